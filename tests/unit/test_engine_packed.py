"""The packed (varlen) body against HF's padded path, for every architecture, on CPU.

On CPU the varlen attention function runs SDPA per sequence, so this checks the packed plumbing
(one [1, T] stream, per-sequence position ids, RoBERTa's position offset, token types, cu_seqlens
through stock HF models, the token budget) that the GPU path shares; the GPU test checks
FlashAttention itself.
"""

from __future__ import annotations

import pytest
import torch

from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import MODEL_FOLDERS

FAMILIES = {
    "bert_classifier": families.BERT,
    "xlm_roberta_classifier": families.XLM_ROBERTA,
    "qwen2_classifier": families.QWEN2,
    "qwen3_classifier": families.QWEN3,
    "llama_classifier": families.LLAMA,
    "bert_embedder": families.BERT_EMBEDDING,
}


def engine(folder, checkpoint, attention, budget=16384, compile_layers=False):
    family = FAMILIES[folder]
    outputs = ("embeddings",) if family.task == "embed" else ("logits", "scores")
    settings = ModelSettings(model_name=folder, checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=attention, output_names=outputs,
                             compile="layers" if compile_layers else "none")
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


@pytest.mark.parametrize("folder", ["bert_classifier", "qwen3_classifier"])
def test_compiled_layers_match_eager_across_batch_shapes(tiny_checkpoints, folder):
    """torch.compile'd layers (dynamic graphs, attention left eager) give the eager results for
    batches of any token count and longest sequence, and stop compiling once warm."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = engine(folder, tiny_checkpoints[folder], "varlen")
    compiled = engine(folder, tiny_checkpoints[folder], "varlen", compile_layers=True)
    assert "compiled_layers=True" in compiled.describe()
    generator = torch.Generator().manual_seed(5)

    def check(lengths):
        lengths = torch.tensor(lengths)
        ids = torch.randint(5, eager.limits.vocab_size, (int(lengths.sum()),), generator=generator)
        data = PackedBatch.pack([RequestSequences(ids, lengths, None)])
        expected, got = eager.run(data), compiled.run(data)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)

    for lengths in ([3, 9], [1, 30, 2, 12]):  # warm-up: the first shapes may specialise, then go dynamic
        check(lengths)
    graphs_when_warm = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs_when_warm > 0
    for lengths in ([17], [5, 5, 5, 5, 5, 40], [64, 1, 7], [2] * 20):
        check(lengths)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_when_warm, "recompiled for a new batch shape"
