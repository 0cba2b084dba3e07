"""Shared-prefix reuse gives the scores of the plain packed path (fp32 CPU, 1e-5).

Rerank-shaped requests (one rendered prefix, documents of mixed lengths) through a causal decoder:
one and many documents, several requests in one batch (one of them sharing nothing), small token
budgets that split the batch into several reused chunks; the stream really holds each prefix once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from poolserve_runtime import families, prefix_reuse
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import build_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    return {kind: build_checkpoint(kind, root / kind) for kind in ("qwen3", "mistral", "qwen3_causal")}


def engine(checkpoint, family, reuse: str, budget: int = 16384, **extra) -> PackedEngine:
    settings = ModelSettings(model_name="reuse", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"), compile="none",
                             prefix_reuse=reuse, **extra)
    return PackedEngine.load(family, settings)


def rerank_request(generator, vocab: int, prefix_length: int, document_lengths: list[int]) -> RequestSequences:
    prefix = torch.randint(5, vocab, (prefix_length,), generator=generator)
    rows = [torch.cat([prefix, torch.randint(5, vocab, (n,), generator=generator)]) for n in document_lengths]
    return RequestSequences(torch.cat(rows), torch.tensor([len(r) for r in rows]), None)


def batch(vocab: int) -> PackedBatch:
    generator = torch.Generator().manual_seed(4)
    unrelated = torch.randint(5, vocab, (30,), generator=generator)
    return PackedBatch.pack([
        rerank_request(generator, vocab, 40, [1, 17, 6, 33, 2]),
        rerank_request(generator, vocab, 25, [9]),  # one document: nothing to share
        RequestSequences(unrelated, torch.tensor([12, 18]), None),  # no common prefix
        rerank_request(generator, vocab, 60, [3, 3, 20]),
    ])


@pytest.mark.parametrize("kind, family", [("qwen3", families.QWEN3), ("mistral", families.MISTRAL)])
@pytest.mark.parametrize("budget", [16384, 90])
def test_reuse_equals_the_plain_packed_path(checkpoints, kind, family, budget):
    plain = engine(checkpoints[kind], family, "off", budget)
    reused = engine(checkpoints[kind], family, "auto", budget)
    assert reused.reuses_prefix and not plain.reuses_prefix
    data = batch(plain.limits.vocab_size)
    expected, got = plain.run(data), reused.run(data)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


def test_the_stream_holds_each_prefix_once(checkpoints):
    data = batch(300)
    chunks = prefix_reuse.plan_chunks(data.input_ids, data.cu_seqlens, data.sequences_per_request, 16384)
    (chunk,) = chunks
    # 40 + (1+17+6+33+2) | 25 + 9 (a single document is its own prefix + suffix: 34) | 12 + 18 | 60 + 26
    assert chunk.tokens == 40 + 59 + 34 + 30 + 60 + 26
    assert chunk.sequences == data.num_seqs == 11
    assert chunk.tokens < int(data.lengths.sum())
    assert int(chunk.cu_seqlens_k[-1]) == chunk.key_index.numel()


def test_converted_llm_reranker_reuses_its_rendered_prefix(checkpoints):
    """The case reuse is for: a Qwen3-Reranker-style causal LM scoring rendered prompts."""
    from transformers import AutoTokenizer

    from poolserve_contract.score_templates import render, template_text

    checkpoint = checkpoints["qwen3_causal"]
    overrides = '{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"], ' \
                '"is_original_qwen3_reranker": true}'
    template = template_text("qwen3_reranker")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    documents = ["paris is the capital", "rain", "the stock market fell and the loan rate rose in winter"]
    rows = [torch.tensor(tokenizer(render(template, "capital of france", d))["input_ids"]) for d in documents]
    data = PackedBatch.pack([RequestSequences(torch.cat(rows), torch.tensor([len(r) for r in rows]), None)])
    results = {reuse: engine(checkpoint, families.QWEN3, reuse, hf_overrides=overrides).run(data)
               for reuse in ("off", "auto")}
    assert prefix_reuse.shared_prefix_length(rows) >= 40
    torch.testing.assert_close(results["auto"]["scores"], results["off"]["scores"], rtol=1e-5, atol=1e-5)


def test_bidirectional_and_padded_bodies_never_reuse(checkpoints):
    assert not families.by_name("llama_bidirectional").causal and not families.MODERNBERT.causal
    varlen = engine(checkpoints["qwen3"], families.QWEN3, "auto")
    padded = PackedEngine.load(families.QWEN3, dataclasses.replace(varlen.settings, attention="padded"))
    assert varlen.reuses_prefix and not padded.reuses_prefix
