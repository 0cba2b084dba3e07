"""The model card: what the adapter must know of a served model, derived once from its parameters,
its family and its checkpoint's config.

:func:`model_card` is the one place that decides the served name, the task, the labels a client sees
(after an LLM reranker's conversion, or a head that reduces them), the longest sequence, whether text
pairs carry token types, and a vision model's image token. When the host completes a model's config
for the run repository (:func:`poolserve_stack.triton_server.completed_config`) it writes the card into
it as the ``model_card`` parameter (:data:`poolserve_contract.wire.MODEL_CARD`, JSON), and the adapter
reads it back through Triton's model-config API. Triton's auto-complete takes no parameters from a
model, so a config completed that way (a stock tritonserver on ``model_repository/``) carries no card:
the adapter then computes it itself, with this same function.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from poolserve_contract.checkpoints import checkpoint_config, max_model_len_for
from poolserve_contract.conversions import load_conversion
from poolserve_contract.embedding_meta import read_embedding_meta
from poolserve_contract.families import FamilyDeclaration, architecture_of, read_config_dict
from poolserve_contract.late_interaction import find_projection
from poolserve_contract.parameters import ModelParameters, check_step_pooling, string_parameters
from poolserve_contract.wire import MODEL_CARD


@dataclass(frozen=True)
class ModelCard:
    served_name: str  # the name clients send in `model`
    family: str  # the runtime family's name; "" for a model folder that is not the runtime's
    task: str  # "classify", "embed", "token_embed" or "token_classify"
    architecture: str  # config.json's architecture (vLLM names it when a text-only model is sent an image)
    max_model_len: int  # the longest sequence, the max_model_len parameter or the checkpoint's (as vLLM)
    num_labels: int  # width of `scores` (token_classify: of each token's `token_logits`; 0 for embedding models)
    id2label: dict[int, str] = field(default_factory=dict)  # empty when the labels are the served head's own
    score_template: str = ""  # the score_template parameter (a shipped template's name or a file)
    # SGLang's cross-encoders apply only a sentence-transformers activation the config declares.
    declares_st_activation: bool = False
    sends_token_types: bool = False  # text pairs are sent with token_type_ids
    vocab_size: int | None = None  # token ids at or above it are refused before they reach Triton
    image_token_id: int | None = None  # the token an image's features replace; None: a text-only model
    long_documents: str = "truncate"  # the long_documents parameter: the scoring routes' default
    # Task "embed" (poolserve_contract.embedding_meta); the defaults describe any other model.
    embedding_size: int = 0  # width of `embeddings` and `pooled` (the hidden size); token_embed: of each token's vector
    normalizes: bool = False  # `embeddings` is L2-normalised (a Normalize module, or no sentence-transformers files)
    is_matryoshka: bool = False  # config.json is_matryoshka, or matryoshka_dimensions given
    matryoshka_dimensions: list[int] = field(default_factory=list)  # empty: any size in [1, embedding_size]
    prompts: dict[str, str] = field(default_factory=dict)  # config_sentence_transformers.json prompts
    # A sparse embedder (SPLADE): its vectors are the `sparse` output, vocab_size wide, never normalised; the
    # adapter serves TEI's /embed_sparse for it.
    sparse: bool = False
    # Task "token_classify": the activation of each token's logits (a families.TOKEN_ACTIVATIONS entry, the
    # adapter's to apply), and STEP pooling's parameters (ModelParameters.step_tag_id / returned_token_ids).
    token_activation: str = ""
    step_tag_id: int | None = None
    returned_token_ids: list[int] = field(default_factory=list)
    # BGE-M3: the /pooling tasks answered besides `task` (token_embed from `token_embeddings`, token_classify
    # from `token_logits` with token_activation relu), whose rows drop a first token equal to bos_token_id
    # (both) and a last equal to eos_token_id (token_classify) as vLLM's BOSEOSFilter does; the adapter serves
    # TEI's /embed_sparse from the lexical weights.
    extra_tasks: list[str] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # The lora_modules parameter: the adapters' names as clients send them in `model` (lora id i + 1 is
    # lora_modules[i]) and their folders, in order; empty when the model serves none.
    lora_modules: tuple[str, ...] = ()
    lora_paths: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        values = json.loads(text)
        values["id2label"] = {int(index): label for index, label in values.get("id2label", {}).items()}
        for name in ("lora_modules", "lora_paths"):  # JSON lists; absent in cards written before LoRA
            values[name] = tuple(values.get(name, ()))
        return cls(**values)

    @classmethod
    def from_config(cls, config: dict) -> ModelCard | None:
        """The card a model config (Triton's JSON form) carries, or None when it carries none."""
        text = string_parameters(config).get(MODEL_CARD, "")
        return cls.from_json(text) if text else None


def model_card(parameters: ModelParameters, family: FamilyDeclaration | None, checkpoint: str, *, task: str,
               token_type_input: bool, fallback_name: str, local_files_only: bool = False) -> ModelCard:
    """The card of a model: ``checkpoint`` resolved, ``family`` None for a folder that is not the runtime's,
    ``token_type_input`` whether the model takes ``token_type_ids``. ``local_files_only``: a hub
    checkpoint is read from the local cache only (nothing is downloaded)."""
    # Families whose config.json transformers cannot read as it is (vision, NomicBERT) read it themselves.
    if family is not None and hasattr(family, "checkpoint_config"):
        config = family.checkpoint_config(checkpoint, local_files_only)
    else:
        config = checkpoint_config(checkpoint, parameters.trust_remote_code, local_files_only)
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    # The family knows the width of its outputs (a gated reward head reduces num_labels to one score);
    # a causal LM served as a reranker has the labels its conversion builds.
    num_labels = int(getattr(config, "num_labels", 1) or 1)
    if family is not None and family.output_labels(config) != num_labels:
        num_labels, id2label = family.output_labels(config), {}
    if family is not None and task == "classify" and (family.caches_kv or parameters.hf_overrides):
        conversion = load_conversion(read_config_dict(checkpoint, local_files_only), checkpoint,
                                     parameters.hf_overrides)
        if conversion is not None:
            num_labels, id2label = conversion.num_labels, {}
    st_config = getattr(config, "sentence_transformers", None)
    declared_activation = getattr(config, "sbert_ce_default_activation_function", None) or (
        st_config.get("activation_fn") if isinstance(st_config, dict) else None)
    embedding = {}
    if task == "embed" and family is not None and family.sparse:
        # vLLM's SPLADESparsePooler returns the vector as it is, whatever use_activation says.
        prompts = read_embedding_meta(checkpoint, family.pooling, local_files_only).prompts
        embedding = dict(embedding_size=int(config.vocab_size), normalizes=False, prompts=prompts, sparse=True)
    elif task == "embed" and family is not None:
        meta = read_embedding_meta(checkpoint, family.pooling, local_files_only)
        dimensions = [int(size) for size in getattr(config, "matryoshka_dimensions", None) or []]
        embedding = dict(embedding_size=int(config.hidden_size), normalizes=meta.normalizes,
                         is_matryoshka=bool(getattr(config, "is_matryoshka", False)) or bool(dimensions),
                         matryoshka_dimensions=dimensions, prompts=meta.prompts)
    if task == "token_embed":  # ColBERT: the projection's width, normalised (vLLM's token_embed default)
        embedding = dict(embedding_size=find_projection(checkpoint, local_files_only).dim, normalizes=True)
    check_step_pooling(parameters.step_tag_id, parameters.returned_token_ids, task, num_labels)
    token_classes = {}
    if task == "token_classify" and family is not None:
        token_classes = dict(token_activation=family.token_activation(config), step_tag_id=parameters.step_tag_id,
                             returned_token_ids=list(parameters.returned_token_ids))
    if family is not None and family.extra_tasks:
        token_classes = dict(extra_tasks=list(family.extra_tasks), token_activation="relu",
                             bos_token_id=getattr(config, "bos_token_id", None),
                             eos_token_id=getattr(config, "eos_token_id", None))
    return ModelCard(
        served_name=parameters.served_name(fallback_name),
        family=family.name if family is not None else "",
        task=task,
        architecture=architecture_of(config),
        max_model_len=parameters.max_model_len or max_model_len_for(config, checkpoint),
        num_labels=num_labels if task in ("classify", "token_classify") else 0,
        id2label=id2label,
        score_template=parameters.score_template,
        declares_st_activation=bool(declared_activation),
        sends_token_types=token_type_input and int(getattr(config, "type_vocab_size", 1) or 1) > 1,
        vocab_size=int(getattr(config, "vocab_size", 0) or 0) or None,
        image_token_id=int(config.image_token_id) if family is not None and family.vision else None,
        long_documents=parameters.long_documents,
        lora_modules=tuple(name for name, _ in parameters.lora_modules),
        lora_paths=tuple(path for _, path in parameters.lora_modules),
        **embedding,
        **token_classes,
    )


def card_for_config(config: dict, family: FamilyDeclaration, model_dir: Path | None = None) -> ModelCard | None:
    """The card of a runtime family's model config (Triton's JSON form), read from checkpoints already on
    this machine (completing a config downloads nothing), or None when it cannot be made here: a hub
    checkpoint not in the cache yet, one not prepared yet, or parameters the model will refuse. The
    model's load then fetches the checkpoint or reports what is wrong, and the adapter computes the card
    itself once the model is up."""
    try:
        parameters = ModelParameters.from_config(config)
        checkpoint = parameters.resolved_checkpoint(model_dir)
        return model_card(parameters, family, checkpoint, task=family.task, token_type_input=family.uses_token_types,
                          fallback_name=config.get("name", ""), local_files_only=True)
    except (OSError, ValueError):
        return None
