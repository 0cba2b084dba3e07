"""vLLM's ``/pooling``: protocol, serving, api_router."""
