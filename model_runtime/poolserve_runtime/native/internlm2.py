"""InternLM2 reward models (``InternLM2ForRewardModel``: internlm/internlm2-1_8b-reward, -7b-, -20b-).

Upstream ships them as remote code (``modeling_internlm2.py`` in the hub repos). The body is a
Llama decoder under other names, so it runs as a stock transformers ``LlamaModel`` (packed
through :mod:`poolserve_runtime.varlen` like every other decoder) with the weights renamed at load:

=====================================  ============================================
upstream                               LlamaForSequenceClassification
=====================================  ============================================
``model.tok_embeddings``               ``model.embed_tokens``
``model.layers.N.attention.wqkv``      ``self_attn.q_proj`` / ``k_proj`` / ``v_proj``
``model.layers.N.attention.wo``        ``self_attn.o_proj``
``feed_forward.w1`` / ``w3`` / ``w2``  ``mlp.gate_proj`` / ``up_proj`` / ``down_proj``
``attention_norm`` / ``ffn_norm``      ``input_layernorm`` / ``post_attention_layernorm``
``model.norm``                         ``model.norm``
``v_head`` (hidden -> 1, no bias)      ``score``
=====================================  ============================================

``wqkv`` is fused per key/value head: its rows are ``[kv_heads, groups + 2, head_dim]`` (the
``groups = heads / kv_heads`` query heads of a group, then that group's key, then its value;
upstream splits it with ``rearrange('b q (h gs d) -> b q h gs d')``), so it is split per group,
not in three contiguous blocks.

Scoring: upstream's ``forward`` scores the *last* token (``v_head(hidden)[:, -1]``, asserting it
is ``reward_token_id``, which ``get_score`` appends after the chat template); there is no
pad-skipping, so this family pools the last token of each sequence as given (the client appends
the reward token, as with upstream). ``logits`` is that raw reward. vLLM serves the architecture as
a token-classification pooling model (``@default_pooling_type(tok_pooling_type="ALL")`` and
``pooler_for_token_classify`` in ``vllm/model_executor/models/internlm2.py``) whose default
activation is ``PoolerClassify`` (sigmoid for one label) with ``use_activation`` defaulting to true
(``vllm/pooling_params.py``); no ``MODELS_CONFIG_MAP`` entry turns it off for this architecture, so
``scores`` is ``sigmoid(reward)``, the value of vLLM's last-token row.
"""

from __future__ import annotations

import torch
from torch import nn

from poolserve_contract.families import (
    INTERNLM2_REWARD_ARCHITECTURE,
    UnsupportedArchitecture,
    by_name,
    read_config_dict,
)
from poolserve_runtime.activation import Activation
from poolserve_runtime.implementations import DecoderFamily
from poolserve_runtime.native.weights import assign_weights, load_state
from poolserve_runtime.weights import checkpoint_folder, parameters_on_meta

ARCHITECTURE = INTERNLM2_REWARD_ARCHITECTURE


# ----------------------------------------------------------------------------------------------
# Helpers shared by the native decoder families (qwen2_reward imports them)


def num_labels_of(raw: dict, default: int = 1) -> int:
    if raw.get("num_labels"):
        return int(raw["num_labels"])
    if raw.get("id2label"):
        return len(raw["id2label"])
    return default


def rope_parameters_of(raw: dict) -> dict:
    """transformers' ``rope_parameters`` from a config.json's ``rope_theta`` / ``rope_scaling``."""
    rope = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))}
    scaling = raw.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in ("dynamic", "linear"):
            raise UnsupportedArchitecture(f"rope_scaling type {kind!r} is not supported (dynamic, linear)")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    return rope


# ----------------------------------------------------------------------------------------------
# InternLM2


def internlm2_config(raw: dict):
    """A ``LlamaConfig`` equivalent to an InternLM2 config.json (InternLM2Config's defaults)."""
    from transformers import LlamaConfig

    heads = int(raw["num_attention_heads"])
    config = LlamaConfig(
        vocab_size=int(raw.get("vocab_size", 103168)),
        hidden_size=int(raw.get("hidden_size", 4096)),
        intermediate_size=int(raw.get("intermediate_size", 11008)),
        num_hidden_layers=int(raw.get("num_hidden_layers", 32)),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        hidden_act=raw.get("hidden_act", "silu"),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        pad_token_id=raw.get("pad_token_id", 0),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2),
        tie_word_embeddings=False,
        rope_parameters=rope_parameters_of(raw),
        attention_bias=bool(raw.get("bias", True)),  # InternLM2Config defaults bias=True
        mlp_bias=False,
        architectures=list(raw.get("architectures") or [ARCHITECTURE]),
        num_labels=num_labels_of(raw),
    )
    if config.num_labels != 1:
        raise UnsupportedArchitecture(f"{ARCHITECTURE} has a one-output v_head, config says {config.num_labels} labels")
    config.reward_token_id = raw.get("reward_token_id")
    config.problem_type = raw.get("problem_type")
    return config


def split_wqkv(weight: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """Upstream's fused ``wqkv`` (rows ``[kv_heads, groups + 2, head_dim]``) -> q, k, v rows."""
    groups = heads // kv_heads
    grouped = weight.reshape(kv_heads, groups + 2, head_dim, *weight.shape[1:])
    q = grouped[:, :groups].reshape(heads * head_dim, *weight.shape[1:])
    k = grouped[:, groups].reshape(kv_heads * head_dim, *weight.shape[1:])
    v = grouped[:, groups + 1].reshape(kv_heads * head_dim, *weight.shape[1:])
    return q, k, v


_RENAMES = {
    "attention.wo.": "self_attn.o_proj.",
    "feed_forward.w1.": "mlp.gate_proj.",
    "feed_forward.w3.": "mlp.up_proj.",
    "feed_forward.w2.": "mlp.down_proj.",
    "attention_norm.": "input_layernorm.",
    "ffn_norm.": "post_attention_layernorm.",
}


def internlm2_to_llama(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("output.") or name.endswith("rotary_emb.inv_freq"):
            continue  # an LM head some exports keep; a buffer
        if name == "v_head.weight":
            converted["score.weight"] = tensor
            continue
        if name == "model.tok_embeddings.weight":
            converted["model.embed_tokens.weight"] = tensor
            continue
        if ".attention.wqkv." in name:
            prefix, kind = name.split(".attention.wqkv.")
            q, k, v = split_wqkv(tensor, heads, kv_heads, head_dim)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                converted[f"{prefix}.self_attn.{proj}.{kind}"] = part.contiguous()
            continue
        for old, new in _RENAMES.items():
            if f".{old}" in name:
                name = name.replace(f".{old}", f".{new}")
                break
        converted[name] = tensor
    return converted


def load_internlm2_reward(checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa"):
    from transformers import LlamaForSequenceClassification

    folder = checkpoint_folder(checkpoint)
    config = internlm2_config(read_config_dict(str(folder)))
    config._attn_implementation = attention if attention in ("sdpa", "eager") else "sdpa"
    with parameters_on_meta():
        model = LlamaForSequenceClassification(config)
    return assign_weights(model, internlm2_to_llama(load_state(folder), config), dtype, device)


class InternLM2RewardFamily(DecoderFamily):
    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        return internlm2_config(read_config_dict(checkpoint))

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa",
             trust_remote_code: bool = False) -> nn.Module:
        return load_internlm2_reward(checkpoint, dtype, device, attention)

    def activation_for(self, config) -> Activation:
        # vLLM: pooler_for_token_classify -> PoolerClassify (one label: sigmoid), use_activation=True.
        return Activation.SIGMOID

    def body(self, model: nn.Module) -> nn.Module:
        return model.model

    def head_linear(self, model: nn.Module) -> nn.Linear:
        return model.score  # the v_head


FAMILY = InternLM2RewardFamily(by_name("internlm2_reward"))
