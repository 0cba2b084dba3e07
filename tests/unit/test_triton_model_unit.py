"""PackedTritonModel.execute with a fake ``triton_python_backend_utils`` (the stub's module)."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from poolserve_runtime.packing import SequenceLimits


class FakeTritonError:
    INVALID_ARG, INTERNAL, CANCELLED = "INVALID_ARG", "INTERNAL", "CANCELLED"

    def __init__(self, message, code):
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors, error


class FakeTensor:
    def __init__(self, tensor):
        self.tensor = tensor

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(self.tensor)


class FakeRequest:
    def __init__(self, input_ids):
        self.inputs = {"input_ids": FakeTensor(input_ids)}

    def is_cancelled(self):
        return False

    def requested_output_names(self):
        return []


@pytest.fixture
def triton_model(monkeypatch):
    logged = []
    utils = types.ModuleType("triton_python_backend_utils")
    utils.TritonError = FakeTritonError
    utils.InferenceResponse = FakeResponse
    utils.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    utils.Logger = types.SimpleNamespace(log_error=lambda message: logged.append(("error", message)),
                                         log_info=lambda message: logged.append(("info", message)))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    monkeypatch.delitem(sys.modules, "poolserve_runtime.triton_model", raising=False)
    module = importlib.import_module("poolserve_runtime.triton_model")
    yield module, logged
    sys.modules.pop("poolserve_runtime.triton_model", None)


def failing_model(module):
    def run(batch, images, wanted):
        raise RuntimeError("CUDA out of memory (simulated)")

    model = module.PackedTritonModel()
    model.family = types.SimpleNamespace(name="bert", vision=False)
    model.engine = types.SimpleNamespace(limits=SequenceLimits(vocab_size=100, max_model_len=16, type_vocab_size=1),
                                         run=run, lora=None)
    return model


def test_a_failed_forward_answers_every_request_and_logs_the_traceback_once(triton_model):
    module, logged = triton_model
    requests = [FakeRequest(torch.tensor([[1, 2, 3]])), FakeRequest(torch.tensor([[4, 5]])),
                FakeRequest(torch.tensor([[500]]))]  # the last one is out of the vocabulary: its own error
    responses = failing_model(module).execute(requests)
    assert [response.error.code for response in responses] == ["INTERNAL", "INTERNAL", "INVALID_ARG"]
    assert "CUDA out of memory" in responses[0].error.message
    errors = [message for level, message in logged if level == "error"]
    assert len(errors) == 1
    assert "Traceback (most recent call last)" in errors[0] and "RuntimeError: CUDA out of memory" in errors[0]
    assert "2 requests (5 tokens)" in errors[0]
