"""A model instance's settings: its parameters (:class:`poolserve_contract.parameters.ModelParameters`,
parsed and checked there) mapped onto torch for the device Triton gave the instance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from poolserve_contract.card import ModelCard
from poolserve_contract.parameters import ModelParameters

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
    # Chunks of up to this many tokens replay a CUDA graph of the varlen body (CUDA only;
    # model_runtime/poolserve_runtime/cuda_graphs.py); 0: always eager.
    cuda_graph_max_tokens: int = 0
    # Serve the checkpoint as this architecture whatever config.json says (vLLM's --hf-overrides
    # '{"architectures": [...]}'): e.g. GteNewForSequenceClassification for NewForSequenceClassification.
    architecture: str = ""
    # vLLM's --hf-overrides JSON for LLM rerankers (architectures, classifier_from_token, method,
    # is_original_qwen3_reranker): see model_runtime/poolserve_runtime/llm_rerankers.py.
    hf_overrides: str = ""
    # "auto": documents of one request sharing a prompt prefix compute it once (causal packed
    # bodies, model_runtime/poolserve_runtime/prefix_reuse.py); "off": every sequence computes its whole prompt.
    prefix_reuse: str = "auto"
    # Tokens of prompt prefixes whose keys/values the reused streams keep across requests (0: none;
    # model_runtime/poolserve_runtime/prefix_cache.py).
    prefix_cache_tokens: int = 0
    # torch's intra-op threads in this stub (0: torch's default, one per core; see
    # ModelParameters.cpu_threads_on for auto)
    cpu_threads: int = 0
    # STEP pooling (token_classify models): checked against the model at load, applied by the adapter.
    step_tag_id: int | None = None
    returned_token_ids: tuple[int, ...] = ()
    # PEFT LoRA adapters served beside the base model, ((name, folder), ...): lora id i is the i-th
    # (model_runtime/poolserve_runtime/lora.py).
    lora_modules: tuple[tuple[str, str], ...] = ()
    # "fp8": the body's Linear layers run FP8 matmuls; "dummy": random weights of the config
    # (ModelParameters.quantization / load_format; poolserve_runtime.weights).
    quantization: str = "none"
    load_format: str = "auto"

    @classmethod
    def from_triton_args(cls, args: dict) -> ModelSettings:
        config = json.loads(args["model_config"])
        parameters = ModelParameters.from_config(config)

        if args.get("model_instance_kind") == "GPU":
            device = torch.device("cuda", int(args.get("model_instance_device_id", 0)))
            torch.cuda.set_device(device)  # the Python backend does not do it for us
        else:
            device = torch.device("cpu")
        if parameters.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = DTYPES[parameters.dtype]
        attention = parameters.attention
        if attention == "auto":
            attention = "varlen" if device.type == "cuda" else "padded"
        card = ModelCard.from_config(config)

        return cls(
            model_name=args["model_name"],
            checkpoint=parameters.resolved_checkpoint(Path(args["model_repository"])),
            device=device,
            dtype=dtype,
            max_tokens_per_forward=parameters.max_tokens_per_forward,
            # the card's when the config carries one (the same rule the engine applies without it)
            max_model_len=parameters.max_model_len or (card.max_model_len if card is not None else 0),
            logit_mean=parameters.logit_mean,
            logit_sigma=parameters.logit_sigma,
            attention=attention,
            output_names=tuple(output["name"] for output in config.get("output", [])),
            compile=parameters.compile,
            trust_remote_code=parameters.trust_remote_code,
            cuda_graph_max_tokens=parameters.cuda_graph_max_tokens,
            architecture=parameters.architecture,
            hf_overrides=parameters.hf_overrides,
            prefix_reuse=parameters.prefix_reuse,
            prefix_cache_tokens=parameters.prefix_cache_tokens,
            cpu_threads=parameters.cpu_threads_on(device.type),
            step_tag_id=parameters.step_tag_id,
            returned_token_ids=parameters.returned_token_ids,
            lora_modules=parameters.lora_modules,
            quantization=parameters.quantization,
            load_format=parameters.load_format,
        )
