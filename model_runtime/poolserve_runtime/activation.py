"""Which activation turns a classifier's logits into scores, by vLLM's rule.

vLLM (``model_executor/layers/pooler/activations.py::get_act_fn``): ``problem_type`` decides first
(regression: identity; single-label: softmax, or sigmoid for one label; multi-label: sigmoid); then
a sentence-transformers activation declared in the config; otherwise sigmoid for one label and
softmax for several. The activation itself is applied by ``poolserve_kernels.score_head``.
"""

from __future__ import annotations

import enum


class Activation(str, enum.Enum):
    IDENTITY = "identity"
    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"


def _classify_default(num_labels: int) -> Activation:
    return Activation.SIGMOID if num_labels < 2 else Activation.SOFTMAX


def activation_for_config(config) -> Activation:
    """The activation vLLM applies for a HF ``PretrainedConfig``."""
    num_labels = int(getattr(config, "num_labels", 1) or 1)
    problem_type = getattr(config, "problem_type", None)
    if problem_type == "regression":
        return Activation.IDENTITY
    if problem_type == "single_label_classification":
        return _classify_default(num_labels)
    if problem_type == "multi_label_classification":
        return Activation.SIGMOID

    st_config = getattr(config, "sentence_transformers", None) or {}
    declared = st_config.get("activation_fn") if isinstance(st_config, dict) else None
    declared = declared or getattr(config, "sbert_ce_default_activation_function", None)
    if declared:
        if not declared.startswith("torch.nn.modules."):
            raise ValueError(f"unsupported sentence-transformers activation {declared!r}")
        if declared.endswith(".Identity"):
            return Activation.IDENTITY
        if declared.endswith((".Sigmoid", ".Softmax")):
            return _classify_default(num_labels)
        raise ValueError(f"unsupported sentence-transformers activation {declared!r}")
    return _classify_default(num_labels)


def apply_activation(logits, activation: Activation):
    """Scores from fp32 logits ``[n, labels]`` in torch (paths that do not run the fused head kernel)."""
    import torch

    if activation is Activation.SIGMOID:
        return torch.sigmoid(logits)
    if activation is Activation.SOFTMAX:
        return torch.softmax(logits, dim=-1)
    return logits.clone()
