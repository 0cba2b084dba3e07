"""Classification: texts, token ids or a chat → Triton ``scores`` (or ``logits``) → labelled rows."""

from __future__ import annotations

import numpy as np

from poolserve_adapter.base.encoding import encode_prompts
from poolserve_adapter.base.protocol import UsageInfo
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.classify.protocol import (
    ClassificationChatRequest,
    ClassificationCompletionRequest,
    ClassificationData,
    ClassificationResponse,
)
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tokenization import Encoded

ClassificationRequest = ClassificationCompletionRequest | ClassificationChatRequest


def refuse_image_tokens(model: ServedModel, encoded: Encoded) -> Encoded:
    """A vision model's prompt without images may not hold its image pad token (typed or as an id)."""
    if model.vision is not None and encoded.vision is None and bool((encoded.input_ids[
            np.arange(encoded.input_ids.shape[1])[None, :] < encoded.lengths[:, None]] == model.vision.image_token_id).any()):
        raise BadRequestError("The prompt holds image placeholder tokens but no image: send images as image_url parts")
    return encoded


class ServingClassification(Serving[ClassificationRequest]):
    capability = "can_classify"

    def validate(self, ctx: ServeContext[ClassificationRequest]) -> None:
        ctx.options = ctx.request.prompt_options(ctx.model.max_model_len, ctx.request.add_special_tokens)

    def item_count(self, request: ClassificationRequest) -> int:
        return request.prompt_count()

    async def encode(self, ctx: ServeContext[ClassificationRequest]) -> Encoded:
        return refuse_image_tokens(ctx.model, await encode_prompts(ctx.model, ctx.request, ctx.options, ctx.settings))

    def output_name(self, ctx: ServeContext[ClassificationRequest]) -> str:
        return "logits" if ctx.request.use_activation is False else "scores"

    def respond(self, ctx: ServeContext[ClassificationRequest]) -> ClassificationResponse:
        best = np.argmax(ctx.output, axis=1)
        data = [
            ClassificationData(index=index, label=ctx.model.id2label.get(int(best[index])), probs=row.tolist(),
                               num_classes=len(row))
            for index, row in enumerate(ctx.output)
        ]
        return ClassificationResponse(id=ctx.response_id("classify"), model=ctx.model.name, data=data,
                                      usage=UsageInfo.of(ctx.encoded.num_tokens))


serving_classification = ServingClassification()
