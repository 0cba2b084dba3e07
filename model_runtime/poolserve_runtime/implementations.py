"""How a declared family runs on torch: load the checkpoint, run its body, apply its head.

Every family runs the stock Hugging Face model where transformers has one (or our own module for
architectures that upstream ships only as remote code, :mod:`poolserve_runtime.native`): the body
produces hidden states, the runtime pools them per packed sequence (``kernels``), and the
checkpoint's own head weights score the pooled vectors, so scores equal the reference model's. A
head is split in two: ``head_features`` (what comes before the last linear layer: BERT's pooler,
RoBERTa's dense + tanh, ModernBERT's dense + activation + norm; nothing for decoders) and
``head_linear`` (the last ``nn.Linear``), which the fused score-head kernel applies together with
the activation. Decoders have no features step, so their last-token gather is fused into that
kernel as well.

What a family serves and how it reads a config (task, pooling, bodies, labels, ...) is its torch-free
declaration (:mod:`poolserve_contract.families`); an implementation wraps one declaration and answers
for it, so ``family.task`` or ``family.pooling_for(config)`` read the declaration. The table that
pairs every declaration with its implementation is :mod:`poolserve_runtime.families`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from poolserve_contract.families import FamilyDeclaration, UnsupportedArchitecture
from poolserve_contract.late_interaction import find_projection
from poolserve_runtime.activation import Activation, activation_for_config
from poolserve_runtime.weights import WeightLoadError, WeightPlan, build_streamed


class Family:
    """The torch side of one declared family; the declaration's fields and rules are read through it."""

    def __init__(self, declaration: FamilyDeclaration):
        self.declaration = declaration

    def __getattr__(self, name: str):
        if name == "declaration":  # not set yet (an instance being copied or unpickled)
            raise AttributeError(name)
        return getattr(self.declaration, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.declaration.name!r})"

    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)

    def auto_class(self):
        """The transformers auto class the stock families load their checkpoints with."""
        from transformers import AutoModel, AutoModelForSequenceClassification

        return AutoModel if self.task in ("embed", "token_embed") else AutoModelForSequenceClassification

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa",
             trust_remote_code: bool = False) -> nn.Module:
        extra = {"attn_implementation": attention} if attention else {}
        model = self.auto_class().from_pretrained(checkpoint, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
        return model.to(device).eval()

    def build_empty(self, config, dtype: torch.dtype, attention: str = "sdpa") -> nn.Module:
        """The model of ``config`` as :meth:`load` builds it, called under
        :func:`~poolserve_runtime.weights.parameters_on_meta` by :meth:`load_streamed`. A family that loads its
        checkpoint its own way overrides this, or serves neither FP8 checkpoints nor dummy weights."""
        if type(self).load is not Family.load:
            raise WeightLoadError(
                f"the {self.name} family loads its checkpoint its own way; FP8 checkpoints and load_format=dummy are "
                "served by the families that load through transformers' auto classes and by the Qwen2 reward "
                "models (quantization=fp8 on a checkpoint of bf16 or fp32 weights works here)")
        extra = {"attn_implementation": attention} if attention else {}
        return self.auto_class().from_config(config, dtype=dtype, **extra)

    def load_streamed(self, checkpoint: str, config, plan: WeightPlan, dtype: torch.dtype, device: torch.device,
                      attention: str = "sdpa") -> nn.Module:
        """The model of ``config`` filled tensor by tensor as ``plan`` says (an FP8 checkpoint, dummy weights:
        :func:`poolserve_runtime.weights.build_streamed`)."""
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # the FP8 layers are built here, not by a transformers quantizer
        return build_streamed(lambda: self.build_empty(config, dtype, attention), config, plan, checkpoint, dtype,
                              device)

    def activation_for(self, config) -> Activation:
        return activation_for_config(config) if self.task == "classify" else Activation.IDENTITY

    def body(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def head_features(self, model: nn.Module, pooled: torch.Tensor) -> torch.Tensor | None:
        """The head up to its last linear layer; None when there is nothing before it."""
        return None

    def head_linear(self, model: nn.Module) -> nn.Linear:
        raise NotImplementedError


class BertFamily(Family):
    """BERT-style heads: a pooler (dense + tanh on CLS), then ``classifier``."""

    def head_features(self, model, pooled):
        pooler = self.body(model).pooler  # dropout is off in eval
        return pooler.activation(pooler.dense(pooled))

    def head_linear(self, model):
        return model.classifier


class RobertaFamily(Family):
    def head_features(self, model, pooled):
        # RobertaClassificationHead: dense + tanh on CLS, then out_proj.
        return torch.tanh(model.classifier.dense(pooled))

    def head_linear(self, model):
        return model.classifier.out_proj


class DistilBertFamily(Family):
    def head_features(self, model, pooled):
        # DistilBertForSequenceClassification: pre_classifier + ReLU on the first token.
        return torch.relu(model.pre_classifier(pooled))

    def head_linear(self, model):
        return model.classifier


class DebertaV2Family(Family):
    def head_features(self, model, pooled):
        # ContextPooler: dense + the config's pooler_hidden_act on the first token.
        from transformers.activations import ACT2FN

        return ACT2FN[model.config.pooler_hidden_act](model.pooler.dense(pooled))

    def head_linear(self, model):
        return model.classifier


class ModernBertFamily(Family):
    def head_features(self, model, pooled):
        return model.head(pooled)  # ModernBertPredictionHead: dense + activation + LayerNorm

    def head_linear(self, model):
        return model.classifier


class DecoderFamily(Family):
    def head_linear(self, model):
        return model.score


class EmbeddingFamily(Family):
    def head_linear(self, model):
        raise TypeError("embedding models have no score head")


class LateInteractionFamily(Family):
    """ColBERT: the base model (``AutoModel``: BertModel) and the checkpoint's token projection, which
    transformers does not know and leaves unloaded; it is loaded here as ``model.colbert_linear``."""

    def load(self, checkpoint, dtype, device, attention="sdpa", trust_remote_code=False):
        from safetensors import safe_open

        model = super().load(checkpoint, dtype, device, attention, trust_remote_code)
        projection = find_projection(checkpoint)
        if projection.hidden_size != model.config.hidden_size:
            raise UnsupportedArchitecture(f"{checkpoint}: the ColBERT projection {projection.tensor} reads "
                                          f"{projection.hidden_size} features, the body's hidden size is "
                                          f"{model.config.hidden_size}")
        with safe_open(projection.file, framework="pt") as weights:
            weight = weights.get_tensor(projection.tensor)
        model.colbert_linear = nn.Linear(projection.hidden_size, projection.dim, bias=False)
        model.colbert_linear.weight.data.copy_(weight)
        return model.to(device=device, dtype=dtype).eval()

    def token_head(self, model: nn.Module) -> nn.Linear:
        """The linear layer every token's last hidden state goes through."""
        return model.colbert_linear

    def head_linear(self, model):
        raise TypeError("late-interaction models have no score head")


class TokenClassifierFamily(Family):
    """``*ForTokenClassification``: the stock model, whose ``classifier`` reads every token's last hidden state
    (its dropout before it is off in eval, so the engine leaves it out)."""

    def load(self, checkpoint, dtype, device, attention="sdpa", trust_remote_code=False):
        from transformers import AutoModelForTokenClassification

        extra = {"attn_implementation": attention} if attention else {}
        model = AutoModelForTokenClassification.from_pretrained(checkpoint, dtype=dtype,
                                                                trust_remote_code=trust_remote_code, **extra)
        return model.to(device).eval()

    def token_head(self, model: nn.Module) -> nn.Module:
        """What turns every token's last hidden state into its logits."""
        return model.classifier

    def head_linear(self, model):
        raise TypeError("token classifiers have no sequence score head")


class ModernBertTokenClassifierFamily(TokenClassifierFamily):
    def token_head(self, model):
        # ModernBertForTokenClassification: ModernBertPredictionHead (dense + activation + LayerNorm), then classifier.
        return nn.Sequential(model.head, model.classifier)


class BgeM3Family(EmbeddingFamily):
    """BGE-M3 (vLLM's ``BgeM3EmbeddingModel``): the ``XLMRobertaModel`` body and FlagEmbedding's two heads, which
    the checkpoint keeps beside it as ``torch.save(linear.state_dict())`` files: ``sparse_linear.pt``
    (``Linear(hidden, 1)``, every token's lexical weight before its relu) and ``colbert_linear.pt``
    (``Linear(hidden, dim)``, every token's ColBERT vector before its normalisation); loaded here as
    ``model.sparse_linear`` and ``model.colbert_linear``."""

    HEAD_FILES = ("sparse_linear", "colbert_linear")

    def load(self, checkpoint, dtype, device, attention="sdpa", trust_remote_code=False):
        model = super().load(checkpoint, dtype, device, attention, trust_remote_code)
        for head in self.HEAD_FILES:
            state = torch.load(bge_m3_head_file(checkpoint, head), map_location="cpu", weights_only=True)
            out_features, in_features = state["weight"].shape
            if in_features != model.config.hidden_size:
                raise UnsupportedArchitecture(f"{checkpoint}: {head}.pt reads {in_features} features, the body's "
                                              f"hidden size is {model.config.hidden_size}")
            linear = nn.Linear(in_features, out_features, bias="bias" in state)
            linear.load_state_dict(state)
            setattr(model, head, linear)
        return model.to(device=device, dtype=dtype).eval()

    def token_outputs(self, model: nn.Module, hidden: torch.Tensor,
                      wanted: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
        """Of every token, those of these ``wanted`` (None: all): its ColBERT vector L2-normalised in float32
        (``token_embeddings``) and not (``token_projected``: ``use_activation`` false), and its lexical weight
        before the relu, float32 ``[tokens, 1]`` (``token_logits``)."""
        wanted = frozenset(("token_embeddings", "token_projected", "token_logits")) if wanted is None else wanted
        outputs = {}
        if wanted & {"token_embeddings", "token_projected"}:
            projected = model.colbert_linear(hidden).float()
            outputs["token_projected"] = projected
            outputs["token_embeddings"] = F.normalize(projected, p=2.0, dim=-1)
        if "token_logits" in wanted:
            outputs["token_logits"] = model.sparse_linear(hidden).float()
        return {name: tensor for name, tensor in outputs.items() if name in wanted}


def bge_m3_head_file(checkpoint: str, head: str) -> str:
    """The path of ``{head}.pt`` beside the checkpoint (a local folder, or a hub id: downloaded to the cache)."""
    from pathlib import Path

    local = Path(checkpoint)
    if local.is_dir():
        path = local / f"{head}.pt"
        if not path.is_file():
            raise UnsupportedArchitecture(f"{checkpoint}: BgeM3EmbeddingModel needs {head}.pt beside the checkpoint")
        return str(path)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(checkpoint, f"{head}.pt")


class SpladeFamily(Family):
    """SPLADE (vLLM's ``BertSpladeSparseEmbeddingModel``): a ``BertForMaskedLM`` checkpoint whose MLM head
    (``cls.predictions``: dense + activation + LayerNorm, then the decoder over the vocabulary) turns every kept
    token into vocabulary logits, reduced to one vector per sequence by :meth:`sparse_vectors`."""

    # Rows of MLM logits computed at once: [rows, vocab_size] float32 stays near 256 MiB for BERT's 30,522 ids.
    LOGIT_ELEMENTS_PER_STEP = 1 << 26

    def load(self, checkpoint, dtype, device, attention="sdpa", trust_remote_code=False):
        from transformers import AutoModelForMaskedLM

        extra = {"attn_implementation": attention} if attention else {}
        model = AutoModelForMaskedLM.from_pretrained(checkpoint, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **extra)
        return model.to(device).eval()

    def token_head(self, model: nn.Module) -> nn.Module:
        """Every token's last hidden state to its vocabulary logits (vLLM's BertMLMHead loads these weights)."""
        return model.cls

    def head_linear(self, model):
        raise TypeError("sparse embedders have no score head")

    def sparse_vectors(self, model: nn.Module, hidden: torch.Tensor, host_ids: torch.Tensor,
                       host_cu: torch.Tensor) -> torch.Tensor:
        """``[num_seqs, vocab_size]`` float32 on ``hidden``'s device, for the packed sequences whose token ids are
        ``host_ids`` (host) split by ``host_cu``.

        vLLM's rule exactly (``vllm/model_executor/models/bert.py``: ``SPLADESparsePooler.forward`` with
        ``pooling="max"``, ``remove_cls_sep=True``, and the ids ``BertSpladeSparseEmbeddingModel._build_pooler``
        reads from the HF config with ``getattr(cfg, "cls_token_id" / "sep_token_id", None)``): a sequence's
        first token is dropped when it is the CLS id and its last when it is the SEP id (an id the config lacks
        drops nothing); the rest go through the MLM head, then ``log1p(relu(logits))``, then the max over those
        tokens; nothing left gives a zero vector. Here the logits are taken to float32 before ``relu`` and
        ``log1p`` (vLLM applies them in the model's dtype: the same numbers in float32), and the max is a
        scatter-amax into zeros, which equals it because every value is >= 0. vLLM's head applies exact GELU
        where transformers' applies ``config.hidden_act`` (``gelu``, the same, in BERT checkpoints)."""
        config = model.config
        cls_id, sep_id = getattr(config, "cls_token_id", None), getattr(config, "sep_token_id", None)
        starts, ends = host_cu[:-1].long(), host_cu[1:].long()
        first = starts + (host_ids[starts] == cls_id).long() if cls_id is not None else starts
        last = ends - (host_ids[ends - 1] == sep_id).long() if sep_id is not None else ends
        last = torch.maximum(first, last)
        owner = torch.repeat_interleave(torch.arange(starts.numel()), ends - starts)
        positions = torch.arange(host_ids.numel())
        kept = (positions >= first[owner]) & (positions < last[owner])
        rows, owners = positions[kept].to(hidden.device), owner[kept].to(hidden.device)
        head = self.token_head(model)
        vectors = torch.zeros(starts.numel(), int(config.vocab_size), device=hidden.device, dtype=torch.float32)
        step = max(1, self.LOGIT_ELEMENTS_PER_STEP // int(config.vocab_size))
        for begin in range(0, rows.numel(), step):
            scores = torch.log1p(torch.relu(head(hidden.index_select(0, rows[begin:begin + step])).float()))
            vectors.scatter_reduce_(0, owners[begin:begin + step, None].expand_as(scores), scores, "amax")
        return vectors


class GenericFamily(Family):
    """Any other ``*ForSequenceClassification``: the model's own padded forward and head (the slow path)."""
