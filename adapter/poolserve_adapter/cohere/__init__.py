"""Cohere's ``/v2/embed`` as vLLM serves it: protocol, serving, api_router."""
