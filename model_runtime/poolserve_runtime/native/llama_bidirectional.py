"""NVIDIA's bidirectional Llama rerankers (``LlamaBidirectionalForSequenceClassification``).

nvidia/llama-nemotron-rerank-1b-v2 and nvidia/llama-3.2-nv-rerankqa-1b-v2 ship this architecture as
remote code (``llama_bidirectional_model.py``, ``model_type: llama_bidirec``): a stock Llama body
whose attention layers have ``is_causal = False`` (and a padding-only 4-D mask), the hidden states
pooled by ``config.pooling`` ("avg": the mean over the sequence's tokens, the default; "cls";
"last"), and a bias-free ``score`` linear.

The remote code also divides the logits by ``config.temperature``, but on the transformers it runs
on (4.47: it needs ``LlamaModel._update_causal_mask``, removed later) ``PretrainedConfig.__init__``
resets ``temperature`` to its generation default 1.0 right after ``LlamaBidirectionalConfig`` set
it, so the division is by 1.0 whatever config.json says; vLLM ignores it too. So does this module
(the golden pins it with ``temperature: 2.0`` in its config).

vLLM serves it natively (``vllm/model_executor/models/llama.py``
``LlamaBidirectionalForSequenceClassification = as_seq_cls_model(LlamaForCausalLM)``;
``vllm/model_executor/models/config.py`` ``LlamaBidirectionalConfig.verify_and_update_model_config``):
``hf_config.is_causal = False``, pooling avg/cls/last -> MEAN/CLS/LAST (anything else is an error),
and the default classify activation (sigmoid for its one label).

Here the body is transformers' own ``LlamaModel`` (inside a stock ``LlamaForSequenceClassification``,
whose parameter names are the checkpoint's) with ``is_causal`` turned off on every attention
module. It runs only packed (``bodies=("varlen",)``): :func:`poolserve_runtime.varlen.packed_attention`
reads ``module.is_causal`` and keeps the sequences apart by ``cu_seqlens``, while HF's padded path
would build a causal mask.
"""

from __future__ import annotations

import torch
from torch import nn

from poolserve_contract.families import by_name, llama_config_from_dict, read_config_dict
from poolserve_runtime.implementations import DecoderFamily
from poolserve_runtime.native.weights import load_state
from poolserve_runtime.weights import checkpoint_folder


class NativeLlamaFamily(DecoderFamily):
    """Llama-body architectures upstream ships as remote code: the config from config.json, the
    weights (upstream names = transformers' Llama names) into a stock ``LlamaForSequenceClassification``,
    with ``customize(model, config)`` adding what the architecture changes before the weights load."""

    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        return llama_config_from_dict(read_config_dict(checkpoint))

    def customize(self, model: nn.Module, config) -> None:
        """Modules the architecture adds or changes, before its weights are loaded."""

    def load_llama(self, checkpoint: str, attention: str = "") -> nn.Module:
        from transformers import LlamaForSequenceClassification

        config = self.read_config(checkpoint)
        self.check_architecture(config)
        if attention:
            config._attn_implementation = attention
        model = LlamaForSequenceClassification(config)
        self.customize(model, config)
        model.load_state_dict(load_state(checkpoint_folder(checkpoint)), strict=True)
        return model


class LlamaBidirectionalFamily(NativeLlamaFamily):
    """A stock Llama with every attention layer's ``is_causal`` off."""

    def customize(self, model: nn.Module, config) -> None:
        self.pooling_for(config)  # fail at load on a pooling we do not serve

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa",
             trust_remote_code: bool = False) -> nn.Module:
        model = self.load_llama(checkpoint)
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
        return model.to(device=device, dtype=dtype).eval()

    def head_linear(self, model: nn.Module) -> nn.Linear:
        return model.score


FAMILY = LlamaBidirectionalFamily(by_name("llama_bidirectional"))
