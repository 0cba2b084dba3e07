"""All Triton calls of the adapter: token ids in, output arrays out, errors mapped once.

Sequences go to Triton as right-padded ``[n, T]`` requests with an ``attention_mask`` of at most
``max_sequences_per_triton_request`` rows, sent concurrently; the model's dynamic batcher packs
them (and other clients' requests) into one forward again. A model serving LoRA adapters gets each
sequence's adapter by name as ``lora_names`` (UTF-8, zero-padded: UINT8 ``[n, width]``, zeros the base model)
beside them; a name the model no longer holds (unloaded through another adapter worker) is vLLM's 404 for that
name. Runtime LoRA updates read a model's config and reload it with another (:meth:`TritonGateway.model_config`,
:meth:`TritonGateway.reload_model`).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from poolserve_adapter.admission import Admission
from poolserve_adapter.admission_board import AdmissionBoard
from poolserve_adapter.errors import AdapterError, NotFoundError, from_triton
from poolserve_adapter.settings import Settings
from poolserve_adapter.timing import timed
from poolserve_adapter.tokenization import Encoded
from poolserve_contract.wire import INFERENCE_GRPC_HEADER, LORA_NAMES_INPUT, LORA_NOT_LOADED


def _tensor(name: str, array: np.ndarray) -> grpcaio.InferInput:
    tensor = grpcaio.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def lora_input(lora_names: np.ndarray | None, rows) -> list[grpcaio.InferInput]:
    """The ``lora_names`` input of the sequences ``rows`` selects (one per row), or none for a model without
    adapters."""
    return [] if lora_names is None else [_tensor(LORA_NAMES_INPUT, np.ascontiguousarray(lora_names[rows]))]


# The runtime's message for an adapter name its model does not hold (wire.LORA_NOT_LOADED).
NOT_LOADED = re.compile(re.escape(LORA_NOT_LOADED).replace(re.escape("{name}"), "(?P<name>.*)").replace(
    re.escape("{model}"), ".*"))


def inference_error(error: InferenceServerException) -> AdapterError:
    """A failed inference as the adapter answers it: an adapter the model does not hold (any more) is vLLM's 404
    for a model that does not exist, anything else as the shared table says."""
    not_loaded = NOT_LOADED.search(error.message() or "")
    if not_loaded is not None:
        return NotFoundError(f"The model `{not_loaded['name']}` does not exist.")
    return from_triton(error)


@dataclass(frozen=True)
class AdmissionLimits:
    max_inflight_tokens: int
    max_queued_tokens: int | None  # None: only time bounds the queue
    max_wait_s: float


UNLIMITED = AdmissionLimits(2**62, None, 1e9)  # no refusals: no queue bound, no rate-based wait bound


def inference_headers(settings: Settings) -> dict[str, str]:
    """The header Triton checks when its inference protocol has a key (TRITON_INFERENCE_KEY there)."""
    return {INFERENCE_GRPC_HEADER: settings.triton_inference_key} if settings.triton_inference_key else {}


def concatenated(arrays: list[np.ndarray]) -> np.ndarray:
    """The outputs of a request's Triton requests, in order. A token-level output ``[n, tokens, D]`` is as wide
    as its own request's longest sequence: the narrower are padded with zeros to the widest."""
    if arrays[0].ndim == 3 and len(arrays) > 1:
        width = max(array.shape[1] for array in arrays)
        arrays = [np.pad(array, ((0, 0), (0, width - array.shape[1]), (0, 0))) for array in arrays]
    return np.concatenate(arrays)


class TritonGateway:
    def __init__(self, client: grpcaio.InferenceServerClient, *, timeout_s: float, max_rows: int,
                 admission: AdmissionLimits = UNLIMITED, admission_board: AdmissionBoard | None = None,
                 triton_models: tuple[str, ...] = (), inference_headers: dict[str, str] | None = None):
        self.client = client
        self.triton_models = triton_models  # what the registry serves: the models /health reports on
        self.inference_headers = inference_headers or {}  # Triton's inference key, when it has one
        self.timeout_s = timeout_s
        self.max_rows = max_rows
        self.admission_limits = admission
        self.admission_board = admission_board  # the other adapter workers' share of each model
        self._admissions: dict[str, Admission] = {}

    def admission(self, triton_model: str) -> Admission:
        if triton_model not in self._admissions:
            limits = self.admission_limits
            self._admissions[triton_model] = Admission(
                triton_model, max_inflight_tokens=limits.max_inflight_tokens,
                max_queued_tokens=limits.max_queued_tokens, max_wait_s=limits.max_wait_s,
                board=self.admission_board.entry(triton_model) if self.admission_board is not None else None)
        return self._admissions[triton_model]

    def leave_admission_board(self) -> None:
        """At shutdown: this worker's records leave the board (the others would drop them once it is gone)."""
        for admission in self._admissions.values():
            admission.leave_board()

    def refuse_if_busy(self, triton_model: str) -> None:
        """429 before any tokenizing when the model's admission queue is full (the serving pipeline's guard)."""
        self.admission(triton_model).refuse_if_full()

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...],
                    lora_names: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One row per sequence for each requested output, in input order. ``lora_names``: each sequence's
        adapter (:meth:`ServedModel.lora_names <poolserve_adapter.registry.ServedModel.lora_names>`), None for a
        model without adapters. The per-request limits (no empty prompt, ADAPTER_MAX_TOKENS_PER_REQUEST) are
        the serving pipeline's, checked before it calls here."""
        if encoded.vision is not None:
            return await self._infer_vision(triton_model, encoded, outputs, lora_names)
        count = encoded.num_sequences
        chunks = [(start, min(start + self.max_rows, count)) for start in range(0, count, self.max_rows)]
        async with self.admission(triton_model).admit(encoded.num_tokens):
            with timed("inference"):
                results = await asyncio.gather(
                    *(self._infer_rows(triton_model, encoded, a, b, outputs, lora_names) for a, b in chunks))
        return {name: concatenated([result[name] for result in results]) for name in outputs}

    async def _infer_vision(self, triton_model: str, encoded: Encoded, outputs, lora_names) -> dict[str, np.ndarray]:
        """Rows with images and rows without go in separate Triton requests (pixel_values is padded per
        request to its largest row, so a text row beside an image row would carry an image of zeros)."""
        has_images = encoded.vision.images_per_row > 0
        groups = [np.nonzero(has_images)[0], np.nonzero(~has_images)[0]]
        chunks = [rows[start:start + self.max_rows] for rows in groups for start in range(0, len(rows), self.max_rows)]
        async with self.admission(triton_model).admit(encoded.num_tokens):
            with timed("inference"):
                results = await asyncio.gather(*(self._infer_selected(triton_model, encoded, rows, outputs, lora_names)
                                                 for rows in chunks))
        order = np.concatenate(chunks)
        merged = {}
        for name in outputs:
            values = np.concatenate([result[name] for result in results])
            merged[name] = np.empty_like(values)
            merged[name][order] = values
        return merged

    async def _infer_selected(self, triton_model: str, encoded: Encoded, rows: np.ndarray, outputs, lora_names):
        lengths = encoded.lengths[rows]
        width = int(lengths.max())
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        inputs = [_tensor("input_ids", np.ascontiguousarray(encoded.input_ids[rows, :width])),
                  _tensor("attention_mask", mask)]
        if encoded.vision.images_per_row[rows].any():
            pixels, grids = encoded.vision.rows(rows)
            inputs += [_tensor("pixel_values", pixels), _tensor("image_grid_thw", grids)]
        return await self._call(triton_model, inputs + lora_input(lora_names, rows), outputs)

    async def _infer_rows(self, triton_model, encoded: Encoded, start: int, end: int, outputs, lora_names):
        lengths = encoded.lengths[start:end]
        width = int(lengths.max())  # each request is padded only to its own longest row
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        inputs = [
            _tensor("input_ids", np.ascontiguousarray(encoded.input_ids[start:end, :width])),
            _tensor("attention_mask", mask),
        ]
        if encoded.token_type_ids is not None:
            inputs.append(_tensor("token_type_ids", np.ascontiguousarray(encoded.token_type_ids[start:end, :width])))
        return await self._call(triton_model, inputs + lora_input(lora_names, slice(start, end)), outputs)

    async def _call(self, triton_model: str, inputs: list, outputs) -> dict[str, np.ndarray]:
        try:
            result = await self.client.infer(
                triton_model,
                inputs,
                outputs=[grpcaio.InferRequestedOutput(name) for name in outputs],
                client_timeout=self.timeout_s,
                headers=self.inference_headers,
                # Triton's queue drops the request when the client would have given up anyway (the
                # model's queue policy allows the override), instead of its 60 s default.
                timeout=int(self.timeout_s * 1_000_000),
            )
        except InferenceServerException as error:
            raise inference_error(error) from None
        return {name: result.as_numpy(name) for name in outputs}

    async def model_config(self, triton_model: str) -> dict:
        """The model's config as Triton holds it now (JSON form; open to every client)."""
        try:
            return (await self.client.get_model_config(triton_model, as_json=True, client_timeout=5))["config"]
        except InferenceServerException as error:
            raise from_triton(error) from None

    async def reload_model(self, triton_model: str, config: dict, *, control_headers: dict[str, str],
                           timeout_s: float) -> None:
        """Load ``triton_model`` again with ``config`` in place of its own. Triton keeps the loaded version serving
        until the new one is ready, and keeps it when the new one fails to load (the error is raised as it is)."""
        await self.client.load_model(triton_model, config=json.dumps(config), headers=control_headers,
                                     client_timeout=timeout_s)

    async def ready(self) -> bool:
        """Triton and every served model are ready. The server alone is not enough: a restarted Triton
        is ready before its models are loaded again (they load through the API once it is up)."""
        try:
            if not await self.client.is_server_ready(client_timeout=5):
                return False
            return all(await asyncio.gather(*(self.client.is_model_ready(name, client_timeout=5)
                                              for name in self.triton_models)))
        except InferenceServerException:
            return False

    async def unavailable_models(self) -> dict[str, str] | None:
        """The served models Triton does not have ready (a stub being reloaded shows here); None when
        Triton itself does not answer. Asked model by model: the repository index, which would give
        Triton's reason, is behind the control key the adapter does not hold."""
        try:
            ready = await asyncio.gather(*(self.client.is_model_ready(name, client_timeout=5)
                                           for name in self.triton_models))
        except InferenceServerException:
            return None
        return {name: "not ready" for name, is_ready in zip(self.triton_models, ready, strict=True) if not is_ready}
