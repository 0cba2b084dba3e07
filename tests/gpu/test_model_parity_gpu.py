"""Whole-model parity on a GPU: the packed engine with the Triton kernels vs the torch reference.

Random-weight bert-base and a Qwen3-style decoder in bf16; the body is the same in both runs, so
any difference comes from pooling and the head: it must stay far below bf16 noise. Both are also
compared with the padded HF model (bf16 vs fp32 differences bound the meaningful tolerance).
"""

from __future__ import annotations

import os

import pytest
import torch

from model_runtime.engine import PackedEngine
from model_runtime.families import BERT, QWEN3
from model_runtime.packing import PackedBatch, RequestSequences
from model_runtime.settings import ModelSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def build(family):
    import transformers as tf

    torch.manual_seed(0)
    if family is BERT:
        config = tf.BertConfig(num_labels=3, vocab_size=30522)
        model = tf.BertForSequenceClassification(config)
    else:
        config = tf.Qwen3Config(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                                num_attention_heads=16, num_key_value_heads=8, head_dim=128, num_labels=1,
                                pad_token_id=0, max_position_embeddings=4096)
        model = tf.Qwen3ForSequenceClassification(config)
    config.architectures = [type(model).__name__]
    return model.to("cuda", torch.bfloat16).eval()


def engine_for(family, model):
    settings = ModelSettings(model_name="parity", checkpoint="<memory>", device=torch.device("cuda"),
                             dtype=torch.bfloat16, max_tokens_per_forward=8192, max_model_len=512,
                             logit_mean=0.0, logit_sigma=1.0, output_names=("logits", "scores"))
    return PackedEngine(family, model, settings)


def random_batch(vocab, count=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 512, (count,), generator=generator)
    ids = torch.randint(5, vocab, (int(lengths.sum()),), generator=generator)
    return PackedBatch.pack([RequestSequences(input_ids=ids, lengths=lengths, token_type_ids=None)])


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", [BERT, QWEN3], ids=["bert-base", "qwen3-style"])
def test_kernels_on_vs_off(family, monkeypatch):
    model = build(family)
    engine = engine_for(family, model)
    batch = random_batch(model.config.vocab_size)
    with_kernels = engine.run(batch)
    monkeypatch.setenv("POOLING_KERNELS", "torch")
    without_kernels = engine.run(batch)
    for name in ("logits", "scores"):
        error = relative_error(with_kernels[name], without_kernels[name])
        print(f"{family.name} {name}: kernels on vs off relative error {error:.2e}")
        assert error < 1e-3, (name, error)
    assert torch.isfinite(with_kernels["scores"]).all()
