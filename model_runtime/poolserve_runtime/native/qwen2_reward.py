"""Qwen2 outcome reward models (``Qwen2ForRewardModel``: Qwen/Qwen2.5-Math-RM-72B, Qwen2-Math-RM-72B).

Upstream ships them as remote code (``modeling_qwen2_rm.py``): a stock Qwen2 decoder (same weight
names as transformers' ``Qwen2Model``, under ``model.``) and a two-layer value head
``score = Sequential(Linear(h, h), ReLU, Linear(h, num_labels))`` applied to every token. The body
runs as transformers' ``Qwen2Model`` (packed through :mod:`poolserve_runtime.varlen`); the head is
split into ``head_features`` (``relu(score.0(x))``) and ``head_linear`` (``score.2``), so the
pooling is not fused into the head kernel (``fused_gather=False``).

vLLM (``vllm/model_executor/models/qwen2_rm.py``) serves it as an ALL-token pooling model with
``num_labels = 1`` and its ``Qwen2ForRewardModelConfig`` (``vllm/model_executor/models/config.py``)
sets ``pooler_config.use_activation = False``: the outputs are raw rewards. The reward of a sequence
is its last token's row, so this family pools the last token (no pad skipping, as vLLM) and applies
no activation: ``scores == logits``.
"""

from __future__ import annotations

import torch
from torch import nn

from poolserve_contract.families import QWEN2_REWARD_ARCHITECTURE, UnsupportedArchitecture, by_name, read_config_dict
from poolserve_runtime.activation import Activation
from poolserve_runtime.implementations import DecoderFamily
from poolserve_runtime.native.internlm2 import num_labels_of
from poolserve_runtime.native.weights import assign_weights, load_state
from poolserve_runtime.weights import checkpoint_folder, parameters_on_meta

ARCHITECTURE = QWEN2_REWARD_ARCHITECTURE


def qwen2_reward_config(raw: dict):
    """A ``Qwen2Config`` from the config.json dict (``architectures`` kept, one label unless stated)."""
    from transformers import Qwen2Config

    raw = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "torch_dtype", "dtype")}
    num_labels = num_labels_of(raw)
    raw.pop("id2label", None)
    raw.pop("label2id", None)
    raw["num_labels"] = num_labels
    raw.setdefault("architectures", [ARCHITECTURE])
    config = Qwen2Config(**raw)
    if config.problem_type is None:
        config.problem_type = "regression"  # raw rewards (vLLM: use_activation=False)
    return config


class Qwen2RewardModel(nn.Module):
    """``model`` (transformers ``Qwen2Model``) + ``score`` (Linear, ReLU, Linear), upstream names."""

    def __init__(self, config):
        super().__init__()
        from transformers import Qwen2Model

        self.config = config
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                   nn.Linear(config.hidden_size, config.num_labels))

    def set_attn_implementation(self, implementation: str):
        self.model.set_attn_implementation(implementation)

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """Per-token rewards ``[B, L, num_labels]`` (upstream's / vLLM's ALL-token output)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return self.score(hidden.last_hidden_state)


def load_qwen2_reward(checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa"):
    folder = checkpoint_folder(checkpoint)
    config = qwen2_reward_config(read_config_dict(str(folder)))
    config._attn_implementation = attention if attention in ("sdpa", "eager") else "sdpa"
    with parameters_on_meta():
        model = Qwen2RewardModel(config)
    state = {k: v for k, v in load_state(folder).items()
             if not k.startswith("lm_head.") and not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        raise UnsupportedArchitecture(f"{ARCHITECTURE} with tied word embeddings is not expected")
    return assign_weights(model, state, dtype, device)


class Qwen2RewardFamily(DecoderFamily):
    """score.0 + ReLU, then score.2 (the reward) on the last token."""

    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        return qwen2_reward_config(read_config_dict(checkpoint))

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa",
             trust_remote_code: bool = False) -> nn.Module:
        return load_qwen2_reward(checkpoint, dtype, device, attention)

    def build_empty(self, config, dtype: torch.dtype, attention: str = "sdpa") -> nn.Module:
        config._attn_implementation = attention if attention in ("sdpa", "eager") else "sdpa"
        return Qwen2RewardModel(config)  # parameters cast to dtype as they are filled; rotary tables stay fp32

    def activation_for(self, config) -> Activation:
        return Activation.IDENTITY  # vLLM Qwen2ForRewardModelConfig: use_activation = False

    def body(self, model: nn.Module) -> nn.Module:
        return model.model

    def head_features(self, model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        return torch.relu(model.score[0](pooled))

    def head_linear(self, model: nn.Module) -> nn.Linear:
        return model.score[2]


FAMILY = Qwen2RewardFamily(by_name("qwen2_reward"))
