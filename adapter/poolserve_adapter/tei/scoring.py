"""TEI's ``/predict`` and ``/rerank`` (its body on ``/rerank``: ``query`` and ``texts``), as
``router/src/http/server.rs`` and ``core/src/infer.rs::predict`` answer them.

Both read the classifier's raw ``logits`` and apply TEI's own activation here, whatever the model's card
says: with ``raw_scores`` the logits, else a softmax over the labels, or the sigmoid of a single label
(a re-ranker). ``/predict`` takes a text, a pair ``[text, text]`` or a batch of both and answers each
input's ``[{"score", "label"}]``; ``/rerank`` scores each ``(query, text)`` pair of a re-ranker (a classifier
with one label) and answers the bare list ``[{"index", "text"?, "score"}]``. Both sort by score descending
as TEI does: a stable ascending sort, reversed (equal scores: the later first).

Checks, in TEI's order. ``/predict``: a batch over the client batch size (422), the model not a classifier
(424 ``Model is not a classifier model``), an empty input (400), too long (422). ``/rerank``: no texts (400
``\\`texts\\` cannot be empty``), the model not a re-ranker (424 ``model is not a re-ranker model``), too many
texts (422), then each pair as ``/predict``. A NaN score is TEI's 424 ``score is NaN``.

A pair is tokenized as TEI does (a text pair, truncated longest side first); an LLM reranker's pair is
rendered by its score template first, as the vLLM routes do, and tokenized as one text. Vision-language
models are not served here: TEI's routes take text only."""

from __future__ import annotations

from http import HTTPStatus

import numpy as np
import orjson
from fastapi.responses import Response

from poolserve_adapter.base.scoring import render_prompts
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.errors import Flavour, TeiError
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tei.protocol import PredictRequest, RerankRequest
from poolserve_adapter.tei.serving import (
    backend_error,
    refuse_empty,
    refuse_oversized_batch,
    tokenized,
)
from poolserve_adapter.tokenization import Encoded, run_sized

TeiInput = str | tuple[str, str]


def activated(logits: np.ndarray, raw_scores: bool) -> np.ndarray:
    """TEI's scores of each row of logits, in float32: as they are with ``raw_scores``, else the softmax over the
    labels, or the sigmoid of a single label."""
    logits = np.asarray(logits, dtype=np.float32)
    if raw_scores:
        return logits
    if logits.shape[-1] == 1:
        return np.float32(1) / (np.float32(1) + np.exp(-logits))
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def descending(scores: list[float]) -> list[int]:
    """Indices by score descending as TEI sorts them: a stable ascending sort, then reversed."""
    order = sorted(range(len(scores)), key=scores.__getitem__)
    order.reverse()
    return order


def refuse_nan(scores: np.ndarray) -> None:
    if np.isnan(scores).any():
        raise TeiError("score is NaN", status=HTTPStatus.FAILED_DEPENDENCY, kind="Backend")


def refuse_vision(model: ServedModel) -> None:
    if model.vision is not None:
        raise backend_error(f"`{model.name}` is a vision-language model: TEI's routes take text only (use /rerank "
                            "with `documents`, or /score)")


async def encode_inputs(ctx: ServeContext, inputs: list[TeiInput]) -> Encoded:
    """Texts and pairs tokenized as TEI does; an LLM reranker's pairs rendered by its score template first."""
    model, request = ctx.model, ctx.request
    if model.score_template is not None:
        pairs = [index for index, item in enumerate(inputs) if not isinstance(item, str)]
        prompts = await render_prompts(model.score_template, [inputs[i][0] for i in pairs],
                                       [inputs[i][1] for i in pairs], {}, ctx.settings.tokenize_in_thread_above)
        inputs = list(inputs)
        for index, prompt in zip(pairs, prompts):
            inputs[index] = prompt
    size = sum(len(text) for item in inputs for text in ((item,) if isinstance(item, str) else item))
    return await run_sized(size, tokenized, model, inputs, bool(request.truncate), request.direction)


class ServingPredict(Serving[PredictRequest]):
    capability = "can_classify"
    # TEI serves one model: the one named when it is served, else the first classifier, else any model (which
    # then answers TEI's 424).
    lenient = True
    fallback = "can_tokenize"
    flavour = Flavour.TEI

    def validate(self, ctx: ServeContext[PredictRequest]) -> None:
        request, limit = ctx.request, ctx.settings.max_items_per_request
        count = len(request.sequences())
        if request.is_batch:
            refuse_oversized_batch(count, limit)
        if not ctx.model.can_classify:
            raise backend_error("Model is not a classifier model")
        refuse_vision(ctx.model)
        refuse_empty(request.sequences())

    def item_count(self, request: PredictRequest) -> int:
        return len(request.sequences())

    async def encode(self, ctx: ServeContext[PredictRequest]) -> Encoded:
        return await encode_inputs(ctx, ctx.request.sequences())

    def output_name(self, ctx: ServeContext[PredictRequest]) -> str:
        return "logits"

    def respond(self, ctx: ServeContext[PredictRequest]) -> Response:
        scores = activated(ctx.output, ctx.request.raw_scores)
        refuse_nan(scores)
        predictions = []
        for row in scores:
            labels = [ctx.model.label(index) or f"LABEL_{index}" for index in range(len(row))]
            predictions.append([{"score": row[index], "label": labels[index]} for index in descending(row.tolist())])
        body = predictions if ctx.request.is_batch else predictions[0]
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


class ServingRerank(Serving[RerankRequest]):
    capability = "can_cross_encode"
    lenient = True
    fallback = "can_tokenize"
    flavour = Flavour.TEI

    def validate(self, ctx: ServeContext[RerankRequest]) -> None:
        texts, limit = ctx.request.texts, ctx.settings.max_items_per_request
        if not texts:
            raise TeiError("`texts` cannot be empty", status=HTTPStatus.BAD_REQUEST, kind="Empty")
        if not ctx.model.can_cross_encode:
            raise backend_error("model is not a re-ranker model")
        refuse_oversized_batch(len(texts), limit)
        refuse_vision(ctx.model)
        refuse_empty(self.pairs(ctx.request))

    @staticmethod
    def pairs(request: RerankRequest) -> list[TeiInput]:
        return [(request.query, text) for text in request.texts]

    def item_count(self, request: RerankRequest) -> int:
        return len(request.texts)

    async def encode(self, ctx: ServeContext[RerankRequest]) -> Encoded:
        return await encode_inputs(ctx, self.pairs(ctx.request))

    def output_name(self, ctx: ServeContext[RerankRequest]) -> str:
        return "logits"

    def respond(self, ctx: ServeContext[RerankRequest]) -> Response:
        request = ctx.request
        scores = activated(ctx.output[:, :1], request.raw_scores)[:, 0]
        refuse_nan(scores)
        ranks = []
        for index in descending(scores.tolist()):
            rank = {"index": index, "text": request.texts[index]} if request.return_text else {"index": index}
            rank["score"] = scores[index]
            ranks.append(rank)
        return Response(orjson.dumps(ranks, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


serving_predict = ServingPredict()
serving_tei_rerank = ServingRerank()
