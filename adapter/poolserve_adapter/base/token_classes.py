"""A token classifier's per-token outputs as vLLM's ``/pooling`` returns them (``task: token_classify``).

The model answers ``token_logits`` ``[n, longest, num_labels]`` (zeros past each sequence); the activation is
applied here, per token, because STEP pooling (process reward models: the ``step_tag_id`` and
``returned_token_ids`` model parameters) chooses columns before it. vLLM's order (``StepPool`` then
``TokenClassifierPoolerHead``): the ``returned_token_ids`` columns, then the rows whose prompt token is
``step_tag_id``, then the activation over what is left; ``use_activation: false`` returns the logits.
BGE-M3's lexical weights are a one-column ``token_logits`` whose rows vLLM's ``BOSEOSFilter`` trims
(:func:`lexical_weight_rows`).
"""

from __future__ import annotations

import numpy as np

from poolserve_adapter.base.embedding import token_rows
from poolserve_adapter.registry import ServedModel


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def activated(logits: np.ndarray, activation: str) -> np.ndarray:
    """``activation`` (a card's ``token_activation``) over the last axis. "classify" is vLLM's PoolerClassify
    without a fixed label count: softmax over the row's own columns when it has two or more, else sigmoid."""
    if activation == "identity":
        return logits
    if activation == "relu":
        return np.maximum(logits, 0.0)
    if activation == "sigmoid" or logits.shape[-1] < 2:
        return sigmoid(logits)
    return softmax(logits)


def token_class_rows(model: ServedModel, output: np.ndarray, input_ids: np.ndarray, lengths: np.ndarray,
                     use_activation: bool | None) -> list[np.ndarray]:
    """Each prompt's ``[rows, columns]`` float32: every token and label, or STEP pooling's step-tag rows and
    returned columns (``[0, columns]`` for a prompt without a step tag); activated unless ``use_activation``
    is false."""
    rows = []
    for index, logits in enumerate(token_rows(output, lengths)):
        if model.returned_token_ids:
            logits = logits[:, list(model.returned_token_ids)]
        if model.step_tag_id is not None:
            logits = logits[input_ids[index, :lengths[index]] == model.step_tag_id]
        if use_activation is not False:
            logits = activated(logits, model.token_activation)
        rows.append(np.ascontiguousarray(logits, dtype=np.float32))
    return rows


def bos_eos_filtered(rows: list[np.ndarray], input_ids: np.ndarray, bos_token_id: int | None,
                     eos_token_id: int | None) -> list[np.ndarray]:
    """vLLM's ``BOSEOSFilter``: each prompt's rows without the first when its first token is ``bos_token_id``
    and without the last when its last token is ``eos_token_id`` (None: nothing dropped on that side)."""
    filtered = []
    for index, prompt_rows in enumerate(rows):
        ids = input_ids[index, :len(prompt_rows)]
        first = 1 if len(ids) and bos_token_id is not None and ids[0] == bos_token_id else 0
        last = len(ids) - 1 if len(ids) > first and eos_token_id is not None and ids[-1] == eos_token_id else len(ids)
        filtered.append(np.ascontiguousarray(prompt_rows[first:last]))
    return filtered


def lexical_weight_rows(model: ServedModel, output: np.ndarray, input_ids: np.ndarray, lengths: np.ndarray,
                        use_activation: bool | None) -> list[np.ndarray]:
    """BGE-M3's lexical weights as vLLM's ``token_classify`` returns them: one float per token (``[n_tokens]``,
    its one column squeezed), BOS and EOS rows dropped, relu'd unless ``use_activation`` is false."""
    rows = bos_eos_filtered(token_rows(output, lengths), input_ids, model.bos_token_id, model.eos_token_id)
    if use_activation is not False:
        rows = [activated(row, model.token_activation) for row in rows]
    return [np.ascontiguousarray(row[:, 0], dtype=np.float32) for row in rows]
