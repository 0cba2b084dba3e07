"""What every model's Triton config shares, in one place: filled in by ``auto_complete_config``.

Each ``model_repository/<folder>/config.pbtxt`` states only what differs (its name, the backend,
its default checkpoint); Triton asks the Python backend to complete the rest at load
(``auto_complete_config``, on by default in every ``tritonserver``, the NGC image's included).
Triton takes ``max_batch_size``, ``input``, ``output`` and, when the file sets no scheduler,
``dynamic_batching`` from the completed config, so those live here; anything a config.pbtxt does
declare is kept as written. Parameters are not completed: their defaults live in
:class:`poolserve_contract.parameters.ModelParameters`; the one parameter added is the model card
(:mod:`poolserve_contract.card`), by the host only (Triton's auto-complete keeps no parameters). With
no ``instance_group`` Triton places one instance on each GPU, or one on the CPU without a GPU (what
``KIND_AUTO`` did).
"""

from __future__ import annotations

from poolserve_contract.card import ModelCard
from poolserve_contract.wire import LORA_NAMES_INPUT, MODEL_CARD

# Largest sum of batch dimensions of the requests grouped into one execute(). A padded request's
# batch dimension is its sequence count; a flat request's is 1 whatever it holds, so an execute() of
# flat requests may hold up to MAX_BATCH_SIZE requests of any number of sequences (the adapter's
# admission bounds the tokens it has in flight). The token budget of one forward is the
# max_tokens_per_forward parameter, not this: the engine cuts any batch into such forwards.
MAX_BATCH_SIZE = 256

# A request sends its sequences in one of two forms (model_runtime/poolserve_runtime/packing.py):
# padded, token ids [batch, tokens] with rows of different lengths right-padded and marked by
# attention_mask; or flat, token ids [1, total_tokens] (the sequences back to back) cut by
# sequence_lengths [1, sequences], which sends no padding at all. Separate requests of different
# lengths share one execute() because the inputs are ragged-batchable (a flag Triton's add_input
# helper does not take, hence the plain dicts). Triton's dynamic batcher groups only requests that
# send the same set of inputs when a model has optional ones (RequiredEqualInputs in Triton core's
# scheduler_utils.cc), so padded and flat requests never share an execute().
_TOKEN_INPUTS = (
    {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1], "allow_ragged_batch": True},
    # 1 for real tokens, 0 for right padding; same shape as input_ids. Absent: no padding.
    {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": [-1], "allow_ragged_batch": True,
     "optional": True},
    # The flat form's token count of each sequence, all positive, summing to input_ids' length.
    {"name": "sequence_lengths", "data_type": "TYPE_INT64", "dims": [-1], "allow_ragged_batch": True,
     "optional": True},
    # Each sequence's LoRA adapter by name (wire.LORA_NAMES_INPUT: UTF-8 bytes, zero-padded; zeros the base):
    # [batch, width] padded, [1, sequences * width] flat.
    {"name": LORA_NAMES_INPUT, "data_type": "TYPE_UINT8", "dims": [-1], "allow_ragged_batch": True,
     "optional": True},
)
# Segment ids for text pairs (0s then 1s), same shape as input_ids, below the checkpoint's
# type_vocab_size. Absent: all zeros.
_TOKEN_TYPE_INPUT = {"name": "token_type_ids", "data_type": "TYPE_INT64", "dims": [-1], "allow_ragged_batch": True,
                     "optional": True}

# Vision-language models (model_runtime/poolserve_runtime/vision.py): each row's image patches in prompt order, right-
# padded with zeros [batch, patches, patch_dim], and each row's (t, h, w) patch grids [batch, images, 3]
# (zero rows after its last image). Absent: a text-only request.
_VISION_INPUTS = (
    {"name": "pixel_values", "data_type": "TYPE_FP32", "dims": [-1, -1], "allow_ragged_batch": True,
     "optional": True},
    {"name": "image_grid_thw", "data_type": "TYPE_INT64", "dims": [-1, 3], "allow_ragged_batch": True,
     "optional": True},
)

_OUTPUTS = {
    # Raw head output and the activated scores (vLLM's rule) per sequence: [batch, num_labels].
    "classify": ({"name": "logits", "data_type": "TYPE_FP32", "dims": [-1]},
                 {"name": "scores", "data_type": "TYPE_FP32", "dims": [-1]}),
    # Sentence embeddings [batch, hidden_size]: pooled, then L2-normalised when the model normalises
    # (its card's `normalizes`); and the pooled vectors never normalised (a request turning the
    # activation off on a normalising model).
    "embed": ({"name": "embeddings", "data_type": "TYPE_FP32", "dims": [-1]},
              {"name": "pooled", "data_type": "TYPE_FP32", "dims": [-1]}),
    # Late interaction (ColBERT), per request: every token's projected vector [batch, longest sequence of the
    # request, dim], zeros past each sequence's length, L2-normalised (token_embeddings) and not
    # (token_projected); and each sequence's MaxSim against the request's first sequence (the query)
    # [batch, 1], from token_embeddings (the first row is the query against itself).
    "token_embed": ({"name": "token_embeddings", "data_type": "TYPE_FP32", "dims": [-1, -1]},
                    {"name": "token_projected", "data_type": "TYPE_FP32", "dims": [-1, -1]},
                    {"name": "maxsim_scores", "data_type": "TYPE_FP32", "dims": [1]}),
    # A sparse embedder (SPLADE), per sequence: the vocabulary-wide vector [batch, vocab_size] (task embed;
    # the adapter reads it for /v1/embeddings, /pooling and TEI's /embed_sparse).
    "sparse_embed": ({"name": "sparse", "data_type": "TYPE_FP32", "dims": [-1]},),
    # Token classifiers, per request: every token's classifier logits [batch, longest sequence of the request,
    # num_labels], zeros past each sequence's length; the activation (and STEP pooling) is the adapter's,
    # because STEP picks columns before it.
    "token_classify": ({"name": "token_logits", "data_type": "TYPE_FP32", "dims": [-1, -1]},),
    # BGE-M3, from one forward: the dense vectors as "embed"'s, and per request every token's ColBERT vector
    # (token_embeddings, L2-normalised; token_projected, not) and lexical weight before its relu (token_logits, [batch, longest, 1]),
    # every token kept (the adapter drops BOS / EOS rows as vLLM does).
    "bge_m3": ({"name": "embeddings", "data_type": "TYPE_FP32", "dims": [-1]},
               {"name": "pooled", "data_type": "TYPE_FP32", "dims": [-1]},
               {"name": "token_embeddings", "data_type": "TYPE_FP32", "dims": [-1, -1]},
               {"name": "token_projected", "data_type": "TYPE_FP32", "dims": [-1, -1]},
               {"name": "token_logits", "data_type": "TYPE_FP32", "dims": [-1, -1]}),
}

# Group concurrent requests into one packed forward. Under load requests pile up while the instance
# is busy, so a short delay suffices (1,000 us cost a full millisecond per request at concurrency 1
# on the H100). A full queue answers UNAVAILABLE at once (the adapter turns it into 503).
DYNAMIC_BATCHING = {
    "max_queue_delay_microseconds": 200,
    "default_queue_policy": {
        "timeout_action": "REJECT",
        "default_timeout_microseconds": 60_000_000,
        "allow_timeout_override": True,
        "max_queue_size": 2048,
    },
}

_SCHEDULERS = ("dynamic_batching", "sequence_batching", "ensemble_scheduling")


def complete_config(config: dict, task: str, uses_token_types: bool, vision: bool = False,
                    card: ModelCard | None = None) -> dict:
    """Fill ``config`` (Triton's JSON form, modified in place) with the shared fields it lacks, and the
    model's ``card`` when there is one (:func:`poolserve_contract.card.card_for_config`). ``task`` names the
    output set: a family's ``output_kind`` (its task, or ``sparse_embed``)."""
    if not config.get("max_batch_size"):
        config["max_batch_size"] = MAX_BATCH_SIZE
    inputs = list(_TOKEN_INPUTS) + ([_TOKEN_TYPE_INPUT] if uses_token_types else []) + (
        list(_VISION_INPUTS) if vision else [])
    _add_missing(config, "input", inputs)
    _add_missing(config, "output", _OUTPUTS[task])
    if not any(key in config for key in _SCHEDULERS):
        config["dynamic_batching"] = {**DYNAMIC_BATCHING,
                                      "default_queue_policy": dict(DYNAMIC_BATCHING["default_queue_policy"])}
    if card is not None:
        config.setdefault("parameters", {})[MODEL_CARD] = {"string_value": card.to_json()}
    return config


def _add_missing(config: dict, key: str, tensors) -> None:
    present = {tensor["name"] for tensor in config.get(key) or []}
    config[key] = list(config.get(key) or []) + [dict(t) for t in tensors if t["name"] not in present]
