"""Texts → token ids with the model's own fast tokenizer, with vLLM's length rules."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from adapter.errors import BadRequestError


@dataclass(frozen=True)
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def too_long_error(max_model_len: int, tokens: int, at_least: bool) -> BadRequestError:
    """vLLM's message for an over-long prompt (``vllm/renderers/params.py``)."""
    return BadRequestError(
        f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
        f"{'at least ' if at_least else ''}{tokens} input tokens, which exceeds this limit even without "
        "any output tokens. Please reduce the length of the input prompt.",
        param="input_tokens",
    )


class TextEncoder:
    def __init__(self, tokenizer, *, max_model_len: int, sends_token_types: bool):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.sends_token_types = sends_token_types

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> Encoded:
        """Tokenize (text pairs as ``[CLS] a [SEP] b [SEP]``); over-long inputs are a 400.

        Like vLLM, the tokenizer stops at ``max_model_len + 1`` tokens, so an over-long prompt is
        reported as containing "at least" that many without tokenizing all of it.
        """
        encoded = self.tokenizer(
            texts,
            pairs,
            truncation=True,
            max_length=self.max_model_len + 1,
            return_attention_mask=False,
            return_token_type_ids=self.sends_token_types,
        )
        input_ids = encoded["input_ids"]
        longest = max((len(ids) for ids in input_ids), default=0)
        if longest > self.max_model_len:
            raise too_long_error(self.max_model_len, longest, at_least=True)
        return Encoded(input_ids, encoded["token_type_ids"] if self.sends_token_types else None)

    def check_token_ids(self, prompts: list[list[int]]) -> Encoded:
        """Pre-tokenized prompts: length checked here, vocabulary by the model."""
        longest = max((len(ids) for ids in prompts), default=0)
        if longest > self.max_model_len:
            raise too_long_error(self.max_model_len, longest, at_least=False)
        return Encoded([list(ids) for ids in prompts], None)

    async def encode_async(self, texts: list[str], pairs: list[str] | None, thread_above: int) -> Encoded:
        if len(texts) > thread_above:
            return await asyncio.to_thread(self.encode, texts, pairs)
        return self.encode(texts, pairs)
