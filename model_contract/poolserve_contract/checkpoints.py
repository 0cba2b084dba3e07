"""Where a model's weights come from: ``config.pbtxt``'s ``checkpoint`` parameter.

Accepted forms (resolved the same way by the models and by the adapter, which loads the
tokenizer from the same place):

* ``builtin:NAME``: a checkpoint the project prepares (``make serve`` builds them) under the
  models cache, ``$MODEL_RUNTIME_CACHE`` or ``<project>/.cache/models``;
* a local folder, absolute or relative to the model's folder in the repository;
* anything else is a Hugging Face hub id, passed to ``from_pretrained`` as is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_PREFIX = "builtin:"


def models_cache() -> Path:
    return Path(os.environ.get("MODEL_RUNTIME_CACHE", PROJECT_ROOT / ".cache" / "models"))


def resolve_checkpoint(value: str, model_dir: Path | None = None) -> str:
    """A local path or a hub id that ``from_pretrained`` accepts."""
    value = value.strip()
    if not value:
        raise ValueError("the model's `checkpoint` parameter is empty")
    if value.startswith(BUILTIN_PREFIX):
        path = models_cache() / value[len(BUILTIN_PREFIX) :]
        if not path.exists():
            raise FileNotFoundError(
                f"built-in checkpoint {value!r} is not prepared at {path}; run `make serve` "
                "(or `python -m poolserve_stack prepare`) once to build it"
            )
        return str(path)
    path = Path(value).expanduser()
    if not path.is_absolute() and model_dir is not None and (model_dir / path).exists():
        return str((model_dir / path).resolve())
    if path.exists():
        return str(path.resolve())
    return value


def checkpoint_config(checkpoint: str, trust_remote_code: bool = False, local_files_only: bool = False):
    """The checkpoint's config as a ``PretrainedConfig``: transformers' own class where it knows the
    model type, else a generic config from config.json (remote-code architectures served natively:
    labels, lengths and vocabulary are all the model card needs, and no remote code runs).
    ``local_files_only``: a hub checkpoint is read from the local cache only."""
    from transformers import AutoConfig, PretrainedConfig

    try:
        return AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code,
                                          local_files_only=local_files_only)
    except (KeyError, ValueError):
        config, _ = PretrainedConfig.get_config_dict(checkpoint, local_files_only=local_files_only)
        return PretrainedConfig.from_dict(config)


def sentence_transformers_max_seq_length(checkpoint: str) -> int | None:
    """``max_seq_length`` from a local sentence-transformers config, if there is one."""
    config = Path(checkpoint) / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_seq_length")
        return int(value) if value else None
    return None


def max_model_len_for(config, checkpoint: str) -> int:
    """The longest sequence the checkpoint takes, as vLLM derives it."""
    if hasattr(config, "get_text_config"):  # multimodal configs keep it in their text config
        config = config.get_text_config()
    length = int(getattr(config, "max_position_embeddings", 0) or 0)
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        # RoBERTa positions start after padding_idx, so two slots are not usable.
        length -= int(getattr(config, "pad_token_id", 1) or 1) + 1
    st_length = sentence_transformers_max_seq_length(checkpoint)
    if st_length:
        length = min(length, st_length) if length > 0 else st_length
    if length <= 0:
        raise ValueError("cannot tell the model's maximum length; set the `max_model_len` parameter")
    return length
