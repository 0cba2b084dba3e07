"""Alibaba's "GTE new" encoder (``NewForSequenceClassification``), run packed.

Checkpoints such as ``Alibaba-NLP/gte-multilingual-reranker-base`` declare ``model_type: "new"``
and point ``auto_map`` at the remote code ``Alibaba-NLP/new-impl`` (``modeling.py``), which
transformers does not ship; vLLM serves them as ``GteNewForSequenceClassification``
(``model_executor/models/bert_with_rope.py``). This module is the project's own implementation of
that architecture, written against the upstream code's semantics and parameter names:

* embeddings: word + token type (when ``type_vocab_size > 0``; missing token types are 0), then
  LayerNorm; no learned positions: rotary embeddings (NeoX layout, ``rope_theta``, optional fixed
  or mixed NTK ``rope_scaling``) are applied to q and k in every layer;
* layers are post-norm: ``attn_ln(x + o_proj(attn(qkv_proj(x))))``, then
  ``mlp_ln(x + down_proj(act(gate) * up))`` where ``up_gate_proj`` (no bias) yields ``[up, gate]``
  and ``act`` is ``hidden_act`` (gelu for the released checkpoints: a GeGLU, vLLM's ``geglu``);
  ``layer_norm_type`` picks LayerNorm or RMSNorm for these two norms;
* attention is bidirectional, scale ``head_dim ** -0.5``, optionally with the log-n query scale
  (``logn_attention_scale``) computed per packed sequence;
* head: ``NewPooler`` (dense + tanh on the first token) then ``classifier``.

The body only runs packed (``bodies=("varlen",)``): one ``[1, T]`` stream whose sequences are kept
apart by ``cu_seq_lens_q`` in :func:`poolserve_runtime.varlen.packed_attention` (FlashAttention varlen
on CUDA, per-sequence SDPA on CPU). ``tests/goldens/gte_new.json`` pins it to logits recorded from
the upstream code.

The same body, without the pooler, serves the embedders (``NewModel``, vLLM's ``GteNewModel``:
``Alibaba-NLP/gte-multilingual-base``): :class:`GteNewEmbeddingFamily`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from poolserve_contract.families import UnsupportedArchitecture, by_name, read_config_dict
from poolserve_runtime.implementations import BertFamily, EmbeddingFamily
from poolserve_runtime.native.packed_rotary import (
    RotaryFrequencies,
    packed_stream,
    rotary_cos_sin,
    rotate_half,
)
from poolserve_runtime.native.weights import load_state
from poolserve_runtime.varlen import packed_attention
from poolserve_runtime.weights import checkpoint_folder

# NewConfig's defaults (Alibaba-NLP/new-impl configuration.py), for keys a config.json leaves out.
NEW_CONFIG_DEFAULTS = {
    "vocab_size": 30528,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.0,
    "max_position_embeddings": 2048,
    "type_vocab_size": 1,
    "initializer_range": 0.02,
    "layer_norm_type": "layer_norm",
    "layer_norm_eps": 1e-12,
    "position_embedding_type": "rope",
    "classifier_dropout": None,
    "pack_qkv": True,
    "unpad_inputs": False,
    "use_memory_efficient_attention": False,
    "logn_attention_scale": False,
    "logn_attention_clip1": False,
}
# transformers 5 rewrites `rope_scaling` / `rope_theta` into its own `rope_parameters` (and drops
# `rope_theta`), so the config keeps them under names of ours.
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def new_config(config_dict: dict):
    """A transformers ``PretrainedConfig`` for a ``model_type: "new"`` config.json dict.

    ``architectures``, ``id2label`` / ``num_labels``, ``pad_token_id`` and the sizes are kept as in
    the file; the rotary settings are stored as ``gte_rope_theta`` and ``gte_rope_scaling``.
    """
    from transformers import PretrainedConfig

    fields = {**NEW_CONFIG_DEFAULTS, **{k: v for k, v in config_dict.items() if k not in _ROPE_KEYS}}
    config = PretrainedConfig.from_dict(fields)
    config.gte_rope_theta = float(config_dict.get("rope_theta", 10000.0))
    config.gte_rope_scaling = config_dict.get("rope_scaling")
    return config


def check_config(config) -> None:
    """Reject the options the upstream code has but vLLM's GteNew does not serve."""
    if config.position_embedding_type not in ("rope", "rotary"):
        raise UnsupportedArchitecture(
            f"GTE-new position_embedding_type {config.position_embedding_type!r} is not served (rope only, as vLLM)")
    if config.layer_norm_type not in ("layer_norm", "rms_norm"):
        raise UnsupportedArchitecture(
            f"GTE-new layer_norm_type {config.layer_norm_type!r} is not layer_norm or rms_norm")
    if config.hidden_size % config.num_attention_heads:
        raise UnsupportedArchitecture("GTE-new hidden_size is not a multiple of num_attention_heads")
    scaling = config.gte_rope_scaling
    if scaling is not None and scaling.get("type", scaling.get("rope_type")) != "ntk":
        raise UnsupportedArchitecture(f"GTE-new rope_scaling {scaling!r} is not the NTK scaling upstream implements")


def rope_inv_freq(config, device: torch.device | None = None) -> torch.Tensor:
    """Rotary inverse frequencies ``[head_dim / 2]`` (float32), as upstream's cos/sin cache uses them.

    Upstream's ``NTKScalingRotaryEmbedding`` builds its cache for ``max_position_embeddings *
    factor`` positions, past the unscaled length, so the NTK frequencies always apply: fixed NTK
    raises the base by ``factor`` and divides by ``factor ** (2 / dim)``; mixed NTK (``mixed_b``)
    divides frequency ``m`` by ``exp(a * m ** b)`` with ``a = log(factor) / (dim / 2) ** b``.
    """
    dim = config.hidden_size // config.num_attention_heads
    base = config.gte_rope_theta
    exponents = torch.arange(0, dim, 2, device=device).float() / dim
    scaling = config.gte_rope_scaling
    if scaling is None:
        return 1.0 / (base ** exponents)
    factor = float(scaling["factor"])
    mixed_b = scaling.get("mixed_b")
    if mixed_b is None:
        return 1.0 / ((base * factor) ** exponents) / factor ** (2 / dim)
    a = torch.tensor(factor).log() / (dim / 2) ** mixed_b
    lambdas = (a * torch.arange(1, dim // 2 + 1, device=device).float() ** mixed_b).exp()
    return 1.0 / (base ** exponents) / lambdas


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def layer_norm(config) -> nn.Module:
    if config.layer_norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GteNewEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.type_vocab_size > 0 else None)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # always LayerNorm upstream

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(embeddings)


class GteNewAttention(nn.Module):
    is_causal = False  # read by packed_attention

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden, cos, sin, query_scale, cu_seqlens, max_length):
        tokens = hidden.shape[1]
        q, k, v = self.qkv_proj(hidden).view(1, tokens, 3, self.num_heads, self.head_dim).unbind(2)  # [1, T, H, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if query_scale is not None:
            q = q * query_scale
        out, _ = packed_attention(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                  scaling=self.scaling, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                                  max_length_q=max_length, max_length_k=max_length)
        return self.o_proj(out.reshape(1, tokens, self.num_heads * self.head_dim))


class GteNewGatedMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.activations import ACT2FN

        self.intermediate_size = config.intermediate_size
        self.up_gate_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.up_gate_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class GteNewLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = GteNewAttention(config)
        self.mlp = GteNewGatedMLP(config)
        self.attn_ln = layer_norm(config)
        self.mlp_ln = layer_norm(config)

    def forward(self, hidden, cos, sin, query_scale, cu_seqlens, max_length):
        hidden = self.attn_ln(hidden + self.attention(hidden, cos, sin, query_scale, cu_seqlens, max_length))
        return self.mlp_ln(hidden + self.mlp(hidden))


class GteNewEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(GteNewLayer(config) for _ in range(config.num_hidden_layers))


class GteNewPooler(nn.Module):
    """Dense + tanh; the engine applies it to the pooled first token (BertFamily.head_features)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(first_token))


@dataclass
class GteNewOutput:
    last_hidden_state: torch.Tensor


class GteNewModel(nn.Module):
    """The packed body: ``input_ids [1, T]`` + ``cu_seq_lens_q`` → ``last_hidden_state [1, T, H]``.
    ``add_pooling_layer`` False: no ``pooler`` (an embedder's ``NewModel``, which upstream builds without one)."""

    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = GteNewEmbeddings(config)
        self.encoder = GteNewEncoder(config)
        self.pooler = GteNewPooler(config) if add_pooling_layer else None
        self.inv_freq = RotaryFrequencies(config, rope_inv_freq)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                max_length_q: int | None = None, max_length_k: int | None = None,
                token_type_ids: torch.Tensor | None = None, use_cache: bool | None = None, **_) -> GteNewOutput:
        cu_seq_lens_q, max_length, position_ids = packed_stream(input_ids, cu_seq_lens_q, max_length_q,
                                                                position_ids, "GTE-new")
        hidden = self.embeddings(input_ids, token_type_ids)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq.on(input_ids.device), hidden.dtype)
        query_scale = self._logn_scale(cu_seq_lens_q, input_ids.shape[1], hidden.dtype)
        for layer in self.encoder.layer:
            hidden = layer(hidden, cos, sin, query_scale, cu_seq_lens_q, max_length)
        return GteNewOutput(last_hidden_state=hidden)

    def _logn_scale(self, cu_seqlens: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Upstream's ``logn_attention_scale``: q times log(length) / log(max_position_embeddings) per sequence."""
        if not self.config.logn_attention_scale:
            return None
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        scale = lengths.float().log() / math.log(self.config.max_position_embeddings)
        if self.config.logn_attention_clip1:
            scale = scale.clamp(min=1)
        return torch.repeat_interleave(scale, lengths, output_size=tokens).to(dtype)[None, :, None, None]


class GteNewForSequenceClassification(nn.Module):
    """``new`` (body + pooler) and ``classifier``, named as the upstream checkpoints' weights."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.new = GteNewModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def set_attn_implementation(self, name: str) -> None:
        """The body always calls poolserve_runtime.varlen.packed_attention itself."""

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                cu_seq_lens_q: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits ``[num_seqs, num_labels]`` of a packed stream (tests and debugging; the engine pools itself)."""
        hidden = self.new(input_ids, token_type_ids=token_type_ids, cu_seq_lens_q=cu_seq_lens_q,
                          **kwargs).last_hidden_state[0]
        starts = (cu_seq_lens_q[:-1].long() if cu_seq_lens_q is not None
                  else torch.zeros(1, dtype=torch.long, device=hidden.device))
        return self.classifier(self.new.pooler(hidden[starts]))


# ----------------------------------------------------------------------------------------------
# Weights

_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def convert_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Upstream names → this module's (the same, except unpacked q/k/v projections are fused)."""
    state = {name: tensor for name, tensor in state.items() if not name.endswith(_IGNORED_SUFFIXES)}
    if not any(name.startswith("new.") for name in state):  # a bare NewModel checkpoint
        state = {(name if name.startswith("classifier.") else f"new.{name}"): t for name, t in state.items()}
    for layer in range(config.num_hidden_layers):
        prefix = f"new.encoder.layer.{layer}.attention."
        for kind in ("weight", "bias"):
            parts = [f"{prefix}{p}_proj.{kind}" for p in "qkv"]
            if all(part in state for part in parts):  # pack_qkv=false checkpoints
                state[f"{prefix}qkv_proj.{kind}"] = torch.cat([state.pop(part) for part in parts])
    return state


def embedder_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The body's weights of a ``NewModel`` checkpoint (bare names, or ``new.``-prefixed ones of a classifier),
    named as :class:`GteNewModel` without a pooler; a pooler and a classifier are left out, as vLLM's
    ``GteNewModel`` leaves them."""
    prefix, skipped = "new.", ("new.pooler.", "classifier.")
    return {name.removeprefix(prefix): tensor for name, tensor in convert_state_dict(state, config).items()
            if not name.startswith(skipped)}


def load_checked(checkpoint: str, dtype: torch.dtype, device: torch.device, build, rename) -> nn.Module:
    """The checkpoint's config checked, ``build(config)`` made on the meta device and given the weights
    ``rename(state, config)`` names as it does (every one of them: strict)."""
    config = new_config(read_config_dict(checkpoint))
    check_config(config)
    state = rename(load_state(checkpoint_folder(checkpoint)), config)
    with torch.device("meta"):
        model = build(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


class GteNewFamily(BertFamily):
    """``NewForSequenceClassification``: CLS pooling, NewPooler (dense + tanh), ``classifier``."""

    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        return new_config(read_config_dict(checkpoint))

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "varlen",
             trust_remote_code: bool = False) -> nn.Module:
        return load_checked(checkpoint, dtype, device, GteNewForSequenceClassification, convert_state_dict)

    def body(self, model: nn.Module) -> nn.Module:
        return model.new

    def head_linear(self, model: nn.Module) -> nn.Linear:
        return model.classifier


FAMILY = GteNewFamily(by_name("gte_new"))


class GteNewEmbeddingFamily(EmbeddingFamily):
    """``NewModel`` / ``GteNewModel`` (gte-multilingual-base): the packed body alone; the engine pools and normalises
    it as the checkpoint's sentence-transformers files say (CLS and Normalize for gte-multilingual-base)."""

    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        return new_config(read_config_dict(checkpoint))

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "varlen",
             trust_remote_code: bool = False) -> nn.Module:
        return load_checked(checkpoint, dtype, device, partial(GteNewModel, add_pooling_layer=False),
                            embedder_state_dict)

    def body(self, model: nn.Module) -> nn.Module:
        return model


EMBEDDING_FAMILY = GteNewEmbeddingFamily(by_name("gte_new_embedding"))
