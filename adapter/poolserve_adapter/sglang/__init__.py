"""SGLang's APIs: ``/v1/classify``, its rerank, its native ``/classify`` body, ``/v1/tokenize``, ``/v1/detokenize``."""
