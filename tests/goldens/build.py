"""Rebuild a golden checkpoint from its committed JSON: config + parameter names and shapes + seed.

Golden files (``tests/goldens/<name>.json``) pin architectures whose reference implementation is
remote code the tests cannot fetch. The weights are not committed: they are drawn here, in the
file's parameter order, from one seeded generator, so the upstream run that recorded the expected
logits and the test see the same checkpoint. Init rule: 1-D ``*.weight`` (norm scales) are
``1 + 0.1 * randn``, 1-D ``*.bias`` are ``0.1 * randn``, everything else ``std * randn``
(``init.std``, default 0.3: large, so a wrong pooling or mask cannot hide in near-constant scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

GOLDENS = Path(__file__).parent


def load_golden(name: str) -> dict:
    return json.loads((GOLDENS / f"{name}.json").read_text())


def golden_state_dict(golden: dict) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(int(golden["seed"]))
    std = float((golden.get("init") or {}).get("std", 0.3))
    state = {}
    for name, shape in golden["parameters"]:
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 1 and name.endswith(".weight"):
            state[name] = 1 + 0.1 * noise
        elif len(shape) == 1 and name.endswith(".bias"):
            state[name] = 0.1 * noise
        else:
            state[name] = std * noise
    return state


def build_golden_checkpoint(golden: dict, directory: Path) -> Path:
    """config.json + model.safetensors in ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(golden["config"], indent=2))
    save_file({k: v.contiguous() for k, v in golden_state_dict(golden).items()}, str(directory / "model.safetensors"))
    return directory
