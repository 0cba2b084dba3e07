"""Runtime LoRA updates: vLLM's load / unload of an adapter, done by reloading its base model in Triton.

A base model's adapters are its ``lora_modules`` parameter, and its model card lists them (``lora_modules``,
``lora_paths``), which is how the adapter learns them (:func:`poolserve_adapter.registry.adapters_of`). A load or an
unload reads the base's config from Triton, writes the new set into both, and loads the model again with that
config in place of its own (Triton's load API with ``config``, behind its control key). Triton keeps the loaded
version serving until the new one is ready, and keeps it when the new one fails (an adapter the runtime refuses:
:mod:`poolserve_runtime.lora`), so the base and its other adapters serve throughout; the base's memory is held
twice while it reloads.

Updates are serialised: within a worker by an asyncio lock, across the workers of this host by an exclusive
``flock`` on a file named after Triton's address, which each update then touches. Every request of a worker
compares that file's modification time with the one it last saw (one ``stat``): when another worker changed the
adapters, it reads its base models' configs from Triton again before resolving the request's model, so a name
loaded through one worker serves on all, and an unloaded one is gone from all (a worker that still sends it gets
the runtime's "not loaded", answered as vLLM's 404). Each update reads the configs under the lock before
checking names, so two workers' updates never lose one another.

Errors are vLLM's (``vllm/entrypoints/openai/models/serving.py``): 400 ``InvalidUserInput`` for a missing name or
path, a name already loaded (without ``load_inplace``) or a base model's name; 404 ``NotFoundError`` for a folder
that is not an adapter (``Loading lora X failed: No adapter found for PATH``) or an unknown name to unload. An
adapter the runtime refuses (another base's shapes, DoRA, ...) is a 400 with the runtime's reason, where vLLM
answers a 500 with its engine's exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from tritonclient.utils import InferenceServerException

from poolserve_adapter.errors import (
    AdapterError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    sanitize_message,
)
from poolserve_adapter.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from poolserve_adapter.registry import ModelRegistry, ServedModel, adapters_of
from poolserve_adapter.settings import Settings
from poolserve_contract.card import ModelCard
from poolserve_contract.parameters import check_lora_folders, parse_lora_modules
from poolserve_contract.wire import CONTROL_GRPC_HEADER, MODEL_CARD

logger = logging.getLogger(__name__)

LORA_MODULES_PARAMETER = "lora_modules"
# The runtime's refusal of an adapter (poolserve_runtime.lora.LoraError) inside Triton's load error, up to the
# Python backend's traceback ("At:") or the end.
REFUSAL = re.compile(r"LoraError: (?P<reason>.+?)(?:\n\s*\nAt:|\s*$)", re.DOTALL)


class InvalidUserInput(BadRequestError):
    """vLLM's 400 for a load or unload request it refuses before touching the engine."""

    error_type = "InvalidUserInput"


def generation_file(triton_grpc_url: str) -> Path:
    """The file the adapter workers of this host lock for an update and touch after one (one per Triton)."""
    digest = hashlib.sha256(triton_grpc_url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"poolserve-lora-{digest}"


def with_lora_modules(config: dict, modules: tuple[tuple[str, str], ...]) -> dict:
    """``config`` (Triton's JSON form) with ``modules`` as its lora_modules parameter and in its model card."""
    updated = copy.deepcopy(config)
    parameters = updated.setdefault("parameters", {})
    parameters[LORA_MODULES_PARAMETER] = {"string_value": ",".join(f"{name}={path}" for name, path in modules)}
    card = ModelCard.from_config(config)
    if card is not None:
        card = replace(card, lora_modules=tuple(name for name, _ in modules),
                       lora_paths=tuple(path for _, path in modules))
        parameters[MODEL_CARD] = {"string_value": card.to_json()}
    return updated


def writable(name: str, path: str) -> bool:
    """Whether the lora_modules parameter can carry this adapter: its separators (',' '=') and the wire's padding
    (NUL) are in neither, and parsing keeps both as given."""
    if "\0" in name or "\0" in path:
        return False
    try:
        return parse_lora_modules(f"{name}={path}") == ((name, path),)
    except ValueError:
        return False


def load_failure(error: InferenceServerException) -> AdapterError:
    """Triton's failed reload: the runtime's refusal of the adapter is a 400 with its reason; anything else a 500."""
    message = error.message() or str(error)
    refusal = REFUSAL.search(message)
    if refusal is not None:
        return BadRequestError(refusal["reason"].strip())
    return InternalServerError(sanitize_message(message))


class LoraUpdates:
    """One adapter worker's side of runtime LoRA updates (see the module docstring). ``state`` is the app's
    state: its ``registry`` is replaced by one with the new adapters, its ``gateway`` talks to Triton."""

    def __init__(self, state, settings: Settings):
        self.state = state
        self.control_headers = {CONTROL_GRPC_HEADER: settings.triton_control_key} if settings.triton_control_key else {}
        self.timeout_s = settings.lora_update_timeout_s
        self.path = generation_file(settings.triton_grpc_url)
        self.seen = self.generation()
        self.update_lock = asyncio.Lock()
        self.refresh_lock = asyncio.Lock()

    def generation(self) -> int:
        """The generation file's modification time (ns); 0 before any update."""
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    async def catch_up(self) -> None:
        """Adopt the adapters another worker loaded or unloaded, before a request resolves its model: one
        ``stat`` when nothing changed. Concurrent requests wait for one refresh."""
        if self.generation() == self.seen:
            return
        async with self.refresh_lock:
            current = self.generation()  # read before the configs: an update after them is seen next time
            if current != self.seen:
                await self.refresh()
                self.seen = current

    async def refresh(self) -> None:
        """The registry with each base model's adapters as its config in Triton says now."""
        registry: ModelRegistry = self.state.registry
        models = list(registry)
        configs = await asyncio.gather(*(self.state.gateway.model_config(model.triton_model) for model in models))
        cards = {model.triton_model: ModelCard.from_config(config) for model, config in zip(models, configs, strict=True)}
        self.state.registry = registry.with_adapters(
            {name: adapters_of(card) for name, card in cards.items() if card is not None})

    async def load(self, request: LoadLoRAAdapterRequest) -> str:
        """Load (or with ``load_inplace`` replace) an adapter; vLLM's success text. A client that disconnects does
        not stop it half-way: the reload it started is seen through, and the workers told."""
        return await asyncio.shield(asyncio.ensure_future(self.loaded(request)))

    async def unload(self, request: UnloadLoRAAdapterRequest) -> str:
        """Unload an adapter (loaded at start or at run time); vLLM's success text. Seen through as a load is."""
        return await asyncio.shield(asyncio.ensure_future(self.unloaded(request)))

    async def loaded(self, request: LoadLoRAAdapterRequest) -> str:
        name, path = request.lora_name, request.lora_path
        if not name or not path:
            raise InvalidUserInput("Both 'lora_name' and 'lora_path' must be provided.")
        async with self.updating() as registry:
            if name in registry.models:
                raise InvalidUserInput(f"The lora adapter '{name}' conflicts with a served base model.")
            held = registry.adapters.get(name)
            if held is not None and not request.load_inplace:
                raise InvalidUserInput(f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                       "adapter in place, set 'load_inplace' to True.")
            base = self.base_model(registry, request.base_model_name, held)
            if not writable(name, path):
                raise InvalidUserInput("lora_name and lora_path may not contain ',', '=' or NUL characters, nor "
                                       "surrounding blanks (they are written into the model's lora_modules parameter)")
            try:
                check_lora_folders(((name, path),))
            except ValueError:
                raise NotFoundError(f"Loading lora {name} failed: No adapter found for {path}") from None
            modules = tuple((known, path if known == name else folder) for known, folder in base.lora_modules)
            if held is None:
                modules += ((name, path),)
            await self.reload(base, modules)
        logger.info("Loaded new LoRA adapter: name '%s', path '%s' (on %s)", name, path, base.name)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unloaded(self, request: UnloadLoRAAdapterRequest) -> str:
        name = request.lora_name
        if not name:
            raise InvalidUserInput("'lora_name' needs to be provided to unload a LoRA adapter.")
        async with self.updating() as registry:
            held = registry.adapters.get(name)
            if held is None:
                raise NotFoundError(f"The lora adapter '{name}' cannot be found.")
            base = registry.models[held.parent]
            await self.reload(base, tuple(module for module in base.lora_modules if module[0] != name))
        logger.info("Removed LoRA adapter: name '%s' (from %s)", name, base.name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    @staticmethod
    def base_model(registry: ModelRegistry, base_model_name: str | None, held: ServedModel | None) -> ServedModel:
        """The base a load goes to: the one holding the adapter (in place), the one named, else the first served."""
        if held is not None:
            if base_model_name and base_model_name != held.parent:
                raise InvalidUserInput(f"The lora adapter '{held.name}' is loaded on '{held.parent}', not on "
                                       f"'{base_model_name}': unload it first.")
            return registry.models[held.parent]
        if base_model_name is None:
            return next(iter(registry))
        base = registry.models.get(base_model_name)
        if base is None:
            raise NotFoundError(f"The model `{base_model_name}` does not exist.", param="base_model_name")
        return base

    async def reload(self, base: ServedModel, modules: tuple[tuple[str, str], ...]) -> None:
        """Triton's ``base`` again with ``modules`` as its adapters; the registry follows once it serves them."""
        config = await self.state.gateway.model_config(base.triton_model)
        try:
            await self.state.gateway.reload_model(base.triton_model, with_lora_modules(config, modules),
                                                  control_headers=self.control_headers, timeout_s=self.timeout_s)
        except InferenceServerException as error:
            raise load_failure(error) from None
        self.touch()
        await self.refresh()

    def touch(self) -> None:
        """Tell the other workers: the generation file's time moves forward (strictly, whatever the clock's grain)."""
        stamp = max(time.time_ns(), self.generation() + 1)
        os.utime(self.path, ns=(stamp, stamp))
        self.seen = stamp

    @contextlib.asynccontextmanager
    async def updating(self) -> AsyncIterator[ModelRegistry]:
        """Hold this worker's and this host's update lock; yields the registry as Triton's configs say now."""
        async with self.update_lock:
            with self.path.open("a") as lock_file:
                await asyncio.to_thread(fcntl.flock, lock_file, fcntl.LOCK_EX)
                try:
                    await self.refresh()
                    yield self.state.registry
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
