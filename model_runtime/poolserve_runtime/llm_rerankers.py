"""LLM rerankers in their original ``*ForCausalLM`` form, served as one-label classifiers.

vLLM's ``as_seq_cls_model`` semantics (``vllm/model_executor/models/adapters.py``): the causal LM's
body runs as is and a ``score`` layer is built at load from rows of its ``lm_head``:

* ``from_2_way_softmax`` with ``classifier_from_token=[false, true]``: one label, weight
  ``W[true] - W[false]``, so the score is ``sigmoid(l_true - l_false)`` = softmax over the two;
* ``no_post_processing`` with ``classifier_from_token=[t1..tk]``: k labels, the rows ``W[t_i]``;
* no ``method``: the checkpoint's own ``score`` head (vLLM's ``--convert classify``), or an
  explicit error when it has none.

The override uses vLLM's keys (``architectures``, ``classifier_from_token``, ``method``,
``is_original_qwen3_reranker``) in one ``hf_overrides`` JSON model parameter, so a
``vllm serve --hf-overrides '...'`` line carries over. Known rerankers are recognised without it
(:data:`KNOWN_RERANKERS`): their configs are those of the base LLM (Qwen3-Reranker-0.6B's equals
Qwen3-0.6B's), so the checkpoint's name decides, together with the causal architecture.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from poolserve_runtime.families import GENERATIVE_SUFFIXES, UnsupportedArchitecture, supported_hint  # noqa: F401

FROM_2_WAY_SOFTMAX = "from_2_way_softmax"
NO_POST_PROCESSING = "no_post_processing"
_METHODS = (FROM_2_WAY_SOFTMAX, NO_POST_PROCESSING)
_OVERRIDE_KEYS = {"architectures", "classifier_from_token", "method", "is_original_qwen3_reranker"}


@dataclass(frozen=True)
class Conversion:
    architecture: str  # the *ForSequenceClassification architecture served (selects the family)
    method: str = ""  # FROM_2_WAY_SOFTMAX, NO_POST_PROCESSING, or "" (the checkpoint's own score head)
    tokens: tuple[str, ...] = ()
    score_template: str = ""  # the shipped template the checkpoint's prompts follow, if known
    overrides: dict = field(default_factory=dict, compare=False)

    @property
    def num_labels(self) -> int:
        return 1 if self.method == FROM_2_WAY_SOFTMAX else len(self.tokens)

    def to_json(self) -> str:
        return json.dumps(self.overrides, sort_keys=True)

    @classmethod
    def from_overrides(cls, overrides: dict, causal_architecture: str, score_template: str = "") -> Conversion:
        unknown = set(overrides) - _OVERRIDE_KEYS
        if unknown:
            raise UnsupportedArchitecture(f"hf_overrides keys {sorted(unknown)} are not served; "
                                          f"known: {sorted(_OVERRIDE_KEYS)}")
        architectures = overrides.get("architectures") or [
            re.sub(r"For(CausalLM|ConditionalGeneration)$", "ForSequenceClassification", causal_architecture)]
        tokens = tuple(overrides.get("classifier_from_token") or ())
        method = overrides.get("method", "")
        if overrides.get("is_original_qwen3_reranker"):
            if len(tokens) != 2:
                raise UnsupportedArchitecture("is_original_qwen3_reranker needs classifier_from_token of two tokens")
            method = FROM_2_WAY_SOFTMAX  # as vLLM's Qwen3ForSequenceClassificationConfig sets it
        if method and method not in _METHODS:
            raise UnsupportedArchitecture(f"hf_overrides method {method!r} is not one of {', '.join(_METHODS)}")
        if tokens and not method:
            method = NO_POST_PROCESSING if len(tokens) != 2 else FROM_2_WAY_SOFTMAX
        if method == FROM_2_WAY_SOFTMAX and len(tokens) != 2:
            raise UnsupportedArchitecture("from_2_way_softmax needs classifier_from_token=[false_token, true_token]")
        if method == NO_POST_PROCESSING and not tokens:
            raise UnsupportedArchitecture("no_post_processing needs classifier_from_token")
        return cls(str(architectures[0]), method, tokens, score_template, dict(overrides))


# (name pattern, causal architecture, vLLM's --hf-overrides for it, its shipped score template)
KNOWN_RERANKERS = (
    (re.compile(r"qwen3-reranker", re.I), "Qwen3ForCausalLM",
     {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
      "is_original_qwen3_reranker": True}, "qwen3_reranker"),
    (re.compile(r"bge-reranker-v2-gemma", re.I), "GemmaForCausalLM",
     {"architectures": ["GemmaForSequenceClassification"], "classifier_from_token": ["Yes"],
      "method": NO_POST_PROCESSING}, "bge_reranker_v2_gemma"),
    (re.compile(r"qwen3[-_]vl[-_]reranker", re.I), "Qwen3VLForConditionalGeneration",
     {"architectures": ["Qwen3VLForSequenceClassification"], "classifier_from_token": ["no", "yes"],
      "is_original_qwen3_reranker": True}, "qwen3_vl_reranker"),
    (re.compile(r"mxbai-rerank-(base|large)-v2", re.I), "Qwen2ForCausalLM",
     {"architectures": ["Qwen2ForSequenceClassification"], "classifier_from_token": ["0", "1"],
      "method": FROM_2_WAY_SOFTMAX}, "mxbai_rerank_v2"),
)


def conversion_for(config: dict, checkpoint: str, hf_overrides: str = "") -> Conversion | None:
    """How to serve the checkpoint as a classifier, or None when it already is one."""
    architecture = (config.get("architectures") or [""])[0]
    names = f"{checkpoint} {config.get('_name_or_path', '')}"
    template = next((t for pattern, causal, _, t in KNOWN_RERANKERS
                     if causal == architecture and pattern.search(names)), "")
    if hf_overrides.strip():
        try:
            overrides = json.loads(hf_overrides)
        except json.JSONDecodeError as error:
            raise UnsupportedArchitecture(f"hf_overrides is not JSON: {error}") from None
        if not isinstance(overrides, dict):
            raise UnsupportedArchitecture("hf_overrides must be a JSON object")
        return Conversion.from_overrides(overrides, architecture, template)
    if not architecture.endswith(GENERATIVE_SUFFIXES):
        return None
    for pattern, causal, overrides, template in KNOWN_RERANKERS:
        if causal == architecture and pattern.search(names):
            return Conversion.from_overrides(overrides, architecture, template)
    if not architecture.endswith("ForCausalLM"):
        return None  # a multimodal generative checkpoint converts when it is a known reranker or hf_overrides ask
    return Conversion.from_overrides({}, architecture)  # vLLM's --convert classify: the checkpoint's head


def token_ids(tokenizer, tokens: tuple[str, ...]) -> list[int]:
    """Vocabulary ids of the label tokens (vLLM: ``tokenizer.convert_tokens_to_ids``)."""
    ids = []
    for token in tokens:
        index = tokenizer.convert_tokens_to_ids(token)
        if index is None or (index == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise UnsupportedArchitecture(f"classifier_from_token {token!r} is not a token of the checkpoint's vocabulary")
        ids.append(int(index))
    return ids


def load_converted(conversion: Conversion, checkpoint: str, dtype: torch.dtype, device: torch.device,
                   attention: str) -> nn.Module:
    """The causal LM with a ``score`` layer from its ``lm_head`` rows (``lm_head`` itself dropped)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    extra = {"attn_implementation": attention} if attention else {}
    if not conversion.method:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, dtype=dtype, output_loading_info=True, **extra)
        if any(key.startswith("score.") for key in info.get("missing_keys", ())):
            raise UnsupportedArchitecture(
                f"{checkpoint} is a causal LM without a score head; serve it as a reranker with vLLM's overrides, "
                "e.g. hf_overrides='{\"architectures\": [\"Qwen3ForSequenceClassification\"], "
                "\"classifier_from_token\": [\"no\", \"yes\"], \"method\": \"from_2_way_softmax\"}'")
        return model.to(device).eval()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **extra)
    ids = token_ids(AutoTokenizer.from_pretrained(checkpoint), conversion.tokens)
    rows = model.get_output_embeddings().weight.detach().float()[ids]
    weight = rows[1:2] - rows[0:1] if conversion.method == FROM_2_WAY_SOFTMAX else rows
    score = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        score.weight.copy_(weight.to(dtype))
    model.score = score
    model.lm_head = nn.Identity()  # never run (the body's hidden states go to `score`); frees untied weights
    config = model.config
    config.num_labels = conversion.num_labels
    config.id2label = {i: f"LABEL_{i}" for i in range(conversion.num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.problem_type = None
    return model.to(device).eval()
