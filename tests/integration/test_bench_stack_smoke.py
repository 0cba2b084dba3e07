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
