"""HTTP adapter: vLLM/SGLang JSON APIs in front of the Triton models, over gRPC."""
