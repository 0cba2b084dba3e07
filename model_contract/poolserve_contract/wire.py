"""Names on the wire between the stack (which starts Triton), Triton and the adapter."""

from __future__ import annotations

# Parameter naming the model_repository folder a served model is made from (the adapter reads it to
# know the family; the model ignores it).
SOURCE_FOLDER = "model_folder"

# Not a model parameter: the number of instances of the model on each device, which becomes the
# config's instance_group (KIND_AUTO: on every GPU Triton sees, else on the CPU). Several instances
# are several stub processes: one prepares and answers its batch while another's runs on the GPU.
INSTANCE_COUNT = "instance_count"

# Triton's control plane. Whoever may load a model runs code in the server (a load may upload its
# model.py), whoever may register shared memory reads other requests' tensors, and trace/logging
# change what the server writes: each needs CONTROL_HEADER. Health, metadata, model config and
# statistics stay open (read-only; tritonclient users need them), and inference is open unless
# INFERENCE_KEY_ENV names a key for it.
CONTROL_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
CONTROL_HEADER = "poolserve-control-key"
CONTROL_KEY_ENV = "TRITON_CONTROL_KEY"
INFERENCE_HEADER = "poolserve-inference-key"
INFERENCE_KEY_ENV = "TRITON_INFERENCE_KEY"
# Triton looks for a restricted protocol's header under this prefix in gRPC metadata (HTTP: as is).
CONTROL_GRPC_HEADER = f"triton-grpc-protocol-{CONTROL_HEADER}"
INFERENCE_GRPC_HEADER = f"triton-grpc-protocol-{INFERENCE_HEADER}"

# Parameter carrying the model card (poolserve_contract.card.ModelCard as JSON): written into the
# config when the host completes it for the run repository, read by the adapter through Triton's
# model-config API.
MODEL_CARD = "model_card"

# Parameter the host's plan writes: the model's place among those the user named ("0" for the first). The
# adapter lists its models in that order, so a request that names no model goes to the first one given that
# can serve its route (vLLM serves the one model it is given).
SERVE_ORDER = "serve_order"

# Optional input of every packed text model: each sequence's LoRA adapter by name, UINT8: one row per sequence
# holding the name's UTF-8 bytes, zero-padded to the request's longest name (padded form [batch, width], flat
# form [1, sequences * width]); a row of zeros is the base model. Absent: every sequence on the base model.
# Names, not positions: the adapter's workers and a model reloaded with another set of adapters
# (POST /v1/load_lora_adapter) may disagree on positions, never on what a name means. Bytes, not BYTES: a BYTES
# input crashes the Python backend's stub under numpy 2 (shared/NOTES.md), and a declared BYTES input would let
# any gRPC client do that. A name the model does not hold fails its request alone, with status NOT_FOUND and
# LORA_NOT_LOADED's message (the adapter answers it as vLLM's 404 for an unknown model).
LORA_NAMES_INPUT = "lora_names"
LORA_NOT_LOADED = "LoRA adapter '{name}' is not loaded on model '{model}'"
