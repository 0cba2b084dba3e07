"""CUDA-graph replay of the varlen body against its eager forward, on a GPU (bf16).

The CPU tests (tests/unit/test_cuda_graph_buckets.py) check that a bucket's padding changes no real
row; here the captured graphs replay it. A replay must equal the eager run of the same padded bucket
(the same kernels on the same shapes), and the plain eager varlen body within bf16 noise (the padded
matmuls have more rows, so cuBLAS may pick other tilings). A chunk past the largest bucket runs
eagerly, the plain body's own result.
"""

from __future__ import annotations

import pytest
import torch

from poolserve_runtime import bodies, cuda_graphs, families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_TOKENS = 128  # buckets 16, 32, 64, 128


def build(name):
    """MiniLM-L6's shape (BERT, token types), and a small Qwen2-style decoder (GQA, causal)."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "minilm":
        config = tf.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                               intermediate_size=1536, num_labels=1)
        model, family = tf.BertForSequenceClassification(config), families.BERT
    else:
        config = tf.Qwen2Config(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                                num_attention_heads=14, num_key_value_heads=2, num_labels=1, pad_token_id=0)
        model, family = tf.Qwen2ForSequenceClassification(config), families.QWEN2
    config.architectures = [type(model).__name__]
    return family, model.to("cuda", torch.bfloat16).eval()


def engine_for(family, model, graph_max_tokens):
    settings = ModelSettings(model_name="graphs", checkpoint="<memory>", device=torch.device("cuda"),
                             dtype=torch.bfloat16, max_tokens_per_forward=8192, max_model_len=512, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"), compile="none",
                             cuda_graph_max_tokens=graph_max_tokens)
    return PackedEngine(family, model, settings)


def batch_of(lengths, vocab, seed, pairs: bool) -> PackedBatch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(5, vocab, (int(lengths.sum()),), generator=generator)
    types = None
    if pairs:  # the second half of each sequence is segment 1
        positions = torch.cat([torch.arange(int(n)) for n in lengths])
        types = (positions >= torch.repeat_interleave(lengths // 2, lengths)).long()
    return PackedBatch.pack([RequestSequences(ids, lengths, types)])


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


SHAPES = {  # per bucket: one sequence, one-token sequences, exactly full; then past the largest bucket
    "1x37": [37], "1x5": [5], "1x100": [100],
    "16x1": [1] * 16, "60x1": [1] * 60, "128x1": [1] * 128,
    "2x8 (full 16)": [8, 8], "3x[10,11,11] (full 32)": [10, 11, 11], "5x[30,1,1,1,31] (full 64)": [30, 1, 1, 1, 31],
    "128 (full 128)": [128], "mixed 97": [40, 1, 3, 50, 3],
    "300 (eager)": [100, 200], "129 (eager)": [129],
}


@pytest.mark.parametrize("name", ["minilm", "qwen2"])
def test_replayed_graphs_equal_the_eager_varlen_body(name):
    family, model = build(name)
    engine = engine_for(family, model, MAX_TOKENS)
    assert isinstance(engine.body, cuda_graphs.GraphedVarlenBody)
    assert engine.graph_buckets == (16, 32, 64, 128) and "cuda_graphs=16,32,64,128" in engine.describe()
    plain: bodies.VarlenBody = engine.body.body
    pairs = family.uses_token_types
    for seed, (label, lengths) in enumerate(SHAPES.items()):
        (chunk,) = engine.chunks(batch_of(lengths, model.config.vocab_size, seed, pairs))
        tokens = sum(lengths)
        bucket = cuda_graphs.bucket_for(tokens, len(lengths), engine.graph_buckets)
        with torch.inference_mode():
            replayed = engine.body.hidden_states(chunk)
            eager = plain.hidden_states(chunk)
            assert replayed.shape == eager.shape == (tokens, model.config.hidden_size), label
            if bucket is None:
                torch.testing.assert_close(replayed, eager, rtol=0, atol=0, msg=label)  # the same eager call
                continue
            inputs = cuda_graphs.BucketInputs.allocate(bucket, engine.device, engine.pad_token_id,
                                                       engine.position_offset, pairs)
            inputs.load(chunk, engine.position_offset)
            padded_eager = cuda_graphs.run_bucket(plain, inputs)[:tokens]
        torch.testing.assert_close(replayed, padded_eager, msg=label)  # bf16 tolerances
        error = relative_error(replayed, eager)
        print(f"{name} {label} (bucket {bucket}): graph vs eager varlen relative error {error:.2e}")
        assert error < 1e-2, (label, error)


@pytest.mark.parametrize("name", ["minilm", "qwen2"])
def test_engine_scores_with_graphs_equal_the_eager_engine(name):
    """Whole engine calls (pooling, head, the decoders' last-token rule) of short requests, one after
    another across buckets, as a server meets them."""
    family, model = build(name)
    eager, graphed = engine_for(family, model, 0), engine_for(family, model, 512)
    assert eager.graph_buckets == () and isinstance(eager.body, bodies.VarlenBody)
    for seed, lengths in enumerate([[37], [3, 9, 1], [200], [37], [64] * 8, [300, 300], [1]]):
        batch = batch_of(lengths, model.config.vocab_size, seed, family.uses_token_types)
        got, expected = graphed.run(batch)["logits"], eager.run(batch)["logits"]
        error = relative_error(got, expected)
        print(f"{name} {lengths[:3]}...: graph engine vs eager engine relative error {error:.2e}")
        assert error < 1e-2, (lengths, error)


def test_a_decoder_sequence_ending_in_pad_ids_pools_its_last_real_token_through_a_graph():
    family, model = build("qwen2")
    eager, graphed = engine_for(family, model, 0), engine_for(family, model, 512)
    batch = batch_of([20, 12], model.config.vocab_size, 3, pairs=False)
    batch.input_ids[-3:] = model.config.pad_token_id  # the second sequence ends in three pad ids
    got, expected = graphed.run(batch)["logits"], eager.run(batch)["logits"]
    assert relative_error(got, expected) < 1e-2
