"""The packed (varlen) body against HF's padded path, for every architecture, on CPU.

On CPU the varlen attention function runs SDPA per sequence, so this checks the packed plumbing
(one [1, T] stream, per-sequence position ids, RoBERTa's position offset, token types, cu_seqlens
through stock HF models, the token budget) that the GPU path shares; the GPU test checks
FlashAttention itself.
"""

from __future__ import annotations

import pytest
import torch

from model_runtime import families
from model_runtime.engine import PackedEngine
from model_runtime.packing import PackedBatch, RequestSequences
from model_runtime.settings import ModelSettings
from tests.tiny_models import MODEL_FOLDERS

FAMILIES = {
    "bert_classifier": families.BERT,
    "xlm_roberta_classifier": families.XLM_ROBERTA,
    "qwen2_classifier": families.QWEN2,
    "qwen3_classifier": families.QWEN3,
    "llama_classifier": families.LLAMA,
    "bert_embedder": families.BERT_EMBEDDING,
}


def engine(folder, checkpoint, attention, budget=16384):
    family = FAMILIES[folder]
    outputs = ("embeddings",) if family.task == "embed" else ("logits", "scores")
    settings = ModelSettings(model_name=folder, checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=attention, output_names=outputs)
    return PackedEngine.load(family, settings)


def batch(vocab_size, with_types):
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor([1, 7, 40, 3, 19, 2])
    ids = torch.randint(5, vocab_size, (int(lengths.sum()),), generator=generator)
    types = torch.randint(0, 2, ids.shape, generator=generator) if with_types else None
    return PackedBatch.pack([RequestSequences(ids, lengths[:4], None if types is None else types[: int(lengths[:4].sum())]),
                             RequestSequences(ids[int(lengths[:4].sum()):], lengths[4:],
                                              None if types is None else types[int(lengths[:4].sum()):])])


@pytest.mark.parametrize("folder", list(MODEL_FOLDERS))
def test_varlen_body_matches_padded(tiny_checkpoints, folder):
    padded = engine(folder, tiny_checkpoints[folder], "padded")
    packed = engine(folder, tiny_checkpoints[folder], "varlen")
    small_budget = engine(folder, tiny_checkpoints[folder], "varlen", budget=20)  # several forwards
    with_types = folder == "bert_classifier"
    data = batch(padded.limits.vocab_size, with_types)
    expected = padded.run(data)
    for candidate in (packed, small_budget):
        got = candidate.run(data)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    assert "body=varlen" in packed.describe() and "body=padded" in padded.describe()
