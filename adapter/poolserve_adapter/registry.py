"""The served models, learned from Triton itself: no second, hand-kept list.

At start the adapter asks Triton for its loaded models (repository index) and each model's config.
The config carries the model card (:mod:`poolserve_contract.card`: served name, task, labels after
conversion, maximum length, image token), written when the config was completed; a model folder
that is not the runtime's gets its card computed here by the same function. From the checkpoint the
adapter loads only the tokenizer the model uses (and a vision model's image processor).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from poolserve_adapter.errors import BadRequestError, NotFoundError, RouteNotOffered
from poolserve_adapter.multimodal import VisionPrompter
from poolserve_adapter.tokenization import TextEncoder
from poolserve_contract import families
from poolserve_contract.card import ModelCard, model_card
from poolserve_contract.parameters import ModelParameters
from poolserve_contract.score_templates import template_text


def encode_lora_names(names: list[str]) -> np.ndarray:
    """The ``lora_names`` input of sequences on these adapters ("" the base model): one row of UTF-8 bytes per
    sequence, zero-padded to the longest (wire.LORA_NAMES_INPUT)."""
    encoded = [name.encode() for name in names]
    rows = np.zeros((len(encoded), max([1, *map(len, encoded)])), np.uint8)
    for row, name in zip(rows, encoded, strict=True):
        row[:len(name)] = np.frombuffer(name, np.uint8)
    return rows


@dataclass(frozen=True)
class ServedModel:
    name: str  # the name clients send in `model`
    triton_model: str
    task: str  # "classify", "embed", "token_embed" (late interaction: ColBERT) or "token_classify"
    checkpoint: str  # resolved path or hub id (the `root` of /v1/models)
    encoder: TextEncoder
    id2label: dict[int, str]
    num_labels: int
    # SGLang's cross-encoders apply only a sentence-transformers activation the config declares
    # (else raw logits); vLLM's rule is applied by the Triton model ("scores").
    declares_st_activation: bool = False
    # Jinja text rendering (query, document[, instruction]) into one prompt (LLM rerankers), or None:
    # the pair is tokenized as a text pair.
    score_template: str | None = None
    # config.json's architecture (vLLM names it when a text-only model is sent an image)
    architecture: str = ""
    # Vision-language models: the checkpoint's image processor and placeholder rules; None: text only.
    vision: VisionPrompter | None = None
    # The scoring routes' long_documents default (the model parameter): "truncate", "max" or "mean".
    long_documents: str = "truncate"
    # Embedding models (task "embed"), from the card: the width of `embeddings`, whether that output is
    # L2-normalised (vLLM's default use_activation), the Matryoshka sizes `dimensions` may take (any in
    # [1, embedding_size] when the list is empty), and the sentence-transformers prompts by name
    # (Cohere's input_type).
    embedding_size: int = 0
    normalizes: bool = False
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()
    prompts: dict[str, str] = field(default_factory=dict)
    # A sparse embedder (SPLADE, from the card): its vectors are the `sparse` output (vocab_size wide, never
    # normalised), and it serves TEI's /embed_sparse.
    sparse: bool = False
    # Token classifiers (task "token_classify"), from the card: the activation of each token's logits
    # (poolserve_contract.families.TOKEN_ACTIVATIONS) and STEP pooling's tag token and kept label columns.
    token_activation: str = "classify"
    step_tag_id: int | None = None
    returned_token_ids: tuple[int, ...] = ()
    # BGE-M3 (from the card): the /pooling tasks answered besides `task` (token_embed, token_classify with
    # token_activation relu) and the ids whose first / last rows they drop (vLLM's BOSEOSFilter); it serves TEI's
    # /embed_sparse from its lexical weights.
    extra_tasks: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Multi-LoRA (the card's lora_modules and lora_paths): the Triton model's adapters as (name, folder) in
    # order, each served as its own model name, as vLLM does. An adapter's entry is the base's with the
    # adapter's name and the base's name as parent; Triton is sent the adapter's name (wire.LORA_NAMES_INPUT).
    lora_modules: tuple[tuple[str, str], ...] = ()
    parent: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def lora_names(self, num_sequences: int) -> np.ndarray | None:
        """The ``lora_names`` input of ``num_sequences`` sequences run on this model (its adapter's name, or the
        base's zeros), or None when the Triton model serves no adapter. A model with adapters is always sent it:
        Triton's dynamic batcher batches only requests sending the same inputs, so base and adapter requests
        share one forward."""
        if not self.lora_modules:
            return None
        return encode_lora_names([self.name if self.parent is not None else ""] * num_sequences)

    def adapters(self) -> list[ServedModel]:
        """The served entry of each of this model's LoRA adapters (vLLM lists each as a model, ``root`` its
        folder, ``parent`` the base)."""
        return [replace(self, name=name, checkpoint=folder, parent=self.name) for name, folder in self.lora_modules]

    def adapter_names(self, names: list[str | None]) -> np.ndarray:
        """SGLang's ``lora_path``, one adapter name per sequence (None: the base model), as the ``lora_names``
        input. A name the model does not serve is SGLang's 400."""
        served = [name for name, _ in self.lora_modules]
        for name in names:
            if name is not None and name not in served:
                raise BadRequestError(f"The following requested LoRA adapters are not loaded: {name}\n"
                                      f"Loaded adapters: {served}.")
        return encode_lora_names(["" if name is None else name for name in names])

    @property
    def max_model_len(self) -> int:
        return self.encoder.max_model_len

    @property
    def can_classify(self) -> bool:
        return self.task == "classify"

    @property
    def can_embed(self) -> bool:
        return self.task == "embed"

    @property
    def can_embed_sparse(self) -> bool:
        return self.task == "embed" and (self.sparse or self.lexical_weights)

    @property
    def lexical_weights(self) -> bool:
        """BGE-M3: one weight per token (``token_logits`` before its relu), FlagEmbedding's lexical weights."""
        return "token_classify" in self.extra_tasks

    @property
    def pooling_tasks(self) -> tuple[str, ...]:
        """The tasks /pooling accepts: the model's own, then any it answers from per-token outputs."""
        return (self.task, *self.extra_tasks)

    @property
    def embedding_output(self) -> str:
        """The Triton output of an embed model's vectors as the model computes them."""
        return "sparse" if self.sparse else "embeddings"

    @property
    def can_embed_texts(self) -> bool:
        """vLLM's /v1/embeddings: a vector per prompt (embed), or a vector per token (token_embed)."""
        return self.task in ("embed", "token_embed")

    @property
    def late_interaction(self) -> bool:
        """/score and /rerank by MaxSim over token vectors (vLLM's LateInteractionIOProcessor)."""
        return self.task == "token_embed"

    @property
    def can_classify_or_embed(self) -> bool:
        return True

    @property
    def can_cross_encode(self) -> bool:
        return self.task == "classify" and self.num_labels == 1

    @property
    def can_tokenize(self) -> bool:
        return True

    @property
    def can_score(self) -> bool:
        """vLLM's enable_scoring_api: embedding and late-interaction models, and classifiers with one label."""
        return self.task in ("embed", "token_embed") or (self.task == "classify" and self.num_labels == 1)

    def label(self, index: int) -> str | None:
        return self.id2label.get(index)

    @property
    def is_cross_encoder(self) -> bool:
        return self.task == "classify"


# A model config's output → the task of the model that answers it (a config without a card).
TASK_BY_OUTPUT = {"embeddings": "embed", "sparse": "embed", "token_embeddings": "token_embed",
                  "token_logits": "token_classify"}


def card_of(triton_model: str, config: dict, checkpoint: str, parameters: ModelParameters) -> ModelCard:
    """The card the config carries, or the one computed from the checkpoint when it carries none."""
    card = ModelCard.from_config(config)
    if card is not None:
        return card
    outputs = {output["name"] for output in config.get("output", [])}
    inputs = {tensor["name"] for tensor in config.get("input", [])}
    return model_card(parameters, families.by_folder(parameters.model_folder or triton_model), checkpoint,
                      task=TASK_BY_OUTPUT.get(next((o for o in TASK_BY_OUTPUT if o in outputs), ""), "classify"),
                      token_type_input="token_type_ids" in inputs, fallback_name=triton_model)


def build_served_model(triton_model: str, config: dict, repository: Path) -> ServedModel:
    from transformers import AutoTokenizer

    parameters = ModelParameters.from_config(config)
    # Resolved here, not taken from the card: the adapter may see the checkpoint at another path.
    checkpoint = parameters.resolved_checkpoint(repository / triton_model)
    card = card_of(triton_model, config, checkpoint, parameters)
    encoder = TextEncoder(
        AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=parameters.trust_remote_code),
        max_model_len=card.max_model_len,
        sends_token_types=card.sends_token_types,
        vocab_size=card.vocab_size,
    )
    vision = None
    if card.image_token_id is not None:
        vision = VisionPrompter(families.by_name(card.family), checkpoint, encoder, card.image_token_id)
    return ServedModel(
        architecture=card.architecture,
        vision=vision,
        name=card.served_name,
        triton_model=triton_model,
        task=card.task,
        checkpoint=checkpoint,
        encoder=encoder,
        id2label=card.id2label,
        num_labels=card.num_labels,
        score_template=template_text(card.score_template) if card.score_template else None,
        declares_st_activation=card.declares_st_activation,
        long_documents=card.long_documents,
        embedding_size=card.embedding_size,
        normalizes=card.normalizes,
        is_matryoshka=card.is_matryoshka,
        matryoshka_dimensions=tuple(card.matryoshka_dimensions),
        prompts=dict(card.prompts),
        sparse=card.sparse,
        token_activation=card.token_activation or "classify",
        step_tag_id=card.step_tag_id,
        returned_token_ids=tuple(card.returned_token_ids),
        extra_tasks=tuple(card.extra_tasks),
        bos_token_id=card.bos_token_id,
        eos_token_id=card.eos_token_id,
        lora_modules=adapters_of(card),
    )


def adapters_of(card: ModelCard) -> tuple[tuple[str, str], ...]:
    """The card's LoRA adapters as (name, folder): the folders as the host named them, or as a runtime load gave
    them (the adapter reports them, as vLLM's `root`; it reads none)."""
    return tuple(zip(card.lora_modules, card.lora_paths or card.lora_modules, strict=True))


# Each capability a route needs → the routes it opens, for telling a client what a model does serve.
ROUTES_OF_CAPABILITY = {
    "can_classify": "/classify",
    "can_embed_texts": "/v1/embeddings",
    "can_embed": "/v2/embed",
    "can_score": "/score and /rerank",
    "can_embed_sparse": "/embed_sparse",
    "can_classify_or_embed": "/pooling",
}
MODEL_KINDS = {"embed": "an embedding model", "token_embed": "a late-interaction (token embedding) model",
               "token_classify": "a token classifier"}


def not_offered_reason(model: ServedModel, capability: str) -> str:
    """Why ``model`` cannot serve a route that needs ``capability``, in vLLM's words where it has them (its
    offline ``LLM`` methods), then what the model is and which routes it serves."""
    if capability in ("can_score", "can_cross_encode"):
        refusal = ("Scoring API is only enabled for num_labels == 1." if model.task == "classify"
                   else "This model does not support the Scoring API.")
    elif capability == "can_classify":
        refusal = "Classification API is not supported by this model."
    elif capability == "can_classify_or_embed":
        refusal = "Pooling API is not supported by this model."
    else:
        refusal = "Embedding API is not supported by this model."
    labels = f"{model.num_labels} label{'' if model.num_labels == 1 else 's'}"
    kind = MODEL_KINDS.get(model.task, f"a classifier with {labels}")
    routes = [route for needed, route in ROUTES_OF_CAPABILITY.items() if getattr(model, needed)]
    return f"{refusal} Model `{model.name}` is {kind}; it serves {', '.join(routes)}."


class ModelRegistry:
    def __init__(self, models: list[ServedModel]):
        self.models = {model.name: model for model in models}
        if len(self.models) != len(models):
            names = [model.name for model in models]
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"several Triton models are served as {', '.join(twice)}: give each its own "
                             "served_model_name")
        # Each LoRA adapter by its name: a name is one model or one adapter, never both (vLLM's clients
        # pick either by `model` alone).
        self.adapters: dict[str, ServedModel] = {}
        for adapter in (adapter for model in models for adapter in model.adapters()):
            taken = self.models.get(adapter.name) or self.adapters.get(adapter.name)
            if taken is not None:
                what = f"model {taken.name}" if taken.parent is None else f"an adapter of {taken.parent}"
                raise ValueError(f"the LoRA adapter {adapter.name} of {adapter.parent} is named as {what}: "
                                 "give each adapter a name no model or other adapter is served as (lora_modules)")
            self.adapters[adapter.name] = adapter

    def __iter__(self):
        """The base models (the LoRA adapters are in :attr:`adapters`)."""
        return iter(self.models.values())

    def with_adapters(self, lora_modules: dict[str, tuple[tuple[str, str], ...]]) -> ModelRegistry:
        """This registry with the base models of the Triton models in ``lora_modules`` serving those adapters
        (runtime LoRA updates: :mod:`poolserve_adapter.lora`); raises ValueError as the constructor does."""
        return ModelRegistry([replace(model, lora_modules=lora_modules.get(model.triton_model, model.lora_modules))
                              for model in self.models.values()])

    def named(self, name: str) -> ServedModel | None:
        """The model or LoRA adapter served as ``name``, or None."""
        return self.models.get(name) or self.adapters.get(name)

    def resolve(self, name: str | None, *, capability: str) -> ServedModel:
        """The model a request names (or the first able to serve it when it names none).

        An unknown name is vLLM's 404 ``The model `X` does not exist.``. A model that cannot serve the
        route, named or the only one served, is a 400 saying why (vLLM does not register the route at all,
        a bare 404 like a mistyped URL's); with several served and none able, that bare 404.
        """
        if name:
            model = self.named(name)
            if model is None:
                raise NotFoundError(f"The model `{name}` does not exist.")
            if not getattr(model, capability):
                raise RouteNotOffered(not_offered_reason(model, capability))
            return model
        for model in self.models.values():
            if getattr(model, capability):
                return model
        if len(self.models) == 1:
            raise RouteNotOffered(not_offered_reason(next(iter(self.models.values())), capability))
        raise RouteNotOffered()

    def resolve_lenient(self, name: str | None, *, capability: str, fallback: str | None = None) -> ServedModel:
        """SGLang's routes do not check ``model``: the named model when it is served and able, else the
        first model with ``capability``, else the first with ``fallback``."""
        model = self.named(name) if name else None
        if model is not None and getattr(model, fallback or capability):
            return model
        try:
            return self.resolve(None, capability=capability)
        except RouteNotOffered:
            if fallback is None:
                raise
            return self.resolve(None, capability=fallback)
