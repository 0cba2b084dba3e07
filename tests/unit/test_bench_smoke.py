"""The benchmark harnesses run end to end at smoke size on the CPU (their GPU numbers are not tests)."""

import csv

from benchmarks import bench_engine


def test_engine_benchmark_smoke(tmp_path):
    rows = bench_engine.main(["--smoke", "--out", str(tmp_path), "--commit", "test"])
    assert {(r["model"], r["system"]) for r in rows} == {
        ("tiny-xlm-roberta", "padded"), ("tiny-xlm-roberta", "packed"), ("tiny-qwen3", "padded"), ("tiny-qwen3", "packed")}
    written = list(csv.DictReader((tmp_path / "engine.csv").open()))
    assert len(written) == 4 and all(float(r["sequences_per_s"]) > 0 for r in written)


def test_systems_benchmark_smoke(tmp_path):
    """Starts Triton, the adapter and the baseline server on the CPU and drives each briefly."""
    from benchmarks import bench_systems

    rows = bench_systems.main(["--smoke", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    systems = {r["system"] for r in rows}
    assert systems == {"bare_forward", "http", "grpc", "baseline_http", "sentence_transformers"}
    assert all(r["pairs_per_s"] > 0 for r in rows)
    assert (tmp_path / "systems.csv").exists()
