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


def write_sentence_transformers_files(directory: Path, width: int, pooling: str, normalize: bool,
                                      prompts: dict[str, str] | None = None, max_seq_length: int | None = None) -> Path:
    """The files sentence-transformers 2.x saves beside a golden checkpoint (as the released remote-code embedders
    ship them): ``modules.json`` (Transformer, Pooling, and Normalize when ``normalize``), ``1_Pooling/config.json``
    with the boolean mode keys set for ``pooling`` (``cls`` or ``mean``), ``config_sentence_transformers.json`` with
    ``prompts`` and ``sentence_bert_config.json`` with ``max_seq_length``."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": width, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True}, indent=2))
    (directory / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts or {},
                                                                             "default_prompt_name": None}, indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                     "do_lower_case": False}, indent=2))
    return directory
