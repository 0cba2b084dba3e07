"""Our stack against what users run today, in one run on one GPU (a benchmark, not a test).

    python -m poolserve_bench.bench_systems --out benchmarks/results [--models NAME ...] [--smoke]

Per model shape (random weights from the real config, saved with a word-level tokenizer so every
system sees the same token ids) and workload, the systems measured:

* ``http``: this project through the HTTP adapter (``/rerank`` or ``/classify``, vLLM bodies);
* ``grpc``: our Triton model over raw gRPC (pre-tokenized, padded ``[n, T]`` + mask): the
  adapter's overhead is http - grpc;
* ``baseline_http``: the plain FastAPI + HF padded server of ``benchmarks/poolserve_bench/baseline_server.py``;
* ``sentence_transformers``: ``CrossEncoder.predict`` offline, default batch size (encoders only);
* ``bare_forward``: the packed engine in-process on one request, the floor for the overhead goal.

Servers are swept over client concurrency; each level runs for a bounded time. Rows: pairs/s,
tokens/s, p50/p99 latency, model-FLOP utilisation over the measured bf16 matmul peak, GPU memory
in use. ``--smoke`` runs a tiny shape on the CPU (CI checks that the harness works).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import torch

from poolserve_bench.bench_engine import flops_per_request, matmul_peak_tflops, model_shapes
from poolserve_bench.checkpoints import save_checkpoint, word_count, words
from poolserve_bench.results_csv import write_csv
from poolserve_contract.wire import INSTANCE_COUNT
from poolserve_runtime import families
from poolserve_stack.processes import free_port, spawn_tied_to_this_process, wait_for_http
from poolserve_stack.triton_server import TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_WORKLOADS = {  # the (shape, workload) pairs the goals are about
    "bge-reranker-v2-m3": ("rerank64",),
    "ms-marco-MiniLM-L6": ("rerank64", "classify32", "classify1"),
    "Qwen3-Reranker-0.6B": ("rerank64",),
    "Qwen2.5-1.5B-classifier": ("classify32",),  # two labels: no score/rerank route (vLLM's rule)
    "ModernBERT-base-reranker": ("rerank64",),
    "Gemma2-2B-reward": ("reward",),
    "tiny-xlm-roberta": ("rerank8",),
}


def body_stream(workload: str, model: str, vocabulary: int, seed: int = 0):
    """Request bodies without end, none repeated (a server with a prefix or response cache must not
    be measured on repeats), the same sequence for the same seed."""
    rng = random.Random(seed)
    while True:
        if workload.startswith("rerank"):
            query_words = rng.randint(6, 20)
            documents = []
            for _ in range(int(workload[len("rerank"):])):
                length = int(math.exp(rng.gauss(math.log(140), 0.45)))
                documents.append(words(rng, max(8, min(length, 512 - query_words - 4)), vocabulary))
            yield {"model": model, "query": words(rng, query_words, vocabulary), "documents": documents}
        elif workload == "reward":  # one prompt + answer of 256-1,024 tokens per request
            yield {"model": model, "input": [words(rng, rng.randint(256, 1024), vocabulary)]}
        else:
            yield {"model": model, "input": [words(rng, rng.randint(8, 64), vocabulary)
                                             for _ in range(int(workload[len("classify"):]))]}


def request_bodies(workload: str, model: str, count: int, vocabulary: int, seed: int = 0) -> list[dict]:
    return list(itertools.islice(body_stream(workload, model, vocabulary, seed), count))


def body_texts(body: dict) -> tuple[list[str], list[str] | None]:
    if "query" in body:
        return [body["query"]] * len(body["documents"]), body["documents"]
    return body["input"], None


async def load(send, bodies: list[dict], concurrency: int, seconds: float, max_requests: int):
    """Closed-loop clients: each sends its next request when the last one returns. ``bodies`` holds
    ``concurrency`` warm-up bodies, then one body for each request of the level: none is sent twice.
    ``send`` returns False for a request the server refused (429 or 503), which the level counts apart.
    Returns (pairs answered, seconds, latencies of the answered requests, refused requests)."""
    latencies: list[float] = []
    done_pairs = 0
    refused = 0
    measured = bodies[concurrency:]
    counter = iter(range(min(max_requests, len(measured))))

    async def client():
        nonlocal done_pairs, refused
        while time.perf_counter() < deadline or not (latencies or refused):  # at least one result per level
            index = next(counter, None)
            if index is None:
                return
            body = measured[index]
            start = time.perf_counter()
            if not await send(body):
                refused += 1  # refused at once (429/503): no latency, no pairs
                continue
            latencies.append(time.perf_counter() - start)
            done_pairs += len(body_texts(body)[0])

    await asyncio.gather(*(send(body) for body in bodies[:concurrency]))  # warm-up: connections, allocator
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done_pairs, time.perf_counter() - start, latencies, refused


def start(command: list[str], env: dict, log: Path, cpus: str | None = None) -> subprocess.Popen:
    if cpus:
        command = ["taskset", "-c", cpus, *command]  # children (uvicorn workers) inherit the mask
    with log.open("wb") as handle:  # killed with this process, however it ends
        return spawn_tied_to_this_process(command, cwd=PROJECT_ROOT, env={**os.environ, **env}, stdout=handle,
                                          stderr=subprocess.STDOUT)


def pin_process_tree(pid: int, cpus: set[int]) -> None:
    """Move every thread of ``pid`` and of its descendants onto ``cpus``."""
    from poolserve_stack.processes import child_pids

    pending = [pid]
    while pending:
        current = pending.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        pending.extend(child_pids(current))


def cpu_plan(enabled: bool) -> dict[str, str | None]:
    """Disjoint cores for Triton, the adapter, the baseline server and the load generator."""
    count = os.cpu_count() or 1
    if not enabled or count < 8:
        return {"triton": None, "adapter": None, "baseline": None, "client": None}
    quarter = count // 4
    spans = {"triton": (0, 2 * quarter), "adapter": (2 * quarter, 3 * quarter),
             "baseline": (3 * quarter, 3 * quarter + quarter // 2), "client": (3 * quarter + quarter // 2, count)}
    return {name: f"{a}-{b - 1}" for name, (a, b) in spans.items()}


def cpu_set(span: str) -> set[int]:
    first, last = (int(x) for x in span.split("-"))
    return set(range(first, last + 1))


def gpu_memory_gib() -> float:
    if not torch.cuda.is_available():
        return float("nan")
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / 2**30, 2)


def bench_shape(shape, workloads, args, work: Path, meta: dict, peak: float, instances: int = 1) -> list[dict]:
    from transformers import AutoTokenizer

    checkpoint = save_checkpoint(shape, work / shape.name)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    folder = shape.family.folder
    rows: list[dict] = []
    parameters = {"checkpoint": str(checkpoint), "served_model_name": shape.name,
                  **({INSTANCE_COUNT: str(instances)} if instances > 0 else {}), **dict(args.model_set)}
    triton = TritonServer(PROJECT_ROOT / "model_repository", {folder: parameters},
                          log_path=work / f"{shape.name}-triton.log", ready_timeout_s=600)
    cpus = cpu_plan(args.pin_cpus)
    meta = {**meta, "instances": instances, "adapter_workers": args.adapter_workers, "pinned": bool(cpus["triton"]),
            **{f"set_{key}": value for key, value in args.model_set}}
    processes = []
    try:
        triton.start()
        if cpus["triton"]:
            pin_process_tree(triton.process.pid, cpu_set(cpus["triton"]))
        adapter_port, baseline_port = free_port(), free_port()
        processes.append(start([sys.executable, "-m", "poolserve_adapter"], {
            "ADAPTER_TRITON_GRPC_URL": triton.grpc_url, "ADAPTER_PORT": str(adapter_port),
            "ADAPTER_MAX_SEQUENCES_PER_TRITON_REQUEST": "64", "ADAPTER_WORKERS": str(args.adapter_workers)},
            work / f"{shape.name}-adapter.log", cpus["adapter"]))
        wait_for_http(f"http://127.0.0.1:{adapter_port}/health", processes[0], 300)
        if "baseline_http" in args.systems:
            processes.append(start([sys.executable, "-m", "poolserve_bench.baseline_server", str(checkpoint),
                                    "--port", str(baseline_port)], {}, work / f"{shape.name}-baseline.log",
                                   cpus["baseline"]))
            wait_for_http(f"http://127.0.0.1:{baseline_port}/health", processes[1], 300)

        for workload in workloads:
            stream = body_stream(workload, shape.name, word_count(shape))
            bodies = list(itertools.islice(stream, 64 if not args.smoke else 4))  # bare forward, st, FLOPs
            lengths = [torch.tensor([len(ids) for ids in tokenizer(*body_texts(b))["input_ids"]]) for b in bodies]
            pairs = sum(len(row) for row in lengths)
            flops_per_pair = sum(flops_per_request(shape, row, _param_counter(shape)) for row in lengths) / pairs
            tokens_per_pair = float(sum(int(row.sum()) for row in lengths)) / pairs
            path = "/rerank" if workload.startswith("rerank") else "/classify"

            def row(system, concurrency, pairs, seconds, latencies, refused=0):
                pairs_per_s = pairs / seconds
                return {**meta, "model": shape.name, "workload": workload, "system": system, "concurrency": concurrency,
                        "requests": len(latencies), "refused": refused, "pairs_per_s": round(pairs_per_s, 1),
                        "tokens_per_s": round(pairs_per_s * tokens_per_pair),
                        "p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
                        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2) if latencies else None,
                        "mfu_pct": round(100 * pairs_per_s * flops_per_pair / 1e12 / peak, 1),
                        "gpu_memory_gib": gpu_memory_gib(),
                        "latencies_ms": " ".join(f"{1000 * x:.2f}" for x in latencies) if concurrency in (1, 16) else ""}

            # Bare forward: one request through the packed engine in this process.
            rows.append(_bare_forward_row(shape, checkpoint, tokenizer, bodies, row, args))
            print(f"{shape.name:<24}{workload:<11}{'bare_forward':<14}c=1   {rows[-1]['pairs_per_s']:>9.0f} pairs/s  "
                  f"p50 {rows[-1]['p50_ms']} ms", flush=True)

            for concurrency in args.concurrency:
                for system in [s for s in ("http", "grpc", "baseline_http") if s in args.systems]:
                    headers: list = []
                    # Fresh bodies for every level: warm-up, then one per request at most.
                    level = list(itertools.islice(stream, concurrency + max(args.requests, 2 * concurrency)))
                    grpc_inputs = [_padded_inputs(tokenizer, body) for body in level] if system == "grpc" else []
                    before = _triton_stats(triton.grpc_url, folder)
                    pairs, seconds, latencies, refused = asyncio.run(sweep_level(
                        system, level, grpc_inputs, concurrency, args.seconds, args.requests, triton.grpc_url, folder,
                        f"http://127.0.0.1:{adapter_port}{path}", f"http://127.0.0.1:{baseline_port}{path}", headers))
                    rows.append(row(system, concurrency, pairs, seconds, latencies, refused))
                    rows[-1].update(_breakdown(before, _triton_stats(triton.grpc_url, folder), headers, system))
                    r = rows[-1]
                    print(f"{shape.name:<24}{workload:<11}{system:<14}i={instances} c={concurrency:<3} "
                          f"{r['pairs_per_s']:>9.0f} pairs/s  refused {r['refused']}/{r['requests'] + r['refused']}  "
                          f"p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                          f"MFU {r['mfu_pct']}%  triton queue/in/infer/out {r['triton_queue_ms']}/"
                          f"{r['triton_compute_input_ms']}/{r['triton_compute_infer_ms']}/{r['triton_compute_output_ms']} ms "
                          f"x{r['triton_requests_per_execution']}  adapter tok/inf/total {r['adapter_tokenize_ms']}/"
                          f"{r['adapter_inference_ms']}/{r['adapter_total_ms']} ms", flush=True)
            if ("sentence_transformers" in args.systems and workload.startswith("rerank")
                    and shape.family in (families.BERT, families.XLM_ROBERTA, families.MODERNBERT)):
                rows.append(_sentence_transformers_row(checkpoint, bodies, row))
                print(f"{shape.name:<24}{workload:<11}{'st':<14}      {rows[-1]['pairs_per_s']:>9.0f} pairs/s", flush=True)
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        triton.stop()
    return rows


def _param_counter(shape):
    """A stand-in model with the shape's parameter counts, on the meta device (no memory)."""
    from poolserve_bench.bench_engine import build_model

    if not hasattr(_param_counter, "cache"):
        _param_counter.cache = {}
    if shape.name not in _param_counter.cache:
        _param_counter.cache[shape.name] = build_model(shape, torch.device("meta"), torch.bfloat16)
    return _param_counter.cache[shape.name]


def _padded_inputs(tokenizer, body):
    import tritonclient.grpc.aio as grpcaio

    texts, pairs = body_texts(body)
    encoded = tokenizer(texts, pairs, padding=True, return_tensors="np", return_token_type_ids=False)
    inputs = []
    for name in ("input_ids", "attention_mask"):
        array = encoded[name].astype(np.int64)
        tensor = grpcaio.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _triton_stats(grpc_url: str, folder: str) -> dict:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(grpc_url).get_inference_statistics(folder, as_json=True)["model_stats"][0]
    inference = stats.get("inference_stats", {})
    out = {name: (int(inference.get(name, {}).get("count", 0)), int(inference.get(name, {}).get("ns", 0)))
           for name in ("success", "queue", "compute_input", "compute_infer", "compute_output")}
    out["executions"] = int(stats.get("execution_count", 0))
    out["inferences"] = int(stats.get("inference_count", 0))
    return out


def _breakdown(before: dict, after: dict, headers: list, system: str) -> dict:
    """Where the time of one request went: Triton's own statistics, and the adapter's headers."""
    requests = after["success"][0] - before["success"][0]
    row = {}
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        spent = after[name][1] - before[name][1]
        row[f"triton_{name}_ms"] = round(spent / max(requests, 1) / 1e6, 3) if system != "baseline_http" else None
    executions = after["executions"] - before["executions"]
    row["triton_requests_per_execution"] = round(requests / executions, 2) if executions and system != "baseline_http" else None
    for name in ("tokenize", "inference", "total"):
        values = [float(h[f"x-{name}-time"]) for h in headers if f"x-{name}-time" in h]
        row[f"adapter_{name}_ms"] = round(statistics.median(values), 3) if values else None
    return row


async def sweep_level(system, bodies, grpc_inputs, concurrency, seconds, requests, grpc_url, folder, http_url,
                      baseline_url, headers=None):
    """One concurrency level of one system (``http``: the adapter at ``http_url``; ``grpc``: Triton's
    ``folder`` fed ``grpc_inputs``; ``baseline_http``: ``baseline_url``), :func:`load` for ``seconds``
    and at most ``requests`` requests (2x ``concurrency`` at least). The adapter's timing headers go to
    ``headers`` when given. Returns (pairs scored, seconds, latencies)."""
    import tritonclient.grpc.aio as grpcaio

    max_requests = max(requests, 2 * concurrency)
    if system == "grpc":
        by_id = {id(body): inputs for body, inputs in zip(bodies, grpc_inputs)}
        async with grpcaio.InferenceServerClient(grpc_url) as client:
            async def send(body):
                await client.infer(folder, by_id[id(body)], outputs=[grpcaio.InferRequestedOutput("scores")])
                return True
            return await load(send, bodies, concurrency, seconds, max_requests)
    url = http_url if system == "http" else baseline_url
    # aiohttp, not httpx, drives the HTTP systems: httpx's async connection pool slows down as
    # concurrency grows (encode/httpx#3215), which showed here as HTTP throughput falling from c=16
    # to c=64 while the adapter's own time per request stayed flat.
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        encoded = {id(body): orjson.dumps(body) for body in bodies}

        async def send(body):
            async with session.post(url, data=encoded[id(body)],
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                if response.status in (429, 503):  # admission refused it: counted, not a failure of the run
                    return False
                response.raise_for_status()
                if headers is not None and system == "http":
                    headers.append({k.lower(): v for k, v in response.headers.items()})
                return True
        return await load(send, bodies, concurrency, seconds, max_requests)


def _bare_forward_row(shape, checkpoint, tokenizer, bodies, row, args):
    from poolserve_runtime.engine import PackedEngine
    from poolserve_runtime.packing import PackedBatch, RequestSequences
    from poolserve_runtime.settings import ModelSettings

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    settings = ModelSettings(model_name=shape.name, checkpoint=str(checkpoint), device=device,
                             dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                             max_tokens_per_forward=16384, max_model_len=0, logit_mean=0.0, logit_sigma=1.0,
                             attention="varlen", output_names=("logits", "scores"), compile="auto")
    engine = PackedEngine.load(shape.family, settings)
    batches = []
    for body in bodies[:8]:
        ids = tokenizer(*body_texts(body))["input_ids"]
        batches.append(PackedBatch.pack([RequestSequences(torch.tensor(sum(ids, [])), torch.tensor([len(i) for i in ids]), None)]))
    engine.run(batches[0])
    latencies = []
    for _ in range(3):
        for batch in batches:
            start = time.perf_counter()
            engine.run(batch)  # returns CPU tensors: synchronised
            latencies.append(time.perf_counter() - start)
    pairs = sum(b.num_seqs for b in batches) * 3
    result = row("bare_forward", 1, pairs, sum(latencies), latencies)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _sentence_transformers_row(checkpoint, bodies, row):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(checkpoint), device="cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        model.model.to(torch.bfloat16)
    pairs = [(q, d) for body in bodies for q, d in zip(*body_texts(body))]
    model.predict(pairs[:64])
    start = time.perf_counter()
    model.predict(pairs)  # default batch size, as the published numbers use
    seconds = time.perf_counter() - start
    del model
    return row("sentence_transformers", 1, len(pairs), seconds, [])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=8.0, help="time bound of one concurrency level")
    parser.add_argument("--requests", type=int, default=96, help="request bound of one concurrency level")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-systems"))
    parser.add_argument("--adapter-workers", type=int, default=4, help="0: the adapter's default (one per 4 cores)")
    parser.add_argument("--instance-counts", type=int, nargs="*", default=[1],
                        help="model instances per GPU to compare in this run (the instance_count parameter; 0: the "
                        "machine's default)")
    parser.add_argument("--systems", nargs="*", default=["http", "grpc", "baseline_http", "sentence_transformers"])
    parser.add_argument("--model-set", type=lambda v: tuple(v.split("=", 1)), action="append", default=[],
                        metavar="KEY=VALUE", help="a model parameter for every shape (e.g. max_tokens_per_forward=65536)")
    parser.add_argument("--name", default="", help="suffix of the CSV name (systems_<name>.csv)")
    parser.add_argument("--pin-cpus", action="store_true",
                        help="give Triton, the adapter, the baseline server and the load generator disjoint cores")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.seconds, args.requests, args.adapter_workers = [1, 2], 2.0, 4, 1
    args.work.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak_tflops(torch.device("cuda")) if torch.cuda.is_available() and not args.smoke else float("nan")
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu",
                torch=torch.__version__, python=platform.python_version(), commit=args.commit,
                matmul_peak_tflops=round(peak, 1))
    rows = []
    for shape in model_shapes(args.smoke):
        if shape.name in SYSTEM_WORKLOADS and (not args.models or shape.name in args.models):
            for instances in args.instance_counts:
                rows += bench_shape(shape, SYSTEM_WORKLOADS[shape.name], args, args.work, meta, peak, instances)
                write_rows(args, rows)  # after every run: a later failure keeps what was measured
    return rows


def write_rows(args, rows: list[dict]) -> None:
    suffix = "_" + args.name if args.name else ("_" + "-".join(args.models) if args.models else "")
    write_csv(args.out / f"systems{suffix}.csv", rows)


if __name__ == "__main__":
    main()
