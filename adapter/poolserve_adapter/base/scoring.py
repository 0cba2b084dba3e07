"""Pairs of texts or multimodal items → one relevance score each: shared by ``/score``, ``/rerank``
and SGLang's rerank.

Cross-encoders (classifiers with one label) read each (query, document) as one text pair, or as the
prompt their score template renders (LLM rerankers), and return the activated logit. Bi-encoders
(embedding models) embed both sides separately, the query once for 1:N, and return the cosine
similarity, as vLLM's ``BiEncoderIOProcessor`` does. Vision-language rerankers join each pair into
one prompt with its images.

Two steps, so that the serving pipeline guards between them: :func:`encode_pairs` tokenizes into
:class:`EncodedPairs`, :func:`score_encoded` runs the model. What the APIs differ in is one
:class:`PairScoring`. :class:`ScoringServing` is the pipeline's steps /score and /rerank share (vLLM's
``ScoringRequestMixin`` fields: per-side truncation, the template's instruction).
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from poolserve_adapter.base.protocol import ScoreItem, ScoringFields
from poolserve_adapter.base.serving import ServeContext, Serving
from poolserve_adapter.errors import BadRequestError, sanitize_message
from poolserve_adapter.media import MediaLoader
from poolserve_adapter.multimodal import check_image_count, is_multimodal, load_images, parse_item
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.settings import Settings
from poolserve_adapter.tokenization import DEFAULT_OPTIONS, Encoded, PromptOptions
from poolserve_adapter.triton_gateway import TritonGateway
from poolserve_contract.score_templates import render


@dataclass(frozen=True)
class PairScoring:
    """How one request wants its pairs scored."""

    # vLLM's truncation: of each joint prompt (cross-encoders, LLM rerankers) or each text (bi-encoders).
    options: PromptOptions = DEFAULT_OPTIONS
    use_activation: bool | None = None  # False: raw logits, or unnormalised dot products; None: the model's
    template_variables: Mapping[str, object] = field(default_factory=dict)  # for the score template
    # vLLM's length rule, applied while tokenizing; False: the endpoint applies its own after (SGLang's).
    check_length: bool = True


@dataclass(frozen=True)
class EncodedPairs:
    """Tokenized pairs: one joint row per pair (cross-encoders), or the two sides apart (bi-encoders)."""

    joint: Encoded | None = None
    queries: Encoded | None = None  # one row for 1:N
    documents: Encoded | None = None

    @property
    def batches(self) -> tuple[Encoded, ...]:
        return (self.joint,) if self.joint is not None else (self.queries, self.documents)

    @property
    def num_tokens(self) -> int:
        return sum(batch.num_tokens for batch in self.batches)

    def tokens_per_pair(self) -> list[int]:
        if self.joint is not None:
            return self.joint.lengths.tolist()
        return (np.broadcast_to(self.queries.lengths, self.documents.lengths.shape) + self.documents.lengths).tolist()


def pair_up(queries: list, documents: list) -> list:
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


def check_pairs(model: ServedModel, queries: list, documents: list) -> None:
    """What can be refused before tokenizing: images sent to a text model, sides that do not pair up."""
    if model.vision is None and any(map(is_multimodal, (*queries, *documents))):
        raise BadRequestError(f"MultiModalParam is not supported for {model.architecture}")
    pair_up(queries, documents)


async def encode_pairs(model: ServedModel, queries: list, documents: list, scoring: PairScoring,
                       settings: Settings) -> EncodedPairs:
    if model.vision is not None:
        return EncodedPairs(joint=await encode_vision_pairs(model, queries, documents, scoring, settings))
    paired = pair_up(queries, documents)
    thread_above, check_length = settings.tokenize_in_thread_above, scoring.check_length
    if model.is_cross_encoder and model.score_template is not None:
        prompts = await render_prompts(model.score_template, paired, documents, scoring.template_variables,
                                       thread_above)
        return EncodedPairs(joint=await model.encoder.encode_async(prompts, None, thread_above, scoring.options,
                                                                   check_length=check_length))
    if model.is_cross_encoder:
        return EncodedPairs(joint=await model.encoder.encode_async(paired, documents, thread_above, scoring.options,
                                                                   check_length=check_length))
    # `queries` holds one text for 1:N: the query is embedded once and broadcast.
    return EncodedPairs(
        queries=await model.encoder.encode_async(queries, None, thread_above, scoring.options,
                                                 check_length=check_length),
        documents=await model.encoder.encode_async(documents, None, thread_above, scoring.options,
                                                   check_length=check_length),
    )


async def score_encoded(gateway: TritonGateway, model: ServedModel, pairs: EncodedPairs,
                        scoring: PairScoring) -> np.ndarray:
    """One score per pair."""
    if pairs.joint is not None:
        output = "logits" if scoring.use_activation is False else "scores"
        return (await gateway.infer(model.triton_model, pairs.joint, (output,)))[output][:, 0]
    query_vectors = (await gateway.infer(model.triton_model, pairs.queries, ("embeddings",)))["embeddings"]
    document_vectors = (await gateway.infer(model.triton_model, pairs.documents, ("embeddings",)))["embeddings"]
    if len(query_vectors) == 1:
        query_vectors = np.broadcast_to(query_vectors, document_vectors.shape)
    dots = np.einsum("ij,ij->i", query_vectors, document_vectors)
    if scoring.use_activation is False:
        return dots  # vLLM: no activation for a bi-encoder means no normalisation
    norms = np.linalg.norm(query_vectors, axis=1) * np.linalg.norm(document_vectors, axis=1)
    return dots / np.maximum(norms, 1e-12)


async def encode_vision_pairs(model: ServedModel, queries: list, documents: list, scoring: PairScoring,
                              settings: Settings) -> Encoded:
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
                prompt = render(model.score_template, query_text, document_text, **scoring.template_variables)
            except Exception as error:
                raise BadRequestError(sanitize_message(f"Could not render the score template: {error}")) from None
        elif model.vision.family.score_format:
            prompt = model.vision.family.score_format.format(query=query_text, document=document_text)
        else:
            prompt = query_text + document_text
        prompts.append(prompt)
        row_urls.append([urls[i] for i in model.vision.image_order(prompt)])
    loaded = await load_images(MediaLoader(settings), [url for urls in row_urls for url in urls])
    return await model.vision.encode(prompts, [[loaded[url] for url in urls] for urls in row_urls], scoring.options,
                                     settings.tokenize_in_thread_above, settings.max_pixel_bytes_per_request)


async def render_prompts(template: str, queries: list[str], documents: list[str], variables: Mapping[str, object],
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


RESERVED_TEMPLATE_KEYS = {"chat_template", "tools", "tokenize"}


def check_scoring_fields(request: ScoringFields, model: ServedModel) -> None:
    """``max_tokens_per_query`` / ``max_tokens_per_doc`` within the model's length, no reserved template key."""
    for name in ("max_tokens_per_query", "max_tokens_per_doc"):
        value = getattr(request, name)
        if value < 0:
            raise BadRequestError(f"{name} must be a non-negative integer", param=name)
        if value >= model.max_model_len:
            raise BadRequestError(f"{name} must be less than max_model_len ({model.max_model_len}).", param=name)
    reserved = RESERVED_TEMPLATE_KEYS & set(request.chat_template_kwargs or {})
    if reserved:
        raise BadRequestError(f"chat_template_kwargs may not set the reserved key(s) {sorted(reserved)}",
                              param="chat_template_kwargs")


def template_variables(request: ScoringFields) -> dict:
    """The score template's variables: ``chat_template_kwargs``, and ``instruction`` when given (the
    template's own default instruction applies when it is not)."""
    variables = dict(request.chat_template_kwargs or {})
    if request.instruction is not None:
        variables["instruction"] = request.instruction
    return variables


async def truncated_sides(request: ScoringFields, model: ServedModel, queries: list[ScoreItem],
                          documents: list[ScoreItem]) -> tuple[list[ScoreItem], list[ScoreItem]]:
    """Each text cut to ``max_tokens_per_query`` / ``max_tokens_per_doc`` tokens first (vLLM's
    ``truncate_text_to_tokens``; 0: no limit); a multimodal item is kept whole."""
    if request.max_tokens_per_query:
        queries = await model.encoder.truncate_texts_async(queries, request.max_tokens_per_query)
    if request.max_tokens_per_doc:  # large: in a worker thread, off the event loop
        documents = await model.encoder.truncate_texts_async(documents, request.max_tokens_per_doc)
    return queries, documents


class ScoringServing(Serving):
    """The steps /score and /rerank share: one side of queries, one of documents, scored in pairs."""

    capability = "can_score"

    @abstractmethod
    def sides(self, request) -> tuple[list[ScoreItem], list[ScoreItem]]:
        """The query side and the document side, each a list."""

    def validate(self, ctx: ServeContext) -> None:
        check_scoring_fields(ctx.request, ctx.model)
        ctx.options = ctx.request.prompt_options(ctx.model.max_model_len)
        check_pairs(ctx.model, *self.sides(ctx.request))

    def scoring(self, ctx: ServeContext) -> PairScoring:
        return PairScoring(options=ctx.options, use_activation=ctx.request.use_activation,
                           template_variables=template_variables(ctx.request))

    async def encode(self, ctx: ServeContext) -> EncodedPairs:
        queries, documents = await truncated_sides(ctx.request, ctx.model, *self.sides(ctx.request))
        return await encode_pairs(ctx.model, queries, documents, self.scoring(ctx), ctx.settings)

    async def infer(self, ctx: ServeContext) -> np.ndarray:
        return await score_encoded(ctx.gateway, ctx.model, ctx.encoded, self.scoring(ctx))
