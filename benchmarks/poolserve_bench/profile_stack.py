"""Where a request's time goes in the whole stack under load (a GPU profile, not a test).

    python -m poolserve_bench.profile_stack --out benchmarks/results --models ms-marco-MiniLM-L6 \
        --concurrency 1 64 --instance-counts 1 2 [--name h200]

Per model shape, instance count and client concurrency, one level of HTTP load (``bench_systems``'
bodies, never repeated) runs while

* ``py-spy`` samples every Triton stub and every adapter worker (where their CPU time goes: the
  stub's execute split into reading inputs, the engine's forward, answering; the adapter's
  tokenizing, JSON, the Triton call);
* ``nvidia-smi`` samples the GPU's busy fraction every 100 ms (the idle gaps between dynamic
  batches are what it does not cover).

Rows (``profile_stack<_name>.csv``): for each process role the share of its samples per frame group,
the GPU busy percentage, the level's pairs/s and p50. Raw py-spy stacks stay in ``--work``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from poolserve_bench.bench_engine import model_shapes
from poolserve_bench.bench_systems import SYSTEM_WORKLOADS, body_stream, start, sweep_level
from poolserve_bench.checkpoints import save_checkpoint, word_count
from poolserve_bench.results_csv import write_csv
from poolserve_contract.wire import INSTANCE_COUNT
from poolserve_stack.processes import descendant_pids, free_port, wait_for_http
from poolserve_stack.triton_server import TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Frame groups, first match wins on "function (file)" of any frame of a sample, innermost first.
STUB_GROUPS = (
    ("read inputs (DLPack, validate, unpad)", ("read_sequences", "_input ", "to_dlpack", "from_dlpack")),
    ("pack", ("PackedBatch.pack", "pack (")),
    ("engine: pooling + head", ("pool", "score_head", "head_")),
    ("engine: forward (CPU side: launches, syncs)", ("forward", "engine.py", "varlen", "_run_chunk")),
    ("answer (split, output tensors)", ("split", "InferenceResponse", "Tensor.from_dlpack")),
    ("waiting for requests (Triton stub loop)", ("stub", "recv", "poll", "wait")),
)
ADAPTER_GROUPS = (
    ("tokenize", ("tokeniz", "encode_batch", "TextEncoder")),
    ("Triton call (build tensors, gRPC)", ("triton_gateway", "grpc", "InferInput", "infer")),
    ("JSON (parse, validate, serialise)", ("orjson", "json", "pydantic", "model_validate", "render")),
    ("HTTP and event loop", ("uvicorn", "h11", "httptools", "asyncio", "starlette", "fastapi", "select", "epoll")),
)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    binary = shutil.which("py-spy")
    if binary is None:
        return None
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def grouped_shares(raw: Path, groups) -> dict[str, float]:
    """Share of samples per group from py-spy's collapsed stacks ("frame;frame;... count")."""
    counts: collections.Counter = collections.Counter()
    total = 0
    if not raw.exists():
        return {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")[::-1]  # innermost first
        label = "other"
        for frame in frames:
            match = next((name for name, needles in groups if any(needle in frame for needle in needles)), None)
            if match:
                label = match
                break
        counts[label] += int(count)
        total += int(count)
    return {label: round(100 * n / total, 1) for label, n in counts.most_common()} if total else {}


def gpu_sampler() -> subprocess.Popen | None:
    if shutil.which("nvidia-smi") is None:
        return None
    return subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def gpu_busy_pct(sampler: subprocess.Popen | None) -> float | None:
    if sampler is None:
        return None
    sampler.terminate()
    out, _ = sampler.communicate(timeout=10)
    values = [float(v) for v in out.split() if v.replace(".", "").isdigit()]
    return round(statistics.mean(values), 1) if values else None


def profile_shape(shape, args, meta: dict, instances: int) -> list[dict]:
    checkpoint = save_checkpoint(shape, args.work / shape.name)
    folder = shape.family.folder
    workload = SYSTEM_WORKLOADS[shape.name][0]
    parameters = {"checkpoint": str(checkpoint), "served_model_name": shape.name,
                  **({INSTANCE_COUNT: str(instances)} if instances > 1 else {})}
    triton = TritonServer(PROJECT_ROOT / "model_repository", {folder: parameters},
                          log_path=args.work / f"{shape.name}-profile-triton.log", ready_timeout_s=600)
    rows = []
    adapter = None
    try:
        triton.start()
        port = free_port()
        adapter = start([sys.executable, "-m", "poolserve_adapter"], {
            "ADAPTER_TRITON_GRPC_URL": triton.grpc_url, "ADAPTER_PORT": str(port),
            "ADAPTER_MAX_SEQUENCES_PER_TRITON_REQUEST": "64", "ADAPTER_WORKERS": str(args.adapter_workers)},
            args.work / f"{shape.name}-profile-adapter.log")
        wait_for_http(f"http://127.0.0.1:{port}/health", adapter, 300)
        stream = body_stream(workload, shape.name, word_count(shape), seed=1)
        path = "/rerank" if workload.startswith("rerank") else "/classify"
        for concurrency in args.concurrency:
            level = list(itertools.islice(stream, concurrency + args.max_requests))
            stubs = [pid for pid in descendant_pids(triton.process.pid) if "triton_python_backend_stub" in cmdline(pid)]
            workers = [pid for pid in descendant_pids(adapter.pid) if "multiprocessing" in cmdline(pid)] or [adapter.pid]
            tag = f"{shape.name}-i{instances}-c{concurrency}"
            spies = [(role, pid, start_py_spy(pid, args.seconds, args.work / f"{tag}-{role}-{pid}.txt"))
                     for role, pids in (("stub", stubs), ("adapter", workers)) for pid in pids]
            sampler = gpu_sampler()
            pairs, seconds, latencies, _refused = asyncio.run(sweep_level(
                "http", level, [], concurrency, args.seconds, args.max_requests, triton.grpc_url, folder,
                f"http://127.0.0.1:{port}{path}", ""))
            busy = gpu_busy_pct(sampler)
            for _, _, spy in spies:
                if spy is not None:
                    spy.wait(timeout=60)
            base = {**meta, "model": shape.name, "workload": workload, "instances": instances,
                    "adapter_workers": args.adapter_workers, "concurrency": concurrency,
                    "pairs_per_s": round(pairs / seconds, 1), "p50_ms": round(1000 * statistics.median(latencies), 2),
                    "gpu_busy_pct": busy}
            print(f"{tag}: {base['pairs_per_s']} pairs/s, p50 {base['p50_ms']} ms, GPU busy {busy}%", flush=True)
            for role, groups in (("stub", STUB_GROUPS), ("adapter", ADAPTER_GROUPS)):
                merged = args.work / f"{tag}-{role}.txt"
                merged.write_text("".join(p.read_text(errors="replace") for p in args.work.glob(f"{tag}-{role}-*.txt")))
                shares = grouped_shares(merged, groups)
                print(f"  {role}: {shares}", flush=True)
                rows += [{**base, "process": role, "group": group, "share_pct": share} for group, share in shares.items()]
                if not shares:
                    rows.append({**base, "process": role, "group": "(py-spy unavailable)", "share_pct": None})
    finally:
        if adapter is not None:
            adapter.terminate()
            adapter.wait(timeout=30)
        triton.stop()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/profile-stack"))
    parser.add_argument("--models", nargs="*", default=["ms-marco-MiniLM-L6"])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--instance-counts", type=int, nargs="*", default=[1])
    parser.add_argument("--adapter-workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--max-requests", type=int, default=1200, help="bodies made per level (none repeats)")
    parser.add_argument("--name", default="")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
                python=platform.python_version(), commit=args.commit)
    rows = []
    for shape in model_shapes(args.smoke):
        if shape.name in args.models and shape.name in SYSTEM_WORKLOADS:
            for instances in args.instance_counts:
                rows += profile_shape(shape, args, meta, instances)
                write_csv(args.out / f"profile_stack{'_' + args.name if args.name else ''}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
