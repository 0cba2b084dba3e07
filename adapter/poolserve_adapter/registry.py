"""The served models, learned from Triton itself: no second, hand-kept list.

At start the adapter asks Triton for its loaded models (repository index) and each model's config.
From the config it takes the task (an ``embeddings`` output: embedding model; ``scores``:
classifier), the ``checkpoint``, ``served_model_name`` and ``max_model_len`` parameters; from the
checkpoint it loads the same tokenizer and HF config the model uses (labels, maximum length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from poolserve_adapter.errors import NotFoundError, RouteNotOffered
from poolserve_adapter.multimodal import VisionPrompter
from poolserve_adapter.tokenization import TextEncoder
from poolserve_contract.checkpoints import checkpoint_config, max_model_len_for, resolve_checkpoint, served_name
from poolserve_contract.parameters import parse_bool
from poolserve_contract.score_templates import template_text
from poolserve_contract.wire import SOURCE_FOLDER
from poolserve_runtime import families
from poolserve_runtime.llm_rerankers import conversion_for


@dataclass(frozen=True)
class ServedModel:
    name: str  # the name clients send in `model`
    triton_model: str
    task: str  # "classify" or "embed"
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
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return self.encoder.max_model_len

    @property
    def can_classify(self) -> bool:
        return self.task == "classify"

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
        """vLLM's enable_scoring_api: embedding models, and classifiers with one label."""
        return self.task == "embed" or self.num_labels == 1

    def label(self, index: int) -> str | None:
        return self.id2label.get(index)

    @property
    def is_cross_encoder(self) -> bool:
        return self.task == "classify"


def build_served_model(triton_model: str, config: dict, repository: Path) -> ServedModel:
    from transformers import AutoTokenizer

    parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    outputs = {output["name"] for output in config.get("output", [])}
    task = "embed" if "embeddings" in outputs else "classify"
    checkpoint = resolve_checkpoint(parameters.get("checkpoint", ""), repository / triton_model)
    trust_remote_code = parse_bool(parameters.get("trust_remote_code", "false"), "trust_remote_code")
    family = families.by_folder(parameters.get(SOURCE_FOLDER, triton_model))
    if family is not None and family.vision:
        hf_config = family.adapter_config(checkpoint)
    else:
        hf_config = checkpoint_config(checkpoint, trust_remote_code)
    max_model_len = int(parameters.get("max_model_len", "0") or 0) or max_model_len_for(hf_config, checkpoint)
    input_names = {tensor["name"] for tensor in config.get("input", [])}
    encoder = TextEncoder(
        AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code),
        max_model_len=max_model_len,
        sends_token_types="token_type_ids" in input_names and int(getattr(hf_config, "type_vocab_size", 1) or 1) > 1,
        vocab_size=int(getattr(hf_config, "vocab_size", 0) or 0) or None,
    )
    id2label = {int(k): v for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
    # The family knows the width of its outputs (a gated reward head reduces num_labels to one score);
    # a causal LM served as a reranker has the labels its conversion builds.
    num_labels = int(getattr(hf_config, "num_labels", 1) or 1)
    if family is not None and family.output_labels(hf_config) != num_labels:
        num_labels, id2label = family.output_labels(hf_config), {}
    conversion = None
    if family is not None and (family.caches_kv or parameters.get("hf_overrides")):
        raw = families.read_config_dict(checkpoint)
        conversion = conversion_for(raw, checkpoint, parameters.get("hf_overrides", ""))
        if conversion is not None and (conversion.method or families.Family.architecture_is_causal_lm(raw)):
            num_labels, id2label = conversion.num_labels, {}
    template_name = parameters.get("score_template", "").strip()
    vision = None
    if family is not None and family.vision:
        vision = VisionPrompter(family, checkpoint, encoder, int(getattr(hf_config, "image_token_id")))
    return ServedModel(
        architecture=families.architecture_of(hf_config),
        vision=vision,
        name=served_name(parameters, triton_model),
        triton_model=triton_model,
        task=task,
        checkpoint=checkpoint,
        encoder=encoder,
        id2label=id2label,
        num_labels=num_labels if task == "classify" else 0,
        score_template=template_text(template_name) if template_name else None,
        declares_st_activation=bool(getattr(hf_config, "sbert_ce_default_activation_function", None) or (
            (getattr(hf_config, "sentence_transformers", None) or {}).get("activation_fn")
            if isinstance(getattr(hf_config, "sentence_transformers", None), dict) else None)),
    )


class ModelRegistry:
    def __init__(self, models: list[ServedModel]):
        self.models = {model.name: model for model in models}

    def __iter__(self):
        return iter(self.models.values())

    def resolve(self, name: str | None, *, capability: str) -> ServedModel:
        """The model a request names (or the first able to serve it when it names none).

        An unknown name is vLLM's 404 ``The model `X` does not exist.``; a known model that cannot
        serve the route answers as vLLM does for a route it never registered.
        """
        if name:
            model = self.models.get(name)
            if model is None:
                raise NotFoundError(f"The model `{name}` does not exist.")
            if not getattr(model, capability):
                raise RouteNotOffered()
            return model
        for model in self.models.values():
            if getattr(model, capability):
                return model
        raise RouteNotOffered()

    def resolve_lenient(self, name: str | None, *, capability: str, fallback: str | None = None) -> ServedModel:
        """SGLang's routes do not check ``model``: the named model when it is served and able, else the
        first model with ``capability``, else the first with ``fallback``."""
        model = self.models.get(name) if name else None
        if model is not None and getattr(model, fallback or capability):
            return model
        try:
            return self.resolve(None, capability=capability)
        except RouteNotOffered:
            if fallback is None:
                raise
            return self.resolve(None, capability=fallback)
