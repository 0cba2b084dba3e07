"""The benchmark harnesses that start no server run end to end at smoke size on the CPU (their GPU numbers
are not tests), and their helpers behave; those that start the stack: tests/integration/test_bench_stack_smoke.py."""

import csv
import json
import random

import pytest

from poolserve_bench import bench_engine


def test_engine_benchmark_smoke(tmp_path):
    rows = bench_engine.main(["--smoke", "--out", str(tmp_path), "--commit", "test"])
    packed_shapes = ("tiny-xlm-roberta", "tiny-qwen3", "tiny-modernbert")
    expected = {(model, system) for model in packed_shapes for system in ("padded", "packed", "packed_compiled")}
    # Gemma2 has no packed body: "packed" is the engine running its padded body, nothing is compiled.
    expected |= {("tiny-gemma2", "padded"), ("tiny-gemma2", "packed")}
    assert {(r["model"], r["system"]) for r in rows} == expected
    written = list(csv.DictReader((tmp_path / "engine.csv").open()))
    assert len(written) == 11 and all(float(r["sequences_per_s"]) > 0 for r in written)


@pytest.mark.parametrize("model_type,vocab_size", [
    ("bert", 30522), ("xlm-roberta", 250002), ("qwen2", 151936), ("qwen3", 1000), ("llama", 128256)])
def test_synthetic_tokenizer_is_one_token_per_word_through_auto_tokenizer(tmp_path, model_type, vocab_size):
    """AutoTokenizer rebuilds a qwen2 tokenizer from vocab and merges; the word count must survive that."""
    from transformers import AutoTokenizer

    from poolserve_bench.checkpoints import word_count, word_tokenizer, words
    from poolserve_runtime import families

    shape = bench_engine.Shape("synthetic", families.BERT, dict(model_type=model_type, vocab_size=vocab_size), ())
    word_tokenizer(shape).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = words(random.Random(0), 37, word_count(shape))
    specials = {"bert": 2, "xlm-roberta": 2}.get(model_type, 1)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 37 + specials
    assert max(ids) < vocab_size
    assert len(set(ids)) > 30  # distinct words are distinct tokens


@pytest.mark.parametrize("kernel, expected", [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
    ("nvjet_sm90_tst_128x248_64x4_2x1_v_bz_coopA_TNT", "matmul"),
    ("triton_poi_fused__unsafe_view_mul_silu_1", "triton (fused / pooling / head)"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<OpaqueType<2u>>", "copy / cast"),
    ("void at::native::vectorized_elementwise_kernel<4, pow_tensor_scalar_kernel>", "elementwise / reduce (eager)"),
])
def test_profile_groups_kernels_by_name(kernel, expected):
    from poolserve_bench.profile_engine import category

    assert category(kernel) == expected


def test_benchmark_bodies_never_repeat_and_are_reproducible():
    import itertools

    from poolserve_bench.bench_systems import body_stream

    for workload in ("rerank64", "classify1", "reward"):
        first = list(itertools.islice(body_stream(workload, "m", 5000, seed=3), 300))
        keys = [repr(body) for body in first]
        assert len(set(keys)) == len(keys), workload
        assert first == list(itertools.islice(body_stream(workload, "m", 5000, seed=3), 300))


def test_stack_profile_groups_sampled_stacks_by_their_innermost_known_frame(tmp_path):
    from poolserve_bench.profile_stack import STUB_GROUPS, grouped_shares

    raw = tmp_path / "stub.txt"
    raw.write_text(
        "execute (model_runtime/poolserve_runtime/triton_model.py:59);read_sequences (model_runtime/poolserve_runtime/packing.py:86) 30\n"
        "execute (model_runtime/poolserve_runtime/triton_model.py:73);PackedEngine.run (model_runtime/poolserve_runtime/engine.py:147);"
        "forward (torch/nn/modules/linear.py:134) 60\n"
        "<module> (x.py:1) 10\n")
    assert grouped_shares(raw, STUB_GROUPS) == {
        "engine: forward (CPU side: launches, syncs)": 60.0, "read inputs (DLPack, validate, unpad)": 30.0, "other": 10.0}
    assert grouped_shares(tmp_path / "missing.txt", STUB_GROUPS) == {}
