"""What tests and benchmarks both start or build: tiny random-weight checkpoints (``tiny_models``,
``tiny_vision``), the real stack on loopback and the memory of its processes (``stack``), and a
throwaway HTTP server (``loopback``). Pytest fixtures stay in the conftest files, thin wrappers
around these; benchmarks import them from the project root (``python -m poolserve_bench.<name>``).
"""
