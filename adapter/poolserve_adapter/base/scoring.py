"""Pair scoring shared by ``/score`` and ``/rerank``.

Cross-encoders (classifiers with one label) read each (query, document) as one text pair and return
the activated logit. Bi-encoders (embedding models) embed both sides separately, the query once
for 1:N, and return the cosine similarity, as vLLM's ``BiEncoderIOProcessor`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from poolserve_adapter.common.protocol import UsageInfo, check_item_count
from poolserve_adapter.errors import BadRequestError, sanitize_message
from poolserve_adapter.media import MediaLoader
from poolserve_adapter.multimodal import check_image_count, is_multimodal, load_images, parse_item
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.score.protocol import ScoreData, ScoreRequest, ScoreResponse, ScoringFields
from poolserve_adapter.settings import Settings
from poolserve_adapter.tokenization import DEFAULT_OPTIONS, Encoded, PromptOptions
from poolserve_adapter.triton_gateway import TritonGateway
from poolserve_contract.score_templates import render


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
    *,
    options: PromptOptions = DEFAULT_OPTIONS,
    length_check: Callable[[ServedModel, Encoded], None] | None = None,
    per_item_tokens: bool = False,
    template_variables: dict | None = None,
) -> tuple[list[float], int | list[int]]:
    """One score per document, and the prompt tokens used (in total, or per document).

    ``options`` (vLLM's truncation) applies to each joint pair prompt of a cross-encoder (for an LLM
    reranker: to the prompt its score template renders, with ``template_variables``) and to each
    text of a bi-encoder; ``length_check`` replaces vLLM's length rule (SGLang's is stricter).
    """
    gateway.refuse_if_busy(model.triton_model)
    if model.vision is None and any(map(is_multimodal, (*queries, *documents))):
        raise BadRequestError(f"MultiModalParam is not supported for {model.architecture}")
    if model.vision is not None:
        return await score_vision_pairs(model, queries, documents, gateway, settings, use_activation, options=options,
                                        per_item_tokens=per_item_tokens, template_variables=template_variables,
                                        length_check=length_check)
    paired = pair_up(queries, documents)
    thread_above = settings.tokenize_in_thread_above
    check_length = length_check is None
    if model.is_cross_encoder:
        if model.score_template is not None:
            prompts = await render_prompts(model.score_template, paired, documents, template_variables or {},
                                           thread_above)
            encoded = await model.encoder.encode_async(prompts, None, thread_above, options, check_length=check_length)
        else:
            encoded = await model.encoder.encode_async(paired, documents, thread_above, options,
                                                       check_length=check_length)
        if length_check is not None:
            length_check(model, encoded)
        output = "logits" if use_activation is False else "scores"
        scores = (await gateway.infer(model.triton_model, encoded, (output,)))[output][:, 0]
        return scores.tolist(), (encoded.lengths.tolist() if per_item_tokens else encoded.num_tokens)

    # `queries` holds one text for 1:N: the query is embedded once and broadcast.
    encoded_queries = await model.encoder.encode_async(queries, None, thread_above, options, check_length=check_length)
    encoded_documents = await model.encoder.encode_async(documents, None, thread_above, options,
                                                         check_length=check_length)
    if length_check is not None:
        length_check(model, encoded_queries)
        length_check(model, encoded_documents)
    gateway.check_total_tokens(encoded_queries.num_tokens + encoded_documents.num_tokens)
    query_vectors = (await gateway.infer(model.triton_model, encoded_queries, ("embeddings",)))["embeddings"]
    document_vectors = (await gateway.infer(model.triton_model, encoded_documents, ("embeddings",)))["embeddings"]
    if len(query_vectors) == 1:
        query_vectors = np.broadcast_to(query_vectors, document_vectors.shape)
    dots = np.einsum("ij,ij->i", query_vectors, document_vectors)
    if use_activation is False:
        scores = dots  # vLLM: no activation for a bi-encoder means no normalisation
    else:
        norms = np.linalg.norm(query_vectors, axis=1) * np.linalg.norm(document_vectors, axis=1)
        scores = dots / np.maximum(norms, 1e-12)
    if per_item_tokens:
        query_lengths = np.broadcast_to(encoded_queries.lengths, encoded_documents.lengths.shape)
        return scores.tolist(), (query_lengths + encoded_documents.lengths).tolist()
    return scores.tolist(), encoded_queries.num_tokens + encoded_documents.num_tokens


async def score_vision_pairs(model: ServedModel, queries: list, documents: list, gateway: TritonGateway,
                             settings: Settings, use_activation: bool | None, *, options: PromptOptions,
                             per_item_tokens: bool, template_variables: dict | None,
                             length_check: Callable[[ServedModel, Encoded], None] | None = None,
                             ) -> tuple[list[float], int | list[int]]:
    """Pairs of texts and/or ``{"content": [parts]}`` items through a vision-language reranker: each side in
    vLLM's string form (image placeholders first), joined by the model's score template or format, then
    the checkpoint's image processor; images load concurrently, each distinct URL once."""
    paired = pair_up(queries, documents)
    query_sides = {id(q): parse_item(q) for q in queries}
    prompts, row_urls = [], []
    for query, document in zip(paired, documents):
        query_side, document_side = query_sides[id(query)], parse_item(document)
        urls = query_side.image_urls + document_side.image_urls
        check_image_count(len(urls), settings.max_images_per_prompt)
        query_text, document_text = query_side.prompt(0), document_side.prompt(len(query_side.image_urls))
        try:
            written = model.vision.family.render_pair(query_side, document_side)
        except ValueError as error:  # the family's own limits (e.g. one image per document)
            raise BadRequestError(str(error)) from None
        if written is not None:
            prompts.append(written[0])
            row_urls.append([urls[i] for i in written[1]])
            continue
        if model.score_template is not None:
            try:
                prompt = render(model.score_template, query_text, document_text, **(template_variables or {}))
            except Exception as error:
                raise BadRequestError(sanitize_message(f"Could not render the score template: {error}")) from None
        elif model.vision.family.score_format:
            prompt = model.vision.family.score_format.format(query=query_text, document=document_text)
        else:
            prompt = query_text + document_text
        prompts.append(prompt)
        row_urls.append([urls[i] for i in model.vision.image_order(prompt)])
    loaded = await load_images(MediaLoader(settings), [url for urls in row_urls for url in urls])
    encoded = await model.vision.encode(prompts, [[loaded[url] for url in urls] for urls in row_urls], options,
                                        settings.tokenize_in_thread_above, settings.max_pixel_bytes_per_request)
    if length_check is not None:
        length_check(model, encoded)
    output = "logits" if use_activation is False else "scores"
    scores = (await gateway.infer(model.triton_model, encoded, (output,)))[output][:, 0]
    return scores.tolist(), (encoded.lengths.tolist() if per_item_tokens else encoded.num_tokens)


async def render_prompts(template: str, queries: list[str], documents: list[str], variables: dict,
                         thread_above: int) -> list[str]:
    """One prompt per pair through the score template; a template error is the client's 400."""
    def render_all() -> list[str]:
        try:
            return [render(template, query, document, **variables) for query, document in zip(queries, documents)]
        except Exception as error:
            raise BadRequestError(sanitize_message(f"Could not render the score template: {error}")) from None

    if len(queries) > thread_above:
        return await asyncio.to_thread(render_all)
    return render_all()


def template_variables(request: ScoringFields) -> dict:
    """The score template's variables: ``chat_template_kwargs``, and ``instruction`` when given
    (the template's own default instruction applies when it is not)."""
    variables = dict(request.chat_template_kwargs or {})
    if request.instruction is not None:
        variables["instruction"] = request.instruction
    return variables


async def truncate_sides(request: ScoringFields, model: ServedModel, queries: list[str],
                         documents: list[str]) -> tuple[list[str], list[str]]:
    """``max_tokens_per_query`` / ``max_tokens_per_doc``: cut each text to that many tokens first
    (vLLM's ``truncate_text_to_tokens``); 0 means no limit."""
    for name in ("max_tokens_per_query", "max_tokens_per_doc"):
        value = getattr(request, name)
        if value < 0:
            raise BadRequestError(f"{name} must be a non-negative integer", param=name)
        if value >= model.max_model_len:
            raise BadRequestError(f"{name} must be less than max_model_len ({model.max_model_len}).", param=name)
    reserved = {"chat_template", "tools", "tokenize"} & set(request.chat_template_kwargs or {})
    if reserved:
        raise BadRequestError(f"chat_template_kwargs may not set the reserved key(s) {sorted(reserved)}",
                              param="chat_template_kwargs")
    # A multimodal item is kept whole (vLLM truncates the text of string items only).
    if request.max_tokens_per_query:
        queries = await model.encoder.truncate_texts_async(queries, request.max_tokens_per_query)
    if request.max_tokens_per_doc:  # large: in a worker thread, off the event loop
        documents = await model.encoder.truncate_texts_async(documents, request.max_tokens_per_doc)
    return queries, documents


async def score(
    request: ScoreRequest, model: ServedModel, gateway: TritonGateway, settings: Settings, response_id: str
) -> ScoreResponse:
    queries, documents = request.sides()
    check_item_count(max(len(queries), len(documents)), settings.max_items_per_request)
    queries, documents = await truncate_sides(request, model, queries, documents)
    scores, prompt_tokens = await score_pairs(model, queries, documents, gateway, settings, request.use_activation,
                                              options=request.prompt_options(model.max_model_len),
                                              template_variables=template_variables(request))
    return ScoreResponse(
        id=response_id,
        model=model.name,
        data=[ScoreData(index=index, score=value) for index, value in enumerate(scores)],
        usage=UsageInfo.of(prompt_tokens),
    )
