"""Architecture families: how to load a checkpoint, run its body, pool, and apply its head.

Every family runs the stock Hugging Face model: the body (``model.base_model``) produces hidden
states, the runtime pools them per packed sequence (``kernels``), and the family applies the
checkpoint's own head to the pooled vectors, so scores equal the HF model's.
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

    def check_architecture(self, config) -> None:
        found = (getattr(config, "architectures", None) or ["<none>"])[0]
        if found not in self.architectures:
            raise ValueError(
                f"checkpoint architecture {found} is not served by the {self.name} family "
                f"(expected one of {', '.join(self.architectures)}); use that architecture's model folder"
            )

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from transformers import AutoModel, AutoModelForSequenceClassification

        auto = AutoModel if self.task == "embed" else AutoModelForSequenceClassification
        model = auto.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval()

    def body(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def head(self, model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class BertFamily(Family):
    def head(self, model, pooled):
        # BertForSequenceClassification: BertPooler (dense + tanh on CLS), then the classifier.
        pooler = model.bert.pooler
        return model.classifier(pooler.activation(pooler.dense(pooled)))


@dataclass(frozen=True)
class RobertaFamily(Family):
    def head(self, model, pooled):
        # RobertaClassificationHead reads features[:, 0]: hand it the pooled CLS as a 1-token row.
        return model.classifier(pooled.unsqueeze(1))


@dataclass(frozen=True)
class DecoderFamily(Family):
    def head(self, model, pooled):
        return model.score(pooled)


@dataclass(frozen=True)
class EmbeddingFamily(Family):
    def head(self, model, pooled):
        return pooled


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
