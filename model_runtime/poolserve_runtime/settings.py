"""A model instance's settings, read from ``config.pbtxt`` ``parameters`` and Triton's args."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from poolserve_contract.checkpoints import resolve_checkpoint
from poolserve_contract.parameters import parse_bool

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSettings:
    model_name: str
    checkpoint: str  # resolved: a local path or a hub id
    device: torch.device
    dtype: torch.dtype
    max_tokens_per_forward: int  # token budget of one forward pass
    max_model_len: int  # 0: derive from the checkpoint
    logit_mean: float  # calibration before the activation: (logit - mean) / sigma, as vLLM's pooler
    logit_sigma: float
    attention: str  # "varlen": one packed stream (GPU default); "padded": HF's padded SDPA (CPU default)
    output_names: tuple[str, ...]
    # torch.compile each transformer layer (fuses norms, rotary, activations): "layers", "none", or
    # "auto" (the family decides, GPU varlen body only; see Family.compile_by_default)
    compile: str = "none"
    # Remote code from the checkpoint runs only when the user asks for it (the generic family).
    trust_remote_code: bool = False
    # Serve the checkpoint as this architecture whatever config.json says (vLLM's --hf-overrides
    # '{"architectures": [...]}'): e.g. GteNewForSequenceClassification for NewForSequenceClassification.
    architecture: str = ""
    # vLLM's --hf-overrides JSON for LLM rerankers (architectures, classifier_from_token, method,
    # is_original_qwen3_reranker): see model_runtime/poolserve_runtime/llm_rerankers.py.
    hf_overrides: str = ""
    # "auto": documents of one request sharing a prompt prefix compute it once (causal packed
    # bodies, model_runtime/poolserve_runtime/prefix_reuse.py); "off": every sequence computes its whole prompt.
    prefix_reuse: str = "auto"
    # torch's intra-op threads in this stub (0: torch's default, one per core). On a GPU the stub's
    # CPU work is small tensor ops (reading and unpadding inputs) that one core's worth of threads
    # does best: with a thread per core they contend with the adapter and the other stubs, and
    # unpadding a 64-document request took 3.8 ms instead of 0.6 ms on a busy 16-core host.
    cpu_threads: int = 0

    @classmethod
    def from_triton_args(cls, args: dict) -> ModelSettings:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])

        if args.get("model_instance_kind") == "GPU":
            device = torch.device("cuda", int(args.get("model_instance_device_id", 0)))
            torch.cuda.set_device(device)  # the Python backend does not do it for us
        else:
            device = torch.device("cpu")

        dtype_name = parameters.get("dtype", "auto")
        if dtype_name == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif dtype_name in DTYPES:
            dtype = DTYPES[dtype_name]
        else:
            raise ValueError(f"dtype parameter {dtype_name!r} is not one of auto, {', '.join(DTYPES)}")

        attention = parameters.get("attention", "auto")
        if attention == "auto":
            attention = "varlen" if device.type == "cuda" else "padded"
        if attention not in ("varlen", "padded"):
            raise ValueError(f"attention parameter {attention!r} is not one of auto, varlen, padded")

        compile_mode = parameters.get("compile", "auto")
        if compile_mode not in ("auto", "layers", "none"):
            raise ValueError(f"compile parameter {compile_mode!r} is not one of auto, layers, none")

        return cls(
            model_name=args["model_name"],
            checkpoint=resolve_checkpoint(parameters.get("checkpoint", ""), model_dir),
            device=device,
            dtype=dtype,
            max_tokens_per_forward=int(parameters.get("max_tokens_per_forward", "16384")),
            max_model_len=int(parameters.get("max_model_len", "0")),
            logit_mean=float(parameters.get("logit_mean", "0") or 0),
            logit_sigma=float(parameters.get("logit_sigma", "1") or 1),
            attention=attention,
            output_names=tuple(output["name"] for output in config.get("output", [])),
            compile=compile_mode,
            trust_remote_code=parse_bool(parameters.get("trust_remote_code", "false"), "trust_remote_code"),
            architecture=parameters.get("architecture", "").strip(),
            hf_overrides=parameters.get("hf_overrides", "").strip(),
            prefix_reuse=_choice(parameters.get("prefix_reuse", "auto"), "prefix_reuse", ("auto", "off")),
            cpu_threads=_cpu_threads(parameters.get("cpu_threads", "auto"), device),
        )


# "auto" on a GPU instance: measured best under load (micro-benchmark in the README's Performance).
GPU_STUB_CPU_THREADS = 4


def _cpu_threads(value: str, device: torch.device) -> int:
    if value.strip() == "auto":
        return GPU_STUB_CPU_THREADS if device.type == "cuda" else 0
    if not value.strip().isdigit():
        raise ValueError(f"cpu_threads parameter {value!r} is not auto or a whole number")
    return int(value)


def _choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} parameter {value!r} is not one of {', '.join(allowed)}")
    return value
