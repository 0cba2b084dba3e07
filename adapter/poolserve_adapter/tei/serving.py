"""``/embed_sparse`` (TEI): each text's SPLADE vector as its non-zero vocabulary entries, ``[{"index", "value"}]``
in index order, from the model's ``sparse`` output; TEI's request checks, truncation and errors (``{"error",
"error_type"}``, :class:`~poolserve_adapter.errors.TeiError`), in TEI's order: the batch (empty, too many
inputs), the model (not a SPLADE model: 424 Backend), then each input (empty, ``prompt_name``, too long).

The TEI steps every TEI route shares live here too: the checks of a list of inputs, TEI's error kinds, the
prompt, and the tokenizing.

Inputs are tokenized as TEI does (``core/src/tokenization.rs::encode_input``): the prompt's text prepended, special
tokens added, and with ``truncate`` the tokenizer's own truncation to the model's maximum length on the side asked
(special tokens kept; a pair loses tokens from its longer side first); without it a longer input is refused.

BGE-M3 (a model with lexical weights) answers it from its per-token weights, as FlagEmbedding's
``_process_token_weights`` makes its ``lexical_weights``: each token id's largest relu'd weight, the ids of the
tokenizer's cls, eos, pad and unk tokens skipped, and weights <= 0 left out; listed in index order."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from http import HTTPStatus

import numpy as np
import orjson
from fastapi.responses import Response

from poolserve_adapter.base.embedding import token_rows
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.errors import Flavour, TeiError
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tei.protocol import EmbedSparseRequest, TextsRequest
from poolserve_adapter.tokenization import Encoded, TextEncoder, run_sized

VALIDATION = "Input validation error: "  # the prefix TEI's TextEmbeddingsError::Validation displays
MAX_TRUNCATING_BACKENDS = 16  # tokenizer copies kept (one per model, maximum length and side)


def validation_error(message: str) -> TeiError:
    return TeiError(message, status=HTTPStatus.UNPROCESSABLE_ENTITY, kind="Validation")


def prompt_text(model: ServedModel, prompt_name: str | None) -> str:
    """The text ``prompt_name`` prepends, refused as TEI's ``prepare_pre_prompt`` does (its message names the
    server's --default-prompt-name even for a request's prompt_name; the keys are listed as Rust's ``{:?}``)."""
    if prompt_name is None:
        return ""
    if not model.prompts:
        raise validation_error(f"{VALIDATION}`default-prompt-name` is set to `{prompt_name}` but no prompts were "
                               "found in the Sentence Transformers configuration")
    if prompt_name not in model.prompts:
        names = ", ".join(json.dumps(name, ensure_ascii=False) for name in model.prompts)
        raise validation_error(f"{VALIDATION}`default-prompt-name` is set to `{prompt_name}` but it was not found "
                               f"in the Sentence Transformers prompts. Available prompts: [{names}]")
    return model.prompts[prompt_name]


class TruncatingBackends:
    """Copies of a model's tokenizer backend that truncate to a length on one side (or not at all), built once
    each: a backend's truncation is its own state, never reconfigured under concurrent requests."""

    def __init__(self):
        self._backends: OrderedDict[tuple[int, int | None, str], object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, encoder: TextEncoder, max_length: int | None, direction: str):
        from tokenizers import Tokenizer

        key = (id(encoder), max_length, direction)
        with self._lock:
            backend = self._backends.get(key)
            if backend is not None:
                self._backends.move_to_end(key)
                return backend
            backend = Tokenizer.from_str(encoder.backend.to_str())
            backend.no_padding()
            if max_length is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(max_length=max_length, direction=direction)
            if len(self._backends) >= MAX_TRUNCATING_BACKENDS:
                self._backends.popitem(last=False)
            self._backends[key] = backend
            return backend


TRUNCATING_BACKENDS = TruncatingBackends()


def tokenized(model: ServedModel, inputs: list[str | tuple[str, str]], truncate: bool, direction: str) -> Encoded:
    """The inputs (texts, or pairs of texts) as TEI's ``encode_input`` makes them; an input longer than the model's
    maximum length (after any truncation: the longest side of a pair first) is TEI's 422, the first in order."""
    encoder, limit = model.encoder, model.max_model_len
    backend = TRUNCATING_BACKENDS.get(encoder, limit if truncate else None, direction)
    encodings = backend.encode_batch(inputs, add_special_tokens=True)
    over = next((len(encoding.ids) for encoding in encodings if len(encoding.ids) > limit), None)
    if over is not None:
        raise validation_error(f"{VALIDATION}`inputs` must have less than {limit} tokens. Given: {over}")
    types = [encoding.type_ids for encoding in encodings] if encoder.sends_token_types else None
    return Encoded.from_lists([encoding.ids for encoding in encodings], types)


def check_batch(count: int, limit: int) -> None:
    """TEI's checks of a list of inputs before the model's: none (400 Empty), more than the client batch size
    (422 Validation)."""
    if not count:
        raise TeiError("`inputs` cannot be empty", status=HTTPStatus.BAD_REQUEST, kind="Empty")
    refuse_oversized_batch(count, limit)


def refuse_oversized_batch(count: int, limit: int) -> None:
    """More inputs than the client batch size: TEI's 422 Validation."""
    if count > limit:
        raise validation_error(f"batch size {count} > maximum allowed batch size {limit}")


def backend_error(message: str) -> TeiError:
    """TEI's ``TextEmbeddingsError::Backend``: a 424 whose message says ``Backend error: ...``."""
    return TeiError(f"Backend error: {message}", status=HTTPStatus.FAILED_DEPENDENCY, kind="Backend")


def refuse_empty(inputs: list[str | tuple[str, ...] | list[str]]) -> None:
    """TEI's tokenizer refuses an empty input (400 Empty): an empty text, or a pair whose texts are all empty."""
    if any(not item if isinstance(item, str) else not any(item) for item in inputs):
        raise TeiError(f"{VALIDATION}`inputs` cannot be empty", status=HTTPStatus.BAD_REQUEST, kind="Empty")


async def tokenized_texts(model: ServedModel, request: TextsRequest) -> Encoded:
    """A texts body tokenized as TEI does: the prompt's text prepended, truncated when asked."""
    prompt = prompt_text(model, request.prompt_name)
    texts = [prompt + text for text in request.texts()]
    return await run_sized(sum(map(len, texts)), tokenized, model, texts, bool(request.truncate), request.direction)


def sparse_entries(row: np.ndarray) -> list[dict]:
    """A vector's non-zero entries in index order (float32 values: orjson writes their shortest digits, as
    serde does TEI's f32)."""
    indices = np.flatnonzero(row)
    return [{"index": int(index), "value": value} for index, value in zip(indices.tolist(), row[indices])]


def lexical_entries(ids: np.ndarray, weights: np.ndarray, skipped: set[int]) -> list[dict]:
    """One prompt's ``{"index": token id, "value": its largest weight}`` in index order (``ids`` and ``weights``
    aligned, one per token): ids in ``skipped`` and weights <= 0 left out."""
    largest: dict[int, np.float32] = {}
    for token, weight in zip(ids.tolist(), weights):
        if token not in skipped and weight > largest.get(token, 0):  # a weight <= 0 never enters
            largest[token] = weight
    return [{"index": token, "value": largest[token]} for token in sorted(largest)]


def skipped_token_ids(model: ServedModel) -> set[int]:
    """FlagEmbedding's unused tokens: the ids of the tokenizer's cls, eos, pad and unk tokens."""
    tokenizer = model.encoder.tokenizer
    ids = (tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return {int(token) for token in ids if token is not None}


class ServingEmbedSparse(Serving[EmbedSparseRequest]):
    capability = "can_embed_sparse"
    # TEI serves one model: the one named when it is served, else the first sparse embedder, else any model
    # (which then answers TEI's 424).
    lenient = True
    fallback = "can_tokenize"
    flavour = Flavour.TEI

    def validate(self, ctx: ServeContext[EmbedSparseRequest]) -> None:
        texts = ctx.request.texts()
        check_batch(len(texts), ctx.settings.max_items_per_request)
        if not ctx.model.can_embed_sparse:
            raise backend_error("Model is not an embedding model with SPLADE pooling")
        refuse_empty(texts)

    def item_count(self, request: EmbedSparseRequest) -> int:
        return len(request.texts())

    async def encode(self, ctx: ServeContext[EmbedSparseRequest]) -> Encoded:
        return await tokenized_texts(ctx.model, ctx.request)

    def output_name(self, ctx: ServeContext[EmbedSparseRequest]) -> str:
        return "token_logits" if ctx.model.lexical_weights else "sparse"

    def respond(self, ctx: ServeContext[EmbedSparseRequest]) -> Response:
        if ctx.model.lexical_weights:
            encoded, skipped = ctx.encoded, skipped_token_ids(ctx.model)
            weights = token_rows(np.asarray(ctx.output, dtype=np.float32), encoded.lengths)
            entries = [lexical_entries(encoded.input_ids[index, :len(rows)], rows[:, 0], skipped)
                       for index, rows in enumerate(weights)]
        else:
            entries = [sparse_entries(row) for row in np.asarray(ctx.output, dtype=np.float32)]
        return Response(orjson.dumps(entries, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


serving_embed_sparse = ServingEmbedSparse()
