"""From what a user names (``make serve MODELS=...``) to the Triton models to load.

An entry is one of:

* ``CHECKPOINT``: a local folder, ``builtin:NAME`` or a hub id. Its ``config.json`` picks the family
  (:func:`poolserve_contract.families.family_for_config`: an ``architecture`` override, then
  ``architectures[0]``, then ``auto_map``, then the generic fallback), and with it the model folder;
  a ``*ForCausalLM`` checkpoint whose ``modules.json`` lists a sentence-transformers Pooling module
  is an embedding model (as vLLM serves Qwen3-Embedding), unless it is a known reranker or
  ``hf_overrides`` / ``architecture`` say otherwise;
* ``FOLDER``: a model_repository folder with the checkpoint its config.pbtxt names;
* ``FOLDER=CHECKPOINT``: that folder, that checkpoint (an explicit choice).

Each entry becomes its own Triton model, so two checkpoints of one architecture are served side by
side, each with its own dynamic batcher. The Triton name is the folder name for the folder forms
(the first time a folder is used) and otherwise the served name with every character Triton's
names should not hold (``/``, spaces, ...) turned into ``--``: ``BAAI/bge-reranker-v2-m3`` is
served as ``BAAI/bge-reranker-v2-m3`` by the adapter and is the Triton model
``BAAI--bge-reranker-v2-m3`` for raw gRPC clients. Names are stable: the same entries give the
same names on every start. The plan records each model's place among the entries
(:data:`~poolserve_contract.wire.SERVE_ORDER`): the first entry is the adapter's default model.

Parameters (``--set NAME.key=value``) are checked before anything is prepared or started
(:func:`check_sets`): an unknown key is refused with the parameters there are, a value a parameter
cannot take with the values it can.
"""

from __future__ import annotations

import re
from pathlib import Path

from poolserve_contract.conversions import conversion_for
from poolserve_contract.embedding_meta import has_sentence_pooling
from poolserve_contract.families import (
    GENERIC,
    FamilyDeclaration,
    UnsupportedArchitecture,
    architecture_of,
    embedding_family_for_causal_lm,
    family_for_config,
    read_config_dict,
)
from poolserve_contract.parameters import ModelParameters, check_lora_folders, check_parameter_names
from poolserve_contract.wire import SERVE_ORDER, SOURCE_FOLDER

_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
# What `make serve` and `docker compose up` serve when no model is named: builtin:sentiment-minilm
# (/classify) and builtin:all-MiniLM-L6-v2 (/score, /rerank), the folders' default checkpoints.
DEFAULT_MODELS = ("bert_classifier", "bert_embedder")


class PlanError(ValueError):
    """An entry that cannot be served; the message says why and what to do."""


def uses_builtins(entries: list[str], repository: Path) -> bool:
    """Whether the plan needs the built-in checkpoints: the defaults, a ``builtin:`` checkpoint, or a
    model folder named alone whose config.pbtxt names a built-in checkpoint."""
    def folder_uses_builtin(entry: str) -> bool:
        config = repository / entry / "config.pbtxt"
        return "=" not in entry and config.is_file() and "builtin:" in config.read_text()

    return not entries or any("builtin:" in entry or folder_uses_builtin(entry) for entry in entries)


def triton_name_for(name: str) -> str:
    return _NOT_IN_NAME.sub("--", name).strip("-.") or "model"


def plan_models(entries: list[str], repository: Path, sets: dict[str, dict[str, str]] | None = None,
                ) -> dict[str, dict[str, str]]:
    """Triton model name → its parameters (with ``model_folder``). ``sets`` maps an entry as written
    (or the Triton name it gets) to parameters to set on it."""
    sets = dict(sets or {})
    check_sets(sets)
    plan: dict[str, dict[str, str]] = {}
    served: dict[str, str] = {}
    for position, entry in enumerate(entries):
        folder, is_pair, checkpoint = entry.partition("=")
        if not is_pair and (repository / entry / "config.pbtxt").exists():
            folder, checkpoint = entry, ""
        elif not is_pair:
            folder, checkpoint = "", entry
        parameters = {**sets.pop(entry, {})}
        if checkpoint:
            parameters["checkpoint"] = checkpoint
        if not folder:
            folder = _folder_for_checkpoint(checkpoint, parameters, repository)
        elif not (repository / folder / "config.pbtxt").exists():
            raise PlanError(f"no model folder {folder!r} in {repository}")
        name = folder if folder not in plan and (is_pair or not checkpoint) else triton_name_for(
            _typed(parameters, entry).served_name(folder))
        name = _unique(name, plan)
        parameters = {**parameters, **sets.pop(name, {}), SOURCE_FOLDER: folder, SERVE_ORDER: str(position)}
        typed = _typed(parameters, entry)  # every entry's values, a model folder named alone too
        # A model folder named alone is served under its folder name unless served_model_name says otherwise.
        public = typed.served_name(name) if "checkpoint" in parameters or typed.served_model_name else name
        if public in served:
            raise PlanError(f"{entry!r} and {served[public]!r} would both be served as {public!r}; "
                            "give one a served_model_name")
        served[public] = entry
        plan[name] = parameters
    if sets:
        raise PlanError(f"--set names {', '.join(sorted(sets))}, which no entry serves (entries: {', '.join(plan)})")
    return plan


def _typed(parameters: dict[str, str], entry: str) -> ModelParameters:
    try:
        typed = ModelParameters.from_mapping(parameters)
        check_lora_folders(typed.lora_modules)
        return typed
    except ValueError as error:
        raise PlanError(f"{entry}: {error}") from None


def _folder_for_checkpoint(checkpoint: str, parameters: dict[str, str], repository: Path) -> str:
    typed = _typed(parameters, checkpoint)
    try:
        config = read_config_dict(typed.resolved_checkpoint())
    except (OSError, ValueError) as error:
        raise PlanError(f"cannot read config.json of {checkpoint!r}: {error}") from error
    try:
        override = typed.architecture
        conversion = conversion_for(config, checkpoint, typed.hf_overrides)
        embedder = None
        if conversion is not None and not (override or typed.hf_overrides or conversion.score_template):
            embedder = embedding_family_for_causal_lm(architecture_of(config))
            if embedder is not None and not has_sentence_pooling(typed.resolved_checkpoint()):
                embedder = None
        if embedder is not None:  # a causal LM's base model served as a sentence-transformers embedder
            conversion = None
            override = embedder.architectures[0]
        if conversion is not None:  # a causal LM served as a classifier (an LLM reranker)
            override = override or conversion.architecture
            if conversion.overrides:
                parameters["hf_overrides"] = conversion.to_json()
            if conversion.score_template:
                parameters.setdefault("score_template", conversion.score_template)
        family = family_for_config(config, override)
    except UnsupportedArchitecture as error:
        raise PlanError(f"{checkpoint}: {error}") from error
    if family is GENERIC and FamilyDeclaration.architecture_is_causal_lm(config):
        raise PlanError(f"{checkpoint}: {(config.get('architectures') or ['?'])[0]} has no classifier family to convert "
                        "into; serve it with hf_overrides naming a served architecture, as vLLM's --hf-overrides")
    if family is GENERIC and config.get("auto_map") and not typed.trust_remote_code:
        raise PlanError(
            f"{checkpoint}: architecture {(config.get('architectures') or ['?'])[0]} is remote code in the checkpoint "
            f"and no family serves it natively; remote code runs only when you allow it: "
            f"--set {checkpoint}.trust_remote_code=true")
    if not (repository / family.folder / "config.pbtxt").exists():
        raise PlanError(f"{checkpoint}: family {family.name} has no model folder {family.folder!r} in {repository}")
    return family.folder


def _unique(name: str, taken: dict) -> str:
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}-{number}", number + 1
    return candidate


def check_sets(sets: dict[str, dict[str, str]]) -> None:
    """Refuse a key that is no model parameter, or a value its parameter cannot take, naming the target."""
    for name, parameters in sets.items():
        try:
            check_parameter_names(parameters)
            ModelParameters.from_mapping(parameters)
        except ValueError as error:
            raise PlanError(f"--set {name}: {error}") from None


def with_served_names(entries: list[str], served_names: list[str], sets: dict[str, dict[str, str]],
                      ) -> dict[str, dict[str, str]]:
    """``sets`` with ``--served-model-name``'s names: one per entry, in order (vLLM serves one model, and
    its several names are aliases of it; here each model has one name)."""
    if not served_names:
        return sets
    if len(served_names) != len(entries):
        raise PlanError(f"--served-model-name gives {len(served_names)} name{'s' if len(served_names) != 1 else ''} "
                        f"for {len(entries)} model{'s' if len(entries) != 1 else ''} ({' '.join(entries) or 'none'}): "
                        "give one name per model, in the order of the models")
    named = {name: dict(parameters) for name, parameters in sets.items()}
    for entry, served_name in zip(entries, served_names, strict=True):
        earlier = named.get(entry, {}).get("served_model_name")
        if earlier not in (None, served_name):
            raise PlanError(f"{entry}: --served-model-name {served_name!r} and --set served_model_name={earlier!r} "
                            "disagree; give one")
        named.setdefault(entry, {})["served_model_name"] = served_name
    return named


def parse_sets(assignments: list[str]) -> dict[str, dict[str, str]]:
    """``NAME.key=value`` (NAME: an entry as written or a Triton name) into {NAME: {key: value}}.
    The key is the part after the last dot before ``=``, so NAME may hold dots (hub ids, paths)."""
    sets: dict[str, dict[str, str]] = {}
    for assignment in assignments:
        target, sep, value = assignment.partition("=")
        name, dot, key = target.rpartition(".")
        if not sep or not dot or not name or not key:
            raise PlanError(f"--set expects NAME.key=value, got {assignment!r}")
        sets.setdefault(name, {})[key] = value
    return sets
