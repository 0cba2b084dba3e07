"""Classification: texts or token ids → Triton ``scores`` (or ``logits``) → labelled rows."""

from __future__ import annotations

import numpy as np

from adapter.classify.protocol import ClassificationData, ClassificationRequest, ClassificationResponse
from adapter.common.protocol import UsageInfo
from adapter.errors import BadRequestError
from adapter.registry import ServedModel
from adapter.settings import Settings
from adapter.tokenization import Encoded
from adapter.triton_gateway import TritonGateway


async def encode_inputs(model: ServedModel, value, settings: Settings) -> Encoded:
    """str | list[str] | list[int] | list[list[int]] → token ids, vLLM's prompt rules."""
    if isinstance(value, str):
        return await model.encoder.encode_async([value], None, settings.tokenize_in_thread_above)
    if not value:
        raise BadRequestError("You must pass at least one prompt")
    if isinstance(value[0], str):
        return await model.encoder.encode_async(list(value), None, settings.tokenize_in_thread_above)
    if isinstance(value[0], int):
        return model.encoder.check_token_ids([value])  # one non-empty list of ints is one prompt
    return model.encoder.check_token_ids(value)


async def classify(
    request: ClassificationRequest, model: ServedModel, gateway: TritonGateway, settings: Settings, response_id: str
) -> ClassificationResponse:
    encoded = await encode_inputs(model, request.input, settings)
    output = "logits" if request.use_activation is False else "scores"
    probs = (await gateway.infer(model.triton_model, encoded, (output,)))[output]
    best = np.argmax(probs, axis=1)
    data = [
        ClassificationData(
            index=index,
            label=model.id2label.get(int(best[index])),
            probs=row.tolist(),
            num_classes=len(row),
        )
        for index, row in enumerate(probs)
    ]
    return ClassificationResponse(
        id=response_id, model=model.name, data=data, usage=UsageInfo.of(encoded.num_tokens)
    )
