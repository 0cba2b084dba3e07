"""FP8 loading on the CPU (model_runtime/poolserve_runtime/fp8.py): compressed-tensors configs and
their refusals, e4m3 weight and per-token activation quantisation against float64 references, and
state dicts written the way llm-compressor writes them, loaded into a tiny BERT classifier.

Error bounds: e4m3 keeps 3 mantissa bits, so rounding to nearest moves a normal value by at most
2^-4 of itself; below the smallest normal (2^-6) the spacing is 2^-9, so by at most 2^-10 absolute
(both in units of the scale).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from poolserve_runtime.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    ActivationScaling,
    Fp8Linear,
    UnsupportedQuantization,
    WeightStrategy,
    matches_target,
    parse_quantization_config,
    quantize_linear_fp8,
    quantize_linears,
    quantize_per_token,
    quantize_weight,
    replace_linears,
)

RELATIVE_ROUNDING = 2.0 ** -4
SUBNORMAL_ROUNDING = 2.0 ** -10


def rounding_bound(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |value - e4m3(value / scale) * scale| round-to-nearest allows."""
    return RELATIVE_ROUNDING * values.abs() + SUBNORMAL_ROUNDING * scale


def fp8_dynamic_config(strategy="channel", ignore=("lm_head",), targets=("Linear",)) -> dict:
    """A quantization_config as llm-compressor's FP8_DYNAMIC / FP8 schemes write it."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "ignore": list(ignore),
        "config_groups": {
            "group_0": {
                "targets": list(targets),
                "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
                            "dynamic": False, "group_size": None, "block_structure": None, "actorder": None,
                            "observer": "minmax"},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True, "group_size": None, "observer": None},
                "output_activations": None,
            },
        },
    }


def with_change(config: dict, path: str, value) -> dict:
    """A deep copy of ``config`` with the dotted ``path`` set to ``value``."""
    changed = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = changed
    for key in parents:
        node = node[key]
    node[last] = value
    return changed


# -- configs ---------------------------------------------------------------------------------------


def test_parses_dynamic_per_channel_and_static_per_tensor():
    config = parse_quantization_config(fp8_dynamic_config())
    (group,) = config.groups
    assert group.weights is WeightStrategy.CHANNEL
    assert group.activations is ActivationScaling.DYNAMIC_PER_TOKEN
    assert group.targets == ("Linear",) and config.ignore == ("lm_head",)

    static = with_change(fp8_dynamic_config("tensor"), "config_groups.group_0.input_activations",
                         {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False})
    (group,) = parse_quantization_config(static).groups
    assert group.weights is WeightStrategy.TENSOR
    assert group.activations is ActivationScaling.STATIC_PER_TENSOR


def test_group_format_overrides_the_top_level_one():
    config = with_change(fp8_dynamic_config(), "format", "mixed-precision")
    config["config_groups"]["group_0"]["format"] = "float-quantized"
    assert parse_quantization_config(config).groups[0].weights is WeightStrategy.CHANNEL


WEIGHTS = "config_groups.group_0.weights"
ACTIVATIONS = "config_groups.group_0.input_activations"


@pytest.mark.parametrize(("path", "value", "message"), [
    ("quant_method", "fp8", "quant_method='fp8'"),
    ("format", "pack-quantized", "format='pack-quantized'"),
    ("format", "int-quantized", "format='int-quantized'"),
    ("kv_cache_scheme", {"num_bits": 8, "type": "float"}, "kv_cache_scheme="),
    ("sparsity_config", {"format": "sparse-24-bitmask"}, "sparsity_config.format='sparse-24-bitmask'"),
    ("config_groups", {}, "config_groups={}"),
    ("config_groups.group_0.targets", [], "config_groups.group_0.targets=[]"),
    ("config_groups.group_0.output_activations", {"num_bits": 8}, "output_activations"),
    (f"{WEIGHTS}.num_bits", 4, f"{WEIGHTS}.num_bits=4"),
    (f"{WEIGHTS}.type", "int", f"{WEIGHTS}.type='int'"),
    (f"{WEIGHTS}.strategy", "group", f"{WEIGHTS}.strategy='group'"),
    (f"{WEIGHTS}.strategy", "block", f"{WEIGHTS}.strategy='block'"),
    (f"{WEIGHTS}.strategy", "tensor_group", f"{WEIGHTS}.strategy='tensor_group'"),
    (f"{WEIGHTS}.symmetric", False, f"{WEIGHTS}.symmetric=False"),
    (f"{WEIGHTS}.dynamic", True, f"{WEIGHTS}.dynamic=True"),
    (ACTIVATIONS, None, "weight-only FP8 (W8A16)"),
    (f"{ACTIVATIONS}.num_bits", 4, f"{ACTIVATIONS}.num_bits=4"),
    (f"{ACTIVATIONS}.type", "int", f"{ACTIVATIONS}.type='int'"),
    (f"{ACTIVATIONS}.symmetric", False, f"{ACTIVATIONS}.symmetric=False"),
    (f"{ACTIVATIONS}.strategy", "tensor", f"{ACTIVATIONS}.strategy/dynamic=('tensor', True)"),
    (f"{ACTIVATIONS}.strategy", "group", f"{ACTIVATIONS}.strategy/dynamic=('group', True)"),
    (f"{ACTIVATIONS}.dynamic", "local", f"{ACTIVATIONS}.strategy/dynamic=('token', 'local')"),
])
def test_refuses_naming_the_field(path, value, message):
    with pytest.raises(UnsupportedQuantization) as refused:
        parse_quantization_config(with_change(fp8_dynamic_config(), path, value))
    assert message in str(refused.value)


def test_targets_match_class_names_exact_names_and_regexes():
    linear, norm = nn.Linear(2, 2), nn.LayerNorm(2)
    assert matches_target("encoder.layer.0.output.dense", linear, "Linear")
    assert not matches_target("encoder.layer.0.output.LayerNorm", norm, "Linear")
    assert matches_target("lm_head", linear, "lm_head")
    assert not matches_target("model.lm_head", linear, "lm_head")  # exact names are whole names
    assert matches_target("encoder.layer.1.intermediate.dense", linear, r"re:.*intermediate\.dense$")
    assert not matches_target("encoder.layer.1.output.dense", linear, r"re:.*intermediate\.dense$")
    assert matches_target("anything", Fp8Linear(torch.zeros(2, 2, dtype=FP8_DTYPE), torch.ones(1)), "Module")


# -- weights and activations -----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_quantised_linear_is_within_e4m3_rounding(strategy):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight[3] *= 50.0  # one row far larger: per-tensor scales lose its neighbours' precision
        linear.weight[5] = 0.0  # an all-zero row keeps a finite scale
    fp8 = quantize_linear_fp8(linear, strategy)

    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight.shape == (24, 64)
    assert fp8.weight_scale.shape == ((24, 1) if strategy == "channel" else (1,))
    assert fp8.weight_strategy is WeightStrategy(strategy)
    assert torch.equal(fp8.dequantized_weight(), fp8.weight.float() * fp8.weight_scale)
    assert torch.all(fp8.weight_scale > 0)
    assert torch.equal(fp8.dequantized_weight()[5], torch.zeros(64))

    weight = linear.weight.detach()
    amax = weight.abs().amax(dim=1, keepdim=True) if strategy == "channel" else weight.abs().amax()
    assert torch.allclose(fp8.weight_scale, (amax / FP8_MAX).clamp(min=1e-12).expand_as(fp8.weight_scale))
    assert fp8.weight.float().abs().max() <= FP8_MAX
    weight_error = (fp8.dequantized_weight() - weight).abs()
    assert torch.all(weight_error <= rounding_bound(weight, fp8.weight_scale))

    x = torch.randn(7, 64)
    exact = linear(x).detach()
    bound = (x.abs() @ rounding_bound(weight, fp8.weight_scale.expand_as(weight)).T) + 1e-5
    assert torch.all((fp8(x) - exact).abs() <= bound)


def test_per_channel_is_more_precise_than_per_tensor_for_uneven_rows():
    torch.manual_seed(1)
    linear = nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight[0] *= 1e5  # the other rows fall into e4m3's subnormals under one shared scale
    errors = {strategy: (quantize_linear_fp8(linear, strategy).dequantized_weight()[1:] - linear.weight[1:])
              .abs().sum().item() for strategy in ("tensor", "channel")}
    assert errors["channel"] < errors["tensor"] / 10


def test_quantize_weight_rounds_to_nearest_e4m3():
    weight = torch.tensor([[448.0, 1.0625, 1.09375, -3.3, 0.0]])  # 1.0625: a tie between 1.0 and 1.125
    quantized, scale = quantize_weight(weight, "tensor")
    assert scale.item() == 1.0
    assert quantized.float().tolist() == [[448.0, 1.0, 1.125, -3.25, 0.0]]


def test_per_token_activation_scales_match_a_float64_reference():
    torch.manual_seed(2)
    x = torch.randn(9, 48) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[4] = 0.0
    quantized, scale = quantize_per_token(x)

    reference_scale = (x.double().abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)
    assert quantized.dtype == FP8_DTYPE and scale.shape == (9, 1) and scale.dtype == torch.float32
    assert torch.allclose(scale.double(), reference_scale, rtol=1e-7, atol=0)
    reference = (x.double() / reference_scale).to(FP8_DTYPE)
    assert torch.equal(quantized.view(torch.uint8), reference.view(torch.uint8))
    # Every row uses the full range: its largest element lands on ±448.
    nonzero_rows = [row for row in range(9) if row != 4]
    assert torch.all(quantized[nonzero_rows].float().abs().amax(dim=1) == FP8_MAX)
    assert torch.equal(quantized[4].float(), torch.zeros(48))
    dequantized = quantized.double() * scale.double()
    assert torch.all((dequantized - x.double()).abs() <= rounding_bound(x.double(), scale.double()))


def test_module_to_dtype_keeps_fp8_weights_and_fp32_scales():
    linear = quantize_linear_fp8(nn.Linear(16, 16), "channel")
    before = linear.weight.clone()
    linear.to(torch.bfloat16)
    assert linear.weight.dtype == FP8_DTYPE and torch.equal(linear.weight.view(torch.uint8), before.view(torch.uint8))
    assert linear.weight_scale.dtype == torch.float32 and linear.bias.dtype == torch.bfloat16
    assert linear(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert set(linear.state_dict()) == {"weight", "weight_scale", "bias"}
    assert [name for name, _ in linear.named_parameters()] == ["bias"]  # model.dtype must not read float8


def test_rejects_scales_that_fit_no_strategy():
    with pytest.raises(ValueError, match="neither per tensor nor per channel"):
        Fp8Linear(torch.zeros(8, 4, dtype=FP8_DTYPE), torch.ones(4, 1))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Linear(torch.zeros(8, 4), torch.ones(1))


# -- compressed-tensors state dicts in a tiny BERT classifier ---------------------------------------


def tiny_bert():
    import transformers as tf

    torch.manual_seed(3)
    config = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, num_labels=1, max_position_embeddings=32)
    return tf.BertForSequenceClassification(config).eval()


def compressed_state_dict(model: nn.Module, config: dict, scale_shape) -> dict[str, torch.Tensor]:
    """What llm-compressor saves: targeted Linears as e4m3 ``weight`` + bf16 ``weight_scale`` of
    ``scale_shape(out_features)``, the rest (ignored modules, norms, embeddings) as they are."""
    parsed = parse_quantization_config(config)
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and parsed.group_for(name, module) is not None:
            weight, scale = quantize_weight(module.weight, parsed.group_for(name, module).weights)
            state[f"{name}.weight"] = weight
            state[f"{name}.weight_scale"] = scale.to(torch.bfloat16).reshape(scale_shape(module.out_features))
    return state


def dequantized_reference(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The same model with every stored FP8 weight dequantised into a plain Linear."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if f"{name}.weight_scale" in state:
                module.weight.copy_(state[f"{name}.weight"].float() * state[f"{name}.weight_scale"].float()
                                    .reshape(-1, 1))
    return reference


@pytest.mark.parametrize(("strategy", "scale_shape"), [
    ("tensor", lambda out: (1,)),
    ("tensor", lambda out: ()),
    ("channel", lambda out: (out, 1)),
])
def test_loads_compressed_tensors_state_dict_into_bert(strategy, scale_shape):
    model = tiny_bert()
    config = fp8_dynamic_config(strategy, ignore=["re:.*attention\\.output\\.dense$", "bert.encoder.layer.1.output.dense"])
    state = compressed_state_dict(model, config, scale_shape)
    reference = dequantized_reference(model, state)

    swapped = replace_linears(model, parse_quantization_config(config), state)

    assert swapped == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.value", "bert.encoder.layer.1.intermediate.dense",
    ]
    fp8_modules = {name for name, module in model.named_modules() if isinstance(module, Fp8Linear)}
    assert fp8_modules == set(swapped)
    for name in ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.output.dense",
                 "bert.pooler.dense", "classifier"):
        assert type(model.get_submodule(name)) is nn.Linear, name
    assert isinstance(model.get_submodule("bert.embeddings.word_embeddings"), nn.Embedding)
    assert isinstance(model.get_submodule("bert.encoder.layer.0.output.LayerNorm"), nn.LayerNorm)
    query = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert query.weight_strategy is WeightStrategy(strategy)
    assert torch.equal(query.dequantized_weight(),
                       state["bert.encoder.layer.0.attention.self.query.weight"].float()
                       * state["bert.encoder.layer.0.attention.self.query.weight_scale"].float().reshape(-1, 1))
    # The pooler and classifier were stored in FP8 (targets: Linear) and are dequantised into plain Linears.
    assert torch.equal(model.classifier.weight, reference.classifier.weight)

    input_ids = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)


def test_static_input_scales_are_loaded():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    config = with_change(fp8_dynamic_config("tensor", ignore=[]), ACTIVATIONS,
                         {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False})
    state = compressed_state_dict(model, config, lambda out: (1,))
    state["0.input_scale"], state["2.input_scale"] = torch.tensor([0.02]), torch.tensor([0.5])
    assert replace_linears(model, parse_quantization_config(config), state) == ["0", "2"]
    assert model[0].input_scale.tolist() == [pytest.approx(0.02)] and model[2].input_scale.tolist() == [0.5]

    del state["2.input_scale"]
    with pytest.raises(KeyError, match="'2.input_scale'"):
        replace_linears(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
                        parse_quantization_config(config), state)


def test_checkpoint_disagreeing_with_its_config_is_refused():
    model = nn.Sequential(nn.Linear(16, 32))
    channel = parse_quantization_config(fp8_dynamic_config("channel", ignore=[]))
    per_tensor = compressed_state_dict(model, fp8_dynamic_config("tensor", ignore=[]), lambda out: (1,))
    with pytest.raises(ValueError, match="not the channel scale"):
        replace_linears(model, channel, per_tensor)
    with pytest.raises(ValueError, match="is torch.float32"):
        replace_linears(model, channel, dict(per_tensor, **{"0.weight": torch.zeros(32, 16)}))
    with pytest.raises(KeyError, match="'0.weight_scale'"):
        replace_linears(model, channel, {"0.weight": per_tensor["0.weight"]})


def test_quantize_linears_leaves_heads_norms_and_embeddings():
    model = tiny_bert()
    reference = copy.deepcopy(model)
    swapped = quantize_linears(model, "channel")
    assert len(swapped) == 12 and all(name.startswith("bert.encoder.") for name in swapped)
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    input_ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        scores, exact = model(input_ids=input_ids).logits, reference(input_ids=input_ids).logits
    assert not torch.equal(scores, exact)
    assert torch.allclose(scores, exact, rtol=0.1, atol=0.05)


def test_per_token_quantisation_traces_into_compiled_layers():
    """Layers compiled by torch.compile trace the quantisation as torch ops (Inductor fuses them into the kernel
    before) with no graph break, and give the eager results (on the CPU both are the torch spelling; the Triton
    kernel equals it bit for bit in tests/kernels/test_fp8_quant_kernel.py)."""
    linear = quantize_linear_fp8(nn.Linear(32, 16), "channel")
    x = torch.randn(5, 32)
    expected, expected_scale = quantize_per_token(x)
    compiled = torch.compile(lambda rows: quantize_per_token(rows), backend="eager", fullgraph=True)
    quantized, scale = compiled(x)
    assert torch.equal(quantized.view(torch.uint8), expected.view(torch.uint8)) and torch.equal(scale, expected_scale)
    assert torch.equal(torch.compile(linear, backend="eager", fullgraph=True)(x), linear(x))
