"""ModelSettings from Triton's args: the parameters config.pbtxt documents, defaults and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from poolserve_contract.parameters import GPU_STUB_CPU_THREADS, ModelParameters
from poolserve_runtime.settings import ModelSettings


def triton_args(tmp_path, **parameters):
    config = {"parameters": {"checkpoint": {"string_value": str(tmp_path)},
                             **{k: {"string_value": v} for k, v in parameters.items()}},
              "output": [{"name": "logits"}, {"name": "scores"}]}
    return {"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_name": "m",
            "model_instance_kind": "CPU"}


def test_cpu_defaults(tmp_path):
    settings = ModelSettings.from_triton_args(triton_args(tmp_path))
    assert settings.device == torch.device("cpu") and settings.dtype == torch.float32
    assert settings.attention == "padded" and settings.compile == "auto"
    assert settings.max_tokens_per_forward == 16384 and settings.output_names == ("logits", "scores")


@pytest.mark.parametrize("value", ["auto", "layers", "none"])
def test_compile_parameter_values(tmp_path, value):
    assert ModelSettings.from_triton_args(triton_args(tmp_path, compile=value)).compile == value


@pytest.mark.parametrize("name, value", [("compile", "always"), ("attention", "flash"), ("dtype", "int8")])
def test_unknown_parameter_values_are_refused(tmp_path, name, value):
    with pytest.raises(ValueError, match=name):
        ModelSettings.from_triton_args(triton_args(tmp_path, **{name: value}))


def test_gpu_stubs_use_a_few_cpu_threads_and_cpu_stubs_torch_s_default(tmp_path):
    assert ModelParameters.from_mapping({}).cpu_threads_on("cuda") == GPU_STUB_CPU_THREADS
    assert ModelParameters.from_mapping({}).cpu_threads_on("cpu") == 0  # the CPU forward wants every core
    assert ModelParameters.from_mapping({"cpu_threads": "2"}).cpu_threads_on("cpu") == 2
    assert ModelSettings.from_triton_args(triton_args(tmp_path, cpu_threads="3")).cpu_threads == 3
    with pytest.raises(ValueError, match="cpu_threads"):
        ModelSettings.from_triton_args(triton_args(tmp_path, cpu_threads="many"))


def test_max_model_len_comes_from_the_card_unless_set(tmp_path):
    from poolserve_contract.card import ModelCard
    from poolserve_contract.wire import MODEL_CARD

    card = ModelCard(served_name="m", family="bert", task="classify", architecture="BertForSequenceClassification",
                     max_model_len=77, num_labels=1)
    args = triton_args(tmp_path)
    config = json.loads(args["model_config"])
    config["parameters"][MODEL_CARD] = {"string_value": card.to_json()}
    args["model_config"] = json.dumps(config)
    assert ModelSettings.from_triton_args(args).max_model_len == 77
    assert ModelSettings.from_triton_args(triton_args(tmp_path)).max_model_len == 0  # the engine derives it
