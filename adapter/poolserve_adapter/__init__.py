"""HTTP adapter: vLLM/SGLang JSON APIs in front of the Triton models, over gRPC."""

from importlib.metadata import version

# One version, pyproject.toml's (the package is always installed: `make install`, the images).
__version__ = version("triton-pooling-serve")
