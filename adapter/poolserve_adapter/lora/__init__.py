"""vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (runtime LoRA updates): protocol, serving,
api_router."""
