"""vLLM's ``/rerank`` (and its ``/v1``, ``/v2`` aliases): protocol, serving, api_router."""
