"""Where a late-interaction (ColBERT) checkpoint keeps its token projection, read torch-free.

A ColBERT checkpoint is a BERT body plus one bias-free linear layer ``[dim, hidden]`` applied to every
token's last hidden state (then L2-normalised). The checkpoint stores it beside the body's tensors in
its safetensors file(s) under a name ending in ``linear.weight`` (answerai-colbert-small-v1, colbert-ai's
``HF_ColBERT``: ``linear.weight`` [96, 384]) or ``colbert_linear.weight``, which is how vLLM's
``ColBERTModel`` finds it. :func:`find_projection` reads only the safetensors headers (JSON), so the
model card learns the vectors' width without torch, and the runtime learns which tensor to load.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from poolserve_contract.families import UnsupportedArchitecture

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROJECTION_SUFFIXES = ("colbert_linear.weight", "linear.weight")  # vLLM's names, the first preferred


@dataclass(frozen=True)
class Projection:
    tensor: str  # the tensor's name in the checkpoint
    file: str  # the local safetensors file that holds it
    dim: int  # width of the token vectors (rows of the weight)
    hidden_size: int  # width of the body's hidden states (columns)


def find_projection(checkpoint: str, local_files_only: bool = False) -> Projection:
    """The ColBERT projection of ``checkpoint`` (a local folder or a hub id). Raises
    :class:`UnsupportedArchitecture` when it has none."""
    shards = _shards(checkpoint, local_files_only)
    for suffix in PROJECTION_SUFFIXES:
        for file in shards:
            for name, entry in _header(file).items():
                if name == suffix or name.endswith("." + suffix):
                    shape = entry.get("shape") or []
                    if len(shape) != 2:
                        raise UnsupportedArchitecture(f"{checkpoint}: the ColBERT projection {name} has shape "
                                                      f"{shape}, not [dim, hidden]")
                    return Projection(tensor=name, file=file, dim=int(shape[0]), hidden_size=int(shape[1]))
    raise UnsupportedArchitecture(
        f"{checkpoint} has no ColBERT projection: no tensor named {' or '.join(PROJECTION_SUFFIXES)} in its "
        "safetensors files (a sentence-transformers Dense projection is not served)")


def _shards(checkpoint: str, local_files_only: bool) -> list[str]:
    index = _local_file(checkpoint, INDEX_FILE, local_files_only)
    if index is not None:
        weight_map = json.loads(Path(index).read_text()).get("weight_map") or {}
        names = sorted(set(weight_map.values()))
        return [path for path in (_local_file(checkpoint, name, local_files_only) for name in names) if path]
    single = _local_file(checkpoint, SINGLE_FILE, local_files_only)
    if single is None:
        raise UnsupportedArchitecture(f"{checkpoint} has no {SINGLE_FILE}: ColBERT checkpoints are read from "
                                      "safetensors files")
    return [single]


def _local_file(checkpoint: str, filename: str, local_files_only: bool) -> str | None:
    local = Path(checkpoint)
    if local.is_dir():
        path = local / filename
        return str(path) if path.is_file() else None
    from transformers.utils import cached_file

    return cached_file(checkpoint, filename, local_files_only=local_files_only,
                       _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def _header(file: str) -> dict:
    """A safetensors file's tensor table: an 8-byte little-endian length, then that much JSON."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        table = json.loads(handle.read(length))
    table.pop("__metadata__", None)
    return table
