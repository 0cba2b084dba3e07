"""Single-request latency of the packed engine, eager vs CUDA-graph replay (a GPU benchmark).

    python -m poolserve_bench.bench_cuda_graphs [--out benchmarks/results] [--name h200] [--models NAME ...]

For each model shape (random weights from the real configs, bf16, as ``bench_engine``) and each
request (one 37-token classify, one 200-token text, 8 x 60-token documents, and 16 x 64 tokens,
past the largest bucket so both runs are eager), two engines on the same model: graphs off
(``cuda_graph_max_tokens=0``) and on (the default, 512). Printed and written to
``cuda_graphs_<name>.csv``: the median milliseconds of the whole engine call (body, pooling, head,
copy to the host) and of the body alone, each call synchronised (the latency of one request alone on
the GPU), the capture time at load, and the largest score difference between the two runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from poolserve_bench.bench_engine import build_model, model_shapes
from poolserve_bench.results_csv import write_csv
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings

REQUESTS = {"1x37": [37], "1x200": [200], "8x60": [60] * 8, "16x64": [64] * 16}
DEFAULT_MODELS = ("ms-marco-MiniLM-L6", "bge-reranker-base", "bge-reranker-v2-m3")


def engine_for(shape, model, graph_max_tokens: int) -> PackedEngine:
    settings = ModelSettings(
        model_name=shape.name, checkpoint="<random>", device=torch.device("cuda"), dtype=torch.bfloat16,
        max_tokens_per_forward=16384,
        max_model_len=512 if shape.family in (families.BERT, families.XLM_ROBERTA) else 4096,
        logit_mean=0.0, logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"), compile="none",
        cuda_graph_max_tokens=graph_max_tokens)
    return PackedEngine(shape.family, model, settings)


def median_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[calls // 2]


def measure(shape, calls: int, meta: dict) -> list[dict]:
    """Every request of ``REQUESTS`` through one shape's two engines."""
    model = build_model(shape, torch.device("cuda"), torch.bfloat16)
    eager = engine_for(shape, model, 0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    graphed = engine_for(shape, model, 512)
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - start
    print(f"\n{shape.name}: {graphed.describe()}\n  graphs captured in {capture_s:.2f} s")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for request, lengths in REQUESTS.items():
        lengths = torch.tensor(lengths)
        ids = torch.randint(5, shape.config["vocab_size"], (int(lengths.sum()),), generator=generator)
        batch = PackedBatch.pack([RequestSequences(ids, lengths, None)])
        (chunk,) = graphed.chunks(batch)
        with torch.inference_mode():
            score_diff = float((graphed.run(batch)["logits"] - eager.run(batch)["logits"]).abs().max())
            timings = {
                "engine_eager_ms": median_ms(lambda: eager.run(batch), calls),
                "engine_graph_ms": median_ms(lambda: graphed.run(batch), calls),
                "body_eager_ms": median_ms(lambda: eager.body.hidden_states(chunk), calls),
                "body_graph_ms": median_ms(lambda: graphed.body.hidden_states(chunk), calls),
            }
        row = {**meta, "model": shape.name, "request": request, "tokens": int(lengths.sum()),
               **{key: round(value, 3) for key, value in timings.items()},
               "capture_s": round(capture_s, 2), "max_abs_logit_diff": score_diff}
        rows.append(row)
        print(f"  {request:<6} {row['tokens']:>5} tokens: engine {row['engine_eager_ms']:>7.2f} -> "
              f"{row['engine_graph_ms']:>7.2f} ms   body {row['body_eager_ms']:>7.2f} -> "
              f"{row['body_graph_ms']:>7.2f} ms   max |logit diff| {score_diff:.2e}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="gpu")
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a CUDA GPU")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    print(f"{meta['device']}, torch {meta['torch']}")
    rows = []
    for shape in model_shapes(smoke=False):
        if shape.name in args.models:
            rows += measure(shape, args.calls, meta)
            torch.cuda.empty_cache()
    write_csv(args.out / f"cuda_graphs_{args.name}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
