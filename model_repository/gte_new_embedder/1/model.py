"""gte_new_embedder: the shared runtime serves it; this file only names the architecture family."""

from poolserve_runtime.families import by_name
from poolserve_runtime.triton_model import PackedTritonModel


class TritonPythonModel(PackedTritonModel):
    family = by_name("gte_new_embedding")
