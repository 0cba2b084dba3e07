"""How an embedding checkpoint pools and normalises, read from its sentence-transformers files.

A sentence-transformers checkpoint lists its modules in ``modules.json`` (Transformer, Pooling,
optionally Dense and Normalize); the Pooling module's ``config.json`` says how token states become
one vector (``pooling_mode_cls_token`` / ``pooling_mode_mean_tokens`` / ``pooling_mode_lasttoken``
true, or a ``pooling_mode`` string), and ``config_sentence_transformers.json`` holds named
``prompts``. :func:`read_embedding_meta` reads them for a local folder or a hub id (torch-free) for
the model card and the engine.

The rule follows vLLM 0.34 (``transformers_utils/config.py::get_pooling_config``, applied in
``config/model.py`` ~L807, defaults in ``pooling_params.py::_set_default_parameters``):

* ``modules.json`` with a Pooling module: the pooling is that module's mode, and the embeddings are
  L2-normalised exactly when a ``Normalize`` module is listed (vLLM's ``use_activation``).
* No ``modules.json``, or one without a Pooling module: the family's default pooling, and the
  embeddings are normalised (vLLM's embed default ``use_activation=True``).

Unlike vLLM, which maps ``mean_sqrt_len_tokens`` to a plain mean, skips ``max`` / ``weightedmean``,
ignores ``include_prompt: false`` and lets the last of several true modes win (each of which gives
vectors that differ from the checkpoint's own), such checkpoints are refused at load with the file
and the setting named. A ``Dense`` module is refused too: its projection is not served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from poolserve_contract.families import UnsupportedArchitecture

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"

# modules.json names each module by its class path, which sentence-transformers moved in v5
# (``sentence_transformers.models.Pooling`` -> ``sentence_transformers.sentence_transformer.modules.pooling.Pooling``,
# ``...models.Normalize`` -> ``sentence_transformers.base.modules.normalize.Normalize``): the class name decides.
_TRANSFORMER, _POOLING, _NORMALIZE = "Transformer", "Pooling", "Normalize"


def _module_class(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


# Pooling config.json boolean keys -> their mode names (the `pooling_mode` strings), and the modes
# served -> the kernels' pooling method.
_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_SERVED_MODES = {"cls": "cls", "mean": "mean", "lasttoken": "last"}


class UnsupportedEmbedding(UnsupportedArchitecture):
    """The checkpoint's sentence-transformers modules ask for something the runtime does not serve."""


@dataclass(frozen=True)
class EmbeddingMeta:
    pooling: str  # "cls", "mean" or "last" (a poolserve_kernels.EMBEDDING_POOLING entry)
    normalizes: bool  # the embeddings are L2-normalised by default
    prompts: dict[str, str] = field(default_factory=dict)  # config_sentence_transformers.json `prompts`
    from_sentence_transformers: bool = False  # False: the family's defaults (no Pooling module)


def read_embedding_meta(checkpoint: str, default_pooling: str, local_files_only: bool = False) -> EmbeddingMeta:
    """The pooling, normalisation and prompts of ``checkpoint`` (a local folder or a hub id);
    ``default_pooling`` is the family's, for a checkpoint without a Pooling module. Raises
    :class:`UnsupportedEmbedding` for modules it does not serve."""
    prompts = _prompts(checkpoint, local_files_only)
    modules = _read_json(checkpoint, MODULES_FILE, local_files_only)
    pooling_module = next((m for m in modules or [] if _module_class(m) == _POOLING), None)
    if pooling_module is None:
        return EmbeddingMeta(pooling=default_pooling, normalizes=True, prompts=prompts)
    # A Dense projection (or any other module) after pooling would change the vectors: refuse it.
    others = [m for m in modules if _module_class(m) not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
    if others:
        what = ("a Dense projection after pooling" if any(_module_class(m) == "Dense" for m in others)
                else "a module besides Transformer, Pooling and Normalize")
        raise UnsupportedEmbedding(f"{checkpoint}/{MODULES_FILE} lists {', '.join(m.get('type', '?') for m in others)}: "
                                   f"{what} is not served")
    pooling_file = f"{pooling_module.get('path') or ''}/config.json".lstrip("/")
    pooling_config = _read_json(checkpoint, pooling_file, local_files_only)
    if pooling_config is None:
        raise UnsupportedEmbedding(f"{checkpoint}: {MODULES_FILE} lists a Pooling module but {pooling_file} "
                                   "is missing")
    return EmbeddingMeta(
        pooling=pooling_mode(pooling_config, f"{checkpoint}/{pooling_file}"),
        normalizes=any(_module_class(m) == _NORMALIZE for m in modules),
        prompts=prompts,
        from_sentence_transformers=True,
    )


def pooling_mode(pooling_config: dict, where: str) -> str:
    """The one pooling method a sentence-transformers Pooling ``config.json`` declares (``where``
    names the file in errors)."""
    if pooling_config.get("include_prompt", True) is False:
        raise UnsupportedEmbedding(f"{where}: include_prompt false (the prompt tokens left out of pooling) "
                                   "is not served")
    declared = [mode for key, mode in _MODE_KEYS.items() if pooling_config.get(key) is True]
    named = pooling_config.get("pooling_mode")  # sentence-transformers v6 writes a string (or a list of them)
    declared += [mode for mode in ([named] if isinstance(named, str) else list(named or [])) if mode not in declared]
    if not declared:
        raise UnsupportedEmbedding(f"{where}: no pooling mode is set (expected pooling_mode, or one of "
                                   f"{', '.join(_MODE_KEYS)} true)")
    if len(declared) > 1:
        raise UnsupportedEmbedding(f"{where}: several pooling modes at once ({', '.join(declared)}; "
                                   "sentence-transformers concatenates them) are not served")
    if declared[0] not in _SERVED_MODES:
        raise UnsupportedEmbedding(f"{where}: pooling mode {declared[0]!r} is not served (served: "
                                   f"{', '.join(_SERVED_MODES)})")
    return _SERVED_MODES[declared[0]]


def has_sentence_pooling(checkpoint: str, local_files_only: bool = False) -> bool:
    """The checkpoint is a sentence-transformers embedder: its ``modules.json`` lists a Pooling module
    (vLLM serves such a ``*ForCausalLM`` checkpoint as an embedding model)."""
    modules = _read_json(checkpoint, MODULES_FILE, local_files_only)
    return any(_module_class(m) == _POOLING for m in modules or [])


def _prompts(checkpoint: str, local_files_only: bool) -> dict[str, str]:
    st_config = _read_json(checkpoint, ST_CONFIG_FILE, local_files_only) or {}
    prompts = st_config.get("prompts") or {}
    return {str(name): str(text) for name, text in prompts.items()}


def _read_json(checkpoint: str, filename: str, local_files_only: bool):
    """A JSON file of a local folder or a hub checkpoint, or None when the checkpoint has no such file."""
    local = Path(checkpoint)
    if local.is_dir():
        path = local / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from transformers.utils import cached_file

    path = cached_file(checkpoint, filename, local_files_only=local_files_only,
                       _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    return None if path is None else json.loads(Path(path).read_text())
