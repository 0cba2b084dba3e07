"""Where a model's weights come from when they are not simply ``from_pretrained``'s: FP8 checkpoints, weights
quantised to FP8 at load, and random weights of a config (``load_format=dummy``).

Three cases, decided from the model's parameters and its ``config.json`` (:func:`weight_plan`):

* **an FP8 checkpoint** (llm-compressor's compressed-tensors ``quantization_config``, parsed by
  :mod:`poolserve_runtime.fp8`): the model is built with its parameters on the meta device, its targeted
  ``nn.Linear`` layers become :class:`~poolserve_runtime.fp8.Fp8Linear` straight from the safetensors
  shards, one tensor at a time, and the other parameters (embeddings, norms, heads) are read the same way.
  The model never exists in bf16, so a 72B checkpoint of 73 GB loads on one 141 GB H200 where its 145 GB
  of bf16 would not.
* **``load_format=dummy``**: the same build, each tensor drawn at random on the device instead of read
  (:class:`DummyTensors`; seeded by the tensor's name, so two loads of one config hold the same weights,
  and a bf16 and an FP8 load of it can be compared); with ``quantization=fp8`` each Linear is quantised
  as it is drawn, so the bf16 model is never whole either.
* **``quantization=fp8`` on a checkpoint of bf16/fp32 weights**: the family loads it as usual, then
  :func:`~poolserve_runtime.fp8.quantize_linears` swaps the Linear layers (the model is in the model's dtype
  on the device until then: a model that does not fit in bf16 needs an FP8 checkpoint).

The first two build the model as the family's ``build_empty`` says: the stock Hugging Face class
(``AutoModelForSequenceClassification``, ``AutoModel``) for the families that load that way, the project's own
module for the Qwen2 reward models (Qwen2.5-Math-RM-72B); the other families say so by name.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poolserve_runtime.fp8 import (
    FP8_DTYPE,
    HIGH_PRECISION_MODULES,
    Fp8Config,
    Fp8Linear,
    in_high_precision,
    parse_quantization_config,
    quantize_weight,
    replace_linears,
)

# Files of a safetensors checkpoint: one file, or shards named by an index.
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Standard deviation of a dummy weight matrix when the config names no initializer_range (HF's default).
DEFAULT_INITIALIZER_RANGE = 0.02


class WeightLoadError(ValueError):
    """Weights that cannot be loaded as the parameters ask; the message says which and why."""


@dataclass(frozen=True)
class WeightPlan:
    """How one model's weights are obtained (see the module's docstring)."""

    fp8_checkpoint: Fp8Config | None  # the checkpoint's own FP8 layout (compressed-tensors), else None
    quantize: bool  # quantization=fp8: quantise the Linear layers that are not FP8 already
    dummy: bool  # load_format=dummy: random weights of the config

    @property
    def streamed(self) -> bool:
        """Built on the meta device and filled tensor by tensor (not ``from_pretrained``)."""
        return self.dummy or self.fp8_checkpoint is not None

    @property
    def fp8(self) -> bool:
        return self.quantize or self.fp8_checkpoint is not None

    def describe(self) -> str:
        source = "dummy" if self.dummy else "fp8-checkpoint" if self.fp8_checkpoint is not None else "checkpoint"
        return f"weights={source} quantization={'fp8' if self.fp8 else 'none'}"


def weight_plan(raw_config: Mapping, quantization: str, load_format: str) -> WeightPlan:
    """The plan for a checkpoint whose ``config.json`` is ``raw_config``; raises
    :class:`~poolserve_runtime.fp8.UnsupportedQuantization` for a ``quantization_config`` that is not FP8
    compressed-tensors (GPTQ, AWQ, bitsandbytes, ...)."""
    quantization_config = raw_config.get("quantization_config")
    fp8_checkpoint = parse_quantization_config(quantization_config) if quantization_config else None
    dummy = load_format == "dummy"
    if dummy:  # drawn in the model's dtype: an FP8 config quantises them as quantization=fp8 does
        return WeightPlan(fp8_checkpoint=None, quantize=quantization == "fp8" or fp8_checkpoint is not None, dummy=True)
    # An FP8 checkpoint is served as its quantization_config says: the layers it leaves in high precision
    # (its ignore list) stay so whatever quantization says.
    return WeightPlan(fp8_checkpoint=fp8_checkpoint, quantize=quantization == "fp8" and fp8_checkpoint is None,
                      dummy=False)


class CheckpointTensors(Mapping):
    """A safetensors checkpoint's tensors by the model's parameter names, each read on demand onto ``device``.

    A model built from a checkpoint of its base class (or the reverse) names its parameters with or without
    the base model's prefix (``model.``, ``bert.``): a name is looked up as written, then with the prefix
    added or removed.
    """

    def __init__(self, checkpoint: str, device: torch.device, base_model_prefix: str = ""):
        from safetensors import safe_open

        self.device = device
        self.prefix = f"{base_model_prefix}." if base_model_prefix else ""
        self.files: dict[str, object] = {}
        self.where: dict[str, str] = {}
        for path in safetensors_files(checkpoint):
            handle = safe_open(str(path), framework="pt", device=str(device))
            self.files[str(path)] = handle
            for key in handle.keys():
                self.where[key] = str(path)

    def key_for(self, name: str) -> str | None:
        candidates = [name, self.prefix + name]
        if self.prefix and name.startswith(self.prefix):
            candidates.append(name[len(self.prefix):])
        return next((key for key in candidates if key in self.where), None)

    def __getitem__(self, name: str) -> torch.Tensor:
        key = self.key_for(name)
        if key is None:
            raise KeyError(name)
        return self.files[self.where[key]].get_tensor(key)

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and self.key_for(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def checkpoint_folder(checkpoint: str) -> Path:
    """A local folder as is; a hub id downloaded (configs and weights only, never code)."""
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(checkpoint, allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"]))


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no init cost, no memory); buffers
    (rotary inverse frequencies) stay real. The weights then come from ``load_state_dict(assign=True)``
    or one tensor at a time (:func:`build_streamed`)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def safetensors_files(checkpoint: str) -> list[Path]:
    """The safetensors files of a local folder or a hub id: one file, or the shards an index names."""
    folder = checkpoint_folder(checkpoint)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    if (folder / SAFETENSORS_FILE).is_file():
        return [folder / SAFETENSORS_FILE]
    raise WeightLoadError(f"{checkpoint}: an FP8 checkpoint is read from safetensors files, and there is neither "
                          f"{SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")


class DummyTensors(Mapping):
    """Random weights for a model's parameter names (``load_format=dummy``), drawn on ``device`` when asked for.

    A matrix ``[out, in]`` (embeddings too) is normal with standard deviation ``min(std, 1 / sqrt(in))``: the
    config's ``initializer_range`` (HF's own initialisation) where the layer is narrow, and no more than keeps a
    layer's output at its input's scale where it is wide. With 0.02 alone a 4,096-wide layer multiplies its
    input's variance by 1.6 and a 36-layer random network turns chaotic: a 3% change anywhere (FP8 rounding)
    reorders its scores (measured on an H100: Spearman 0.85 between bf16 and FP8 for a Qwen3-8B shape), which
    says nothing about a trained model. Vectors named ``bias`` are zeros and other vectors (norm weights) ones.
    Each tensor's generator is seeded by ``seed`` and the tensor's name, so the weights do not depend on the
    order they are drawn in.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], device: torch.device, std: float, seed: int = 0):
        self.shapes = dict(shapes)
        self.device = device
        self.std = std
        self.seed = seed

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            fill = torch.zeros if name.endswith("bias") else torch.ones
            return fill(shape, dtype=torch.float32, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed + zlib.crc32(name.encode()))
        std = min(self.std, shape[-1] ** -0.5)
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=self.device).mul_(std)

    def __contains__(self, name) -> bool:
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build_streamed(build: Callable[[], nn.Module], config, plan: WeightPlan, checkpoint: str, dtype: torch.dtype,
                   device: torch.device, seed: int = 0) -> nn.Module:
    """The model ``build()`` makes of ``config`` (under :func:`parameters_on_meta`), its weights filled one
    tensor at a time as ``plan`` says: read from the checkpoint's safetensors files, or drawn at random
    (``plan.dummy``); FP8 Linear layers from an FP8 checkpoint, or quantised as they arrive
    (``plan.quantize``). Buffers (rotary tables, position ids) are the ones the model computes itself."""
    with parameters_on_meta():
        model = build()
    if plan.dummy:
        std = float(getattr(config, "initializer_range", None) or DEFAULT_INITIALIZER_RANGE)
        tensors: Mapping[str, torch.Tensor] = DummyTensors(
            {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}, device, std, seed)
    else:
        tensors = CheckpointTensors(checkpoint, device, getattr(model, "base_model_prefix", ""))
    try:
        if plan.fp8_checkpoint is not None:
            replace_linears(model, plan.fp8_checkpoint, tensors)
        if plan.quantize:
            quantize_streamed_linears(model, tensors)
        fill_meta_parameters(model, tensors, dtype)
    except KeyError as error:
        raise WeightLoadError(f"{checkpoint}: {error.args[0]}") from None
    return model.to(device).eval()


def quantize_streamed_linears(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Each ``nn.Linear`` still on the meta device and not under a head becomes an :class:`Fp8Linear` of its
    weight read from ``tensors`` (per-channel scales, dynamic per-token activations), one layer at a time."""
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not module.weight.is_meta or in_high_precision(name, HIGH_PRECISION_MODULES):
            continue
        weight = tensors[f"{name}.weight"]
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise WeightLoadError(f"{name}.weight has shape {tuple(weight.shape)}, the model expects "
                                  f"{(module.out_features, module.in_features)}")
        quantized, scale = quantize_weight(weight, "channel")
        del weight
        bias = tensors[f"{name}.bias"].to(module.bias.dtype) if module.bias is not None else None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Fp8Linear(quantized, scale, bias))
        swapped.append(name)
    return swapped


def fill_meta_parameters(model: nn.Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every parameter still on the meta device read from ``tensors``, in ``dtype`` (float ones) and frozen."""
    for name, parameter in list(model.named_parameters()):
        if not parameter.is_meta:
            continue
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(parameter.shape):
            raise WeightLoadError(f"{name} has shape {tuple(tensor.shape)}, the model expects {tuple(parameter.shape)}")
        if tensor.dtype == FP8_DTYPE:
            raise WeightLoadError(f"{name} is stored as float8_e4m3fn but no FP8 group of the quantization_config "
                                  "targets it")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    leftover = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if leftover:
        raise WeightLoadError(f"no weights for {', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}")
