"""``/v1/models``: protocol and api_router."""
