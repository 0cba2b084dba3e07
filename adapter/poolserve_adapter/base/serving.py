"""The serving pipeline of every endpoint that runs a model, written once: resolve the model, guard,
encode, infer, respond (vLLM's ``PoolingServing.__call__`` over a ``ServeContext``).

An endpoint is a :class:`Serving` subclass in its slice (``classify/serving.py``, ...). It declares
which models may serve it and how a request names one, and how many items a request holds; it
writes only what is its own: the checks of the request alone (:meth:`Serving.validate`), the
tokenizing (:meth:`Serving.encode`), the Triton output it reads and the response it builds.

The guards run here, for every endpoint, in this order:

1. the item count (``ADAPTER_MAX_ITEMS_PER_REQUEST``), read from the request;
2. admission: a 429 while the model's admission queue is full, before any tokenizing;
3. once encoded: SGLang's context-length rule (endpoints that speak SGLang), no empty prompt, and
   ``ADAPTER_MAX_TOKENS_PER_REQUEST`` over every sequence the request sends to Triton. vLLM's
   context-length rule is the tokenizer's own (:class:`~poolserve_adapter.tokenization.TextEncoder`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

import numpy as np
from fastapi import Request

from poolserve_adapter.base.dependencies import get_app_settings, get_gateway, get_registry
from poolserve_adapter.errors import BadRequestError, Flavour
from poolserve_adapter.registry import ModelRegistry, ServedModel
from poolserve_adapter.settings import Settings
from poolserve_adapter.tokenization import DEFAULT_OPTIONS, Encoded, PromptOptions, check_request_tokens
from poolserve_adapter.triton_gateway import TritonGateway

RequestT = TypeVar("RequestT")


class Batches(Protocol):
    """What an endpoint's encoding sends to Triton: an ``Encoded``, or the two sides of scored pairs."""

    @property
    def batches(self) -> tuple[Encoded, ...]: ...

    @property
    def num_tokens(self) -> int: ...


@dataclass(kw_only=True)
class ServeContext(Generic[RequestT]):
    """One request on its way through the pipeline: what each step reads and what it leaves."""

    request: RequestT
    raw_request: Request
    model: ServedModel
    gateway: TritonGateway
    settings: Settings
    started: float = field(default_factory=time.perf_counter)  # SGLang reports the latency from here
    options: PromptOptions = DEFAULT_OPTIONS  # how the prompts are tokenized (vLLM's truncation)
    encoded: Batches | None = None  # what goes to Triton
    output: np.ndarray | None = None  # what came back: one row (or score) per prompt or pair, in order

    def response_id(self, prefix: str) -> str:
        """``prefix-<X-Request-Id header, else the body's request_id>``, as vLLM names its responses."""
        return f"{prefix}-{self.raw_request.headers.get('x-request-id') or self.request.request_id}"


def check_item_count(count: int, limit: int) -> None:
    if count > limit:
        raise BadRequestError(
            f"Input list length {count} exceeds the maximum allowed count of {limit} per request "
            "(ADAPTER_MAX_ITEMS_PER_REQUEST)."
        )


def check_context_length(model: ServedModel, encoded: Encoded) -> None:
    """SGLang refuses N >= context length (vLLM allows N == max_model_len)."""
    longest = int(encoded.lengths.max()) if encoded.num_sequences else 0
    if longest >= model.max_model_len:
        raise BadRequestError(
            f"The input ({longest} tokens) is longer than the model's context length ({model.max_model_len} tokens)."
        )


async def infer_on(gateway: TritonGateway, model: ServedModel, encoded: Encoded, outputs: tuple[str, ...],
                   lora_names: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every Triton call of the endpoints: ``encoded`` run on ``model``'s Triton model, with the ``lora_names``
    of the adapter the request named (``lora_names``: one per sequence where a request names several, as
    SGLang's ``lora_path`` list does)."""
    if lora_names is None:
        lora_names = model.lora_names(encoded.num_sequences)
    return await gateway.infer(model.triton_model, encoded, outputs, lora_names)


class Serving(ABC, Generic[RequestT]):
    """resolve → validate → guards → encode → guards → infer → respond; subclasses fill in the steps."""

    # The ServedModel property a model needs to serve this endpoint.
    capability: ClassVar[str]
    # SGLang's routes do not check `model`: the named model when it is served and able (by `fallback`
    # when set), else the first model with `capability`, else the first with `fallback`. vLLM's: a
    # name that is not served is a 404, a model that cannot serve the route a plain 404.
    lenient: ClassVar[bool] = False
    fallback: ClassVar[str | None] = None
    # Set where the path alone does not tell the error flavour (SGLang's native /classify).
    flavour: ClassVar[Flavour | None] = None
    # SGLang refuses a prompt of max_model_len tokens, vLLM does not (its rule is the tokenizer's).
    sglang_context_length: ClassVar[bool] = False

    async def __call__(self, request: RequestT, raw_request: Request):
        if self.flavour is not None:
            raw_request.state.flavour = self.flavour
        return await self.run(request, raw_request, self.resolve(await get_registry(raw_request), request))

    def resolve(self, registry: ModelRegistry, request: RequestT) -> ServedModel:
        if self.lenient:
            return registry.resolve_lenient(request.model, capability=self.capability, fallback=self.fallback)
        return registry.resolve(request.model, capability=self.capability)

    async def run(self, request: RequestT, raw_request: Request, model: ServedModel):
        """The pipeline for a request whose model is known (``/invocations`` resolves it to pick the endpoint)."""
        ctx = ServeContext(request=request, raw_request=raw_request, model=model,
                           gateway=await get_gateway(raw_request), settings=await get_app_settings(raw_request))
        self.validate(ctx)
        check_item_count(self.item_count(request), ctx.settings.max_items_per_request)
        ctx.gateway.refuse_if_busy(model.triton_model)
        ctx.encoded = await self.encode(ctx)
        self.check_tokens(ctx)
        ctx.output = await self.infer(ctx)
        return self.respond(ctx)

    def check_tokens(self, ctx: ServeContext) -> None:
        for batch in ctx.encoded.batches:
            if self.sglang_context_length:
                check_context_length(ctx.model, batch)
            if batch.num_sequences and int(batch.lengths.min()) == 0:
                raise BadRequestError("The decoder prompt cannot be empty")
        check_request_tokens(ctx.encoded.num_tokens, ctx.settings.max_tokens_per_request)

    # --- the endpoint's own steps ------------------------------------------------------------------

    def validate(self, ctx: ServeContext) -> None:
        """Checks of the request alone, before any guard: no tokenizer, no Triton. Nothing by default."""

    @abstractmethod
    def item_count(self, request: RequestT) -> int:
        """How many prompts, texts or documents the request holds."""

    @abstractmethod
    async def encode(self, ctx: ServeContext) -> Batches:
        """The request's prompts (or pairs) as token ids: all its tokenizing happens here."""

    def output_name(self, ctx: ServeContext) -> str:
        """The Triton output the default :meth:`infer` reads (``scores``, ``logits`` or ``embeddings``);
        an endpoint that overrides :meth:`infer` (pair scoring) has none."""
        raise NotImplementedError(f"{type(self).__name__} reads no single Triton output")

    async def infer(self, ctx: ServeContext) -> np.ndarray:
        name = self.output_name(ctx)
        return (await infer_on(ctx.gateway, ctx.model, ctx.encoded, (name,)))[name]

    @abstractmethod
    def respond(self, ctx: ServeContext):
        """The response body (a response model, or a ``Response`` already rendered)."""
