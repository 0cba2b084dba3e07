"""vLLM's bodies of ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``
(``vllm/entrypoints/serve/lora/protocol.py``); fields vLLM has and the adapter does not use are ignored, as
any unknown field is."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(description="The name clients send as `model` to use the adapter.")
    lora_path: str = Field(description="The PEFT adapter folder (adapter_config.json, adapter_model.safetensors), "
                           "as Triton's model sees it; the adapter process checks it exists at that path too.")
    load_inplace: bool = Field(False, description="Replace the adapter of this name (its base model stays); without "
                               "it a name already loaded is a 400.")
    base_model_name: str | None = Field(
        None, description="Not vLLM's (it serves one base model): the served base model the adapter is for. "
        "Default: the first model served (the one a request naming no model gets).")


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(description="The adapter to unload, loaded at start (lora_modules) or at run time.")
