"""LLM rerankers in their original ``*ForCausalLM`` form, loaded as one-label classifiers.

Which conversion a checkpoint gets is the contract's rule (:mod:`poolserve_contract.conversions`,
vLLM's ``as_seq_cls_model``); here the ``score`` layer is built from rows of the checkpoint's
``lm_head``: ``W[true] - W[false]`` for ``from_2_way_softmax``, the rows ``W[t_i]`` for
``no_post_processing``, or the checkpoint's own ``score`` head when no method is named.
"""

from __future__ import annotations

import torch
from torch import nn

# The engine and the benchmarks read the rule through this module (conversion_for, supported_hint).
from poolserve_contract.conversions import FROM_2_WAY_SOFTMAX, Conversion, conversion_for  # noqa: F401
from poolserve_contract.families import UnsupportedArchitecture, supported_hint  # noqa: F401


def token_ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    """Vocabulary ids of the label tokens (vLLM: ``tokenizer.convert_tokens_to_ids``)."""
    ids = []
    for token in tokens:
        index = tokenizer.convert_tokens_to_ids(token)
        if index is None or (index == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise UnsupportedArchitecture(f"classifier_from_token {token!r} is not a token of the checkpoint's vocabulary")
        ids.append(int(index))
    return ids


def load_converted(conversion: Conversion, checkpoint: str, dtype: torch.dtype, device: torch.device,
                   attention: str) -> nn.Module:
    """The causal LM with a ``score`` layer from its ``lm_head`` rows (``lm_head`` itself dropped)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    extra = {"attn_implementation": attention} if attention else {}
    if not conversion.method:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, dtype=dtype, output_loading_info=True, **extra)
        if any(key.startswith("score.") for key in info.get("missing_keys", ())):
            raise UnsupportedArchitecture(
                f"{checkpoint} is a causal LM without a score head; serve it as a reranker with vLLM's overrides, "
                "e.g. hf_overrides='{\"architectures\": [\"Qwen3ForSequenceClassification\"], "
                "\"classifier_from_token\": [\"no\", \"yes\"], \"method\": \"from_2_way_softmax\"}'")
        return model.to(device).eval()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **extra)
    ids = token_ids(AutoTokenizer.from_pretrained(checkpoint), conversion.tokens)
    rows = model.get_output_embeddings().weight.detach().float()[ids]
    weight = rows[1:2] - rows[0:1] if conversion.method == FROM_2_WAY_SOFTMAX else rows
    score = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        score.weight.copy_(weight.to(dtype))
    model.score = score
    model.lm_head = nn.Identity()  # never run (the body's hidden states go to `score`); frees untied weights
    config = model.config
    config.num_labels = conversion.num_labels
    config.id2label = {i: f"LABEL_{i}" for i in range(conversion.num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.problem_type = None
    return model.to(device).eval()
