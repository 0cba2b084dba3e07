"""Texts → token ids with the model's own fast tokenizer, with vLLM's length rules."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from poolserve_adapter.errors import BadRequestError, sanitize_message
from poolserve_adapter.timing import timed


@dataclass(frozen=True)
class VisionArrays:
    """The images of an encoded request (vision-language models), in row and prompt order."""

    pixel_values: np.ndarray  # [patches, patch_dim] float32, every image's patches in turn
    image_grid_thw: np.ndarray  # [images, 3] int64
    images_per_row: np.ndarray  # [n] int64

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``pixel_values`` [len(rows), P, D] (right-padded with zeros) and ``image_grid_thw``
        [len(rows), K, 3] (zero rows after each row's images) of the given rows: the Triton inputs."""
        image_starts = np.concatenate([[0], np.cumsum(self.images_per_row)])
        patches = self.image_grid_thw.prod(axis=1)
        patch_starts = np.concatenate([[0], np.cumsum(patches)])
        counts = self.images_per_row[rows]
        row_patches = [int(patches[image_starts[r]:image_starts[r + 1]].sum()) for r in rows]
        pixels = np.zeros((len(rows), max(row_patches, default=0), self.pixel_values.shape[1]), np.float32)
        grids = np.zeros((len(rows), max(int(counts.max(initial=0)), 1), 3), np.int64)
        for i, r in enumerate(rows):
            a, b = image_starts[r], image_starts[r + 1]
            pixels[i, :row_patches[i]] = self.pixel_values[patch_starts[a]:patch_starts[b]]
            grids[i, :b - a] = self.image_grid_thw[a:b]
        return pixels, grids


@dataclass(frozen=True)
class Encoded:
    """Right-padded token ids as the tokenizer returns them: no per-token Python objects."""

    input_ids: np.ndarray  # [n, width] int64
    lengths: np.ndarray  # [n] int64
    token_type_ids: np.ndarray | None  # [n, width] int64
    vision: VisionArrays | None = None  # the rows' images (vision-language models)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def batches(self) -> tuple[Encoded, ...]:
        """What a request sends to Triton, as the serving pipeline reads it (pairs of a bi-encoder are two)."""
        return (self,)

    @classmethod
    def from_lists(cls, rows: list[list[int]], token_type_ids: list[list[int]] | None = None) -> Encoded:
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        width = int(lengths.max()) if len(rows) else 0
        keep = np.arange(width)[None, :] < lengths[:, None]
        ids = np.zeros((len(rows), width), dtype=np.int64)
        # chain.from_iterable, not a generator expression: the tokens are walked in C, not by Python
        # bytecode per token (0.25 vs 0.43 ms for a 64-document rerank's 15k tokens).
        ids[keep] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        types = None
        if token_type_ids is not None:
            types = np.zeros_like(ids)
            types[keep] = np.fromiter(itertools.chain.from_iterable(token_type_ids), dtype=np.int64,
                                      count=int(lengths.sum()))
        return cls(ids, lengths, types)


def too_long_error(max_model_len: int, tokens: int, at_least: bool) -> BadRequestError:
    """vLLM's message for an over-long prompt (``vllm/renderers/params.py``)."""
    return BadRequestError(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
        f"{'at least ' if at_least else ''}{tokens} input tokens, which exceeds this limit even without "
        "any output tokens. Please reduce the length of the input prompt.",
        param="input_tokens",
    )


@dataclass(frozen=True)
class PromptOptions:
    """How one request wants its prompts tokenized (vLLM's ``TokenizeParams``).

    ``truncate_to``: None keeps the whole prompt (too long is an error); k keeps k tokens.
    ``side``: None truncates inside the tokenizer, which keeps the special tokens; "left" / "right"
    tokenize untruncated and then slice the ids (keeping the last / first k), specials included.
    """

    add_special_tokens: bool = True
    truncate_to: int | None = None
    side: str | None = None


DEFAULT_OPTIONS = PromptOptions()
UNTRUSTED_CHAT_TEMPLATE = (
    "Chat template is passed with request, but --trust-request-chat-template is not set. "
    "Refused request with untrusted chat template."
)
MAX_TOKENIZER_VARIANTS = 8  # differently truncating copies of the backend kept per model
# No token of a real vocabulary spans more characters than this, so a text longer than
# (tokens + 1) * MAX_CHARS_PER_TOKEN characters holds more than `tokens` tokens: an over-long text is
# refused, or cut before the tokenizer sees it, without tokenizing megabytes (a 1 MB text took 2 s).
MAX_CHARS_PER_TOKEN = 64
# Work of more than this many characters (texts) or token ids (decoding) runs in a worker thread,
# whatever the number of texts: tokenizing runs at ~0.8 us a character here (10 MB in 7.6 s), so
# no request keeps the event loop for more than ~15 ms; below it, the thread hop (~0.1 ms) is not worth it.
OFF_LOOP_ABOVE = 16_384


def too_many_tokens_error(tokens: int, limit: int, param: str | None = None) -> BadRequestError:
    """The per-request token limit (ADAPTER_MAX_TOKENS_PER_REQUEST), in the Triton gateway's words."""
    return BadRequestError(
        f"The request holds {tokens} tokens, more than the maximum of {limit} per request "
        "(ADAPTER_MAX_TOKENS_PER_REQUEST).",
        param=param,
    )


def check_request_tokens(tokens: int, limit: int, param: str | None = None) -> None:
    if tokens > limit:
        raise too_many_tokens_error(tokens, limit, param)


async def run_sized(size: int, function, /, *args, **kwargs):
    """``function(*args, **kwargs)``: in a worker thread when ``size`` (characters or token ids) is over
    :data:`OFF_LOOP_ABOVE`, else here. What runs in the thread must release the GIL for its long
    calls (the backend's ``encode_batch`` / ``decode_batch`` do; its ``encode`` / ``decode`` hold it
    for the whole call, which starves the event loop even from a thread) or be Python code, which
    yields the GIL every few milliseconds."""
    if size > OFF_LOOP_ABOVE:
        return await asyncio.to_thread(function, *args, **kwargs)
    return function(*args, **kwargs)


class TextEncoder:
    """The checkpoint's fast tokenizer, called through its Rust backend.

    ``encode_batch`` on the backend, then one flat copy of all ids into a padded numpy array:
    measured here on 64 (query, passage) pairs of ~150 words, the transformers wrapper with
    ``return_tensors="np"`` took 38 ms and this path 13 ms (the backend alone 12.5 ms; 2 cores).
    A backend's truncation is its own state, so requests that truncate differently get their own
    copies of it (cached), never a shared one reconfigured under concurrent requests.
    """

    def __init__(self, tokenizer, *, max_model_len: int, sends_token_types: bool, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size or len(tokenizer)
        self.sends_token_types = sends_token_types
        # Like vLLM, stop at max_model_len + 1 tokens: an over-long prompt is reported as
        # containing "at least" that many without tokenizing all of it.
        self.backend = tokenizer.backend_tokenizer
        self.backend.no_padding()
        self.backend.enable_truncation(max_length=max_model_len + 1)
        self._variants: OrderedDict[int | None, object] = OrderedDict()
        # truncation_side null means the tokenizer's own default side (HF passes it as direction).
        self.truncation_direction = getattr(tokenizer, "truncation_side", "right") or "right"
        self._variants_lock = threading.Lock()

    def _backend_truncating_to(self, max_length: int | None):
        """A copy of the backend that truncates to ``max_length`` (None: does not truncate)."""
        with self._variants_lock:
            backend = self._variants.get(max_length)
            if backend is not None:
                self._variants.move_to_end(max_length)  # least recently used goes first
            else:
                from tokenizers import Tokenizer

                backend = Tokenizer.from_str(self.backend.to_str())
                backend.no_padding()
                if max_length is None:
                    backend.no_truncation()
                else:
                    backend.enable_truncation(max_length=max_length, direction=self.truncation_direction)
                if len(self._variants) >= MAX_TOKENIZER_VARIANTS:
                    self._variants.pop(next(iter(self._variants)))
                self._variants[max_length] = backend
            return backend

    def encode(self, texts: list[str], pairs: list[str] | None = None, options: PromptOptions = DEFAULT_OPTIONS,
               *, check_length: bool = True) -> Encoded:
        """Tokenize (text pairs as ``[CLS] a [SEP] b [SEP]``); over-long inputs are a 400."""
        texts, pairs = self._bounded(texts, options, check_length), (
            None if pairs is None else self._bounded(pairs, options, check_length))
        inputs = list(zip(texts, pairs)) if pairs is not None else texts
        if options.truncate_to is None:
            backend = self.backend if check_length else self._backend_truncating_to(None)
        elif options.side is None:
            backend = self._backend_truncating_to(options.truncate_to)
        else:
            backend = self._backend_truncating_to(None)
        try:
            encodings = backend.encode_batch(inputs, add_special_tokens=options.add_special_tokens)
        except Exception as error:
            raise BadRequestError(f"Could not tokenize the input: {error}") from None
        if options.truncate_to is not None and options.side is not None:
            return self._sliced(encodings, options.truncate_to, options.side)
        lengths = np.fromiter((len(encoding.ids) for encoding in encodings), dtype=np.int64, count=len(encodings))
        longest = int(lengths.max()) if len(lengths) else 0
        if check_length and longest > self.max_model_len:
            raise too_long_error(self.max_model_len, longest, at_least=options.truncate_to is None)
        total = int(lengths.sum())
        keep = np.arange(longest)[None, :] < lengths[:, None]
        ids = np.zeros((len(encodings), longest), dtype=np.int64)
        ids[keep] = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
        types = None
        if self.sends_token_types:
            types = np.zeros_like(ids)
            types[keep] = np.fromiter(
                itertools.chain.from_iterable(e.type_ids for e in encodings), dtype=np.int64, count=total
            )
        return Encoded(ids, lengths, types)

    def _bounded(self, texts: list[str], options: PromptOptions, check_length: bool) -> list[str]:
        """Texts too long for any tokenization to fit: refused (no truncation asked) or cut on the side
        truncation drops, keeping more characters than the kept tokens can span."""
        keep = options.truncate_to if options.truncate_to is not None else self.max_model_len
        limit = (keep + 1) * MAX_CHARS_PER_TOKEN
        if not any(len(text) > limit for text in texts):
            return texts
        if options.truncate_to is None and check_length:
            raise too_long_error(self.max_model_len, self.max_model_len + 1, at_least=True)
        if (options.side or self.truncation_direction) == "left":
            return [text[-limit:] if len(text) > limit else text for text in texts]
        return [text[:limit] if len(text) > limit else text for text in texts]

    def _sliced(self, encodings, keep: int, side: str) -> Encoded:
        """vLLM with an explicit side: slice the full ids, special tokens included."""
        def cut(values: list[int]) -> list[int]:
            return values[:keep] if side == "right" else (values[-keep:] if keep else [])

        rows = [cut(e.ids) for e in encodings]
        types = [cut(e.type_ids) for e in encodings] if self.sends_token_types else None
        return Encoded.from_lists(rows, types)

    def check_token_ids(self, prompts: list[list[int]], options: PromptOptions = DEFAULT_OPTIONS) -> Encoded:
        """Pre-tokenized prompts: truncated as asked, length checked here, vocabulary by the model."""
        if options.truncate_to is not None:
            keep = options.truncate_to
            prompts = [(ids[-keep:] if keep else []) if options.side == "left" else ids[:keep] for ids in prompts]
        self.check_vocabulary(prompts, param="input")
        longest = max((len(ids) for ids in prompts), default=0)
        if longest > self.max_model_len:
            raise too_long_error(self.max_model_len, longest, at_least=False)
        return Encoded.from_lists([list(ids) for ids in prompts])

    def check_vocabulary(self, prompts: list[list[int]], param: str | None = None) -> None:
        """Every id in ``[0, vocab_size)``, in one vectorised pass; ids past int64 are out of it too."""
        count = sum(len(ids) for ids in prompts)
        try:
            ids = np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64, count=count)
        except OverflowError:
            huge = next(t for t in itertools.chain.from_iterable(prompts) if not -(2**63) <= t < 2**63)
            raise BadRequestError(f"Token id {huge} is out of vocabulary", param=param) from None
        outside = (ids < 0) | (ids >= self.vocab_size)
        if outside.any():
            raise BadRequestError(f"Token id {int(ids[outside][0])} is out of vocabulary", param=param)

    async def encode_async(self, texts: list[str], pairs: list[str] | None, thread_above: int,
                           options: PromptOptions = DEFAULT_OPTIONS, *, check_length: bool = True) -> Encoded:
        with timed("tokenize"):
            variant = options.truncate_to if options.side is None else None
            needs_copy = options.truncate_to is not None or not check_length
            if needs_copy and variant not in self._variants:
                # Building a truncating copy parses the whole tokenizer.json: never on the event loop.
                await asyncio.to_thread(self._backend_truncating_to, variant)
            # A few huge texts go to the thread too: `encode` calls the backend's encode_batch, which
            # releases the GIL there, so the loop serves other requests meanwhile.
            chars = sum(map(len, texts)) + (sum(map(len, pairs)) if pairs is not None else 0)
            if len(texts) > thread_above or chars > OFF_LOOP_ABOVE:
                return await asyncio.to_thread(self.encode, texts, pairs, options, check_length=check_length)
            return self.encode(texts, pairs, options, check_length=check_length)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool, continue_final_message: bool,
                    chat_template_kwargs: dict | None) -> str:
        """The conversation as one prompt string, through the tokenizer's own chat template."""
        if continue_final_message and add_generation_prompt:
            raise BadRequestError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        if (chat_template_kwargs or {}).get("chat_template") is not None:
            raise BadRequestError(UNTRUSTED_CHAT_TEMPLATE)
        chat_template_kwargs = {k: v for k, v in (chat_template_kwargs or {}).items() if k != "tokenize"}
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequestError(
                "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat "
                "template if the tokenizer does not define one."
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}),
            )
        except Exception as error:
            raise BadRequestError(sanitize_message(f"Could not render the chat template: {error}")) from None

    async def render_chat_async(self, messages: list[dict], **kwargs) -> str:
        """``render_chat`` in a worker thread: a template loop must not stall the other requests."""
        return await asyncio.to_thread(self.render_chat, messages, **kwargs)

    def truncate_text(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` that is at most ``max_tokens`` tokens (no special tokens)."""
        return self.truncate_texts([text], max_tokens)[0]

    def truncate_texts(self, items: list, max_tokens: int) -> list:
        """:meth:`truncate_text` of every string in ``items`` (anything else is kept whole), all in one
        ``encode_batch``: it releases the GIL (``encode`` holds it throughout) and spreads over the cores."""
        limit = (max_tokens + 1) * MAX_CHARS_PER_TOKEN  # enough for max_tokens + 1 tokens
        positions = [i for i, item in enumerate(items) if isinstance(item, str)]
        texts = [items[i][:limit] for i in positions]
        result = list(items)
        if not texts:
            return result
        encodings = self._backend_truncating_to(None).encode_batch(texts, add_special_tokens=False)
        for i, text, encoding in zip(positions, texts, encodings, strict=True):
            if len(encoding.ids) <= max_tokens:
                result[i] = text
            else:
                result[i] = text[: encoding.offsets[max_tokens - 1][1]] if max_tokens else ""
        return result

    async def truncate_texts_async(self, items: list, max_tokens: int) -> list:
        """:meth:`truncate_texts`, in a worker thread when the texts are large (a document can be
        ``max_model_len * 64`` characters, ~25 ms of tokenizing for a 512-token model, and there can be
        a thousand of them)."""
        limit = (max_tokens + 1) * MAX_CHARS_PER_TOKEN
        size = sum(min(len(item), limit) for item in items if isinstance(item, str))
        return await run_sized(self.work_size(size), self.truncate_texts, items, max_tokens)

    def work_size(self, size: int) -> int:
        """``size`` (characters) for :func:`run_sized` of :meth:`tokenize`, or more than it runs on the loop
        while the untruncated copy of the backend is still to be built: that parses the whole
        tokenizer.json (~1 s for a large vocabulary), never on the event loop."""
        return size if None in self._variants else max(size, OFF_LOOP_ABOVE + 1)

    def tokenize(self, texts: list[str], add_special_tokens: bool, max_tokens: int | None = None,
                 param: str | None = None) -> list[list[int]]:
        """Every text's whole token ids (``/tokenize``), in one ``encode_batch``: it releases the GIL,
        so a worker thread running it leaves the event loop free (``encode`` holds the GIL for the whole
        call: a 10 MB prompt starved the loop for 7.6 s). More than ``max_tokens`` ids in all is a 400."""
        try:
            encodings = self._backend_truncating_to(None).encode_batch(texts, add_special_tokens=add_special_tokens)
        except Exception as error:
            raise BadRequestError(f"Could not tokenize the input: {error}") from None
        rows = [encoding.ids for encoding in encodings]
        if max_tokens is not None:
            check_request_tokens(sum(map(len, rows)), max_tokens, param)
        return rows

    def encode_whole(self, inputs: list, add_special_tokens: bool) -> list:
        """The backend's untruncated encodings of texts or ``(text, pair)`` tuples, with what :meth:`encode`
        drops (sequence ids, offsets): what cutting a long document into chunks reads. One
        ``encode_batch``, which releases the GIL."""
        try:
            return self._backend_truncating_to(None).encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as error:
            raise BadRequestError(f"Could not tokenize the input: {error}") from None

    def count_tokens(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenize([text], add_special_tokens)[0]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.decode_rows([ids], skip_special_tokens)[0]

    def decode_rows(self, rows: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        """Texts of token-id rows, in one ``decode_batch`` (it releases the GIL; ``decode`` does not)."""
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in ids]
