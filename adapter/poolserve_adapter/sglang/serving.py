"""SGLang's classify, rerank, native classify and tokenize semantics over the same Triton models.

Differences from vLLM that are SGLang's own and kept (``serving_classify.py``, ``serving_rerank.py``,
``http_server.py`` of SGLang 0.5.23): ``/v1/classify`` always applies softmax to the raw logits
(a one-label model gives ``[1.0]``) and names unlabelled classes ``LABEL_i``; rerank returns raw
logits unless the checkpoint declares a sentence-transformers activation; the native ``/classify``
returns the raw head output; an input of N >= context-length tokens is rejected (vLLM allows N ==
max_model_len). ``lora_path`` picks a LoRA adapter by its name, for every input or one per input.
"""

from __future__ import annotations

import secrets
import time

import numpy as np
import orjson
from fastapi.responses import Response

from poolserve_adapter.base.embedding import EmbeddingPlan
from poolserve_adapter.base.scoring import (
    EncodedPairs,
    PairScoring,
    check_pairs,
    encode_pairs,
    long_documents,
    score_encoded,
)
from poolserve_adapter.base.serving import ServeContext, Serving, check_item_count, infer_on
from poolserve_adapter.errors import BadRequestError, Flavour
from poolserve_adapter.registry import ServedModel
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


async def encode_texts(model: ServedModel, texts: list[str], pairs: list[str] | None, settings: Settings) -> Encoded:
    """SGLang's length rule is the pipeline's (``sglang_context_length``), not the tokenizer's."""
    return await model.encoder.encode_async(texts, pairs, settings.tokenize_in_thread_above, check_length=False)


def encode_ids(model: ServedModel, prompts: list[list[int]]) -> Encoded:
    model.encoder.check_vocabulary(prompts)
    return Encoded.from_lists([list(ids) for ids in prompts])


def meta_info(rid: str | None, prompt_tokens: int, latency: float) -> NativeMetaInfo:
    return NativeMetaInfo(id=rid or secrets.token_hex(16), finish_reason={"type": "length", "length": 0},
                          prompt_tokens=prompt_tokens, e2e_latency=latency)


def check_matryoshka(model: ServedModel, dimensions: int | None) -> None:
    """SGLang's ``_validate_for_matryoshka_dim``, in its order and words (the model named by its served name)."""
    if dimensions is None:
        return
    if not model.is_matryoshka:
        raise BadRequestError(f"Model '{model.name}' does not support matryoshka representation, changing output "
                              "dimensions will lead to poor results.")
    if dimensions < 1:
        raise BadRequestError("Requested dimensions must be greater than 0")
    if model.matryoshka_dimensions and dimensions not in model.matryoshka_dimensions:
        raise BadRequestError(f"Model '{model.name}' only supports {list(model.matryoshka_dimensions)} matryoshka "
                              "dimensions, using other output dimensions will lead to poor results.")
    if dimensions > model.embedding_size:
        raise BadRequestError(f"Provided dimensions are greater than max embedding dimension: {model.embedding_size}")


def lora_path_names(model: ServedModel, lora_path: str | list[str | None] | None, count: int) -> np.ndarray | None:
    """SGLang's ``lora_path`` over ``count`` inputs as their adapters' names: one adapter name for all, or one per
    input (None: the base model); None when the request names none (the model's own then)."""
    if lora_path is None:
        return None
    names = [lora_path] * count if isinstance(lora_path, str) else list(lora_path)
    if len(names) != count:
        raise BadRequestError(f"lora_path names {len(names)} adapters for {count} inputs: give one name, or one "
                              "per input")
    return model.adapter_names(names)


async def infer_with_lora_path(ctx: ServeContext, lora_path, output: str) -> np.ndarray:
    """The endpoint's output, each input run on the adapter ``lora_path`` gives it (else the resolved model)."""
    lora_names = lora_path_names(ctx.model, lora_path, ctx.encoded.num_sequences)
    return (await infer_on(ctx.gateway, ctx.model, ctx.encoded, (output,), lora_names))[output]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class ServingClassifyV1(Serving[ClassifyRequest]):
    """``/v1/classify``: SGLang's ``OpenAIServingClassify``."""

    capability = "can_classify"
    lenient = True
    sglang_context_length = True

    def validate(self, ctx: ServeContext[ClassifyRequest]) -> None:
        """SGLang's ``OpenAIServingClassify._validate_request`` messages."""
        value = ctx.request.input
        if isinstance(value, str):
            if not value:
                raise BadRequestError("Input cannot be empty")
            if not value.strip():
                raise BadRequestError("Input cannot be empty or whitespace only")
        else:
            if not value:
                raise BadRequestError("Input cannot be empty")
            for index, item in enumerate(value):
                if isinstance(item, str) and not item.strip():
                    raise BadRequestError(f"Input at index {index} cannot be empty or whitespace only")
                if isinstance(item, int) and item < 0:
                    raise BadRequestError(f"Token ID at index {index} must be non-negative")
        lora_path_names(ctx.model, ctx.request.lora_path, self.item_count(ctx.request))

    def item_count(self, request: ClassifyRequest) -> int:
        value = request.input
        return 1 if isinstance(value, str) or isinstance(value[0], int) else len(value)

    async def encode(self, ctx: ServeContext[ClassifyRequest]) -> Encoded:
        value = ctx.request.input
        if isinstance(value, str):
            return await encode_texts(ctx.model, [value], None, ctx.settings)
        if isinstance(value[0], int):
            return encode_ids(ctx.model, [value])
        return await encode_texts(ctx.model, list(value), None, ctx.settings)

    def output_name(self, ctx: ServeContext[ClassifyRequest]) -> str:
        return "logits"

    async def infer(self, ctx: ServeContext[ClassifyRequest]) -> np.ndarray:
        return await infer_with_lora_path(ctx, ctx.request.lora_path, self.output_name(ctx))

    def respond(self, ctx: ServeContext[ClassifyRequest]) -> ClassifyResponse:
        probs = softmax(ctx.output.astype(np.float64))
        best = np.argmax(probs, axis=1)
        data = [
            ClassifyData(index=i, label=ctx.model.label(int(best[i])) or f"LABEL_{int(best[i])}", probs=row.tolist(),
                         num_classes=len(row))
            for i, row in enumerate(probs)
        ]
        tokens = ctx.encoded.num_tokens
        return ClassifyResponse(model=ctx.model.name, data=data,
                                usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens))


class ServingRerank(Serving[RerankRequest]):
    """SGLang's ``/v1/rerank``: a bare list sorted by score, ``top_n`` >= 1, optional documents."""

    capability = "can_cross_encode"
    fallback = "can_score"
    lenient = True
    sglang_context_length = True

    def validate(self, ctx: ServeContext[RerankRequest]) -> None:
        request = ctx.request
        if not request.query:
            raise BadRequestError("Query cannot be empty")
        if not request.query.strip():
            raise BadRequestError("Query cannot be empty or whitespace only")
        if not request.documents:
            raise BadRequestError("Documents cannot be empty")
        if any(not document.strip() for document in request.documents):
            raise BadRequestError("Each document cannot be empty or whitespace only")
        check_pairs(ctx.model, [request.query], request.documents)

    def item_count(self, request: RerankRequest) -> int:
        return len(request.documents)

    def scoring(self, ctx: ServeContext[RerankRequest]) -> PairScoring:
        """SGLang scores an LLM reranker by p(yes) / (p(yes) + p(no)), activated; cross-encoders get raw
        logits unless the checkpoint declares an activation."""
        model, instruct = ctx.model, ctx.request.instruct
        return PairScoring(use_activation=model.declares_st_activation or model.score_template is not None,
                           template_variables={} if instruct is None else {"instruction": instruct},
                           check_length=False, long_documents=long_documents(ctx.request, model))

    async def encode(self, ctx: ServeContext[RerankRequest]) -> EncodedPairs:
        return await encode_pairs(ctx.model, [ctx.request.query], ctx.request.documents, self.scoring(ctx),
                                  ctx.settings)

    async def infer(self, ctx: ServeContext[RerankRequest]) -> np.ndarray:
        return await score_encoded(ctx.gateway, ctx.model, ctx.encoded, self.scoring(ctx))

    def respond(self, ctx: ServeContext[RerankRequest]) -> Response:
        request, scores, lengths = ctx.request, ctx.output.tolist(), ctx.encoded.tokens_per_pair()
        order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if request.top_n is not None:
            order = order[: request.top_n]
        latency = time.perf_counter() - ctx.started
        results = [
            RerankResult(score=scores[i], document=request.documents[i] if request.return_documents else None, index=i,
                         meta_info={"id": secrets.token_hex(16), "finish_reason": {"type": "length", "length": 0},
                                    "prompt_tokens": int(lengths[i]), "e2e_latency": latency})
            for i in order
        ]
        exclude = set() if request.return_documents else {"document"}
        return Response(orjson.dumps([result.model_dump(exclude=exclude) for result in results]),
                        media_type="application/json")


class ServingNativeClassify(Serving[NativeEncodeRequest]):
    """SGLang's native ``/classify``: the raw head output (or the embedding) per input, with meta_info.
    ``dimensions`` keeps the first values of a Matryoshka embedding, normalised again when the model
    normalises (SGLang's pooler slices, then normalises)."""

    capability = "can_classify"
    fallback = "can_classify_or_embed"
    lenient = True
    flavour = Flavour.SGLANG_NATIVE
    sglang_context_length = True

    @staticmethod
    def is_single(request: NativeEncodeRequest) -> bool:
        return isinstance(request.text, str) or (request.input_ids is not None and bool(request.input_ids)
                                                 and isinstance(request.input_ids[0], int))

    def prompts(self, request: NativeEncodeRequest) -> list:
        """The texts, [query, document] pairs or token-id prompts of the request."""
        if request.text is not None:
            return [request.text] if isinstance(request.text, str) else list(request.text)
        return [request.input_ids] if self.is_single(request) else list(request.input_ids)

    def validate(self, ctx: ServeContext[NativeEncodeRequest]) -> None:
        request = ctx.request
        if request.text is None and request.input_ids is None:
            raise BadRequestError("At least one of text, input_ids, image, video, or audio should be provided")
        if request.text is not None and request.input_ids is not None:
            raise BadRequestError("Either text or input_ids should be provided, not both")
        prompts = self.prompts(request)
        if request.text is not None:
            if not prompts:
                raise BadRequestError("text cannot be an empty list")
            if isinstance(prompts[0], list) and any(len(pair) != 2 for pair in prompts):
                raise BadRequestError("Each text pair must be [query, document]")
        elif not prompts or any(not ids for ids in prompts):
            raise BadRequestError("input_ids cannot be empty")
        check_matryoshka(ctx.model, request.dimensions)
        lora_path_names(ctx.model, request.lora_path, len(prompts))

    def item_count(self, request: NativeEncodeRequest) -> int:
        return len(self.prompts(request))

    async def encode(self, ctx: ServeContext[NativeEncodeRequest]) -> Encoded:
        prompts = self.prompts(ctx.request)
        if ctx.request.text is None:
            return encode_ids(ctx.model, prompts)
        if isinstance(prompts[0], list):  # [query, document] pairs: cross-encoder input
            return await encode_texts(ctx.model, [p[0] for p in prompts], [p[1] for p in prompts], ctx.settings)
        return await encode_texts(ctx.model, prompts, None, ctx.settings)

    def output_name(self, ctx: ServeContext[NativeEncodeRequest]) -> str:
        return ctx.model.embedding_output if ctx.model.task == "embed" else "logits"

    async def infer(self, ctx: ServeContext[NativeEncodeRequest]) -> np.ndarray:
        return await infer_with_lora_path(ctx, ctx.request.lora_path, self.output_name(ctx))

    def respond(self, ctx: ServeContext[NativeEncodeRequest]) -> Response:
        latency = time.perf_counter() - ctx.started
        rid = ctx.request.rid
        rows = ctx.output
        if ctx.request.dimensions is not None:  # only a Matryoshka embedding model gets here with dimensions
            rows = EmbeddingPlan("embeddings", ctx.request.dimensions, ctx.model.normalizes).finish(rows)
        rids = rid if isinstance(rid, list) else [rid] * len(rows)
        results = [
            NativeEncodeResult(embedding=row.tolist(),
                               meta_info=meta_info(rids[i] if i < len(rids) else None, int(ctx.encoded.lengths[i]),
                                                   latency)).model_dump()
            for i, row in enumerate(rows)
        ]
        return Response(orjson.dumps(results[0] if self.is_single(ctx.request) else results),
                        media_type="application/json")


class ServingNativeEncode(ServingNativeClassify):
    """SGLang's ``/encode``: the same request and answer as its native ``/classify`` (one handler in SGLang),
    served by an embedding model first; a named classifier answers with its raw head output, as SGLang
    run with ``--is-embedding`` does."""

    capability = "can_embed"
    fallback = "can_classify_or_embed"


serving_classify_v1 = ServingClassifyV1()
serving_rerank = ServingRerank()
serving_native_classify = ServingNativeClassify()
serving_native_encode = ServingNativeEncode()


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
