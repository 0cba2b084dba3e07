"""SGLang's classify, rerank, native classify and tokenize semantics over the same Triton models.

Differences from vLLM that are SGLang's own and kept (``serving_classify.py``, ``serving_rerank.py``,
``http_server.py`` of SGLang 0.5.23): ``/v1/classify`` always applies softmax to the raw logits
(a one-label model gives ``[1.0]``) and names unlabelled classes ``LABEL_i``; rerank returns raw
logits unless the checkpoint declares a sentence-transformers activation; the native ``/classify``
returns the raw head output; an input of N >= context-length tokens is rejected (vLLM allows N ==
max_model_len).
"""

from __future__ import annotations

import secrets
import time

import numpy as np
import orjson

from poolserve_adapter.common.protocol import check_item_count
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.score.service import score_pairs
from poolserve_adapter.settings import Settings
from poolserve_adapter.sglang.protocol import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    DetokenizeRequest,
    NativeEncodeRequest,
    NativeEncodeResult,
    NativeMetaInfo,
    RerankRequest,
    RerankResult,
    TokenizeRequest,
)
from poolserve_adapter.tokenization import Encoded, check_request_tokens, run_sized
from poolserve_adapter.triton_gateway import TritonGateway


def check_context_length(model: ServedModel, encoded: Encoded) -> None:
    """SGLang refuses N >= context length (vLLM allows N == max_model_len)."""
    longest = int(encoded.lengths.max()) if encoded.num_sequences else 0
    if longest >= model.max_model_len:
        raise BadRequestError(
            f"The input ({longest} tokens) is longer than the model's context length ({model.max_model_len} tokens)."
        )


async def encode_texts(model: ServedModel, texts: list[str], pairs: list[str] | None, settings: Settings) -> Encoded:
    encoded = await model.encoder.encode_async(texts, pairs, settings.tokenize_in_thread_above, check_length=False)
    check_context_length(model, encoded)
    return encoded


def encode_ids(model: ServedModel, prompts: list[list[int]]) -> Encoded:
    model.encoder.check_vocabulary(prompts)
    encoded = Encoded.from_lists([list(ids) for ids in prompts])
    check_context_length(model, encoded)
    return encoded


def validate_classify_input(value) -> None:
    """SGLang's ``OpenAIServingClassify._validate_request`` messages."""
    if isinstance(value, str):
        if not value:
            raise BadRequestError("Input cannot be empty")
        if not value.strip():
            raise BadRequestError("Input cannot be empty or whitespace only")
        return
    if not value:
        raise BadRequestError("Input cannot be empty")
    for index, item in enumerate(value):
        if isinstance(item, str) and not item.strip():
            raise BadRequestError(f"Input at index {index} cannot be empty or whitespace only")
        if isinstance(item, int) and item < 0:
            raise BadRequestError(f"Token ID at index {index} must be non-negative")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


async def classify_v1(request: ClassifyRequest, model: ServedModel, gateway: TritonGateway,
                      settings: Settings) -> ClassifyResponse:
    gateway.refuse_if_busy(model.triton_model)
    validate_classify_input(request.input)
    if isinstance(request.input, str):
        encoded = await encode_texts(model, [request.input], None, settings)
    elif isinstance(request.input[0], int):
        encoded = encode_ids(model, [request.input])
    else:
        check_item_count(len(request.input), settings.max_items_per_request)
        encoded = await encode_texts(model, list(request.input), None, settings)
    logits = (await gateway.infer(model.triton_model, encoded, ("logits",)))["logits"]
    probs = softmax(logits.astype(np.float64))
    best = np.argmax(probs, axis=1)
    data = [
        ClassifyData(index=i, label=model.label(int(best[i])) or f"LABEL_{int(best[i])}", probs=row.tolist(),
                     num_classes=len(row))
        for i, row in enumerate(probs)
    ]
    tokens = encoded.num_tokens
    return ClassifyResponse(model=model.name, data=data, usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens))


async def rerank(request: RerankRequest, model: ServedModel, gateway: TritonGateway,
                 settings: Settings) -> list[RerankResult]:
    """SGLang's ``/v1/rerank``: a bare list sorted by score, ``top_n`` >= 1, optional documents."""
    started = time.perf_counter()
    if not request.query:
        raise BadRequestError("Query cannot be empty")
    if not request.query.strip():
        raise BadRequestError("Query cannot be empty or whitespace only")
    if not request.documents:
        raise BadRequestError("Documents cannot be empty")
    if any(not document.strip() for document in request.documents):
        raise BadRequestError("Each document cannot be empty or whitespace only")
    check_item_count(len(request.documents), settings.max_items_per_request)
    # SGLang scores an LLM reranker by p(yes) / (p(yes) + p(no)), activated; cross-encoders get raw
    # logits unless the checkpoint declares an activation.
    scores, lengths = await score_pairs(
        model, [request.query], request.documents, gateway, settings,
        use_activation=model.declares_st_activation or model.score_template is not None,
        length_check=check_context_length, per_item_tokens=True,
        template_variables={} if request.instruct is None else {"instruction": request.instruct},
    )
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if request.top_n is not None:
        order = order[: request.top_n]
    latency = time.perf_counter() - started
    return [
        RerankResult(
            score=scores[i],
            document=request.documents[i] if request.return_documents else None,
            index=i,
            meta_info={"id": secrets.token_hex(16), "finish_reason": {"type": "length", "length": 0},
                       "prompt_tokens": int(lengths[i]), "e2e_latency": latency},
        )
        for i in order
    ]


async def classify_native(request: NativeEncodeRequest, model: ServedModel, gateway: TritonGateway,
                          settings: Settings) -> NativeEncodeResult | list[NativeEncodeResult]:
    """SGLang's native ``/classify``: the raw head output (or the embedding) per input, with meta_info."""
    gateway.refuse_if_busy(model.triton_model)
    started = time.perf_counter()
    if request.text is None and request.input_ids is None:
        raise BadRequestError("At least one of text, input_ids, image, video, or audio should be provided")
    if request.text is not None and request.input_ids is not None:
        raise BadRequestError("Either text or input_ids should be provided, not both")
    single = isinstance(request.text, str) or (request.input_ids is not None and bool(request.input_ids)
                                               and isinstance(request.input_ids[0], int))
    if request.text is not None:
        texts = [request.text] if isinstance(request.text, str) else list(request.text)
        if not texts:
            raise BadRequestError("text cannot be an empty list")
        check_item_count(len(texts), settings.max_items_per_request)
        if isinstance(texts[0], list):  # [query, document] pairs: cross-encoder input
            if any(len(pair) != 2 for pair in texts):
                raise BadRequestError("Each text pair must be [query, document]")
            encoded = await encode_texts(model, [p[0] for p in texts], [p[1] for p in texts], settings)
        else:
            encoded = await encode_texts(model, texts, None, settings)
    else:
        prompts = [request.input_ids] if single else list(request.input_ids)
        if not prompts or any(not ids for ids in prompts):
            raise BadRequestError("input_ids cannot be empty")
        check_item_count(len(prompts), settings.max_items_per_request)
        encoded = encode_ids(model, prompts)
    output = "embeddings" if model.task == "embed" else "logits"
    rows = (await gateway.infer(model.triton_model, encoded, (output,)))[output]
    latency = time.perf_counter() - started
    rids = request.rid if isinstance(request.rid, list) else [request.rid] * len(rows)
    results = [
        NativeEncodeResult(
            embedding=row.tolist(),
            meta_info=NativeMetaInfo(id=(rids[i] if i < len(rids) and rids[i] else secrets.token_hex(16)),
                                     finish_reason={"type": "length", "length": 0},
                                     prompt_tokens=int(encoded.lengths[i]), e2e_latency=latency),
        )
        for i, row in enumerate(rows)
    ]
    return results[0] if single else results


def tokenize_json(request: TokenizeRequest, model: ServedModel, settings: Settings) -> bytes:
    """SGLang's ``TokenizeResponse`` as JSON bytes: in a worker thread for large prompts (see
    :func:`tokenize`), tokenized by the backend's GIL-releasing ``encode_batch``."""
    single = isinstance(request.prompt, str)
    texts = [request.prompt] if single else list(request.prompt)
    rows = model.encoder.tokenize(texts, request.add_special_tokens, settings.max_tokens_per_request)
    if single:
        return orjson.dumps({"tokens": rows[0], "count": len(rows[0]), "max_model_len": model.max_model_len})
    return orjson.dumps({"tokens": rows, "count": [len(r) for r in rows], "max_model_len": model.max_model_len})


async def tokenize(request: TokenizeRequest, model: ServedModel, settings: Settings) -> bytes:
    """``/v1/tokenize``: bounded (items, then ADAPTER_MAX_TOKENS_PER_REQUEST ids), and off the event loop
    when large: tokenizing a 10 MB prompt takes seconds, writing its millions of ids as JSON a while."""
    if not isinstance(request.prompt, str):
        check_item_count(len(request.prompt), settings.max_items_per_request)
    chars = len(request.prompt) if isinstance(request.prompt, str) else sum(map(len, request.prompt))
    return await run_sized(model.encoder.work_size(chars), tokenize_json, request, model, settings)


def detokenize_json(request: DetokenizeRequest, model: ServedModel) -> bytes:
    rows = request.tokens
    if rows and isinstance(rows[0], list):
        model.encoder.check_vocabulary(rows)
        return orjson.dumps({"text": model.encoder.decode_rows(rows, request.skip_special_tokens)})
    model.encoder.check_vocabulary([rows])
    return orjson.dumps({"text": model.encoder.decode(rows, request.skip_special_tokens)})


async def detokenize(request: DetokenizeRequest, model: ServedModel, settings: Settings) -> bytes:
    """``/v1/detokenize``: bounded (items, then ADAPTER_MAX_TOKENS_PER_REQUEST ids) before any work, and
    checked and decoded (``decode_batch``, which releases the GIL) in a worker thread when large."""
    rows = request.tokens
    nested = bool(rows) and isinstance(rows[0], list)
    if nested:
        check_item_count(len(rows), settings.max_items_per_request)
    count = sum(map(len, rows)) if nested else len(rows)
    check_request_tokens(count, settings.max_tokens_per_request)
    return await run_sized(count, detokenize_json, request, model)
