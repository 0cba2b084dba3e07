"""Model parameters (config.pbtxt ``parameters``), parsed once into a typed object both sides read.

Triton carries every parameter as a string; :class:`ModelParameters` holds each one typed, with its
default and its check, for the host's plan and run repository, the model card, the Triton stub's
settings and the adapter. Keys it does not know are left alone there (other backends' models, and the
``model_card`` :func:`poolserve_contract.triton_config.complete_config` writes); what a user sets is
checked against :data:`PARAMETER_NAMES` first (:func:`check_parameter_names`), so a typo is refused
instead of ignored.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from poolserve_contract.checkpoints import BUILTIN_PREFIX, resolve_checkpoint
from poolserve_contract.wire import INSTANCE_COUNT, SOURCE_FOLDER

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("varlen", "padded")
COMPILE_MODES = ("auto", "layers", "none")
PREFIX_REUSE_MODES = ("auto", "off")
# How a (query, document) pair longer than the model's window is scored (the adapter's long_documents).
LONG_DOCUMENT_MODES = ("truncate", "max", "mean")
QUANTIZATIONS = ("none", "fp8")  # ModelParameters.quantization
LOAD_FORMATS = ("auto", "dummy")  # ModelParameters.load_format
# cpu_threads=auto on a GPU instance: measured best under load (benchmarks/README.md). On a GPU the
# stub's CPU work is small tensor ops (reading and unpadding inputs) that one core's worth of threads
# does best: with a thread per core they contend with the adapter and the other stubs, and unpadding
# a 64-document request took 3.8 ms instead of 0.6 ms on a busy 16-core host.
GPU_STUB_CPU_THREADS = 4
# The largest token bucket with a CUDA graph (cuda_graph_max_tokens); see ModelParameters.
DEFAULT_CUDA_GRAPH_MAX_TOKENS = 512


def parse_bool(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{name} parameter {value!r} is not true or false")


def did_you_mean(given: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for a close spelling of one of ``known``, else ``""``."""
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.7)
    return f" (did you mean {close[0]}?)" if close else ""


def _choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} parameter {value!r} is not one of {', '.join(allowed)}{did_you_mean(value, allowed)}")
    return value


def parse_number(value: str, name: str) -> float:
    """A finite number (nan and inf would reach the scores as they are)."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} parameter {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} parameter {value!r} is not a finite number")
    return number


def parse_positive_number(value: str, name: str) -> float:
    number = parse_number(value, name)
    if number <= 0:
        raise ValueError(f"{name} parameter {value!r} must be greater than 0")
    return number


def parse_cpu_threads(value: str) -> int | None:
    """``auto`` (None: the device decides, :meth:`ModelParameters.cpu_threads_on`) or a whole number."""
    if value.strip() == "auto":
        return None
    if not value.strip().isdigit():
        raise ValueError(f"cpu_threads parameter {value!r} is not auto or a whole number")
    return int(value)


# The least prefix cache that stores anything: one request stores at most a quarter of the budget, in blocks
# of 16 tokens (poolserve_runtime.prefix_cache).
MIN_PREFIX_CACHE_TOKENS = 64


def parse_prefix_cache_tokens(value: str) -> int:
    tokens = parse_whole_number(value, "prefix_cache_tokens")
    if 0 < tokens < MIN_PREFIX_CACHE_TOKENS:
        raise ValueError(f"prefix_cache_tokens parameter {value!r} is too small to store a prefix: 0 (off) or at "
                         f"least {MIN_PREFIX_CACHE_TOKENS}")
    return tokens


def parse_whole_number(value: str, name: str, least: int = 0) -> int:
    if not value.strip().isdigit():
        raise ValueError(f"{name} parameter {value!r} is not a whole number")
    if int(value) < least:
        raise ValueError(f"{name} parameter {value!r} must be at least {least}")
    return int(value)


def parse_instance_count(value: str) -> int | None:
    """Instances of the model on each device (None: Triton's own placement)."""
    count = value.strip()
    if not count:
        return None
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{INSTANCE_COUNT} must be a positive integer, got {count!r}")
    return int(count)


def parse_step_tag_id(value: str) -> int | None:
    """STEP pooling's tag token (None: every token is a row)."""
    return parse_whole_number(value, "step_tag_id") if value.strip() else None


def parse_token_ids(value: str, name: str) -> tuple[int, ...]:
    """A comma-separated list of token ids (vLLM's JSON list, written as Triton's one string)."""
    return tuple(parse_whole_number(part, name) for part in value.split(",")) if value.strip() else ()


def parse_lora_modules(value: str) -> tuple[tuple[str, str], ...]:
    """``name=path,name2=path2`` (vLLM's --lora-modules) → ``((name, path), ...)`` in order; the names are what
    clients send as ``model`` and Triton is sent (wire.LORA_NAMES_INPUT)."""
    modules: list[tuple[str, str]] = []
    for entry in (part.strip() for part in value.split(",")) if value.strip() else ():
        name, is_pair, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not is_pair or not name or not path or "=" in path:
            raise ValueError(f"lora_modules parameter entry {entry!r} is not name=path (entries are separated by ',')")
        if name in (known for known, _ in modules):
            raise ValueError(f"lora_modules parameter names {name!r} twice")
        modules.append((name, path))
    return tuple(modules)


# The files of a PEFT adapter folder the runtime reads (poolserve_runtime.lora).
LORA_CONFIG_FILE = "adapter_config.json"


def check_lora_folders(modules: tuple[tuple[str, str], ...]) -> None:
    """Raise ValueError for the first adapter whose path is not a PEFT adapter folder (checked where the
    host plans the models, so a typo fails before Triton starts)."""
    for name, path in modules:
        if not (Path(path) / LORA_CONFIG_FILE).is_file():
            raise ValueError(f"lora_modules: adapter {name!r} at {path!r} is not a PEFT adapter folder "
                             f"(no {LORA_CONFIG_FILE} there)")


def check_step_pooling(step_tag_id: int | None, returned_token_ids: tuple[int, ...], task: str,
                       num_labels: int) -> None:
    """vLLM accepts the STEP fields on a token_classify pooler only, and its columns index the logits' row."""
    if step_tag_id is None and not returned_token_ids:
        return
    if task != "token_classify":
        raise ValueError(f"step_tag_id and returned_token_ids (STEP pooling) apply to token_classify models "
                         f"(*ForTokenClassification) only, not to a {task} model")
    outside = [index for index in returned_token_ids if index >= num_labels]
    if outside:
        raise ValueError(f"returned_token_ids {outside} are not columns of the model's {num_labels} labels")


@dataclass(frozen=True)
class ModelParameters:
    # Where the weights come from, as written: builtin:NAME, a folder (absolute or relative to the
    # model's folder) or a hub id (poolserve_contract.checkpoints.resolve_checkpoint).
    checkpoint: str = ""
    served_model_name: str = ""  # the name clients send as `model` (see served_name)
    dtype: str = "auto"  # auto (bfloat16 on a GPU, float32 on the CPU) or one of DTYPE_NAMES
    # "varlen": one packed stream (the GPU default); "padded": HF's padded SDPA (the CPU default)
    attention: str = "auto"
    # torch.compile each transformer layer (fuses norms, rotary, activations): "layers", "none", or
    # "auto" (the family decides, GPU varlen body only; see FamilyDeclaration.compile_by_default)
    compile: str = "auto"
    max_tokens_per_forward: int = 16384  # token budget of one forward pass
    max_model_len: int = 0  # 0: derive from the checkpoint (the model card)
    # Chunks of up to this many tokens replay a CUDA graph of the packed body captured at load (GPU
    # varlen body without compiled layers; poolserve_runtime.cuda_graphs); 0: always eager. 512: one
    # short text through MiniLM-L6 3.2 -> 0.5 ms, 200 tokens through bge-reranker-v2-m3 8.9 -> 2.1 ms,
    # scores equal (H100, benchmarks/results/cuda_graphs_h100.csv); captured in 0.06-0.34 s at load.
    cuda_graph_max_tokens: int = DEFAULT_CUDA_GRAPH_MAX_TOKENS
    logit_mean: float = 0.0  # calibration before the activation: (logit - mean) / sigma, as vLLM's pooler
    logit_sigma: float = 1.0
    # Remote code from the checkpoint runs only when the user asks for it (the generic family).
    trust_remote_code: bool = False
    # Serve the checkpoint as this architecture whatever config.json says (vLLM's --hf-overrides
    # '{"architectures": [...]}'): e.g. GteNewForSequenceClassification for NewForSequenceClassification.
    architecture: str = ""
    # vLLM's --hf-overrides JSON for LLM rerankers (architectures, classifier_from_token, method,
    # is_original_qwen3_reranker): see poolserve_contract.conversions.
    hf_overrides: str = ""
    # "auto": documents of one request sharing a prompt prefix compute it once (causal packed
    # bodies, poolserve_runtime.prefix_reuse); "off": every sequence computes its whole prompt.
    prefix_reuse: str = "auto"
    # Tokens of prompt prefixes whose per-layer keys/values a model instance keeps across requests
    # for the reused-prefix streams (poolserve_runtime.prefix_cache); 0: off, the default until it has
    # been measured on a GPU (16,384 suits Qwen3-Reranker: its shared prompt plus ~150 queries, 1.9 GB per
    # model instance: each instance keeps its own).
    prefix_cache_tokens: int = 0
    cpu_threads: int | None = None  # torch's intra-op threads in the stub; None: auto (cpu_threads_on)
    score_template: str = ""  # a shipped score template's name or a Jinja file (poolserve_contract.score_templates)
    model_folder: str = ""  # the model_repository folder the model is made from (wire.SOURCE_FOLDER)
    instance_count: int | None = None  # instances per device, the host's instance_group (wire.INSTANCE_COUNT)
    # The default of the scoring routes' long_documents field: "truncate" (a pair longer than the window is
    # cut, or refused, as vLLM does), or "max" / "mean" of the scores of the document's overlapping chunks.
    long_documents: str = "truncate"
    # STEP pooling of a token_classify model (process reward models, vLLM's --pooler-config step_tag_id and
    # returned_token_ids): /pooling keeps the rows whose prompt token is step_tag_id and, of each, the
    # returned_token_ids columns (written "648,387"); unset: every token, every label.
    step_tag_id: int | None = None
    returned_token_ids: tuple[int, ...] = ()
    # LoRA adapters in PEFT's format served beside the base model (vLLM's --lora-modules), written
    # "name=path,name2=path2": ((name, path), ...) in order; a request picks one per sequence by its
    # name (wire.LORA_NAMES_INPUT; none: the base model). POST /v1/load_lora_adapter rewrites it at run time.
    lora_modules: tuple[tuple[str, str], ...] = ()
    # "fp8": the Linear layers of the body run FP8 (e4m3) matmuls, weights quantised per output channel at
    # load and activations per token (vLLM's --quantization fp8); norms, attention, pooling and heads keep the
    # model's dtype. A checkpoint that is already FP8 (llm-compressor's compressed-tensors format) is read as
    # such whatever this says. "none": the checkpoint's own weights. (poolserve_runtime.fp8, .weights)
    quantization: str = "none"
    # "dummy": random weights of the checkpoint's config.json, seeded per tensor name (vLLM's --load-format
    # dummy: measure a model's speed and memory without its weights); "auto": the checkpoint's weights.
    load_format: str = "auto"

    @classmethod
    def from_mapping(cls, parameters: Mapping[str, str]) -> ModelParameters:
        """From ``{key: string value}``; raises ValueError naming the parameter a value does not fit."""
        def text(key: str, default: str = "") -> str:
            return parameters.get(key, default)

        typed = cls(
            checkpoint=text("checkpoint").strip(),
            served_model_name=text("served_model_name").strip(),
            dtype=_choice(text("dtype", "auto"), "dtype", ("auto", *DTYPE_NAMES)),
            attention=_choice(text("attention", "auto"), "attention", ("auto", *ATTENTIONS)),
            compile=_choice(text("compile", "auto"), "compile", COMPILE_MODES),
            max_tokens_per_forward=parse_whole_number(text("max_tokens_per_forward") or "16384", "max_tokens_per_forward",
                                                      least=1),
            max_model_len=parse_whole_number(text("max_model_len") or "0", "max_model_len"),
            cuda_graph_max_tokens=parse_whole_number(text("cuda_graph_max_tokens") or str(DEFAULT_CUDA_GRAPH_MAX_TOKENS), "cuda_graph_max_tokens"),
            logit_mean=parse_number(text("logit_mean") or "0", "logit_mean"),
            logit_sigma=parse_positive_number(text("logit_sigma") or "1", "logit_sigma"),  # scores divide by it
            trust_remote_code=parse_bool(text("trust_remote_code", "false"), "trust_remote_code"),
            architecture=text("architecture").strip(),
            hf_overrides=text("hf_overrides").strip(),
            prefix_reuse=_choice(text("prefix_reuse", "auto"), "prefix_reuse", PREFIX_REUSE_MODES),
            prefix_cache_tokens=parse_prefix_cache_tokens(text("prefix_cache_tokens") or "0"),
            cpu_threads=parse_cpu_threads(text("cpu_threads", "auto")),
            score_template=text("score_template").strip(),
            model_folder=text("model_folder"),
            instance_count=parse_instance_count(text(INSTANCE_COUNT)),
            long_documents=_choice(text("long_documents", "truncate"), "long_documents", LONG_DOCUMENT_MODES),
            step_tag_id=parse_step_tag_id(text("step_tag_id")),
            returned_token_ids=parse_token_ids(text("returned_token_ids"), "returned_token_ids"),
            lora_modules=parse_lora_modules(text("lora_modules")),
            quantization=_choice(text("quantization", "none"), "quantization", QUANTIZATIONS),
            load_format=_choice(text("load_format", "auto"), "load_format", LOAD_FORMATS),
        )
        if typed.lora_modules and typed.quantization != "none":
            # The adapters wrap the body's nn.Linear layers (poolserve_runtime.lora); FP8 replaces those layers,
            # and adapters over an FP8 base are not built.
            raise ValueError(f"lora_modules cannot be combined with quantization={typed.quantization}: LoRA adapters "
                             "are served on the model's own dtype weights")
        return typed

    @classmethod
    def from_config(cls, config: dict) -> ModelParameters:
        """From a model config in Triton's JSON form (``parameters``: ``{key: {"string_value": ...}}``)."""
        return cls.from_mapping(string_parameters(config))

    def served_name(self, fallback: str) -> str:
        """The name clients send as ``model``: ``served_model_name``, else ``builtin:NAME`` → NAME, else
        the checkpoint as written (vLLM's default), else ``fallback``."""
        if self.served_model_name:
            return self.served_model_name
        if self.checkpoint.startswith(BUILTIN_PREFIX):
            return self.checkpoint[len(BUILTIN_PREFIX):]
        return self.checkpoint or fallback

    def resolved_checkpoint(self, model_dir: Path | None = None) -> str:
        """A local path or a hub id that ``from_pretrained`` accepts."""
        return resolve_checkpoint(self.checkpoint, model_dir)

    def cpu_threads_on(self, device_type: str) -> int:
        """Threads for a stub on ``device_type`` ("cuda", "cpu"); 0: torch's default, one per core."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        return GPU_STUB_CPU_THREADS if device_type == "cuda" else 0  # the CPU forward wants every core


# What a user may set on a model (``--set NAME.key=value``, config.pbtxt): every parameter but the source
# folder, which the host's plan writes.
PARAMETER_NAMES = tuple(field.name for field in fields(ModelParameters) if field.name != SOURCE_FOLDER)


def check_parameter_names(keys: Iterable[str]) -> None:
    """Raise ValueError for the first key that is not a model parameter, naming a close spelling and the
    parameters there are."""
    for key in keys:
        if key not in PARAMETER_NAMES:
            raise ValueError(f"unknown parameter {key!r}{did_you_mean(key, PARAMETER_NAMES)}; the parameters are "
                             f"{', '.join(PARAMETER_NAMES)}")


def string_parameters(config: dict) -> dict[str, str]:
    """``parameters`` of a model config in Triton's JSON form as ``{key: string value}``."""
    return {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}


def served_name(parameters: Mapping[str, str], fallback: str) -> str:
    """:meth:`ModelParameters.served_name` of ``{key: string value}`` parameters."""
    return ModelParameters.from_mapping(parameters).served_name(fallback)
