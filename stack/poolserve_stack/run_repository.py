"""The per-run model repository: one folder per served model, made from a folder of
``model_repository/`` with its name and parameters set and its config completed (shared inputs,
outputs, batching and the model card), so the repository on disk stays the one a stock
tritonserver serves.
"""

from __future__ import annotations

from pathlib import Path

from poolserve_contract.card import card_for_config
from poolserve_contract.checkpoints import resolve_checkpoint
from poolserve_contract.families import by_folder
from poolserve_contract.parameters import parse_instance_count
from poolserve_contract.triton_config import complete_config
from poolserve_contract.wire import (
    INSTANCE_COUNT,
    SOURCE_FOLDER,
)
from poolserve_stack.errors import LauncherError
from poolserve_stack.processes import visible_gpu_count

# Instances per GPU by default. Two stub processes overlap one batch's CPU work (reading inputs, packing,
# returning outputs) with the other's forward: measured on an H200, 64 clients of MiniLM rerank64 went from
# 7,514 to 14,016 pairs/s, at a cost of 2-3 ms for one client alone (benchmarks/README.md). Only for
# checkpoints on this machine of up to SMALL_WEIGHTS_BYTES (bge-m3's 2.3 GB of fp32 weights, a 1B model in
# bf16): a second copy of a larger one costs memory the batches (and a prefix cache) need, and on a small GPU
# may not fit; its forward, not the CPU work, is the bottleneck then.
INSTANCES_PER_GPU = 2
SMALL_WEIGHTS_BYTES = 4 * 2**30


def config_with_parameters(config_pbtxt: Path, parameters: dict[str, str], name: str | None = None) -> str:
    """The model's config.pbtxt (text format) renamed to ``name``, with ``parameters`` set or replaced
    (and ``instance_count`` turned into its instance_group), completed with the model card."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_pbtxt.read_text(), model_config_pb2.ModelConfig())
    if name is not None:
        config.name = name
    parameters = dict(parameters)
    try:
        instance_count = parse_instance_count(parameters.pop(INSTANCE_COUNT, ""))
    except ValueError as error:
        raise LauncherError(str(error)) from None
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    if instance_count is None and not config.instance_group:
        instance_count = default_instance_count(config.parameters["checkpoint"].string_value
                                                if "checkpoint" in config.parameters else "", config_pbtxt.parent)
    if instance_count is not None:
        del config.instance_group[:]
        config.instance_group.add(count=instance_count)
    return text_format.MessageToString(completed_config(config, config_pbtxt.parent.name, config_pbtxt.parent))


def default_instance_count(checkpoint: str, model_dir: Path) -> int | None:
    """Instances per GPU when the user names none: :data:`INSTANCES_PER_GPU` for a checkpoint on this machine
    whose weights fit :data:`SMALL_WEIGHTS_BYTES`, on a machine with a GPU; None (Triton's one per GPU, or one
    on the CPU) otherwise. On the CPU one instance already uses every core, and a large model's second copy
    could exhaust the GPU's memory."""
    if not visible_gpu_count() or not checkpoint:
        return None
    try:
        path = Path(resolve_checkpoint(checkpoint, model_dir))
    except (ValueError, FileNotFoundError):
        return None
    if not path.is_dir():  # a hub id: its size is unknown here
        return None
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))  # one format, when a checkpoint has both
    weights = sum(file.stat().st_size for file in files)
    return INSTANCES_PER_GPU if 0 < weights <= SMALL_WEIGHTS_BYTES else None


def completed_config(config, folder: str, model_dir: Path | None = None):
    """``config`` with what every model of the shared runtime adds (poolserve_contract.triton_config) and
    its model card (poolserve_contract.card), when ``folder`` is one of its families; otherwise as it is.

    Triton would ask the model's ``auto_complete_config`` for the same at load, in a stub process of
    its own that imports torch and the runtime only to exit again: on a 2-core machine that doubles
    the time a model takes to load, and to come back after its stub died. Completed here, the server
    runs with auto-complete off (see :func:`all_completed`). The card is read from checkpoints already
    on this machine (:func:`~poolserve_contract.card.card_for_config`).
    """
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    family = by_folder(folder)
    if family is None:
        return config
    as_dict = json_format.MessageToDict(config, preserving_proto_field_name=True)
    card = card_for_config(as_dict, family, model_dir)
    complete_config(as_dict, family.output_kind, family.uses_token_types, family.vision, card)
    return json_format.ParseDict(as_dict, model_config_pb2.ModelConfig())


def all_completed(models: dict[str, dict[str, str]]) -> bool:
    """Every planned model comes from a folder of the shared runtime (its config completed here)."""
    return all(by_folder(parameters.get(SOURCE_FOLDER, name)) is not None for name, parameters in models.items())


def write_run_repository(source: Path, models: dict[str, dict[str, str]], target: Path) -> Path:
    """One folder per served model under ``target``, each made from a folder of ``source``.

    This is how two checkpoints of one architecture run side by side (two Triton models, each with
    its own dynamic batcher) while ``source`` stays the repository a stock tritonserver serves: the
    generated ``config.pbtxt`` is the source folder's with its name and parameters set, and the
    version folders are links to the source's. A relative ``checkpoint`` is resolved against the
    source folder, as the model would have resolved it there.
    """
    target.mkdir(parents=True, exist_ok=True)
    for name, parameters in models.items():
        parameters = {**parameters, SOURCE_FOLDER: parameters.get(SOURCE_FOLDER, name)}
        folder = source / parameters[SOURCE_FOLDER]
        if not (folder / "config.pbtxt").exists():
            raise LauncherError(f"no model folder {folder.name!r} in {source}")
        checkpoint = parameters.get("checkpoint", "")
        if checkpoint and not checkpoint.startswith("builtin:") and (folder / checkpoint).exists():
            parameters["checkpoint"] = str((folder / checkpoint).resolve())
        model_dir = target / name
        model_dir.mkdir()
        (model_dir / "config.pbtxt").write_text(config_with_parameters(folder / "config.pbtxt", parameters, name))
        for entry in folder.iterdir():
            if entry.name != "config.pbtxt":
                (model_dir / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return target
