"""bert_classifier: the shared runtime serves it; this file only names the architecture family."""

from model_runtime.families import BERT
from model_runtime.triton_model import PackedTritonModel


class TritonPythonModel(PackedTritonModel):
    family = BERT
