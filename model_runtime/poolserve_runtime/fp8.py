"""FP8 (e4m3) linear layers: checkpoints in the compressed-tensors format and bf16 weights quantised at load.

llm-compressor writes FP8 checkpoints in the compressed-tensors format: ``config.json`` carries a
``quantization_config`` (``quant_method: "compressed-tensors"``, ``format: "float-quantized"``) whose
``config_groups`` say which modules (``targets``: class names such as ``"Linear"``, exact module
names, or ``"re:"`` regexes) hold 8-bit float weights, with one scale per tensor or per output channel,
and how activations are scaled (dynamic per token, or one static scale per tensor stored as
``input_scale``); ``ignore`` names the modules left in the original dtype (``lm_head``, heads). Each
quantised module stores ``weight`` (``float8_e4m3fn``, ``[out, in]``) and ``weight_scale`` (``[]`` or
``[1]`` per tensor, ``[out, 1]`` per channel), so that the real weight is ``weight.float() * weight_scale``.

What is supported, and what is refused with an error naming the field: 8-bit float, symmetric,
static weights with ``tensor`` or ``channel`` scales; activations dynamic per ``token`` or static per
``tensor``. Refused: other bit widths, integer types, ``group``/``block``/``tensor_group`` scales,
asymmetric (zero-point) schemes, weight-only FP8 (no ``input_activations``: W8A16), dynamic
per-tensor activations, output-activation and KV-cache quantisation, sparse formats.

:class:`Fp8Linear` runs ``torch._scaled_mm`` on CUDA devices of compute capability 8.9 or more
(Ada, Hopper) for bf16 inputs whose feature sizes are multiples of 16 (the FP8 GEMM's alignment).
Anywhere else (CPU, older GPUs, other dtypes) it falls back to dequantising the weight to the input's
dtype and running ``F.linear``: the weights are the checkpoint's exactly, but the activations are not
rounded to FP8, so the fallback is slightly closer to the bf16 model than the FP8 path, and it saves
memory, not time.

Norms, embeddings, attention and the heads stay in the model's dtype: :func:`replace_linears` and
:func:`quantize_linears` never swap a module under one of ``HIGH_PRECISION_MODULES``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import poolserve_kernels

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# A row or weight of zeros gets this scale instead of 0, so that dividing by it stays finite.
MIN_SCALE = 1e-12
# Modules whose Linears stay in the model's dtype whatever the config targets: classifier and reward heads
# and what feeds them (BERT's pooler, DistilBERT's pre_classifier, ModernBERT's head), the MLM head SPLADE
# pools (cls), and the token projections of ColBERT and BGE-M3: pooling and heads stay bf16/fp32.
HIGH_PRECISION_MODULES = ("score", "classifier", "lm_head", "pooler", "pre_classifier", "head", "cls",
                          "colbert_linear", "sparse_linear")
# torch._scaled_mm needs both feature sizes to be multiples of 16.
SCALED_MM_ALIGNMENT = 16


class UnsupportedQuantization(ValueError):
    """A ``quantization_config`` this module cannot serve; the message names the field."""


class WeightStrategy(str, enum.Enum):
    TENSOR = "tensor"  # one scale for the whole weight
    CHANNEL = "channel"  # one scale per output row


class ActivationScaling(str, enum.Enum):
    DYNAMIC_PER_TOKEN = "dynamic-per-token"  # amax / 448 of each row, computed in the forward
    STATIC_PER_TENSOR = "static-per-tensor"  # the checkpoint's ``input_scale``


@dataclass(frozen=True)
class Fp8Group:
    """One entry of ``config_groups``: the modules it targets and how they are scaled."""

    name: str
    targets: tuple[str, ...]
    weights: WeightStrategy
    activations: ActivationScaling


@dataclass(frozen=True)
class Fp8Config:
    groups: tuple[Fp8Group, ...]
    ignore: tuple[str, ...]

    def group_for(self, name: str, module: nn.Module) -> Fp8Group | None:
        """The group that quantises module ``name``, or None (ignored, or no group targets it)."""
        if any(matches_target(name, module, entry) for entry in self.ignore):
            return None
        for group in self.groups:
            if any(matches_target(name, module, target) for target in group.targets):
                return group
        return None


def matches_target(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' rule: ``"re:<regex>"`` matched (``re.match``) against the module name,
    otherwise the exact module name or the name of a class in the module's MRO (``"Linear"``)."""
    if target.startswith("re:"):
        return re.match(target[len("re:"):], name) is not None
    return target == name or any(cls.__name__ == target for cls in type(module).__mro__)


def _refuse(field: str, value, why: str) -> UnsupportedQuantization:
    return UnsupportedQuantization(f"quantization_config {field}={value!r}: {why}")


def _parse_weights(prefix: str, weights: Mapping) -> WeightStrategy:
    if weights.get("num_bits") != 8:
        raise _refuse(f"{prefix}.num_bits", weights.get("num_bits"), "only 8-bit FP8 weights are supported")
    if weights.get("type") != "float":
        raise _refuse(f"{prefix}.type", weights.get("type"),
                      "only float (e4m3) weights are supported, not integer (W8A8-INT8) schemes")
    strategy = weights.get("strategy")
    if strategy not in {s.value for s in WeightStrategy}:
        raise _refuse(f"{prefix}.strategy", strategy,
                      "only per-tensor ('tensor') and per-channel ('channel') weight scales are supported")
    if weights.get("symmetric") is not True:
        raise _refuse(f"{prefix}.symmetric", weights.get("symmetric"),
                      "only symmetric FP8 (no zero point) is supported")
    if weights.get("dynamic", False) is not False:
        raise _refuse(f"{prefix}.dynamic", weights.get("dynamic"), "weight scales must be static (stored)")
    return WeightStrategy(strategy)


def _parse_activations(prefix: str, activations: Mapping | None) -> ActivationScaling:
    if activations is None:
        raise _refuse(prefix, None, "weight-only FP8 (W8A16) is not supported; activations must be FP8 too")
    if activations.get("num_bits") != 8:
        raise _refuse(f"{prefix}.num_bits", activations.get("num_bits"), "only 8-bit FP8 activations are supported")
    if activations.get("type") != "float":
        raise _refuse(f"{prefix}.type", activations.get("type"), "only float (e4m3) activations are supported")
    if activations.get("symmetric") is not True:
        raise _refuse(f"{prefix}.symmetric", activations.get("symmetric"),
                      "only symmetric FP8 (no zero point) is supported")
    strategy, dynamic = activations.get("strategy"), activations.get("dynamic")
    if strategy == "token" and dynamic is True:
        return ActivationScaling.DYNAMIC_PER_TOKEN
    if strategy == "tensor" and dynamic is False:
        return ActivationScaling.STATIC_PER_TENSOR
    raise _refuse(f"{prefix}.strategy/dynamic", (strategy, dynamic),
                  "activations must be dynamic per token ('token', true) or static per tensor ('tensor', false)")


def parse_quantization_config(quantization_config: Mapping) -> Fp8Config:
    """Check a ``config.json`` ``quantization_config`` and return what :func:`replace_linears` needs.

    Raises :class:`UnsupportedQuantization` naming the first field it cannot serve.
    """
    method = quantization_config.get("quant_method")
    if method != "compressed-tensors":
        raise _refuse("quant_method", method, "only compressed-tensors FP8 checkpoints (llm-compressor) are supported")
    for field in ("kv_cache_scheme", "transform_config"):
        if quantization_config.get(field):
            raise _refuse(field, quantization_config[field], "is not supported")
    sparsity = quantization_config.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise _refuse("sparsity_config.format", sparsity.get("format"), "sparse checkpoints are not supported")
    raw_groups = quantization_config.get("config_groups") or {}
    if not raw_groups:
        raise _refuse("config_groups", raw_groups, "no quantisation group is declared")

    groups = []
    for group_name, group in raw_groups.items():
        prefix = f"config_groups.{group_name}"
        fmt = group.get("format") or quantization_config.get("format")
        if fmt != "float-quantized":
            raise _refuse(f"{prefix}.format" if group.get("format") else "format", fmt,
                          "only 'float-quantized' (FP8 weights stored as float8_e4m3fn) is supported")
        targets = tuple(group.get("targets") or ())
        if not targets:
            raise _refuse(f"{prefix}.targets", group.get("targets"), "a group must target some modules")
        if group.get("output_activations") is not None:
            raise _refuse(f"{prefix}.output_activations", group["output_activations"], "is not supported")
        groups.append(Fp8Group(
            name=group_name,
            targets=targets,
            weights=_parse_weights(f"{prefix}.weights", group.get("weights") or {}),
            activations=_parse_activations(f"{prefix}.input_activations", group.get("input_activations")),
        ))
    return Fp8Config(groups=tuple(groups), ignore=tuple(quantization_config.get("ignore") or ()))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x [tokens, features]`` as e4m3 with one fp32 scale each (``amax / 448``, ``[tokens, 1]``):
    ``x ≈ q.float() * scale``; one Triton kernel on CUDA (:mod:`poolserve_kernels.fp8_quant`).

    Inside compiled layers it is the torch spelling instead, which Inductor can fuse into the kernel that makes
    ``x`` (the RMSNorm before q/k/v and gate/up, the activation before down). The kernel as an opaque operator there
    cost a pass over the activations per layer it feeds: on an H100 the 0.6B shape served FP8 at 0.55-0.61x bf16
    with it, 0.89-1.02x without (benchmarks/README.md)."""
    if torch.compiler.is_compiling():
        return poolserve_kernels.per_token_quant_reference(x)
    return poolserve_kernels.per_token_quant(x)


def quantize_weight(weight: torch.Tensor, strategy: WeightStrategy | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` as e4m3 and its fp32 scale (``amax / 448``: ``[1]`` per tensor, ``[out, 1]`` per
    channel), rounded to nearest by ``.to(float8_e4m3fn)``."""
    weight = weight.detach().float()
    if WeightStrategy(strategy) is WeightStrategy.CHANNEL:
        amax = weight.abs().amax(dim=1, keepdim=True)
    else:
        amax = weight.abs().amax().reshape(1)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    return (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor-core matmuls: CUDA compute capability 8.9 (Ada) and newer (Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W = weight.float() * weight_scale`` stored in e4m3.

    ``weight``, ``weight_scale`` and ``input_scale`` are buffers, not parameters: HF's ``model.dtype``
    reads the first floating parameter, which must not become float8. They also keep their dtypes
    through ``module.to(dtype)`` (see :meth:`_apply`); the bias follows the model's dtype.
    """

    QUANTISED_BUFFERS = ("weight", "weight_scale", "input_scale", "weight_scale_row")

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None):
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"an FP8 weight is a 2-d float8_e4m3fn tensor, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_strategy = scale_strategy(weight_scale, self.out_features)
        shape = (self.out_features, 1) if self.weight_strategy is WeightStrategy.CHANNEL else (1,)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(shape).to(weight.device))
        # torch._scaled_mm's row-wise scale_b, [1, out] (a per-tensor scale broadcast to every column), made once
        # here rather than on every forward.
        self.register_buffer("weight_scale_row", self.weight_scale.expand(self.out_features, 1)
                             .reshape(1, self.out_features).contiguous(), persistent=False)
        if input_scale is not None:
            if input_scale.numel() != 1:
                raise ValueError(f"a static input_scale is one number, got shape {tuple(input_scale.shape)}")
            input_scale = input_scale.detach().float().reshape(1).to(weight.device)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        activations = "static" if self.input_scale is not None else "dynamic per token"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_scale={self.weight_strategy.value}, activations={activations}")

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating tensor, float8 included: the quantised weight and its
        # fp32 scales only follow the device (found by applying fn to an empty probe).
        device = fn(torch.empty(0, device=self.weight.device)).device
        kept = {name: self._buffers.pop(name) for name in self.QUANTISED_BUFFERS}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():  # back in place: a non-persistent buffer stays so
            self._buffers[name] = None if tensor is None else tensor.to(device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype)

    def uses_scaled_mm(self, x: torch.Tensor) -> bool:
        return (x.dtype == torch.bfloat16 and self.in_features % SCALED_MM_ALIGNMENT == 0
                and self.out_features % SCALED_MM_ALIGNMENT == 0 and scaled_mm_supported(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_scaled_mm(x):
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        rows = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            x_fp8, x_scale = quantize_per_token(rows)
        else:
            x_fp8 = (rows.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            x_scale = self.input_scale.expand(rows.shape[0], 1).contiguous()
        # Row-wise scaling (scale_a [M, 1], scale_b [1, N], bf16 out) covers every combination: a
        # per-tensor weight scale is broadcast to all columns. weight.t() is column-major, as required.
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale_row,
                               bias=None if self.bias is None else self.bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
        return out.reshape(*x.shape[:-1], self.out_features)


def scale_strategy(weight_scale: torch.Tensor, out_features: int) -> WeightStrategy:
    """Which strategy a stored scale's shape means: ``[]``, ``[1]`` or ``[1, 1]`` per tensor, ``[out, 1]``
    or ``[out]`` per channel."""
    if weight_scale.numel() == 1 and weight_scale.dim() <= 2:
        return WeightStrategy.TENSOR
    if weight_scale.numel() == out_features and tuple(weight_scale.shape) in {(out_features,), (out_features, 1)}:
        return WeightStrategy.CHANNEL
    raise ValueError(f"weight_scale of shape {tuple(weight_scale.shape)} is neither per tensor nor per channel "
                     f"of {out_features} outputs")


def quantize_linear_fp8(linear: nn.Linear, strategy: WeightStrategy | str = WeightStrategy.CHANNEL) -> Fp8Linear:
    """An :class:`Fp8Linear` from a high-precision ``nn.Linear`` (``quantization=fp8`` on a bf16 checkpoint),
    with dynamic per-token activation scales."""
    weight, scale = quantize_weight(linear.weight, strategy)
    return Fp8Linear(weight, scale, bias=linear.bias)


def in_high_precision(name: str, keep: Iterable[str]) -> bool:
    """True for a module under one of ``keep`` (a component of its dotted name: ``classifier.dense``)."""
    return bool(set(name.split(".")) & set(keep))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _checkpoint_tensor(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise KeyError(f"the FP8 checkpoint has no {key!r}, which its quantization_config implies")
    return state_dict[key]


def replace_linears(model: nn.Module, config: Fp8Config, state_dict: Mapping[str, torch.Tensor],
                    keep: Iterable[str] = HIGH_PRECISION_MODULES) -> list[str]:
    """Swap every ``nn.Linear`` a group of ``config`` targets (and ``ignore`` does not name) for an
    :class:`Fp8Linear` loaded from ``state_dict`` (keys are the model's own module names:
    ``<name>.weight``, ``<name>.weight_scale``, ``<name>.input_scale`` for static activations,
    ``<name>.bias`` or else the module's current bias). Returns the names swapped.

    A targeted Linear under ``keep`` (the heads) stays an ``nn.Linear``: its stored FP8 weight is
    dequantised into it in the Linear's own dtype. Other modules are not touched.
    """
    keep = tuple(keep)
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        group = config.group_for(name, module)
        if group is None:
            continue
        weight = _checkpoint_tensor(state_dict, f"{name}.weight")
        if weight.dtype != FP8_DTYPE:
            raise ValueError(f"{name}.weight is {weight.dtype}, but group {group.name!r} stores it as float8_e4m3fn")
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{name}.weight has shape {tuple(weight.shape)}, the model expects "
                             f"{(module.out_features, module.in_features)}")
        weight_scale = _checkpoint_tensor(state_dict, f"{name}.weight_scale")
        # With one output a per-tensor and a per-channel scale are the same number.
        if module.out_features > 1 and scale_strategy(weight_scale, module.out_features) is not group.weights:
            raise ValueError(f"{name}.weight_scale has shape {tuple(weight_scale.shape)}, not the "
                             f"{group.weights.value} scale group {group.name!r} declares")
        bias = state_dict.get(f"{name}.bias", module.bias)
        input_scale = None
        if group.activations is ActivationScaling.STATIC_PER_TENSOR:
            input_scale = _checkpoint_tensor(state_dict, f"{name}.input_scale")
        fp8 = Fp8Linear(weight, weight_scale, bias=bias, input_scale=input_scale)
        if in_high_precision(name, keep):
            # New parameters rather than copies into the old: a model built on the meta device has no storage.
            module.weight = nn.Parameter(fp8.dequantized_weight(module.weight.dtype), requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(bias.detach().to(module.bias.dtype), requires_grad=False)
            continue
        _set_submodule(model, name, fp8)  # on the device of the checkpoint's tensor
        swapped.append(name)
    return swapped


def quantize_linears(model: nn.Module, strategy: WeightStrategy | str = WeightStrategy.CHANNEL,
                     keep: Iterable[str] = HIGH_PRECISION_MODULES) -> list[str]:
    """Quantise every ``nn.Linear`` not under ``keep`` in place (``quantization=fp8``); returns the names swapped."""
    keep = tuple(keep)
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not in_high_precision(name, keep):
            _set_submodule(model, name, quantize_linear_fp8(module, strategy))
            swapped.append(name)
    return swapped
