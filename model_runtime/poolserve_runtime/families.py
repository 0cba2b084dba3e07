"""Architecture families: how to load a checkpoint, run its body, pool, and apply its head.

Every family runs the stock Hugging Face model where transformers has one (or our own module for
architectures that upstream ships only as remote code, :mod:`poolserve_runtime.native`): the body
produces hidden states, the runtime pools them per packed sequence (``kernels``), and the
checkpoint's own head weights score the pooled vectors, so scores equal the reference model's. A
head is split in two: ``head_features`` (what comes before the last linear layer: BERT's pooler,
RoBERTa's dense + tanh, ModernBERT's dense + activation + norm; nothing for decoders) and
``head_linear`` (the last ``nn.Linear``), which the fused score-head kernel applies together with
the activation. Decoders have no features step, so their last-token gather is fused into that
kernel as well.

A family is a declarative entry of :data:`FAMILIES`; :func:`family_for_checkpoint` picks one from a
checkpoint's ``config.json`` (``architectures[0]``, then ``auto_map``), so a user names a
checkpoint, not a model folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from poolserve_runtime.activation import Activation, activation_for_config

BODIES = ("varlen", "padded")
GENERATIVE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration")


class UnsupportedArchitecture(ValueError):
    """No family serves this checkpoint (or not the one the user chose)."""


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json `architectures[0]` values this family serves
    task: str = "classify"  # "classify" (logits + scores) or "embed" (embeddings)
    pooling: str = "cls"  # a kernels.POOLING_METHODS entry (pooling_for may read it from the config)
    uses_token_types: bool = False
    fused_gather: bool = False  # pooling is a plain gather straight into the last linear layer
    # compile=auto compiles the layers on a GPU for these. Measured (benchmarks/results/
    # engine_compiled_h200.csv): decoders 1.1-2.2x (eager RMSNorm + rotary were half of Qwen3's GPU
    # time); encoders -30% to +6% (their eager layers are already few kernels, and MiniLM-sized
    # layers turn bound by the compiled graphs' per-call CPU cost).
    compile_by_default: bool = False
    # Which bodies the architecture can run: "varlen" (one packed stream) and/or "padded" (HF's
    # padded forward). A family without "varlen" says why in padded_reason (logged at load).
    bodies: tuple[str, ...] = BODIES
    padded_reason: str = ""
    padded_attention: str = "sdpa"  # attn_implementation of the padded body ("": the model's default)
    # Decoders: pool the last token that is not the pad token, as HF's *ForSequenceClassification
    # does (a sequence ending in pad ids, e.g. pad = eos, is pooled before them).
    skips_trailing_pad: bool = False
    caches_kv: bool = False  # the body builds a KV cache unless called with use_cache=False
    causal: bool = False  # causal attention: documents sharing a prompt prefix may reuse it
    vision: bool = False  # reads pixel inputs besides token ids (model_runtime/poolserve_runtime/vision.py)
    example: str = ""  # a checkpoint of this architecture (README table, error messages)
    folder: str = ""  # its model_repository folder

    @property
    def packed(self) -> bool:
        return "varlen" in self.bodies

    def check_architecture(self, config) -> None:
        found = architecture_of(config)
        if found not in self.architectures:
            raise UnsupportedArchitecture(
                f"checkpoint architecture {found} is not served by the {self.name} family "
                f"(expected one of {', '.join(self.architectures)}); {supported_hint(found)}"
            )

    @staticmethod
    def architecture_is_causal_lm(config: dict) -> bool:
        """A generative checkpoint (text ``*ForCausalLM`` or multimodal ``*ForConditionalGeneration``)."""
        return architecture_of(config).endswith(GENERATIVE_SUFFIXES)

    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa",
             trust_remote_code: bool = False) -> nn.Module:
        from transformers import AutoModel, AutoModelForSequenceClassification

        auto = AutoModel if self.task == "embed" else AutoModelForSequenceClassification
        extra = {"attn_implementation": attention} if attention else {}
        model = auto.from_pretrained(checkpoint, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
        return model.to(device).eval()

    def pooling_for(self, config) -> str:
        return self.pooling

    def activation_for(self, config) -> Activation:
        return activation_for_config(config) if self.task == "classify" else Activation.IDENTITY

    def output_labels(self, config) -> int:
        """Width of ``logits`` / ``scores``: the config's num_labels unless the head reduces it."""
        return int(getattr(config, "num_labels", 1) or 1)

    def position_offset(self, config) -> int:
        """First position id of every sequence (RoBERTa-style models start after padding_idx)."""
        return 0

    def body(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def head_features(self, model: nn.Module, pooled: torch.Tensor) -> torch.Tensor | None:
        """The head up to its last linear layer; None when there is nothing before it."""
        return None

    def head_linear(self, model: nn.Module) -> nn.Linear:
        raise NotImplementedError


@dataclass(frozen=True)
class BertFamily(Family):
    """BERT-style heads: a pooler (dense + tanh on CLS), then ``classifier``."""

    def head_features(self, model, pooled):
        pooler = self.body(model).pooler  # dropout is off in eval
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
class DistilBertFamily(Family):
    def head_features(self, model, pooled):
        # DistilBertForSequenceClassification: pre_classifier + ReLU on the first token.
        return torch.relu(model.pre_classifier(pooled))

    def head_linear(self, model):
        return model.classifier


@dataclass(frozen=True)
class DebertaV2Family(Family):
    def head_features(self, model, pooled):
        # ContextPooler: dense + the config's pooler_hidden_act on the first token.
        from transformers.activations import ACT2FN

        return ACT2FN[model.config.pooler_hidden_act](model.pooler.dense(pooled))

    def head_linear(self, model):
        return model.classifier


@dataclass(frozen=True)
class ModernBertFamily(Family):
    def pooling_for(self, config) -> str:
        pooling = getattr(config, "classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise UnsupportedArchitecture(f"ModernBERT classifier_pooling {pooling!r} is not cls or mean")
        return pooling

    def head_features(self, model, pooled):
        return model.head(pooled)  # ModernBertPredictionHead: dense + activation + LayerNorm

    def head_linear(self, model):
        return model.classifier


@dataclass(frozen=True)
class DecoderFamily(Family):
    pooling: str = "last"
    fused_gather: bool = True
    compile_by_default: bool = True
    skips_trailing_pad: bool = True
    caches_kv: bool = True
    causal: bool = True

    def head_linear(self, model):
        return model.score


@dataclass(frozen=True)
class EmbeddingFamily(Family):
    task: str = "embed"

    def head_linear(self, model):
        raise TypeError("embedding models have no score head")


@dataclass(frozen=True)
class GenericFamily(Family):
    """Any other ``*ForSequenceClassification``: the model's own padded forward and head.

    The slow path: no packing, no fused head kernel; the logits are the model's own output and
    the activation follows vLLM's rule. Remote code runs only with ``trust_remote_code``.
    """

    bodies: tuple[str, ...] = ("padded",)
    padded_reason: str = "generic fallback: the checkpoint's own forward, padded (the slow path)"
    padded_attention: str = ""

    def check_architecture(self, config) -> None:
        found = architecture_of(config)
        if not found.endswith("ForSequenceClassification"):
            raise UnsupportedArchitecture(
                f"the generic fallback serves *ForSequenceClassification checkpoints only, not {found}; "
                f"{supported_hint(found)}"
            )


# ----------------------------------------------------------------------------------------------
# The table

_PADDED_RELATIVE = "DeBERTa's disentangled relative-position attention has no packed kernel: runs padded"
_PADDED_MAMBA = "Jamba's Mamba layers scan a padded batch: runs padded"
_PADDED_SOFTCAP = ("Gemma2's attention-logit soft-capping has no FlashAttention varlen kernel in torch: "
                   "runs padded with eager attention (HF's reference path)")

FAMILIES: tuple[Family, ...] = (
    BertFamily(name="bert", architectures=("BertForSequenceClassification",), uses_token_types=True,
               example="cross-encoder/ms-marco-MiniLM-L6-v2", folder="bert_classifier"),
    RobertaFamily(name="xlm_roberta", architectures=("XLMRobertaForSequenceClassification",
                                                      "RobertaForSequenceClassification"),
                  uses_token_types=True, example="BAAI/bge-reranker-v2-m3", folder="xlm_roberta_classifier"),
    BertFamily(name="ernie", architectures=("ErnieForSequenceClassification",), uses_token_types=True,
               example="an ernie-3.0 sequence-classification fine-tune", folder="ernie_classifier"),
    DistilBertFamily(name="distilbert", architectures=("DistilBertForSequenceClassification",),
                     example="distilbert/distilbert-base-uncased-finetuned-sst-2-english",
                     folder="distilbert_classifier"),
    ModernBertFamily(name="modernbert", architectures=("ModernBertForSequenceClassification",),
                     example="Alibaba-NLP/gte-reranker-modernbert-base", folder="modernbert_classifier"),
    DebertaV2Family(name="deberta_v2", architectures=("DebertaV2ForSequenceClassification",),
                    uses_token_types=True, bodies=("padded",), padded_reason=_PADDED_RELATIVE, padded_attention="eager",
                    example="protectai/deberta-v3-base-prompt-injection-v2", folder="deberta_v2_classifier"),
    DecoderFamily(name="qwen2", architectures=("Qwen2ForSequenceClassification",),
                  example="jason9693/Qwen2.5-1.5B-apeach", folder="qwen2_classifier"),
    DecoderFamily(name="qwen3", architectures=("Qwen3ForSequenceClassification",),
                  example="tomaarsen/Qwen3-Reranker-0.6B-seq-cls, Skywork/Skywork-Reward-V2-Qwen3-0.6B", folder="qwen3_classifier"),
    DecoderFamily(name="llama", architectures=("LlamaForSequenceClassification",),
                  example="Skywork/Skywork-Reward-V2-Llama-3.1-8B", folder="llama_classifier"),
    DecoderFamily(name="mistral", architectures=("MistralForSequenceClassification",),
                  example="weqweasdas/RM-Mistral-7B", folder="mistral_classifier"),
    DecoderFamily(name="gemma", architectures=("GemmaForSequenceClassification",),
                  example="weqweasdas/RM-Gemma-2B", folder="gemma_classifier"),
    DecoderFamily(name="gemma2", architectures=("Gemma2ForSequenceClassification",), bodies=("padded",),
                  padded_reason=_PADDED_SOFTCAP, padded_attention="eager",
                  example="Skywork/Skywork-Reward-Gemma-2-27B-v0.2", folder="gemma2_classifier"),
    DecoderFamily(name="phi3", architectures=("Phi3ForSequenceClassification",),
                  example="a Phi-3 sequence-classification fine-tune", folder="phi3_classifier"),
    DecoderFamily(name="gpt2", architectures=("GPT2ForSequenceClassification",),
                  example="microsoft/DialogRPT-updown", folder="gpt2_classifier"),
    DecoderFamily(name="jamba", architectures=("JambaForSequenceClassification",), bodies=("padded",),
                  padded_reason=_PADDED_MAMBA, compile_by_default=False,
                  example="ai21labs/Jamba-tiny-reward-dev", folder="jamba_classifier"),
    EmbeddingFamily(name="bert_embedding", architectures=("BertModel",), pooling="mean_normalized",
                    uses_token_types=True, example="sentence-transformers/all-MiniLM-L6-v2", folder="bert_embedder"),
)
GENERIC = GenericFamily(name="generic", architectures=("*ForSequenceClassification",), folder="generic_classifier",
                        example="any other *ForSequenceClassification")


def _register_native() -> tuple[Family, ...]:
    from poolserve_runtime import native, vision_families

    return native.FAMILIES + vision_families.FAMILIES


def all_families() -> tuple[Family, ...]:
    return FAMILIES + _register_native()


def by_name(name: str) -> Family:
    for family in (*all_families(), GENERIC):
        if family.name == name:
            return family
    raise UnsupportedArchitecture(f"no family named {name!r}; known: {', '.join(f.name for f in all_families())}")


def by_folder(folder: str) -> Family | None:
    """The family a model_repository folder serves (None for folders that are not the runtime's)."""
    for family in (*all_families(), GENERIC):
        if family.folder == folder:
            return family
    return None


def architecture_of(config) -> str:
    """``architectures[0]`` of a config object or a config.json dict."""
    architectures = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    return (architectures or ["<none>"])[0]


def supported_hint(found: str) -> str:
    names = sorted({arch for family in all_families() for arch in family.architectures})
    return (f"served architectures: {', '.join(names)}; any other *ForSequenceClassification runs on the generic "
            f"padded path (family=generic, trust_remote_code=true for remote code); "
            f"to serve {found} under another architecture set the `architecture` parameter (vLLM's "
            "--hf-overrides '{\"architectures\": [...]}')")


def family_for_architecture(architecture: str) -> Family | None:
    for family in all_families():
        if architecture in family.architectures:
            return family
    return None


def family_for_config(config_dict: dict, override: str = "") -> Family:
    """The family that serves a checkpoint, from its config.json: an explicit architecture override
    (vLLM's ``--hf-overrides {"architectures": [...]}``) first, then ``architectures[0]``, then the
    classes named in ``auto_map`` (remote-code checkpoints), then the generic fallback for any other
    sequence classifier. Raises :class:`UnsupportedArchitecture` naming what is served."""
    candidates = [override] if override else []
    candidates += list(config_dict.get("architectures") or [])[:1]
    auto_map = config_dict.get("auto_map") or {}
    for key in ("AutoModelForSequenceClassification", "AutoModel"):
        target = auto_map.get(key)
        if isinstance(target, (list, tuple)):
            target = target[0]
        if target:
            candidates.append(str(target).rsplit(".", 1)[-1])
    for architecture in candidates:
        family = family_for_architecture(architecture)
        if family is not None:
            return family
    for architecture in candidates:
        if architecture.endswith("ForSequenceClassification"):
            return GENERIC
    found = candidates[0] if candidates else "<no architectures in config.json>"
    raise UnsupportedArchitecture(f"no family serves architecture {found}; {supported_hint(found)}")


def read_config_dict(checkpoint: str) -> dict:
    """config.json of a local folder or hub id, as a plain dict (no remote code is imported)."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(checkpoint)
    return config


# Names the families were importable by before the table (model.py files, benchmarks, tests).
BERT, XLM_ROBERTA, ERNIE, DISTILBERT, MODERNBERT, DEBERTA_V2, QWEN2, QWEN3, LLAMA, MISTRAL, GEMMA, GEMMA2, PHI3, GPT2, \
    JAMBA, BERT_EMBEDDING = FAMILIES
