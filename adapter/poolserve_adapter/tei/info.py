"""TEI's ``GET /info`` (``router/src/lib.rs::Info``) and the TEI kind of a served model, by which TEI's
``POST /`` picks its route (``server.rs::run``: a classifier → /predict, a re-ranker → /rerank, an embedding model
→ /embed, or /embed_sparse for SPLADE).

TEI's kinds (``ModelType``, serde's externally tagged enum, lower case): a classifier with one label is a
``reranker``, with more a ``classifier`` (both with ``id2label`` / ``label2id``, keys as strings), anything else an
``embedding`` model with its ``pooling`` (``cls``, ``mean``, ``last_token``, ``splade``). Two kinds TEI does not
serve are told as the nearest: a token classifier is a ``classifier`` (its /predict answers TEI's 424), a
late-interaction (ColBERT) model an ``embedding`` model with pooling ``none``, whose ``POST /`` is /embed_all.

``/info`` describes the default model (the first served). What the adapter does not have is TEI's default or
null: ``model_sha``, ``sha``, ``docker_label`` and ``max_batch_requests`` null, ``max_concurrent_requests``
TEI's default 512 (admission here is by tokens), ``auto_truncate`` false, ``tokenization_workers`` the CPU
count. ``model_dtype`` is the model's ``dtype`` parameter (``auto``: bfloat16 on a GPU, float32 on the CPU, which
the stub picks), ``max_input_length`` the model's maximum length, ``max_batch_tokens`` and
``max_client_batch_size`` the adapter's per-request token and item limits."""

from __future__ import annotations

import asyncio
import os

from tritonclient.utils import InferenceServerException

from poolserve_adapter import __version__
from poolserve_adapter.errors import from_triton
from poolserve_adapter.registry import ServedModel, card_of
from poolserve_adapter.settings import Settings
from poolserve_adapter.triton_gateway import TritonGateway
from poolserve_contract import families
from poolserve_contract.embedding_meta import read_embedding_meta
from poolserve_contract.parameters import ModelParameters

TEI_DEFAULT_MAX_CONCURRENT_REQUESTS = 512
TEI_POOLING_NAMES = {"cls": "cls", "mean": "mean", "last": "last_token"}  # EmbeddingMeta.pooling -> TEI's Pool


def tei_route(model: ServedModel) -> str:
    """The TEI route ``POST /`` takes for ``model``."""
    if model.task == "classify":
        return "rerank" if model.num_labels == 1 else "predict"
    if model.task == "embed":
        return "embed_sparse" if model.sparse else "embed"
    if model.task == "token_embed":
        return "embed_all"
    return "predict"


def labels(model: ServedModel) -> dict:
    id2label = {str(index): model.label(index) or f"LABEL_{index}" for index in range(model.num_labels)}
    return {"id2label": id2label, "label2id": {label: int(index) for index, label in id2label.items()}}


def model_type(model: ServedModel, pooling: str) -> dict:
    if model.task in ("classify", "token_classify"):
        return {"reranker" if tei_route(model) == "rerank" else "classifier": labels(model)}
    return {"embedding": {"pooling": pooling}}


def described(model: ServedModel, config: dict) -> tuple[str, str]:
    """The model's dtype parameter and its TEI pooling name, from its Triton config (and, for a dense embedder, its
    checkpoint's sentence-transformers files, as the runtime reads them)."""
    parameters = ModelParameters.from_config(config)
    if model.sparse:
        return parameters.dtype, "splade"
    if model.task != "embed":
        return parameters.dtype, "none"
    card = card_of(model.triton_model, config, model.checkpoint, parameters)
    default = families.by_name(card.family).pooling if card.family else "cls"
    pooling = read_embedding_meta(model.checkpoint, default, local_files_only=True).pooling
    return parameters.dtype, TEI_POOLING_NAMES.get(pooling, pooling)


async def model_info(model: ServedModel, settings: Settings, gateway: TritonGateway) -> dict:
    """TEI's ``Info`` of ``model``, its fields in TEI's order."""
    try:
        config = (await gateway.client.get_model_config(model.triton_model, as_json=True))["config"]
    except InferenceServerException as error:
        raise from_triton(error) from None
    dtype, pooling = await asyncio.to_thread(described, model, config)
    return {
        "model_id": model.checkpoint,
        "model_sha": None,
        "model_dtype": dtype,
        "served_model_name": model.name,
        "model_type": model_type(model, pooling),
        "max_concurrent_requests": TEI_DEFAULT_MAX_CONCURRENT_REQUESTS,
        "max_input_length": model.max_model_len,
        "max_batch_tokens": settings.max_tokens_per_request,
        "max_batch_requests": None,
        "max_client_batch_size": settings.max_items_per_request,
        "auto_truncate": False,
        "tokenization_workers": os.cpu_count() or 1,
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }
