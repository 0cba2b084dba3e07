"""vLLM's OpenAI-compatible ``/v1/embeddings``: protocol, serving, api_router."""
