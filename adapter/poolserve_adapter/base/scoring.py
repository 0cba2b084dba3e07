"""Pairs of texts or multimodal items → one relevance score each: shared by ``/score``, ``/rerank``
and SGLang's rerank.

Cross-encoders (classifiers with one label) read each (query, document) as one text pair, or as the
prompt their score template renders (LLM rerankers), and return the activated logit. Bi-encoders
(embedding models) embed both sides separately, the query once for 1:N, and return the cosine
similarity, as vLLM's ``BiEncoderIOProcessor`` does. Late-interaction (ColBERT) models encode both sides
apart too and return the MaxSim of their token vectors (vLLM's ``LateInteractionIOProcessor``): each
distinct query goes to Triton once per request, as the first row before its documents, and the model's
MaxSim kernel scores every row against it (``maxsim_scores``). Vision-language rerankers join each pair into
one prompt with its images.

A pair longer than the model's window is truncated (or refused) as vLLM does, or, when the request's
``long_documents`` (else the model's parameter) says ``max`` or ``mean``, its document is cut into
overlapping chunks of token ids, each scored with the query in the same Triton request, and the pair's
score is the max or mean of its chunks' (:class:`LongDocuments`).

Two steps, so that the serving pipeline guards between them: :func:`encode_pairs` tokenizes into
:class:`EncodedPairs`, :func:`score_encoded` runs the model. What the APIs differ in is one
:class:`PairScoring`. :class:`ScoringServing` is the pipeline's steps /score and /rerank share (vLLM's
``ScoringRequestMixin`` fields: per-side truncation, the template's instruction).
"""

from __future__ import annotations

import asyncio
import math
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from poolserve_adapter.base.embedding import token_rows
from poolserve_adapter.base.protocol import ScoreItem, ScoringFields
from poolserve_adapter.base.serving import ServeContext, Serving, infer_on
from poolserve_adapter.errors import BadRequestError, sanitize_message
from poolserve_adapter.media import MediaLoader
from poolserve_adapter.multimodal import check_image_count, is_multimodal, load_images, parse_item
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.settings import Settings
from poolserve_adapter.tokenization import (
    DEFAULT_OPTIONS,
    MAX_CHARS_PER_TOKEN,
    Encoded,
    PromptOptions,
    run_sized,
    too_many_tokens_error,
)
from poolserve_adapter.triton_gateway import TritonGateway
from poolserve_contract.score_templates import render


@dataclass(frozen=True)
class LongDocuments:
    """How a pair longer than the model's window is scored: ``truncate`` (vLLM's and TEI's rule: cut by
    ``truncate_prompt_tokens``, else a 400), or its document cut into chunks of token ids that share
    ``overlap`` tokens, each paired with the query, and the ``max`` or ``mean`` of their scores."""

    mode: str = "truncate"
    overlap: int | None = None  # None: a quarter of the room a chunk has beside the query

    @property
    def chunks(self) -> bool:
        return self.mode != "truncate"


@dataclass(frozen=True)
class PairScoring:
    """How one request wants its pairs scored."""

    # vLLM's truncation: of each joint prompt (cross-encoders, LLM rerankers) or each text (bi-encoders).
    options: PromptOptions = DEFAULT_OPTIONS
    use_activation: bool | None = None  # False: raw logits, or unnormalised dot products; None: the model's
    template_variables: Mapping[str, object] = field(default_factory=dict)  # for the score template
    # vLLM's length rule, applied while tokenizing; False: the endpoint applies its own after (SGLang's).
    check_length: bool = True
    long_documents: LongDocuments = LongDocuments()


@dataclass(frozen=True)
class EncodedPairs:
    """Tokenized pairs: one joint row per pair (cross-encoders), or the two sides apart (bi-encoders)."""

    joint: Encoded | None = None
    queries: Encoded | None = None  # one row for 1:N
    documents: Encoded | None = None
    # Documents cut into chunks: the first row (of `joint`, or of `documents`) of each pair, whose rows run
    # to the next pair's first; None: one row per pair.
    pair_starts: np.ndarray | None = None
    # Late interaction: the tokens vLLM counts between a query and a document in usage (1 when the tokenizer
    # has a pad token, else 0); None: usage counts the tokens sent.
    pair_padding: int | None = None

    @property
    def batches(self) -> tuple[Encoded, ...]:
        return (self.joint,) if self.joint is not None else (self.queries, self.documents)

    @property
    def num_tokens(self) -> int:
        return sum(batch.num_tokens for batch in self.batches)

    @property
    def usage_tokens(self) -> int:
        """The response's prompt tokens: those sent, or for late interaction vLLM's count, each document row
        with its query and the padding between (``query + pad + document`` per pair)."""
        if self.pair_padding is None:
            return self.num_tokens
        return int((self.queries.lengths[self.query_of_document_rows()] + self.pair_padding).sum()
                   + self.documents.num_tokens)

    def query_of_document_rows(self) -> np.ndarray:
        """Bi-encoder sides: the row of ``queries`` each row of ``documents`` is scored against."""
        if self.queries.num_sequences == 1:
            return np.zeros(self.documents.num_sequences, dtype=np.int64)
        pairs = np.arange(self.queries.num_sequences)
        return pairs if self.pair_starts is None else np.repeat(pairs, self.rows_per_pair())

    def tokens_per_pair(self) -> list[int]:
        """Each pair's tokens: every chunk's, and a bi-encoder's query once."""
        if self.joint is not None:
            return self.per_pair(self.joint.lengths).tolist()
        documents = self.per_pair(self.documents.lengths)
        return (np.broadcast_to(self.queries.lengths, documents.shape) + documents).tolist()

    def per_pair(self, rows: np.ndarray, reduce: np.ufunc = np.add) -> np.ndarray:
        """``rows`` (one value per row sent) reduced to one per pair; as is without chunks."""
        return rows if self.pair_starts is None else reduce.reduceat(rows, self.pair_starts)

    def rows_per_pair(self) -> np.ndarray:
        rows = (self.joint if self.joint is not None else self.documents).num_sequences
        return np.diff(np.append(self.pair_starts, rows))


def aggregated(scores: np.ndarray, pairs: EncodedPairs, mode: str) -> np.ndarray:
    """One score per pair: the max or mean of its chunks' (a pair of one row keeps its score exactly)."""
    if pairs.pair_starts is None:
        return scores
    if mode == "max":
        return pairs.per_pair(scores, np.maximum)
    return pairs.per_pair(scores.astype(np.float64)) / pairs.rows_per_pair()


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
        if scoring.long_documents.chunks:
            raise BadRequestError(f"long_documents={scoring.long_documents.mode} is for text models; "
                                  f"{model.name} takes images", param="long_documents")
        return EncodedPairs(joint=await encode_vision_pairs(model, queries, documents, scoring, settings))
    paired = pair_up(queries, documents)
    thread_above, check_length = settings.tokenize_in_thread_above, scoring.check_length
    chunks = scoring.long_documents.chunks
    if model.is_cross_encoder and model.score_template is not None:
        prompts = await render_prompts(model.score_template, paired, documents, scoring.template_variables,
                                       thread_above)
        if chunks:
            def document_characters(index: int) -> tuple[int, int]:
                return document_in_prompt(model.score_template, paired[index], documents[index], prompts[index],
                                          scoring.template_variables)

            joint, starts = await encode_chunked(model, prompts, scoring, settings, sequence=0,
                                                 characters=document_characters)
            return EncodedPairs(joint=joint, pair_starts=starts)
        return EncodedPairs(joint=await model.encoder.encode_async(prompts, None, thread_above, scoring.options,
                                                                   check_length=check_length))
    if model.is_cross_encoder:
        if chunks:
            joint, starts = await encode_chunked(model, list(zip(paired, documents)), scoring, settings, sequence=1)
            return EncodedPairs(joint=joint, pair_starts=starts)
        return EncodedPairs(joint=await model.encoder.encode_async(paired, documents, thread_above, scoring.options,
                                                                   check_length=check_length))
    # `queries` holds one text for 1:N: the query is embedded once and broadcast.
    query_rows = await model.encoder.encode_async(queries, None, thread_above, scoring.options,
                                                  check_length=check_length)
    padding = None
    if model.late_interaction:
        padding = 0 if model.encoder.tokenizer.pad_token_id is None else 1
    if chunks:  # each chunk of a document is embedded alone: its room is the window less the special tokens
        document_rows, starts = await encode_chunked(model, documents, scoring, settings, sequence=0)
        return EncodedPairs(queries=query_rows, documents=document_rows, pair_starts=starts, pair_padding=padding)
    return EncodedPairs(
        queries=query_rows,
        documents=await model.encoder.encode_async(documents, None, thread_above, scoring.options,
                                                   check_length=check_length),
        pair_padding=padding,
    )


def pair_window(model: ServedModel, scoring: PairScoring) -> int:
    """The most tokens one row may hold: ``truncate_prompt_tokens`` when asked, else the model's length,
    less one under SGLang's rule (the endpoint's own length check refuses ``max_model_len`` tokens)."""
    window = model.max_model_len if scoring.options.truncate_to is None else scoring.options.truncate_to
    return window if scoring.check_length else min(window, model.max_model_len - 1)


def chunk_windows(length: int, room: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk of a document of ``length`` tokens: ``room`` tokens each, each
    starting ``room - overlap`` after the one before, except the last, which ends at the document's end
    and starts ``room`` tokens before it (it overlaps the one before by ``overlap`` tokens or more): a
    short last chunk would score its few tokens with little context."""
    stride, start, windows = room - overlap, 0, []
    while start + room < length:
        windows.append((start, start + room))
        start += stride
    windows.append((max(0, length - room), length))
    return windows


def chunk_count(length: int, room: int, overlap: int) -> int:
    """How many windows :func:`chunk_windows` cuts, without cutting them."""
    return 1 if length <= room else 1 + math.ceil((length - room) / (room - overlap))


def document_tokens(encoding, sequence: int, characters: tuple[int, int] | None) -> tuple[int, int]:
    """``[start, end)`` of the document's tokens in one whole encoding: sequence ``sequence`` of it (the
    second of a text pair, the only one of a text), and of those, when ``characters`` is given (a
    rendered prompt), the tokens overlapping that span of the text. A token that straddles the
    document's edge (a byte-level word with the template's space before it) is the document's."""
    first, last = len(encoding.ids), -1
    for position, (owner, (start, end)) in enumerate(zip(encoding.sequence_ids, encoding.offsets)):
        if owner == sequence and (characters is None or (start < characters[1] and end > characters[0])):
            first, last = min(first, position), position
    return (first, first) if last < 0 else (first, last + 1)


def chunked(model: ServedModel, inputs: list, scoring: PairScoring, max_rows: int, max_tokens: int, sequence: int,
            characters: Callable[[int], tuple[int, int]] | None) -> tuple[Encoded, np.ndarray]:
    """Every input tokenized whole, once; one longer than the window becomes several rows, each the
    encoding's own ids around one chunk of the document's ids (the special tokens, the query, a
    template's fixed parts: exactly what the tokenizer put there, token types included), so no chunk is
    decoded and tokenized again. One that fits is one row, the ids truncate mode sends. The rows and tokens
    a document makes are counted before its rows are built: every row repeats the query and the template,
    so a long document with little room would otherwise cost memory far beyond the request's limits."""
    encodings = model.encoder.encode_whole(inputs, scoring.options.add_special_tokens)
    window, mode = pair_window(model, scoring), scoring.long_documents.mode
    rows, types, starts = [], [], []
    row_count = token_count = 0

    def check_limits() -> None:
        if row_count > max_rows:
            raise BadRequestError(
                f"The documents make {row_count} chunks or more (long_documents={mode}), more than the maximum of "
                f"{max_rows} per request (ADAPTER_MAX_ITEMS_PER_REQUEST).", param="long_documents")
        if token_count > max_tokens:
            raise too_many_tokens_error(token_count, max_tokens)

    for index, encoding in enumerate(encodings):
        starts.append(len(rows))
        ids, type_ids = encoding.ids, encoding.type_ids
        if len(ids) <= window:
            row_count, token_count = row_count + 1, token_count + len(ids)
            check_limits()
            rows.append(ids)
            types.append(type_ids)
            continue
        start, end = document_tokens(encoding, sequence, None if characters is None else characters(index))
        room = window - (len(ids) - (end - start))  # what the query, specials and template leave
        if room < 1:
            raise BadRequestError(
                f"The query and the special tokens take {len(ids) - (end - start)} of the {window} tokens a "
                f"pair may hold: no room is left for a chunk of document {index} (long_documents={mode}).",
                param="long_documents")
        overlap = room // 4 if scoring.long_documents.overlap is None else scoring.long_documents.overlap
        if overlap >= room:
            raise BadRequestError(
                f"chunk_overlap_tokens ({overlap}) must be less than the {room} tokens a chunk of document "
                f"{index} has beside the query and the special tokens.", param="chunk_overlap_tokens")
        length, fixed = end - start, len(ids) - (end - start)
        count = chunk_count(length, room, overlap)
        last = length - (count - 1) * (room - overlap)  # the last window's document tokens
        row_count, token_count = row_count + count, token_count + count * fixed + (count - 1) * room + last
        check_limits()
        for chunk_start, chunk_end in chunk_windows(length, room, overlap):
            rows.append(ids[:start] + ids[start + chunk_start:start + chunk_end] + ids[end:])
            types.append(type_ids[:start] + type_ids[start + chunk_start:start + chunk_end] + type_ids[end:])
    return Encoded.from_lists(rows, types if model.encoder.sends_token_types else None), np.array(starts)


async def encode_chunked(model: ServedModel, inputs: list, scoring: PairScoring, settings: Settings, *,
                         sequence: int, characters: Callable[[int], tuple[int, int]] | None = None,
                         ) -> tuple[Encoded, np.ndarray]:
    """:func:`chunked` (in a worker thread when large). Texts too long for the request's token limit are
    refused before tokenizing: each token spans at most ``MAX_CHARS_PER_TOKEN`` characters, and the
    chunks hold at least every token of their documents."""
    size = sum(len(text) for item in inputs for text in (item if isinstance(item, tuple) else (item,)))
    limit = settings.max_tokens_per_request
    if size > (limit + 1) * MAX_CHARS_PER_TOKEN:
        raise too_many_tokens_error(size // MAX_CHARS_PER_TOKEN, limit)
    return await run_sized(model.encoder.work_size(size), chunked, model, inputs, scoring,
                           settings.max_items_per_request, limit, sequence, characters)


DOCUMENT_MARK = "\ue000document\ue000"  # private-use characters: no template writes them itself


def document_in_prompt(template: str, query: str, document: str, prompt: str,
                       variables: Mapping[str, object]) -> tuple[int, int]:
    """The characters the document takes in its rendered prompt, found by rendering the mark in its place.
    A template that writes the document more than once or changes it cannot be cut into chunks."""
    try:
        marked = render(template, query, DOCUMENT_MARK, **variables)
    except Exception:  # a template that reads the document's content; it rendered the document itself
        marked = ""
    before, _, after = marked.partition(DOCUMENT_MARK)
    if marked.count(DOCUMENT_MARK) != 1 or before + document + after != prompt:
        raise BadRequestError("The score template does not write each document once as it is, so long "
                              "documents cannot be cut into chunks; use long_documents=truncate.",
                              param="long_documents")
    return len(before), len(before) + len(document)


async def score_encoded(gateway: TritonGateway, model: ServedModel, pairs: EncodedPairs,
                        scoring: PairScoring) -> np.ndarray:
    """One score per pair: with chunks, the max or mean of what each chunk's row scores as a pair would
    (the activated score, or the raw logit / dot product with ``use_activation`` false), so a document
    that fits keeps its score exactly."""
    return aggregated(await score_rows(gateway, model, pairs, scoring), pairs, scoring.long_documents.mode)


async def score_rows(gateway: TritonGateway, model: ServedModel, pairs: EncodedPairs,
                     scoring: PairScoring) -> np.ndarray:
    """One score per row sent: per pair, or per chunk."""
    if pairs.joint is not None:
        output = "logits" if scoring.use_activation is False else "scores"
        return (await infer_on(gateway, model, pairs.joint, (output,)))[output][:, 0]
    if model.late_interaction:
        return await maxsim_rows(gateway, model, pairs, scoring)
    output = model.embedding_output
    query_vectors = (await infer_on(gateway, model, pairs.queries, (output,)))[output]
    document_vectors = (await infer_on(gateway, model, pairs.documents, (output,)))[output]
    if len(query_vectors) == 1:
        query_vectors = np.broadcast_to(query_vectors, document_vectors.shape)
    elif pairs.pair_starts is not None:  # N:N: each pair's query beside each of its chunks
        query_vectors = np.repeat(query_vectors, pairs.rows_per_pair(), axis=0)
    dots = np.einsum("ij,ij->i", query_vectors, document_vectors)
    if scoring.use_activation is False:
        return dots  # vLLM: no activation for a bi-encoder means no normalisation
    norms = np.linalg.norm(query_vectors, axis=1) * np.linalg.norm(document_vectors, axis=1)
    return dots / np.maximum(norms, 1e-12)


async def maxsim_rows(gateway: TritonGateway, model: ServedModel, pairs: EncodedPairs,
                      scoring: PairScoring) -> np.ndarray:
    """Each document row's MaxSim against its query. Each distinct query (by its token ids) is sent once per
    Triton request, first, before up to ``max_rows - 1`` of its documents, and the model's ``maxsim_scores``
    answer. ``use_activation: false`` (MaxSim of the unnormalised vectors, as vLLM) reads the token vectors
    of both sides instead and scores them here, as does a gateway that sends one row per Triton request."""
    query_of = pairs.query_of_document_rows()
    if scoring.use_activation is False or gateway.max_rows < 2:
        output = "token_projected" if scoring.use_activation is False else "token_embeddings"
        queries, documents = await asyncio.gather(infer_on(gateway, model, pairs.queries, (output,)),
                                                  infer_on(gateway, model, pairs.documents, (output,)))
        query_tokens = token_rows(queries[output], pairs.queries.lengths)
        document_tokens = token_rows(documents[output], pairs.documents.lengths)
        return np.array([(query_tokens[q] @ d.T).max(axis=1).sum() for q, d in zip(query_of, document_tokens)],
                        dtype=np.float32)
    groups: dict[bytes, tuple[int, list[int]]] = {}
    for row, query in enumerate(query_of.tolist()):
        key = pairs.queries.input_ids[query, :pairs.queries.lengths[query]].tobytes()
        groups.setdefault(key, (query, []))[1].append(row)
    per_request = gateway.max_rows - 1
    requests = [(query, rows[start:start + per_request]) for query, rows in groups.values()
                for start in range(0, len(rows), per_request)]
    answers = await asyncio.gather(*(
        infer_on(gateway, model, query_first(pairs.queries, query, pairs.documents, rows), ("maxsim_scores",))
        for query, rows in requests))
    scores = np.empty(pairs.documents.num_sequences, dtype=np.float32)
    for (_, rows), answer in zip(requests, answers):
        scores[rows] = answer["maxsim_scores"][1:, 0]
    return scores


def query_first(queries: Encoded, query: int, documents: Encoded, rows: list[int]) -> Encoded:
    """Row ``query`` of ``queries`` then ``rows`` of ``documents``, as one right-padded batch."""
    lengths = np.concatenate([queries.lengths[query:query + 1], documents.lengths[rows]])
    width = int(lengths.max())

    def stacked(query_side: np.ndarray, document_side: np.ndarray) -> np.ndarray:
        out = np.zeros((len(lengths), width), dtype=np.int64)
        out[0, :min(width, query_side.shape[1])] = query_side[query, :width]
        out[1:, :min(width, document_side.shape[1])] = document_side[rows, :width]
        return out

    types = None
    if queries.token_type_ids is not None or documents.token_type_ids is not None:
        types = stacked(*(np.zeros_like(side.input_ids) if side.token_type_ids is None else side.token_type_ids
                          for side in (queries, documents)))
    return Encoded(stacked(queries.input_ids, documents.input_ids), lengths, types)


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


def long_documents(request, model: ServedModel) -> LongDocuments:
    """The request's ``long_documents`` and ``chunk_overlap_tokens``; the model's parameter when it sends none
    (not for a vision model, which has no chunks: its requests would all be refused for a setting they did not
    make; one that asks for chunks itself is)."""
    default = model.long_documents if model.vision is None else "truncate"
    return LongDocuments(request.long_documents or default, request.chunk_overlap_tokens)


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
                           template_variables=template_variables(ctx.request),
                           long_documents=long_documents(ctx.request, ctx.model))

    async def encode(self, ctx: ServeContext) -> EncodedPairs:
        queries, documents = await truncated_sides(ctx.request, ctx.model, *self.sides(ctx.request))
        return await encode_pairs(ctx.model, queries, documents, self.scoring(ctx), ctx.settings)

    async def infer(self, ctx: ServeContext) -> np.ndarray:
        return await score_encoded(ctx.gateway, ctx.model, ctx.encoded, self.scoring(ctx))
