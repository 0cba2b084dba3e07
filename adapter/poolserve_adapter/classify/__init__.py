"""vLLM's ``/classify`` forms: protocol and serving (the path itself is in ``shared_paths/classify.py``)."""
