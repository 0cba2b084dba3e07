"""Nomic's BERT with rotary positions (``NomicBertModel``: nomic-embed-text-v1 / v1.5), run packed.

The checkpoints point ``auto_map`` at the remote code ``nomic-ai/nomic-bert-2048``
(``modeling_hf_nomic_bert.py``); vLLM serves them as ``NomicBertModel``
(``model_executor/models/bert_with_rope.py``). This module is the project's own implementation of
that architecture, written against the upstream code's semantics and parameter names:

* embeddings: word (the rows padded to ``pad_vocab_size_multiple``) + token type (when
  ``type_vocab_size > 0``; missing token types are 0), then ``emb_ln``; no learned positions:
  rotary embeddings (NeoX layout, base ``rotary_emb_base``) on the first
  ``head_dim * rotary_emb_fraction`` channels of q and k in every layer;
* layers are post-norm: ``norm1(x + out_proj(attn(Wqkv(x))))``, then ``norm2(x + mlp(x))``, where the
  MLP is SwiGLU ``fc2(fc11(x) * silu(fc12(x)))`` (``activation_function: swiglu``, the released
  checkpoints) or ``fc2(gelu(fc1(x)))`` (``gelu``); the projections carry biases when the config
  says so (the released checkpoints: none);
* attention is bidirectional, scale ``head_dim ** -0.5``.

The config is read by :func:`poolserve_contract.families.nomic_bert_config` (GPT-2 key names).
Options upstream has and vLLM does not serve are refused at load, naming the option
(:func:`check_config`). The body only runs packed (``bodies=("varlen",)``), as the GTE-new body
does (:mod:`poolserve_runtime.native.gte_new`, with which it shares
:mod:`poolserve_runtime.native.packed_rotary`).
``tests/goldens/nomic_bert.json`` pins it to hidden states recorded from the upstream code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from poolserve_contract.families import UnsupportedArchitecture, by_name
from poolserve_runtime.implementations import EmbeddingFamily
from poolserve_runtime.native.packed_rotary import RotaryFrequencies, packed_stream, rotary_cos_sin, rotate_half
from poolserve_runtime.native.weights import load_state
from poolserve_runtime.varlen import packed_attention
from poolserve_runtime.weights import checkpoint_folder

SERVED_ACTIVATIONS = ("swiglu", "gelu")  # vLLM's NomicBertModelConfig asserts these two
GATED_ACTIVATION = "swiglu"


def rotary_dim(config) -> int:
    """Channels of each head that rotate: ``head_dim * rotary_emb_fraction``."""
    return round(config.hidden_size // config.num_attention_heads * float(config.rotary_emb_fraction))


def check_config(config) -> None:
    """Reject the options the upstream code has but vLLM's NomicBertModel does not serve."""
    refusals = {
        "activation_function": (config.activation_function not in SERVED_ACTIVATIONS,
                                f"{config.activation_function!r} is not served (swiglu or gelu, as vLLM)"),
        "mlp_fc1_bias / mlp_fc2_bias / qkv_proj_bias": (
            not config.mlp_fc1_bias == config.mlp_fc2_bias == config.qkv_proj_bias,
            "differ; vLLM serves one bias setting for every projection"),
        "prenorm": (bool(config.prenorm), "true (pre-norm layers) is not served: vLLM runs post-norm layers only"),
        "rotary_emb_fraction": (float(config.rotary_emb_fraction) <= 0,
                                f"{config.rotary_emb_fraction} (learned absolute positions) is not served: "
                                "rotary positions only, as vLLM"),
        "rotary_emb_interleaved": (bool(config.rotary_emb_interleaved),
                                   "true (GPT-J rotary layout) is not served (as vLLM)"),
        "rotary_emb_scale_base": (config.rotary_emb_scale_base is not None,
                                  f"{config.rotary_emb_scale_base} (xPos scaling) is not served (as vLLM)"),
        "rotary_head_dim": (bool(getattr(config, "rotary_head_dim", False)),
                            "true (rotary over the head axis) is not served"),
        "rope_scaling": (getattr(config, "rope_scaling", None) is not None,
                         f"{getattr(config, 'rope_scaling', None)!r} is not served: plain rotary positions only"),
        "moe_every_n_layers": (int(getattr(config, "moe_every_n_layers", 0) or 0) > 0,
                               "> 0 (mixture-of-experts layers, nomic-embed-text-v2-moe) is not served"),
        "norm_mlp": (bool(getattr(config, "norm_mlp", False)),
                     "true (a LayerNorm inside the gated MLP) is not served (vLLM has none)"),
    }
    for option, (refused, why) in refusals.items():
        if refused:
            raise UnsupportedArchitecture(f"NomicBERT {option} {why}")
    if config.hidden_size % config.num_attention_heads:
        raise UnsupportedArchitecture("NomicBERT n_embd is not a multiple of n_head")
    head_dim = config.hidden_size // config.num_attention_heads
    rotating = head_dim * float(config.rotary_emb_fraction)
    if rotating != int(rotating) or int(rotating) % 2 or rotating > head_dim:
        raise UnsupportedArchitecture(f"NomicBERT rotary_emb_fraction {config.rotary_emb_fraction} rotates "
                                      f"{rotating} of {head_dim} channels per head: not an even number of them")


def rope_inv_freq(config, device: torch.device | None = None) -> torch.Tensor:
    """Rotary inverse frequencies ``[rotary_dim / 2]`` (float32), upstream's ``NomicBertRotaryEmbedding``'s."""
    dim = rotary_dim(config)
    return 1.0 / (float(config.rotary_emb_base) ** (torch.arange(0, dim, 2, device=device).float() / dim))


class NomicBertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.type_vocab_size > 0 else None)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return embeddings


class NomicBertAttention(nn.Module):
    is_causal = False  # read by packed_attention

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_dim = rotary_dim(config)
        self.scaling = self.head_dim ** -0.5
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_proj_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_proj_bias)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary positions on the first ``rotary_dim`` channels of each head; the rest pass through."""
        if self.rotary_dim == self.head_dim:
            return x * cos + rotate_half(x) * sin
        rotating, passing = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((rotating * cos + rotate_half(rotating) * sin, passing), dim=-1)

    def forward(self, hidden, cos, sin, cu_seqlens, max_length):
        tokens = hidden.shape[1]
        # upstream: "... (three h d) -> ... three h d"
        q, k, v = self.Wqkv(hidden).view(1, tokens, 3, self.num_heads, self.head_dim).unbind(2)  # [1, T, H, D]
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        out, _ = packed_attention(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                                  scaling=self.scaling, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                                  max_length_q=max_length, max_length_k=max_length)
        return self.out_proj(out.reshape(1, tokens, self.num_heads * self.head_dim))


class NomicBertGatedMLP(nn.Module):
    """SwiGLU: ``fc2(fc11(x) * silu(fc12(x)))``, with fc11 and fc12 stacked in one matmul (``fc11_fc12``)."""

    def __init__(self, config):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.fc11_fc12 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_fc1_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc11_fc12(x).split(self.intermediate_size, dim=-1)
        return self.fc2(value * nn.functional.silu(gate))


class NomicBertMLP(nn.Module):
    """``fc2(gelu(fc1(x)))``, the exact (erf) GELU as upstream's ``F.gelu``."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_fc1_bias)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class NomicBertBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = NomicBertAttention(config)
        self.mlp = NomicBertGatedMLP(config) if config.activation_function == GATED_ACTIVATION else NomicBertMLP(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden, cos, sin, cu_seqlens, max_length):
        hidden = self.norm1(hidden + self.attn(hidden, cos, sin, cu_seqlens, max_length))
        return self.norm2(hidden + self.mlp(hidden))


class NomicBertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(NomicBertBlock(config) for _ in range(config.num_hidden_layers))


@dataclass
class NomicBertOutput:
    last_hidden_state: torch.Tensor


class NomicBertModel(nn.Module):
    """The packed body: ``input_ids [1, T]`` + ``cu_seq_lens_q`` → ``last_hidden_state [1, T, H]``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = NomicBertEmbeddings(config)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = NomicBertEncoder(config)
        self.inv_freq = RotaryFrequencies(config, rope_inv_freq)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                max_length_q: int | None = None, max_length_k: int | None = None,
                token_type_ids: torch.Tensor | None = None, use_cache: bool | None = None, **_) -> NomicBertOutput:
        cu_seq_lens_q, max_length, position_ids = packed_stream(input_ids, cu_seq_lens_q, max_length_q,
                                                                position_ids, "NomicBERT")
        hidden = self.emb_ln(self.embeddings(input_ids, token_type_ids))
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq.on(input_ids.device), hidden.dtype)
        for layer in self.encoder.layers:
            hidden = layer(hidden, cos, sin, cu_seq_lens_q, max_length)
        return NomicBertOutput(last_hidden_state=hidden)


# ----------------------------------------------------------------------------------------------
# Weights

_IGNORED_PREFIXES = ("pooler.",)  # an upstream pooler (add_pooling_layer), which vLLM leaves unloaded too


def convert_state_dict(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Upstream names → this module's (the same, except that a SwiGLU layer's fc11 and fc12 are stacked)."""
    state = {name: tensor for name, tensor in state.items() if not name.startswith(_IGNORED_PREFIXES)}
    if config.activation_function != GATED_ACTIVATION:
        return state
    for layer in range(config.num_hidden_layers):
        prefix = f"encoder.layers.{layer}.mlp."
        for kind in ("weight", "bias"):
            parts = [f"{prefix}fc11.{kind}", f"{prefix}fc12.{kind}"]
            if all(part in state for part in parts):
                state[f"{prefix}fc11_fc12.{kind}"] = torch.cat([state.pop(part) for part in parts])
    return state


class NomicBertFamily(EmbeddingFamily):
    """``NomicBertModel``: the packed body alone; the engine pools and normalises it as the checkpoint's
    sentence-transformers files say (mean and Normalize for nomic-embed-text-v1 / v1.5)."""

    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        return self.checkpoint_config(checkpoint)

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "varlen",
             trust_remote_code: bool = False) -> nn.Module:
        config = self.read_config(checkpoint)
        check_config(config)
        state = convert_state_dict(load_state(checkpoint_folder(checkpoint)), config)
        with torch.device("meta"):
            model = NomicBertModel(config)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval()

    def body(self, model: nn.Module) -> nn.Module:
        return model


FAMILY = NomicBertFamily(by_name("nomic_bert_embedding"))
