"""Architecture families: how to load a checkpoint, run its body, pool, and apply its head.

Every family runs the stock Hugging Face model: the body (``model.base_model``) produces hidden
states, the runtime pools them per packed sequence (``kernels``), and the checkpoint's own head
weights score the pooled vectors, so scores equal the HF model's. A head is split in two:
``head_features`` (what comes before the last linear layer: BERT's pooler, RoBERTa's dense + tanh;
nothing for decoders) and ``head_linear`` (the last ``nn.Linear``), which the fused score-head
kernel applies together with the activation. Decoders have no features step, so their last-token
gather is fused into that kernel as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json `architectures[0]` values this family serves
    pooling: str  # a kernels.POOLING_METHODS entry
    task: str  # "classify" (logits + scores) or "embed" (embeddings)
    uses_token_types: bool = False
    fused_gather: bool = False  # pooling is a plain gather straight into the last linear layer
    # compile=auto compiles the layers on a GPU for these. Measured (benchmarks/results/
    # engine_compiled_h200.csv): decoders 1.1-2.2x (eager RMSNorm + rotary were half of Qwen3's GPU
    # time); encoders -30% to +6% (their eager layers are already few kernels, and MiniLM-sized
    # layers turn bound by the compiled graphs' per-call CPU cost).
    compile_by_default: bool = False

    def check_architecture(self, config) -> None:
        found = (getattr(config, "architectures", None) or ["<none>"])[0]
        if found not in self.architectures:
            raise ValueError(
                f"checkpoint architecture {found} is not served by the {self.name} family "
                f"(expected one of {', '.join(self.architectures)}); use that architecture's model folder"
            )

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa") -> nn.Module:
        from transformers import AutoModel, AutoModelForSequenceClassification

        auto = AutoModel if self.task == "embed" else AutoModelForSequenceClassification
        model = auto.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attention)
        return model.to(device).eval()

    def position_offset(self, config) -> int:
        """First position id of every sequence (RoBERTa-style models start after padding_idx)."""
        return 0

    def body(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def head_features(self, model: nn.Module, pooled: torch.Tensor) -> torch.Tensor | None:
        """The head up to its last linear layer; None when there is nothing before it."""
        raise NotImplementedError

    def head_linear(self, model: nn.Module) -> nn.Linear:
        raise NotImplementedError


@dataclass(frozen=True)
class BertFamily(Family):
    def head_features(self, model, pooled):
        # BertForSequenceClassification: BertPooler (dense + tanh on CLS); dropout is off in eval.
        pooler = model.bert.pooler
        return pooler.activation(pooler.dense(pooled))

    def head_linear(self, model):
        return model.classifier


@dataclass(frozen=True)
class RobertaFamily(Family):
    def position_offset(self, config) -> int:
        return int(config.pad_token_id) + 1

    def head_features(self, model, pooled):
        # RobertaClassificationHead: dense + tanh on CLS, then out_proj.
        return torch.tanh(model.classifier.dense(pooled))

    def head_linear(self, model):
        return model.classifier.out_proj


@dataclass(frozen=True)
class DecoderFamily(Family):
    fused_gather: bool = True
    compile_by_default: bool = True

    def head_features(self, model, pooled):
        return None

    def head_linear(self, model):
        return model.score


@dataclass(frozen=True)
class EmbeddingFamily(Family):
    def head_features(self, model, pooled):
        return None

    def head_linear(self, model):
        raise TypeError("embedding models have no score head")


BERT = BertFamily(
    name="bert", architectures=("BertForSequenceClassification",), pooling="cls", task="classify",
    uses_token_types=True,
)
XLM_ROBERTA = RobertaFamily(
    name="xlm_roberta",
    architectures=("XLMRobertaForSequenceClassification", "RobertaForSequenceClassification"),
    pooling="cls",
    task="classify",
    uses_token_types=True,
)
QWEN2 = DecoderFamily(name="qwen2", architectures=("Qwen2ForSequenceClassification",), pooling="last", task="classify")
QWEN3 = DecoderFamily(name="qwen3", architectures=("Qwen3ForSequenceClassification",), pooling="last", task="classify")
LLAMA = DecoderFamily(name="llama", architectures=("LlamaForSequenceClassification",), pooling="last", task="classify")
BERT_EMBEDDING = EmbeddingFamily(
    name="bert_embedding", architectures=("BertModel",), pooling="mean_normalized", task="embed",
    uses_token_types=True,
)
