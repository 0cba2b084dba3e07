"""Pair scoring shared by ``/score`` and ``/rerank``.

Cross-encoders (classifiers with one label) read each (query, document) as one text pair and return
the activated logit. Bi-encoders (embedding models) embed both sides separately, the query once
for 1:N, and return the cosine similarity, as vLLM's ``BiEncoderIOProcessor`` does.
"""

from __future__ import annotations

import numpy as np

from adapter.common.protocol import UsageInfo
from adapter.errors import BadRequestError
from adapter.registry import ServedModel
from adapter.score.protocol import ScoreData, ScoreRequest, ScoreResponse
from adapter.settings import Settings
from adapter.triton_gateway import TritonGateway


def pair_up(queries: list[str], documents: list[str]) -> list[str]:
    """vLLM's 1:1, 1:N and N:N rule; the queries broadcast to the documents' length."""
    if not queries:
        raise BadRequestError("At least one text element must be given")
    if not documents:
        raise BadRequestError("At least one text_pair element must be given")
    if len(queries) == 1:
        return queries * len(documents)
    if len(queries) != len(documents):
        raise BadRequestError("Input lengths must be either 1:1, 1:N or N:N")
    return queries


async def score_pairs(
    model: ServedModel,
    queries: list[str],
    documents: list[str],
    gateway: TritonGateway,
    settings: Settings,
    use_activation: bool | None = None,
) -> tuple[list[float], int]:
    """One score per document, and the prompt tokens used."""
    paired = pair_up(queries, documents)
    thread_above = settings.tokenize_in_thread_above
    if model.is_cross_encoder:
        encoded = await model.encoder.encode_async(paired, documents, thread_above)
        output = "logits" if use_activation is False else "scores"
        scores = (await gateway.infer(model.triton_model, encoded, (output,)))[output][:, 0]
        return scores.tolist(), encoded.num_tokens

    # `queries` holds one text for 1:N: the query is embedded once and broadcast.
    encoded_queries = await model.encoder.encode_async(queries, None, thread_above)
    encoded_documents = await model.encoder.encode_async(documents, None, thread_above)
    query_vectors = (await gateway.infer(model.triton_model, encoded_queries, ("embeddings",)))["embeddings"]
    document_vectors = (await gateway.infer(model.triton_model, encoded_documents, ("embeddings",)))["embeddings"]
    if len(query_vectors) == 1:
        query_vectors = np.broadcast_to(query_vectors, document_vectors.shape)
    norms = np.linalg.norm(query_vectors, axis=1) * np.linalg.norm(document_vectors, axis=1)
    cosine = np.einsum("ij,ij->i", query_vectors, document_vectors) / np.maximum(norms, 1e-12)
    return cosine.tolist(), encoded_queries.num_tokens + encoded_documents.num_tokens


async def score(
    request: ScoreRequest, model: ServedModel, gateway: TritonGateway, settings: Settings, response_id: str
) -> ScoreResponse:
    queries, documents = request.sides()
    scores, prompt_tokens = await score_pairs(model, queries, documents, gateway, settings, request.use_activation)
    return ScoreResponse(
        id=response_id,
        model=model.name,
        data=[ScoreData(index=index, score=value) for index, value in enumerate(scores)],
        usage=UsageInfo.of(prompt_tokens),
    )
