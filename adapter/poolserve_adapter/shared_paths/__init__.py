"""Paths that several slices answer, told apart by the body's shape: ``/classify`` (vLLM's classify or
SGLang's native reward API) and ``/invocations`` (SageMaker: classify, score, rerank or pooling)."""
