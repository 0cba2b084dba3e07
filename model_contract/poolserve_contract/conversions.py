"""LLM rerankers in their original ``*ForCausalLM`` form, served as one-label classifiers: the rule.

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

Which conversion a checkpoint gets (and so how many labels it serves) is decided here, without torch,
for the host's plan, the model card and the runtime; building the ``score`` layer is the runtime's
(:mod:`poolserve_runtime.llm_rerankers`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from poolserve_contract.families import GENERATIVE_SUFFIXES, UnsupportedArchitecture, architecture_of

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


def load_conversion(config: dict, checkpoint: str, hf_overrides: str = "") -> Conversion | None:
    """The conversion a model is loaded with: None also when ``hf_overrides`` only name the architecture
    of a checkpoint that already is a classifier (the family loads it as usual)."""
    conversion = conversion_for(config, checkpoint, hf_overrides)
    if conversion is not None and not (conversion.method or architecture_of(config).endswith(GENERATIVE_SUFFIXES)):
        return None
    return conversion
