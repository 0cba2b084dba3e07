"""vLLM's ``/score``: protocol, serving, api_router."""
