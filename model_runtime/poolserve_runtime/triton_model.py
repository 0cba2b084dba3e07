"""The Triton Python-backend model every ``model_repository/*/1/model.py`` subclasses.

``execute`` maps requests to responses explicitly: read each request's tensors through DLPack and
validate them, padded or flat (:func:`~poolserve_runtime.packing.read_sequences`, and each sequence's LoRA
adapter by name, :func:`~poolserve_runtime.packing.read_lora_names`; a bad request gets its own ``TritonError``,
NOT_FOUND for an adapter the model does not hold, and nothing else fails), pack all valid sequences into one stream, run the
engine once, split the outputs back per request, and answer every request exactly once, in order.
"""

from __future__ import annotations

import traceback

import torch
import triton_python_backend_utils as pb_utils  # only attributes used inside methods: see pitfalls

from poolserve_contract.triton_config import complete_config
from poolserve_contract.wire import LORA_NAMES_INPUT
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.families import Family
from poolserve_runtime.packing import (
    InvalidRequest,
    LoraNotLoaded,
    PackedBatch,
    RequestSequences,
    read_lora_names,
    read_sequences,
)
from poolserve_runtime.settings import ModelSettings
from poolserve_runtime.vision import BatchImages, check_image_tokens, read_images


def _input(request, name: str) -> torch.Tensor | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else torch.from_dlpack(tensor.to_dlpack())


def _error(message: str, code) -> object:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class PackedTritonModel:
    """Subclasses set ``family``; everything else comes from config.pbtxt."""

    family: Family

    @classmethod
    def auto_complete_config(cls, auto_complete_model_config):
        """Triton calls this at load: the shared inputs, outputs and batching (poolserve_contract.triton_config).
        Triton takes only those fields from it (no parameters), so the model card is the host's to write
        (poolserve_stack.triton_server.completed_config); without one the adapter computes it."""
        complete_config(auto_complete_model_config.as_dict(), cls.family.output_kind, cls.family.uses_token_types,
                        cls.family.vision)
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        settings = ModelSettings.from_triton_args(args)
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        self.engine = PackedEngine.load(self.family, settings)
        missing = set(self.engine.output_names) - set(settings.output_names)
        if missing:
            raise pb_utils.TritonModelException(
                f"config.pbtxt of {settings.model_name} lacks outputs {sorted(missing)} of a {self.family.task} model"
            )
        pb_utils.Logger.log_info(f"{settings.model_name}: {self.engine.describe()}")

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        accepted: list[tuple[int, RequestSequences]] = []
        images = []
        for index, request in enumerate(requests):
            if request.is_cancelled():  # its client gave up while it queued: compute nothing for it
                responses[index] = _error("request cancelled", pb_utils.TritonError.CANCELLED)
                continue
            try:
                sequences = read_sequences(
                    _input(request, "input_ids"),
                    _input(request, "attention_mask"),
                    _input(request, "token_type_ids"),
                    self.engine.limits,
                    _input(request, "sequence_lengths"),
                )
                names = _input(request, LORA_NAMES_INPUT)
                if names is not None:
                    lora = self.engine.lora
                    sequences = read_lora_names(names, sequences, lora.ids_by_name if lora is not None else {},
                                                self.engine.settings.model_name)
                if self.family.vision:
                    request_images = read_images(_input(request, "pixel_values"), _input(request, "image_grid_thw"),
                                                 sequences.lengths.numel())
                    check_image_tokens(self.engine.model, sequences, request_images)
                    images.append(request_images)
            except LoraNotLoaded as error:
                responses[index] = _error(str(error), pb_utils.TritonError.NOT_FOUND)
                continue
            except InvalidRequest as error:
                responses[index] = _error(str(error), pb_utils.TritonError.INVALID_ARG)
                continue
            accepted.append((index, sequences))

        if accepted:
            batch = PackedBatch.pack([sequences for _, sequences in accepted])
            # The outputs some request asks for (a request naming none gets all, so then all are computed).
            requested = [requests[index].requested_output_names() for index, _ in accepted]
            wanted = frozenset().union(*requested) if all(requested) else None
            try:
                outputs = self.engine.run(batch, BatchImages.concat(images) if self.family.vision else None, wanted)
            except Exception as error:
                # Once per batch, with the traceback: the clients only see the message.
                pb_utils.Logger.log_error(
                    f"{self.family.name}: forward of {len(accepted)} requests "
                    f"({int(batch.cu_seqlens[-1])} tokens) failed:\n{traceback.format_exc()}"
                )
                for index, _ in accepted:
                    responses[index] = _error(f"model failed: {error}", pb_utils.TritonError.INTERNAL)
                return responses
            for (index, _), per_request in zip(accepted, batch.split(outputs, self.engine.token_outputs)):
                wanted = requests[index].requested_output_names() or list(per_request)
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor.from_dlpack(name, per_request[name].contiguous()) for name in wanted
                    ]
                )
        return responses

    def finalize(self) -> None:
        self.engine = None
