"""vLLM's ``/tokenize`` and ``/detokenize``: protocol, serving, api_router."""
