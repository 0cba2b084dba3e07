"""qwen2_classifier: the shared runtime serves it; this file only names the architecture family."""

from model_runtime.families import QWEN2
from model_runtime.triton_model import PackedTritonModel


class TritonPythonModel(PackedTritonModel):
    family = QWEN2
