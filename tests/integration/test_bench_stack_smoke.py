"""The benchmark harnesses that start the real stack (tritonserver, the adapter, the plain HF baseline
server) run end to end at smoke size on the CPU; their GPU numbers are not tests."""

import pytest

pytestmark = pytest.mark.integration


def test_systems_benchmark_smoke(tmp_path):
    """Starts Triton, the adapter and the baseline server on the CPU and drives each briefly."""
    from poolserve_bench import bench_systems

    rows = bench_systems.main(["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    systems = {r["system"] for r in rows}
    assert systems == {"bare_forward", "http", "grpc", "baseline_http", "sentence_transformers"}
    assert all(r["pairs_per_s"] > 0 for r in rows)
    assert (tmp_path / "systems.csv").exists()


def test_llm_reranker_benchmark_smoke(tmp_path):
    """Recognises the named causal LM, serves it with and without reuse beside the plain HF recipe."""
    from poolserve_bench import bench_llm_rerankers

    rows = bench_llm_rerankers.main(["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    assert {r["system"] for r in rows} == {"http_reuse", "http_no_reuse", "baseline_http"}
    assert all(r["pairs_per_s"] > 0 and 0 < r["prefix_share"] < 1 for r in rows)


def test_embeddings_benchmark_smoke(tmp_path):
    """Serves a sentence-transformers embedder and an HF_ColBERT checkpoint, embeds over HTTP beside
    sentence-transformers and padded HF in-process, and sets rerank against the token_embed forward."""
    from poolserve_bench import bench_embeddings

    rows = bench_embeddings.main(["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    assert {(r["model"], r["system"]) for r in rows} == {
        ("tiny-bge-m3", "http"), ("tiny-bge-m3", "sentence_transformers"), ("tiny-bge-m3", "padded_hf"),
        ("tiny-colbert", "http_token_embed"), ("tiny-colbert", "http_rerank")}
    assert all(r.get("texts_per_s", r.get("documents_per_s")) > 0 and r["refused"] == 0 for r in rows)
    assert all("maxsim_overhead_pct" in r for r in rows if r["system"] == "http_rerank")
    assert (tmp_path / "embeddings.csv").exists()


def test_lora_fp8_benchmark_smoke(tmp_path):
    """Serves dummy-weight models from a config alone: a base beside the same base with 8 PEFT adapters mixed per
    request, bf16 beside FP8 with their parity rows (and both against fp32), and the 72B reward model's family in FP8."""
    from poolserve_bench import bench_lora_fp8

    rows = bench_lora_fp8.main(["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    levels = [r for r in rows if "concurrency" in r]
    assert {(r["model"], r["system"]) for r in levels} == {
        ("Qwen3-Reranker-0.6B", "base_alone"), ("Qwen3-Reranker-0.6B", "lora_mixed"),
        ("Qwen3-Reranker-0.6B", "bf16"), ("Qwen3-Reranker-0.6B", "fp8"), ("Qwen2.5-Math-RM-72B", "fp8")}
    assert all(r["refused"] == 0 and r["requests"] > 0 for r in levels)
    parity = [r for r in rows if r["system"] == "fp8_vs_bf16"]
    assert [r["model"] for r in parity] == ["Qwen3-Reranker-0.6B", "Qwen2.5-Math-RM-72B"]
    assert all(r["spearman"] > 0.9 and r["max_abs_diff"] < 0.1 for r in parity)
    against_fp32 = {r["system"]: r for r in rows if r["system"].endswith("_vs_fp32")}
    assert set(against_fp32) == {"bf16_vs_fp32", "fp8_vs_fp32"}
    assert all(r["model"] == "Qwen3-Reranker-0.6B" and r["spearman"] > 0.9 for r in against_fp32.values())
    assert (tmp_path / "lora_fp8.csv").exists()
