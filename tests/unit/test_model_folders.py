"""Every model folder's defaults are usable as they stand: the config parses as Triton's ModelConfig
and the default checkpoint is a built-in name, a hub id of the folder's family example, or absent."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from tritonclient.grpc import model_config_pb2

from poolserve_contract.checkpoints import BUILTIN_PREFIX
from poolserve_runtime.families import by_folder
from poolserve_stack import builtin

MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
FOLDERS = sorted(path.parent.name for path in MODEL_REPOSITORY.glob("*/config.pbtxt"))
BUILTINS = {builtin.MINILM, builtin.SENTIMENT}


def default_checkpoint(folder: str) -> str | None:
    config = text_format.Parse((MODEL_REPOSITORY / folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == folder
    parameter = config.parameters.get("checkpoint")
    return None if parameter is None else parameter.string_value


def test_every_folder_is_found():
    assert len(FOLDERS) >= 20


@pytest.mark.parametrize("folder", FOLDERS)
def test_default_checkpoint_is_a_builtin_or_the_family_example(folder):
    checkpoint = default_checkpoint(folder)
    family = by_folder(folder)
    assert family is not None, f"{folder} has no family in the table"
    if checkpoint is None:
        return  # the folder documents that a checkpoint is set at load
    assert checkpoint == checkpoint.strip() and checkpoint, f"{folder}: default checkpoint {checkpoint!r}"
    if checkpoint.startswith(BUILTIN_PREFIX):
        assert checkpoint.removeprefix(BUILTIN_PREFIX) in BUILTINS, f"{folder}: unknown built-in {checkpoint!r}"
        return
    try:
        validate_repo_id(checkpoint)
    except HFValidationError as error:
        pytest.fail(f"{folder}: default checkpoint {checkpoint!r} is not a hub id: {error}")
    assert "/" in checkpoint, f"{folder}: {checkpoint!r} names no owner"
    examples = [example.strip() for example in family.example.split(",")]
    assert checkpoint in examples, f"{folder}: default {checkpoint!r} is not its family's example {family.example!r}"


def test_a_cut_default_is_refused():
    """The check above catches the defect it was written for (a header comment spliced into the value)."""
    with pytest.raises(HFValidationError):
        validate_repo_id(" text and image documents):jinaai/jina-reranker-m0")
