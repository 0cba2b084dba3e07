"""Architecture families as declarations: what each family serves and how it reads a checkpoint's config.

A family is one entry of :data:`FAMILIES`: the ``architectures[0]`` values it serves, its task, its
pooling, the bodies it can run, its model_repository folder, and the rules that read the checkpoint's
``config.json`` (pooling, output width, position offset). Nothing here imports torch: the host's plan,
the adapter and the model card read these declarations, and the Triton stub puts one torch
implementation on each (:mod:`poolserve_runtime.families`).

:func:`family_for_config` picks a family from a checkpoint's ``config.json`` (an ``architecture``
override, then ``architectures[0]``, then ``auto_map``, then the generic fallback), so a user names a
checkpoint, not a model folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from poolserve_contract.tiling import TilingImageProcessor, tiles_processor_for

BODIES = ("varlen", "padded")
GENERATIVE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration")


class UnsupportedArchitecture(ValueError):
    """No family serves this checkpoint (or not the one the user chose)."""


@dataclass(frozen=True)
class FamilyDeclaration:
    name: str
    architectures: tuple[str, ...]  # config.json `architectures[0]` values this family serves
    # "classify" (logits + scores), "embed" (embeddings), "token_embed" (per-token vectors) or "token_classify"
    # (per-token logits)
    task: str = "classify"
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
    vision: bool = False  # reads pixel inputs besides token ids (a VisionDeclaration)
    # Task "embed" with a vocabulary-wide sparse vector (SPLADE) as its one output (``sparse``) in place of
    # ``embeddings`` / ``pooled``; the adapter also serves TEI's /embed_sparse for it.
    sparse: bool = False
    # /pooling tasks the model answers besides ``task``, from per-token outputs of the same forward (BGE-M3).
    extra_tasks: tuple[str, ...] = ()
    example: str = ""  # a checkpoint of this architecture (docs/models.md table, error messages)
    folder: str = ""  # its model_repository folder

    @property
    def packed(self) -> bool:
        return "varlen" in self.bodies

    @property
    def output_kind(self) -> str:
        """Which Triton outputs the family answers (a ``poolserve_contract.triton_config`` output set): its task's,
        ``sparse_embed`` for a sparse embedder, ``bge_m3`` for BGE-M3's three."""
        return "sparse_embed" if self.sparse else self.task

    def check_architecture(self, config) -> None:
        found = architecture_of(config)
        if found not in self.architectures:
            raise UnsupportedArchitecture(
                f"checkpoint architecture {found} is not served by the {self.name} family "
                f"(expected one of {', '.join(self.architectures)}); {supported_hint(found)}"
            )

    @staticmethod
    def architecture_is_causal_lm(config) -> bool:
        """A generative checkpoint (text ``*ForCausalLM`` or multimodal ``*ForConditionalGeneration``)."""
        return architecture_of(config).endswith(GENERATIVE_SUFFIXES)

    def pooling_for(self, config) -> str:
        return self.pooling

    def output_labels(self, config) -> int:
        """Width of ``logits`` / ``scores``: the config's num_labels unless the head reduces it."""
        return int(getattr(config, "num_labels", 1) or 1)

    def position_offset(self, config) -> int:
        """First position id of every sequence (RoBERTa-style models start after padding_idx)."""
        return 0


@dataclass(frozen=True)
class RobertaDeclaration(FamilyDeclaration):
    def position_offset(self, config) -> int:
        return int(config.pad_token_id) + 1


@dataclass(frozen=True)
class ModernBertDeclaration(FamilyDeclaration):
    def pooling_for(self, config) -> str:
        pooling = getattr(config, "classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise UnsupportedArchitecture(f"ModernBERT classifier_pooling {pooling!r} is not cls or mean")
        return pooling


@dataclass(frozen=True)
class DecoderDeclaration(FamilyDeclaration):
    pooling: str = "last"
    fused_gather: bool = True
    compile_by_default: bool = True
    skips_trailing_pad: bool = True
    caches_kv: bool = True
    causal: bool = True


@dataclass(frozen=True)
class EmbeddingDeclaration(FamilyDeclaration):
    """A dense embedding model: the stock base model (``AutoModel``), pooled, then L2-normalised or
    not, as the checkpoint's sentence-transformers files say (:mod:`poolserve_contract.embedding_meta`).
    ``pooling`` is the default for a checkpoint without them."""

    task: str = "embed"
    # *ForCausalLM architectures served as this family's base model when the checkpoint's modules.json
    # lists a Pooling module, as vLLM does (Qwen3-Embedding ships as Qwen3ForCausalLM): the LM head is
    # left unloaded.
    causal_lm_architectures: tuple[str, ...] = ()

    def check_architecture(self, config) -> None:
        if architecture_of(config) not in self.causal_lm_architectures:
            super().check_architecture(config)


# nomic-ai/nomic-bert-2048's NomicBertConfig defaults (a GPT2Config: its own defaults for the n_* keys), for keys a
# config.json leaves out.
NOMIC_BERT_DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "prenorm": False, "rotary_emb_fraction": 0.0,
    "rotary_emb_base": 10_000, "rotary_emb_scale_base": None, "rotary_emb_interleaved": False,
    "rotary_scaling_factor": None, "max_trained_positions": 2048, "qkv_proj_bias": True, "mlp_fc1_bias": True,
    "mlp_fc2_bias": True, "type_vocab_size": 2, "pad_vocab_size_multiple": 1,
}
NOMIC_GATED_ACTIVATIONS = ("glu", "swiglu", "geglu")  # upstream's NomciBertGatedMLP (fc11, fc12, fc2)
NOMIC_GATED_MULTIPLE = 256  # upstream rounds a gated MLP's width up to a multiple of this (its weights have that width)


def nomic_bert_config(config_dict: dict):
    """A transformers ``PretrainedConfig`` for a NomicBERT config.json dict (nomic-ai/nomic-bert-2048's remote
    ``NomicBertConfig``, a ``GPT2Config``), with the standard names beside the file's own: ``hidden_size`` (n_embd),
    ``num_attention_heads`` (n_head), ``num_hidden_layers`` (n_layer), ``layer_norm_eps`` (layer_norm_epsilon),
    ``intermediate_size`` (the MLP width upstream builds from n_inner), ``vocab_size`` padded to
    ``pad_vocab_size_multiple`` (the embedding's rows, as upstream pads it) and ``max_position_embeddings``.

    transformers' own ``nomic_bert`` config (model_type ``nomic_bert``) reads none of the n_* keys, so the file is
    read here. ``max_position_embeddings`` is ``n_positions`` capped at ``max_trained_positions``, vLLM's default
    length (its ``NomicBertModelConfig`` disables context extension: nomic-embed-text-v1 / v1.5 say 8192 and are
    served to 2048). Up to there upstream agrees: its dynamic NTK (``rotary_scaling_factor``) only starts past
    ``max_trained_positions``.
    """
    from transformers import PretrainedConfig

    fields = {**NOMIC_BERT_DEFAULTS, **config_dict}
    config = PretrainedConfig.from_dict(fields)
    hidden, positions = int(fields["n_embd"]), int(fields["n_positions"])
    if positions <= 0 and float(fields["rotary_emb_fraction"]) > 0:
        positions = 2048  # upstream's from_pretrained does the same
    positions = min(positions, int(fields["max_trained_positions"]))
    inner = fields["n_inner"]
    if fields["activation_function"] in NOMIC_GATED_ACTIVATIONS:
        inner = int(inner) if inner is not None else int(8 * hidden / 3)
        inner = -(-inner // NOMIC_GATED_MULTIPLE) * NOMIC_GATED_MULTIPLE
    else:
        inner = int(inner) if inner is not None else 4 * hidden
    multiple = int(fields["pad_vocab_size_multiple"] or 1)
    config.hidden_size = hidden
    config.num_attention_heads = int(fields["n_head"])
    config.num_hidden_layers = int(fields["n_layer"])
    config.intermediate_size = inner
    config.layer_norm_eps = float(fields["layer_norm_epsilon"])
    config.vocab_size = -(-int(fields["vocab_size"]) // multiple) * multiple
    config.max_position_embeddings = positions
    return config


@dataclass(frozen=True)
class NomicBertDeclaration(EmbeddingDeclaration):
    """NomicBERT embedders (nomic-embed-text-v1 / v1.5: remote code upstream, :mod:`poolserve_runtime.native.nomic_bert`
    here), whose config.json uses GPT-2's key names: the model card reads it through :meth:`checkpoint_config`."""

    def checkpoint_config(self, checkpoint: str, local_files_only: bool = False):
        return nomic_bert_config(read_config_dict(checkpoint, local_files_only))


@dataclass(frozen=True)
class LateInteractionDeclaration(FamilyDeclaration):
    """A ColBERT model: the base model's every token (CLS and SEP included, no query or document markers:
    vLLM's ColBERTModel) through the checkpoint's bias-free projection, then L2-normalised
    (:mod:`poolserve_contract.late_interaction`); /score and /rerank by MaxSim."""

    task: str = "token_embed"
    pooling: str = "all"  # no pooling: every token is an output


@dataclass(frozen=True)
class SpladeDeclaration(FamilyDeclaration):
    """A SPLADE sparse embedder: a ``BertForMaskedLM`` checkpoint (naver/splade-*) whose MLM logits become one
    vocabulary-wide vector per text, served only when the ``architecture`` parameter names
    ``BertSpladeSparseEmbeddingModel``, as vLLM needs ``--hf-overrides '{"architectures":
    ["BertSpladeSparseEmbeddingModel"]}'`` (the checkpoint's own architecture is a plain masked LM). The rule is
    vLLM's ``SPLADESparsePooler`` (:mod:`poolserve_runtime.implementations`, ``SpladeFamily``)."""

    task: str = "embed"
    sparse: bool = True
    pooling: str = "all"  # every token's logits, reduced by the family's own rule


@dataclass(frozen=True)
class BgeM3Declaration(RobertaDeclaration):
    """BGE-M3 (vLLM's ``BgeM3EmbeddingModel``): an ``XLMRobertaModel`` checkpoint with FlagEmbedding's two heads
    beside it, ``sparse_linear.pt`` (``Linear(hidden, 1)``) and ``colbert_linear.pt`` (``Linear(hidden, dim)``),
    served only when the ``architecture`` parameter names ``BgeM3EmbeddingModel``, as vLLM needs ``--hf-overrides
    '{"architectures": ["BgeM3EmbeddingModel"]}'`` (the checkpoint's own architecture is a plain XLM-R). One
    forward gives the dense vector (task ``embed``: CLS, normalised per the sentence-transformers files),
    every token's ColBERT vector (``token_embed``) and every token's lexical weight (``token_classify``,
    activation ``relu``); the adapter drops the BOS / EOS rows as vLLM's ``BOSEOSFilter`` does."""

    task: str = "embed"
    pooling: str = "cls"
    extra_tasks: tuple[str, ...] = ("token_embed", "token_classify")

    @property
    def output_kind(self) -> str:
        return "bge_m3"


# How vLLM activates a token classifier's logits (TokenClassifierPoolerHead, resolve_classifier_act_fn with
# static_num_labels=False): "classify" is softmax over the labels a row keeps when it keeps two or more, else
# sigmoid; the width is the row's own, so STEP pooling's returned_token_ids decide it when they keep columns.
TOKEN_ACTIVATIONS = ("classify", "sigmoid", "identity", "relu")  # relu: BGE-M3's lexical weights


@dataclass(frozen=True)
class TokenClassifierDeclaration(FamilyDeclaration):
    """A ``*ForTokenClassification`` model: the classifier applied to every token's last hidden state (CLS and
    SEP included), one row of logits per token (vLLM's ``token_classify`` task); the activation is the
    adapter's, per token (:meth:`token_activation`)."""

    task: str = "token_classify"
    pooling: str = "all"  # no pooling: every token is an output

    @staticmethod
    def token_activation(config) -> str:
        """A :data:`TOKEN_ACTIVATIONS` entry: ``problem_type`` decides as transformers' losses do (regression:
        none; multi-label: sigmoid), otherwise vLLM's ``PoolerClassify`` rule."""
        problem_type = getattr(config, "problem_type", None)
        if problem_type == "regression":
            return "identity"
        if problem_type == "multi_label_classification":
            return "sigmoid"
        return "classify"


@dataclass(frozen=True)
class RobertaTokenClassifierDeclaration(TokenClassifierDeclaration, RobertaDeclaration):
    """XLM-R / RoBERTa token classifiers: positions start after padding_idx."""


@dataclass(frozen=True)
class RobertaEmbeddingDeclaration(EmbeddingDeclaration, RobertaDeclaration):
    pooling: str = "cls"  # vLLM's RobertaEmbeddingModel default


@dataclass(frozen=True)
class DecoderEmbeddingDeclaration(EmbeddingDeclaration):
    """A causal decoder's base model pooled at each sequence's final token (a packed stream holds no
    padding, so the final token is the last one the tokenizer wrote)."""

    pooling: str = "last"  # vLLM's default for decoders
    compile_by_default: bool = True  # see FamilyDeclaration.compile_by_default
    caches_kv: bool = True
    causal: bool = True


@dataclass(frozen=True)
class GenericDeclaration(FamilyDeclaration):
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


# config.json "pooling" of NVIDIA's bidirectional Llama models -> kernels pooling method (vLLM: avg ->
# MEAN, cls -> CLS, last -> LAST; anything else is an error)
LLAMA_BIDIRECTIONAL_POOLING = {"avg": "mean", "cls": "cls", "last": "last"}


@dataclass(frozen=True)
class BidirectionalLlamaDeclaration(DecoderDeclaration):
    pooling: str = "mean"  # the upstream default ("avg"); pooling_for reads the config
    fused_gather: bool = False  # mean pooling is no row gather
    skips_trailing_pad: bool = False  # upstream pools by attention_mask, never by pad ids
    causal: bool = False  # bidirectional: a shared prefix's states depend on each document
    bodies: tuple[str, ...] = ("varlen",)
    padded_reason: str = ("bidirectional attention runs on the packed body only "
                          "(HF's padded Llama path builds a causal mask)")

    def pooling_for(self, config) -> str:
        pooling = getattr(config, "pooling", "avg")
        if pooling not in LLAMA_BIDIRECTIONAL_POOLING:
            raise UnsupportedArchitecture(f"LlamaBidirectional pooling {pooling!r} is not one of "
                                          f"{', '.join(LLAMA_BIDIRECTIONAL_POOLING)} (as vLLM)")
        return LLAMA_BIDIRECTIONAL_POOLING[pooling]


@dataclass(frozen=True)
class GatedRewardDeclaration(DecoderDeclaration):
    """URM's (mean, uncertainty) pairs gated into one reward (SGLang's LlamaForSequenceClassificationWithNormal_Weights)."""

    fused_gather: bool = False  # the gate and the products come between the gather and the sum
    skips_trailing_pad: bool = False  # SGLang pools the sequence's last token, pad or not

    def output_labels(self, config) -> int:
        return 1  # one gated reward, whatever num_labels (the score layer's width) says


# ----------------------------------------------------------------------------------------------
# Vision-language families: what the adapter needs to write images into prompts

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
_PADDED_VISION = ("vision-language: multimodal RoPE positions and the image merge are HF's own forward: "
                  "runs padded")


@dataclass(frozen=True)
class VisionDeclaration(FamilyDeclaration):
    pooling: str = "last"
    fused_gather: bool = True
    caches_kv: bool = True
    causal: bool = True
    bodies: tuple[str, ...] = ("padded",)
    padded_reason: str = _PADDED_VISION
    vision: bool = True
    backbone: str = ""  # transformers class of the multimodal body, built from the checkpoint
    head: str = "linear"  # "linear": score; "mlp": score.0 + ReLU + score.2
    logit_bias: float = 0.0  # subtracted from the logit before the activation (vLLM's pooler logit_bias)
    # Appended to every prompt after tokenizing (jina-reranker-m0 pools its score token, id 100).
    score_token_id: int | None = None
    # How a (query, document) pair is written when no score template applies: "{query}"/"{document}"
    # are the texts with their image placeholders first. "" tokenizes query + document as one text.
    score_format: str = ""
    image_placeholder: str = QWEN_IMAGE  # one image in a prompt before expansion
    image_pad_token: str = "<|image_pad|>"  # the token repeated per image feature (the model's image_token_id)
    video_placeholder: str = ""  # "" when the model reads no video
    # The original generative form of the checkpoint this family converts (yes/no rerankers).
    generative_architecture: str = ""

    def output_labels(self, config) -> int:
        return 1 if self.head == "mlp" else int(getattr(config, "num_labels", 1) or 1)

    def checkpoint_config(self, checkpoint: str, local_files_only: bool = False):
        """The config labels, lengths and the image token are read from."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(checkpoint, local_files_only=local_files_only)

    def image_processor(self, checkpoint: str):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(checkpoint)

    def image_text(self, grid, processor) -> str:
        """One image's placeholder expanded as the checkpoint's processor does: the pad token once per
        merged patch (t * h * w / merge_size^2)."""
        merge = int(getattr(processor, "merge_size", 2) or 2) ** 2
        tokens = math.prod(int(size) for size in grid) // merge
        return self.image_placeholder.replace(self.image_pad_token, self.image_pad_token * tokens)

    def render_pair(self, query_side, document_side) -> tuple[str, list[int]] | None:
        """A (query, document) prompt the family writes itself, with the order of its images; None: the
        score template, ``score_format`` or query + document decide."""
        return None


NEMOTRON_IMAGE_PLACEHOLDER = "<image>"
NEMOTRON_IMAGE_START, NEMOTRON_IMAGE_END, NEMOTRON_IMAGE_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
NEMOTRON_IMAGE_TOKEN_ID = 128258  # img_context_token_id when config.json does not say


def llama_config_from_dict(config_dict: dict):
    """A transformers ``LlamaConfig`` from a remote-code Llama config.json (``architectures`` kept)."""
    from transformers import LlamaConfig

    values = {k: v for k, v in config_dict.items() if k not in ("auto_map", "model_type", "transformers_version")}
    if "torch_dtype" in values:  # the pre-v5 name
        values.setdefault("dtype", values.pop("torch_dtype"))
    config = LlamaConfig(**values)
    for key, value in values.items():  # keys LlamaConfig does not know (pooling, temperature, ...)
        if not hasattr(config, key):
            setattr(config, key, value)
    config.architectures = list(config_dict.get("architectures") or [])
    if config_dict.get("auto_map"):
        config.auto_map = dict(config_dict["auto_map"])
    return config


@dataclass(frozen=True)
class NemotronVLDeclaration(VisionDeclaration):
    """nvidia/llama-nemotron-rerank-vl: a SigLIP tower on image tiles and a bidirectional Llama."""

    pooling: str = "mean"
    fused_gather: bool = False
    causal: bool = False
    caches_kv: bool = False
    image_placeholder: str = NEMOTRON_IMAGE_PLACEHOLDER
    image_pad_token: str = NEMOTRON_IMAGE_CONTEXT

    def pooling_for(self, config) -> str:
        pooling = getattr(config, "pooling", "avg")
        if pooling not in LLAMA_BIDIRECTIONAL_POOLING:
            raise UnsupportedArchitecture(f"LlamaNemotronVL pooling {pooling!r} is not one of "
                                          f"{', '.join(LLAMA_BIDIRECTIONAL_POOLING)}")
        return LLAMA_BIDIRECTIONAL_POOLING[pooling]

    def checkpoint_config(self, checkpoint: str, local_files_only: bool = False):
        raw = read_config_dict(checkpoint, local_files_only)
        config = llama_config_from_dict(raw["llm_config"])
        config.num_labels = int(raw.get("num_labels") or config.num_labels or 1)
        config.id2label = {int(k): v for k, v in (raw.get("id2label") or {}).items()} or {
            i: f"LABEL_{i}" for i in range(config.num_labels)}
        config.image_token_id = int(raw.get("img_context_token_id", NEMOTRON_IMAGE_TOKEN_ID))
        return config

    def image_processor(self, checkpoint: str) -> TilingImageProcessor:
        return tiles_processor_for(read_config_dict(checkpoint))

    def image_text(self, grid, processor) -> str:
        tiles = math.prod(int(size) for size in grid)
        return NEMOTRON_IMAGE_START + NEMOTRON_IMAGE_CONTEXT * (processor.tokens_per_tile * tiles) + NEMOTRON_IMAGE_END

    def render_pair(self, query_side, document_side) -> tuple[str, list[int]]:
        """nemotron-vl-rerank.jinja: the document's image (one per pair) first, then
        "question:{query} \\n \\n passage:{document text}"."""
        if query_side.image_urls:
            raise UnsupportedArchitecture("LlamaNemotronVL takes images in documents only; the query must be text")
        if len(document_side.image_urls) > 1:
            raise UnsupportedArchitecture("LlamaNemotronVL takes one image per document")
        image = "\x00image0\x00 " if document_side.image_urls else ""
        return f"{image}question:{chr(10).join(query_side.texts)} \n \n passage:{chr(10).join(document_side.texts)}", \
            list(range(len(document_side.image_urls)))


# ----------------------------------------------------------------------------------------------
# The table

_PADDED_RELATIVE = "DeBERTa's disentangled relative-position attention has no packed kernel: runs padded"
_PADDED_MAMBA = "Jamba's Mamba layers scan a padded batch: runs padded"
_PADDED_SOFTCAP = ("Gemma2's attention-logit soft-capping has no FlashAttention varlen kernel in torch: "
                   "runs padded with eager attention (HF's reference path)")

# Architectures upstream ships only as remote code, served by the runtime's own modules (poolserve_runtime.native).
INTERNLM2_REWARD_ARCHITECTURE = "InternLM2ForRewardModel"
QWEN2_REWARD_ARCHITECTURE = "Qwen2ForRewardModel"

FAMILIES: tuple[FamilyDeclaration, ...] = (
    FamilyDeclaration(name="bert", architectures=("BertForSequenceClassification",), uses_token_types=True,
                      example="cross-encoder/ms-marco-MiniLM-L6-v2", folder="bert_classifier"),
    RobertaDeclaration(name="xlm_roberta", architectures=("XLMRobertaForSequenceClassification",
                                                          "RobertaForSequenceClassification"),
                       uses_token_types=True, example="BAAI/bge-reranker-v2-m3", folder="xlm_roberta_classifier"),
    FamilyDeclaration(name="ernie", architectures=("ErnieForSequenceClassification",), uses_token_types=True,
                      example="an ernie-3.0 sequence-classification fine-tune", folder="ernie_classifier"),
    FamilyDeclaration(name="distilbert", architectures=("DistilBertForSequenceClassification",),
                      example="distilbert/distilbert-base-uncased-finetuned-sst-2-english",
                      folder="distilbert_classifier"),
    ModernBertDeclaration(name="modernbert", architectures=("ModernBertForSequenceClassification",),
                          example="Alibaba-NLP/gte-reranker-modernbert-base", folder="modernbert_classifier"),
    FamilyDeclaration(name="deberta_v2", architectures=("DebertaV2ForSequenceClassification",),
                      uses_token_types=True, bodies=("padded",), padded_reason=_PADDED_RELATIVE,
                      padded_attention="eager", example="protectai/deberta-v3-base-prompt-injection-v2",
                      folder="deberta_v2_classifier"),
    DecoderDeclaration(name="qwen2", architectures=("Qwen2ForSequenceClassification",),
                       example="jason9693/Qwen2.5-1.5B-apeach", folder="qwen2_classifier"),
    DecoderDeclaration(name="qwen3", architectures=("Qwen3ForSequenceClassification",),
                       example="tomaarsen/Qwen3-Reranker-0.6B-seq-cls, Skywork/Skywork-Reward-V2-Qwen3-0.6B",
                       folder="qwen3_classifier"),
    DecoderDeclaration(name="llama", architectures=("LlamaForSequenceClassification",),
                       example="Skywork/Skywork-Reward-V2-Llama-3.1-8B", folder="llama_classifier"),
    DecoderDeclaration(name="mistral", architectures=("MistralForSequenceClassification",),
                       example="weqweasdas/RM-Mistral-7B", folder="mistral_classifier"),
    DecoderDeclaration(name="gemma", architectures=("GemmaForSequenceClassification",),
                       example="weqweasdas/RM-Gemma-2B", folder="gemma_classifier"),
    DecoderDeclaration(name="gemma2", architectures=("Gemma2ForSequenceClassification",), bodies=("padded",),
                       padded_reason=_PADDED_SOFTCAP, padded_attention="eager",
                       example="Skywork/Skywork-Reward-Gemma-2-27B-v0.2", folder="gemma2_classifier"),
    DecoderDeclaration(name="phi3", architectures=("Phi3ForSequenceClassification",),
                       example="a Phi-3 sequence-classification fine-tune", folder="phi3_classifier"),
    DecoderDeclaration(name="gpt2", architectures=("GPT2ForSequenceClassification",),
                       example="microsoft/DialogRPT-updown", folder="gpt2_classifier"),
    DecoderDeclaration(name="jamba", architectures=("JambaForSequenceClassification",), bodies=("padded",),
                       padded_reason=_PADDED_MAMBA, compile_by_default=False,
                       example="ai21labs/Jamba-tiny-reward-dev", folder="jamba_classifier"),
    # Embedding models: pooling and normalisation from the checkpoint's sentence-transformers files, else
    # `pooling` and normalised (poolserve_contract.embedding_meta). BERT keeps its mean default (vLLM's is CLS).
    EmbeddingDeclaration(name="bert_embedding", architectures=("BertModel",), pooling="mean",
                         uses_token_types=True, example="sentence-transformers/all-MiniLM-L6-v2",
                         folder="bert_embedder"),
    RobertaEmbeddingDeclaration(name="roberta_embedding", architectures=("XLMRobertaModel", "RobertaModel"),
                                uses_token_types=True, example="BAAI/bge-m3, intfloat/multilingual-e5-base",
                                folder="xlm_roberta_embedder"),
    EmbeddingDeclaration(name="modernbert_embedding", architectures=("ModernBertModel",), pooling="cls",
                         example="Alibaba-NLP/gte-modernbert-base, nomic-ai/modernbert-embed-base",
                         folder="modernbert_embedder"),
    DecoderEmbeddingDeclaration(name="decoder_embedding",
                                architectures=("Qwen3Model", "Qwen2Model", "LlamaModel", "MistralModel"),
                                causal_lm_architectures=("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM",
                                                         "MistralForCausalLM"),
                                example="Qwen/Qwen3-Embedding-0.6B", folder="decoder_embedder"),
    # Late interaction: vLLM's HF_ColBERT (colbert-ai's name, answerai-colbert-small-v1's config.json) and
    # ColBERTModel; a BertModel checkpoint with a projection is served with architecture=HF_ColBERT.
    LateInteractionDeclaration(name="colbert", architectures=("HF_ColBERT", "ColBERTModel"), uses_token_types=True,
                               example="answerdotai/answerai-colbert-small-v1", folder="colbert_embedder"),
    # BGE-M3 (vLLM's BgeM3EmbeddingModel): an XLMRobertaModel checkpoint with sparse_linear.pt and
    # colbert_linear.pt beside it, served with architecture=BgeM3EmbeddingModel.
    BgeM3Declaration(name="bge_m3", architectures=("BgeM3EmbeddingModel",), uses_token_types=True,
                     example="BAAI/bge-m3", folder="bge_m3_embedder"),
    # SPLADE (vLLM's BertSpladeSparseEmbeddingModel): a BertForMaskedLM checkpoint served with
    # architecture=BertSpladeSparseEmbeddingModel.
    SpladeDeclaration(name="splade", architectures=("BertSpladeSparseEmbeddingModel",), uses_token_types=True,
                      example="naver/splade-cocondenser-ensembledistil, naver/splade-v3", folder="splade_embedder"),
    # Token classifiers (NER, per-token rewards): every token's logits (vLLM's token_classify).
    TokenClassifierDeclaration(name="bert_token_classifier", architectures=("BertForTokenClassification",),
                               uses_token_types=True, example="dslim/bert-base-NER", folder="bert_token_classifier"),
    RobertaTokenClassifierDeclaration(name="xlm_roberta_token_classifier",
                                      architectures=("XLMRobertaForTokenClassification",
                                                     "RobertaForTokenClassification"),
                                      uses_token_types=True,
                                      example="FacebookAI/xlm-roberta-large-finetuned-conll03-english",
                                      folder="xlm_roberta_token_classifier"),
    TokenClassifierDeclaration(name="distilbert_token_classifier",
                               architectures=("DistilBertForTokenClassification",),
                               example="elastic/distilbert-base-uncased-finetuned-conll03-english",
                               folder="distilbert_token_classifier"),
    TokenClassifierDeclaration(name="modernbert_token_classifier",
                               architectures=("ModernBertForTokenClassification",),
                               example="a ModernBERT token-classification fine-tune",
                               folder="modernbert_token_classifier"),
    TokenClassifierDeclaration(name="deberta_v2_token_classifier", architectures=("DebertaV2ForTokenClassification",),
                               uses_token_types=True, bodies=("padded",), padded_reason=_PADDED_RELATIVE,
                               padded_attention="eager", example="iiiorg/piiranha-v1-detect-personal-information",
                               folder="deberta_v2_token_classifier"),
    # Served by poolserve_runtime.native modules (remote code upstream).
    FamilyDeclaration(name="gte_new", architectures=("GteNewForSequenceClassification", "NewForSequenceClassification"),
                      uses_token_types=True, pooling="cls", bodies=("varlen",),
                      example="Alibaba-NLP/gte-multilingual-reranker-base", folder="gte_new_classifier"),
    # Embedders with BERT-style bodies and rotary positions (vLLM's bert_with_rope.py), default pooling CLS as vLLM's.
    # NewModel is GteNewModel's name in the checkpoints (vLLM needs --hf-overrides to call it GteNewModel).
    EmbeddingDeclaration(name="gte_new_embedding", architectures=("GteNewModel", "NewModel"), uses_token_types=True,
                         pooling="cls", bodies=("varlen",), example="Alibaba-NLP/gte-multilingual-base",
                         folder="gte_new_embedder"),
    NomicBertDeclaration(name="nomic_bert_embedding", architectures=("NomicBertModel",), uses_token_types=True,
                         pooling="cls", bodies=("varlen",),
                         example="nomic-ai/nomic-embed-text-v1.5, nomic-ai/nomic-embed-text-v1",
                         folder="nomic_bert_embedder"),
    BidirectionalLlamaDeclaration(name="llama_bidirectional",
                                  architectures=("LlamaBidirectionalForSequenceClassification",),
                                  example="nvidia/llama-nemotron-rerank-1b-v2", folder="llama_bidirectional_classifier"),
    GatedRewardDeclaration(name="llama_normal_weights",
                           architectures=("LlamaForSequenceClassificationWithNormal_Weights",),
                           example="LxzGordon/URM-LLaMa-3.1-8B", folder="llama_normal_weights_reward"),
    DecoderDeclaration(name="internlm2_reward", architectures=(INTERNLM2_REWARD_ARCHITECTURE,),
                       skips_trailing_pad=False,  # upstream scores input_ids[:, -1] (the reward token), pad or not
                       example="internlm/internlm2-1_8b-reward", folder="internlm2_reward"),
    DecoderDeclaration(name="qwen2_reward", architectures=(QWEN2_REWARD_ARCHITECTURE,),
                       fused_gather=False,  # score.0 + ReLU come between the pooled token and the last linear
                       skips_trailing_pad=False,  # vLLM returns every token's reward; the sequence's is the last row
                       example="Qwen/Qwen2.5-Math-RM-72B", folder="qwen2_reward"),
    NemotronVLDeclaration(name="llama_nemotron_vl", architectures=("LlamaNemotronVLForSequenceClassification",),
                          example="nvidia/llama-nemotron-rerank-vl-1b-v2", folder="llama_nemotron_vl_reranker"),
    # Vision-language families on stock transformers bodies.
    VisionDeclaration(name="qwen2_5_vl", architectures=("Qwen2_5_VLForSequenceClassification",),
                      backbone="Qwen2_5_VLModel", video_placeholder=QWEN_VIDEO,
                      example="muziyongshixin/Qwen2.5-VL-7B-for-VideoCls", folder="qwen2_5_vl_classifier"),
    VisionDeclaration(name="jina_vl", architectures=("JinaVLForRanking", "JinaVLForSequenceClassification"),
                      backbone="Qwen2VLModel", head="mlp", fused_gather=False, logit_bias=2.65, score_token_id=100,
                      score_format="**Document**:\n{document}\n**Query**:\n{query}",
                      example="jinaai/jina-reranker-m0", folder="jina_vl_reranker"),
    VisionDeclaration(name="qwen3_vl", architectures=("Qwen3VLForSequenceClassification",), backbone="Qwen3VLModel",
                      video_placeholder=QWEN_VIDEO, generative_architecture="Qwen3VLForConditionalGeneration",
                      example="Qwen/Qwen3-VL-Reranker-2B", folder="qwen3_vl_classifier"),
)
GENERIC = GenericDeclaration(name="generic", architectures=("*ForSequenceClassification",),
                             folder="generic_classifier", example="any other *ForSequenceClassification")


def by_name(name: str) -> FamilyDeclaration:
    for family in (*FAMILIES, GENERIC):
        if family.name == name:
            return family
    raise UnsupportedArchitecture(f"no family named {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def by_folder(folder: str) -> FamilyDeclaration | None:
    """The family a model_repository folder serves (None for folders that are not the runtime's)."""
    for family in (*FAMILIES, GENERIC):
        if family.folder == folder:
            return family
    return None


def architecture_of(config) -> str:
    """``architectures[0]`` of a config object or a config.json dict."""
    architectures = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    return (architectures or ["<none>"])[0]


def supported_hint(found: str) -> str:
    names = sorted({arch for family in FAMILIES for arch in family.architectures})
    return (f"served architectures: {', '.join(names)}; any other *ForSequenceClassification runs on the generic "
            f"padded path (family=generic, trust_remote_code=true for remote code); "
            f"to serve {found} under another architecture set the `architecture` parameter (vLLM's "
            "--hf-overrides '{\"architectures\": [...]}')")


def family_for_architecture(architecture: str) -> FamilyDeclaration | None:
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    return None


def family_for_config(config_dict: dict, override: str = "") -> FamilyDeclaration:
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


def embedding_family_for_causal_lm(architecture: str) -> FamilyDeclaration | None:
    """The embedding family that serves a ``*ForCausalLM`` sentence-transformers checkpoint as its base
    model (the caller checks the checkpoint's modules.json), or None."""
    for family in FAMILIES:
        if architecture in getattr(family, "causal_lm_architectures", ()):
            return family
    return None


def read_config_dict(checkpoint: str, local_files_only: bool = False) -> dict:
    """config.json of a local folder or hub id, as a plain dict (no remote code is imported).
    ``local_files_only``: a hub checkpoint is read from the local cache only (nothing is downloaded)."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(checkpoint, local_files_only=local_files_only)
    return config
