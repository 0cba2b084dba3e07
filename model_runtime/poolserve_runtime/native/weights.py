"""Reading a native architecture's weights: the checkpoint folder, its tensors, meta-device building.

Shared by every module in :mod:`poolserve_runtime.native`; nothing here imports a checkpoint's code.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn


def checkpoint_folder(checkpoint: str) -> Path:
    """A local folder as is; a hub id downloaded (configs and weights only, never code)."""
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(checkpoint, allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin"]))


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder: its ``*.safetensors`` (one file or an index's shards), else its
    ``pytorch_model*.bin`` files (read with ``weights_only``: no pickled code runs)."""
    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for file in files:
            state.update(load_file(str(file)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    for file in bins:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no init cost, no memory); buffers
    (rotary inverse frequencies) stay real. The weights then come from ``load_state_dict(assign=True)``."""
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


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                   device: torch.device) -> nn.Module:
    """Load ``state`` (exactly the model's parameters) in ``dtype``; buffers keep their own dtype."""
    expected = {name for name, _ in model.named_parameters()}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match the architecture: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.to(device).eval()


def read_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Only the tensors whose names start with ``prefix`` (a head of a multi-GB checkpoint), without
    reading the rest: safetensors files are opened lazily; ``.bin`` files are read whole."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return {name: tensor for name, tensor in load_state(Path(folder)).items() if name.startswith(prefix)}
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(prefix):
                    tensors[name] = handle.get_tensor(name)
    return tensors
