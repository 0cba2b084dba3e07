"""Reading a native architecture's weights: its tensors, whole or by prefix, and assigning them to a model built
on the meta device (:func:`poolserve_runtime.weights.parameters_on_meta`, :func:`~poolserve_runtime.weights.checkpoint_folder`).

Shared by every module in :mod:`poolserve_runtime.native`; nothing here imports a checkpoint's code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


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
