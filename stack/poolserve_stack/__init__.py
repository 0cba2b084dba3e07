"""The host side of the stack: plan the models, start and supervise ``tritonserver``, run the HTTP
adapter beside it. One command line, :mod:`poolserve_stack.cli`."""
