"""FP8 weights through the engine on the CPU: compressed-tensors checkpoints, ``quantization=fp8`` at load,
``load_format=dummy``, and what each refuses (poolserve_runtime.weights, poolserve_runtime.fp8).

On the CPU the FP8 layers dequantise their stored weights (the documented fallback), so a model served from
an FP8 checkpoint must give exactly the scores of the same architecture holding the dequantised weights in
fp32: that checks every scale, layout and key of the loading path without a Hopper GPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from poolserve_contract.parameters import ModelParameters
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.fp8 import (
    HIGH_PRECISION_MODULES,
    Fp8Linear,
    UnsupportedQuantization,
    in_high_precision,
    quantize_weight,
)
from poolserve_runtime.native import qwen2_reward
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from poolserve_runtime.weights import DummyTensors, WeightLoadError, weight_plan
from tests.goldens.build import build_golden_checkpoint, load_golden
from tests.support.tiny_models import build_checkpoint
from tests.support.token_models import colbert_checkpoint

LENGTHS = [3, 11, 1, 25]
COLBERT_OUTPUTS = ("token_embeddings", "token_projected", "maxsim_scores")


def settings_for(checkpoint: Path, **overrides) -> ModelSettings:
    settings = ModelSettings(model_name="fp8", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=4096, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"), compile="none")
    return dataclasses.replace(settings, **overrides)


def engine_for(checkpoint: Path, **overrides) -> PackedEngine:
    family = families.family_for_config(families.read_config_dict(str(checkpoint)))
    return PackedEngine.load(family, settings_for(checkpoint, **overrides))


def batch(vocab_size: int) -> PackedBatch:
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor(LENGTHS)
    ids = torch.randint(4, vocab_size, (int(lengths.sum()),), generator=generator)
    return PackedBatch.pack([RequestSequences(ids, lengths, None)])


def fp8_linears(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, Fp8Linear)]


def quantized_targets(model: nn.Module) -> list[str]:
    """The Linear layers an FP8 checkpoint of llm-compressor's default recipe quantises (all but the heads)."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and not in_high_precision(name, HIGH_PRECISION_MODULES)]


def write_fp8_checkpoint(source: Path, target: Path, strategy: str, static_inputs: bool = False) -> dict:
    """``source`` (a save_pretrained folder) as llm-compressor writes it: targeted Linear weights in e4m3 with
    ``weight_scale`` ([1] per tensor, [out, 1] per channel), a compressed-tensors quantization_config, the rest as
    is. Returns the dequantised weights by name (what the served model must hold)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(source), dtype=torch.float32)
    state = {name: tensor.clone() for name, tensor in load_file(str(source / "model.safetensors")).items()}
    dequantized = {}
    for name in quantized_targets(model):
        weight, scale = quantize_weight(state[f"{name}.weight"], strategy)
        state[f"{name}.weight"], state[f"{name}.weight_scale"] = weight, scale
        if static_inputs:
            state[f"{name}.input_scale"] = torch.tensor([0.05])
        dequantized[f"{name}.weight"] = weight.float() * scale
    target.mkdir(parents=True)
    save_file(state, str(target / "model.safetensors"))
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (target / item.name).write_bytes(item.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False},
            "input_activations": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                   "dynamic": False} if static_inputs else
                                  {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                   "dynamic": True}),
        }},
        "ignore": ["score"],
    }
    (target / "config.json").write_text(json.dumps(config))
    return dequantized


def reference_scores(source: Path, weights: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """The unquantised engine with ``weights`` put in place of the checkpoint's."""
    engine = engine_for(source)
    with torch.no_grad():
        for name, tensor in weights.items():
            engine.model.get_parameter(name).copy_(tensor)
    return engine.run(batch(vocab_size))["scores"]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    return build_checkpoint("qwen3", tmp_path_factory.mktemp("fp8") / "qwen3")


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_checkpoint_serves_its_dequantised_weights(qwen3, tmp_path, strategy):
    dequantized = write_fp8_checkpoint(qwen3, tmp_path / "fp8", strategy)
    engine = engine_for(tmp_path / "fp8")
    vocab_size = engine.limits.vocab_size
    assert fp8_linears(engine.model) == [name.removesuffix(".weight") for name in dequantized]
    assert not any("score" in name for name in fp8_linears(engine.model))  # the head stays in the model's dtype
    assert "fp8_linears=" in engine.describe() and "fp8_linears=0" not in engine.describe()
    scores = engine.run(batch(vocab_size))["scores"]
    torch.testing.assert_close(scores, reference_scores(qwen3, dequantized, vocab_size), rtol=1e-5, atol=1e-5)


def test_fp8_checkpoint_with_static_input_scales(qwen3, tmp_path):
    write_fp8_checkpoint(qwen3, tmp_path / "fp8", "channel", static_inputs=True)
    engine = engine_for(tmp_path / "fp8")
    layer = engine.model.get_submodule(fp8_linears(engine.model)[0])
    assert layer.input_scale is not None and layer.input_scale.item() == pytest.approx(0.05)


def test_fp8_checkpoint_missing_a_scale_names_it(qwen3, tmp_path):
    write_fp8_checkpoint(qwen3, tmp_path / "fp8", "channel")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    missing = next(name for name in state if name.endswith("weight_scale"))
    del state[missing]
    save_file(state, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=missing.replace(".", r"\.")):
        engine_for(tmp_path / "fp8")


def test_quantization_fp8_quantises_the_body_at_load(qwen3):
    base = engine_for(qwen3)
    vocab_size = base.limits.vocab_size
    expected_weights = {}
    for name in quantized_targets(base.model):
        weight, scale = quantize_weight(base.model.get_submodule(name).weight, "channel")
        expected_weights[f"{name}.weight"] = weight.float() * scale
    engine = engine_for(qwen3, quantization="fp8")
    assert sorted(fp8_linears(engine.model)) == sorted(name.removesuffix(".weight") for name in expected_weights)
    for name, expected in expected_weights.items():
        torch.testing.assert_close(engine.model.get_submodule(name.removesuffix(".weight")).dequantized_weight(),
                                   expected, rtol=0, atol=0)
    scores = engine.run(batch(vocab_size))["scores"]
    torch.testing.assert_close(scores, reference_scores(qwen3, expected_weights, vocab_size), rtol=1e-5, atol=1e-5)
    # and close to the unquantised model: e4m3 keeps 3 mantissa bits
    torch.testing.assert_close(scores, base.run(batch(vocab_size))["scores"], rtol=0, atol=5e-2)


@pytest.mark.parametrize("kind", ["bert", "modernbert", "colbert"])
def test_quantization_fp8_keeps_heads_and_projections_in_the_model_dtype(tmp_path, kind):
    if kind == "colbert":
        engine = PackedEngine.load(families.by_name("colbert"), settings_for(
            colbert_checkpoint(tmp_path / kind), quantization="fp8", output_names=COLBERT_OUTPUTS))
    else:
        engine = engine_for(build_checkpoint(kind, tmp_path / kind), quantization="fp8")
    swapped = fp8_linears(engine.model)
    assert swapped and all(not in_high_precision(name, HIGH_PRECISION_MODULES) for name in swapped)
    heads = {"bert": ["bert.pooler.dense", "classifier"], "modernbert": ["head.dense", "classifier"],
             "colbert": ["colbert_linear"]}[kind]
    assert all(type(engine.model.get_submodule(name)) is nn.Linear for name in heads)


def test_dummy_weights_are_seeded_by_name_and_quantised_as_drawn(qwen3):
    first = engine_for(qwen3, load_format="dummy")
    second = engine_for(qwen3, load_format="dummy")
    vocab_size = first.limits.vocab_size
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    trained = engine_for(qwen3)
    assert not torch.equal(first.model.score.weight, trained.model.score.weight)  # not the checkpoint's
    norm = next(module for name, module in first.model.named_modules() if name.endswith("input_layernorm"))
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    config = first.config
    for name, parameter in first.model.named_parameters():  # the config's std, capped at 1 / sqrt(fan_in)
        if parameter.dim() == 2 and parameter.numel() > 1000:
            expected = min(config.initializer_range, parameter.shape[1] ** -0.5)
            assert parameter.std().item() == pytest.approx(expected, rel=0.1), name

    fp8 = engine_for(qwen3, load_format="dummy", quantization="fp8")
    assert fp8_linears(fp8.model)
    for name in fp8_linears(fp8.model):  # the same dummy weights, quantised
        weight, scale = quantize_weight(first.model.get_submodule(name).weight, "channel")
        torch.testing.assert_close(fp8.model.get_submodule(name).dequantized_weight(), weight.float() * scale,
                                   rtol=0, atol=0)
    torch.testing.assert_close(fp8.run(batch(vocab_size))["scores"], first.run(batch(vocab_size))["scores"],
                               rtol=0, atol=5e-2)


def test_dummy_qwen2_reward_model_in_fp8(tmp_path):
    """The 72B reward model's family (the project's own module, not an auto class) builds from its config alone."""
    checkpoint = build_golden_checkpoint(load_golden("qwen2_reward"), tmp_path / "rm")
    for weights in checkpoint.glob("*.safetensors"):
        weights.unlink()  # dummy weights need the config only
    engine = PackedEngine.load(qwen2_reward.FAMILY, settings_for(checkpoint, load_format="dummy", quantization="fp8",
                                                                 output_names=("logits", "scores")))
    swapped = fp8_linears(engine.model)
    assert swapped and all(name.startswith("model.layers.") for name in swapped)  # score.0 / score.2 stay
    assert isinstance(engine.model.score[0], nn.Linear) and isinstance(engine.model.score[2], nn.Linear)
    assert engine.model.model.rotary_emb.inv_freq.dtype == torch.float32
    scores = engine.run(batch(engine.limits.vocab_size))["scores"]
    assert scores.shape[0] == len(LENGTHS) and torch.isfinite(scores).all()


def test_dummy_tensors_fill_by_kind():
    tensors = DummyTensors({"a.weight": (4, 3), "norm.weight": (3,), "a.bias": (4,)}, torch.device("cpu"), std=0.5)
    assert torch.equal(tensors["norm.weight"], torch.ones(3)) and torch.equal(tensors["a.bias"], torch.zeros(4))
    assert torch.equal(tensors["a.weight"], tensors["a.weight"]) and tensors["a.weight"].shape == (4, 3)


def test_weight_plan():
    assert not weight_plan({}, "none", "auto").streamed
    assert weight_plan({}, "fp8", "auto").quantize and not weight_plan({}, "fp8", "auto").streamed
    dummy = weight_plan({}, "none", "dummy")
    assert dummy.streamed and not dummy.fp8 and dummy.describe() == "weights=dummy quantization=none"
    with pytest.raises(UnsupportedQuantization, match="quant_method"):
        weight_plan({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "none", "auto")


def test_an_fp8_checkpoint_keeps_its_ignored_layers_whatever_quantization_says(qwen3, tmp_path):
    write_fp8_checkpoint(qwen3, tmp_path / "fp8", "channel")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["score", "re:.*down_proj"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    for name in [key for key in state if "down_proj" in key and key.endswith(".weight")]:
        # stored in high precision, as llm-compressor writes an ignored layer
        state[name] = state[name].float() * state.pop(f"{name}_scale")
    save_file(state, str(tmp_path / "fp8" / "model.safetensors"))
    plan = weight_plan(config, "fp8", "auto")
    assert plan.fp8_checkpoint is not None and not plan.quantize
    engine = engine_for(tmp_path / "fp8", quantization="fp8")
    assert fp8_linears(engine.model) and not any("down_proj" in name for name in fp8_linears(engine.model))


def test_families_that_load_their_own_way_refuse_streamed_weights(tmp_path):
    checkpoint = colbert_checkpoint(tmp_path / "colbert")
    with pytest.raises(WeightLoadError, match="loads its checkpoint its own way"):
        PackedEngine.load(families.by_name("colbert"), settings_for(checkpoint, load_format="dummy",
                                                                   output_names=COLBERT_OUTPUTS))


def test_generic_family_refuses_fp8(tmp_path):
    checkpoint = build_checkpoint("electra", tmp_path / "electra")
    with pytest.raises(WeightLoadError, match="generic"):
        engine_for(checkpoint, quantization="fp8")


def test_parameters():
    parameters = ModelParameters.from_mapping({"quantization": "fp8", "load_format": "dummy"})
    assert (parameters.quantization, parameters.load_format) == ("fp8", "dummy")
    with pytest.raises(ValueError, match="quantization parameter 'int8' is not one of none, fp8"):
        ModelParameters.from_mapping({"quantization": "int8"})
    with pytest.raises(ValueError, match="load_format parameter"):
        ModelParameters.from_mapping({"load_format": "pt"})
    with pytest.raises(ValueError, match="lora_modules cannot be combined with quantization=fp8"):
        ModelParameters.from_mapping({"quantization": "fp8", "lora_modules": "a=/tmp/a"})


STREAMED_BUILD = """
import json, resource, sys, torch
from transformers import AutoConfig
from poolserve_runtime import families
from poolserve_runtime.weights import weight_plan
folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder)
plan = weight_plan(json.load(open(folder + "/config.json")), "fp8", "dummy")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = families.QWEN3.load_streamed(folder, config, plan, torch.bfloat16, torch.device("cpu"), "sdpa")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"peak_kib": peak, "held_bytes": held}))
"""


def test_fp8_dummy_build_never_holds_the_bf16_model(tmp_path):
    """The 72B reward model fits one H200 only if its bf16 weights (145 GB) never exist whole: a model built with
    load_format=dummy and quantization=fp8 peaks near its FP8 size, not its bf16 size (measured in a fresh process
    on a ~400M-parameter Qwen3 shape: 0.8 GB in bf16, 0.4 GB in FP8)."""
    import os
    import subprocess
    import sys

    config = dict(model_type="qwen3", architectures=["Qwen3ForSequenceClassification"], vocab_size=1024,
                  hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                  intermediate_size=4096, num_labels=1, pad_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    # A fixed mmap threshold: glibc otherwise raises it to the size of the freed per-tensor temporaries and keeps
    # them in its heap, so the process's peak would count memory it has already freed (2.6 GB here instead of 0.5).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", STREAMED_BUILD, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, check=True, env=env).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    linear_params = 24 * (4 * 1024 * 1024 + 3 * 1024 * 4096)
    assert measured["held_bytes"] < 1.1 * linear_params  # one byte a weight (+ scales, norms, embeddings)
    bf16_bytes = 2 * linear_params
    assert measured["peak_kib"] * 1024 < 0.75 * bf16_bytes, measured


def test_checkpoint_tensors_read_names_with_or_without_the_base_prefix(tmp_path):
    """An embedder (AutoModel: ``encoder.…``) reads a checkpoint saved from its classifier (``bert.encoder.…``),
    and the reverse; the folder's index names the shards."""
    from poolserve_runtime.weights import CheckpointTensors

    save_file({"bert.encoder.w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"classifier.weight": torch.zeros(3)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "bert.encoder.w": "a.safetensors", "classifier.weight": "b.safetensors"}}))
    tensors = CheckpointTensors(str(tmp_path), torch.device("cpu"), "bert")
    assert torch.equal(tensors["encoder.w"], torch.ones(2)) and torch.equal(tensors["bert.encoder.w"], torch.ones(2))
    assert "classifier.weight" in tensors and "bert.classifier.weight" in tensors and "missing" not in tensors
    with pytest.raises(KeyError):
        tensors["missing"]
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(WeightLoadError, match="safetensors"):
        CheckpointTensors(str(tmp_path), torch.device("cpu"))
