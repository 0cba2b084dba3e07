"""LLM rerankers in their original form through the whole stack, with and without shared-prefix reuse.

    python -m poolserve_bench.bench_llm_rerankers --out benchmarks/results [--models NAME ...] [--smoke]

Per shape (random weights of the real config as a ``*ForCausalLM`` checkpoint named as published,
so the stack recognises it with no flag; a byte-level BPE trained here on the model's rendered
score template and synthetic words, so the template's text is a few dozen tokens as with the real
tokenizer), three systems behind HTTP ``/rerank`` with 64 documents of ~140 words per request:

* ``http_reuse``: this project, the documents' shared rendered prefix computed once per request;
* ``http_no_reuse``: the same checkpoint as a second Triton model with ``prefix_reuse=off``;
* ``baseline_http``: a plain FastAPI + HF server (``benchmarks/poolserve_bench/baseline_server.py --score-template``:
  renders the same prompts, one padded ``AutoModelForCausalLM`` forward per request).

No request body repeats within a run (each is drawn fresh), so no cache of any system can help.
Rows: pairs/s, p50/p99, and model-FLOP utilisation counted on the tokens actually computed (the
prefix once per request) and on the tokens the requests hold.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import torch

from poolserve_bench.bench_engine import Shape, flops_per_request, matmul_peak_tflops
from poolserve_bench.bench_systems import cpu_plan, cpu_set, pin_process_tree, start
from poolserve_bench.checkpoints import spell
from poolserve_bench.results_csv import write_csv
from poolserve_contract.score_templates import render, template_text
from poolserve_runtime import families, prefix_reuse
from poolserve_stack.plan import plan_models
from poolserve_stack.processes import free_port, wait_for_http
from poolserve_stack.triton_server import TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = 64
# name as published → (family, causal config, score template, label tokens the vocabulary must hold)
SHAPES = {
    "Qwen3-Reranker-0.6B": (families.QWEN3, dict(
        model_type="qwen3", vocab_size=151669, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
        tie_word_embeddings=True), "qwen3_reranker"),
    "mxbai-rerank-large-v2": (families.QWEN2, dict(  # Qwen2.5-1.5B
        model_type="qwen2", vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, intermediate_size=8960, max_position_embeddings=32768, tie_word_embeddings=True),
        "mxbai_rerank_v2"),
    "bge-reranker-v2-gemma": (families.GEMMA, dict(  # gemma-2b
        model_type="gemma", vocab_size=256000, hidden_size=2048, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, intermediate_size=16384, max_position_embeddings=8192),
        "bge_reranker_v2_gemma"),
}
SMOKE_SHAPES = {"Qwen3-Reranker-tiny": (families.QWEN3, dict(
    model_type="qwen3", vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=4096), "qwen3_reranker")}
WORDS = 8000


def words(rng: random.Random, count: int) -> str:
    return " ".join(spell(rng.randrange(WORDS)) for _ in range(count))


def rerank_body(rng: random.Random, model: str, documents: int = DOCUMENTS) -> dict:
    lengths = [max(8, min(int(math.exp(rng.gauss(math.log(140), 0.45))), 480)) for _ in range(documents)]
    return {"model": model, "query": words(rng, rng.randint(6, 20)), "documents": [words(rng, n) for n in lengths]}


def train_tokenizer(template: str, vocab_size: int, gemma: bool):
    """Byte-level BPE trained on rendered prompts: template words and synthetic words become tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [render(template, words(rng, 12), words(rng, 150)) for _ in range(600)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>"]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=min(vocab_size, WORDS + 4000), special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if gemma:  # the Gemma tokenizer adds BOS; bge-reranker-v2-gemma's template relies on it
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<bos>", model_max_length=8192)
    fast.add_tokens(["yes", "no", "Yes"])  # the label tokens, single tokens as in the real vocabularies
    return fast


def save_checkpoint(name: str, config: dict, template: str, directory: Path, device: torch.device) -> Path:
    import transformers as tf

    if (directory / "config.json").exists():
        return directory
    tokenizer = train_tokenizer(template, config["vocab_size"], config["model_type"] == "gemma")
    hf_config = tf.AutoConfig.for_model(**config, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(hf_config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory


async def closed_loop(url: str, make_body, concurrency: int, seconds: float, max_requests: int,
                      count=lambda body: len(body["documents"])):
    """Closed-loop clients; every request body is new (``make_body`` draws one per call). Returns
    (pairs answered, seconds, latencies of the answered requests, requests refused with 429/503); ``count``:
    the pairs a body holds (its documents)."""
    latencies: list[float] = []
    pairs = refused = 0
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def send():
            nonlocal pairs
            body = make_body()
            started = time.perf_counter()
            async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
                await r.read()
                if r.status in (429, 503):  # admission refused it: counted apart, no latency
                    return None, 0
                r.raise_for_status()
            return time.perf_counter() - started, count(body)

        await asyncio.gather(*(send() for _ in range(concurrency)))  # warm-up: connections, allocator
        begin = time.perf_counter()
        deadline, sent = begin + seconds, 0

        async def client():
            nonlocal pairs, sent, refused
            while (time.perf_counter() < deadline or not (latencies or refused)) and sent < max_requests:
                sent += 1
                latency, count = await send()
                if latency is None:
                    refused += 1
                    continue
                latencies.append(latency)
                pairs += count
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return pairs, time.perf_counter() - begin, latencies, refused


def token_counts(tokenizer, template: str, rng_seed: int, count: int = 8):
    """Mean tokens per pair as requested and as computed with reuse, and the prefix's share."""
    rng = random.Random(rng_seed)
    held = computed = pairs = 0
    for _ in range(count):
        body = rerank_body(rng, "x")
        rows = [torch.tensor(tokenizer(render(template, body["query"], d))["input_ids"]) for d in body["documents"]]
        shared = prefix_reuse.shared_prefix_length(rows)
        lengths = torch.tensor([len(r) for r in rows])
        held += int(lengths.sum())
        computed += int(lengths.sum()) - shared * (len(rows) - 1)
        pairs += len(rows)
    return held / pairs, computed / pairs, 1 - computed / held


def engine_rows(name, family, checkpoint, tokenizer, template, meta, peak, flops_of, requests: int = 16) -> list[dict]:
    """The packed engine alone on rerank batches as the dynamic batcher hands them over (``requests``
    64-document requests per run), with and without reuse: the GPU side of the HTTP rows."""
    import dataclasses

    from poolserve_runtime.engine import PackedEngine
    from poolserve_runtime.packing import PackedBatch, RequestSequences
    from poolserve_runtime.settings import ModelSettings

    rng = random.Random(7)
    batch_requests, lengths = [], []
    for _ in range(requests):
        body = rerank_body(rng, name)
        rows = [torch.tensor(tokenizer(render(template, body["query"], d))["input_ids"]) for d in body["documents"]]
        batch_requests.append(RequestSequences(torch.cat(rows), torch.tensor([len(r) for r in rows]), None))
        lengths.append(torch.tensor([len(r) for r in rows]))
    batch = PackedBatch.pack(batch_requests)
    settings = ModelSettings(model_name=name, checkpoint=str(checkpoint), device=torch.device("cuda"),
                             dtype=torch.bfloat16, max_tokens_per_forward=16384, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"), compile="auto")
    engine = PackedEngine.load(family, settings)
    rows = []
    for system, reuse in (("engine_no_reuse", "off"), ("engine_reuse", "auto")):
        # compile="none" here: the layers were compiled once, at load, and stay compiled modules
        engine = PackedEngine(family, engine.model, dataclasses.replace(settings, prefix_reuse=reuse, compile="none"))
        engine.run(batch)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            started = time.perf_counter()
            engine.run(batch)
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        pairs = batch.num_seqs
        rows.append({**meta, "model": name, "workload": f"rerank{DOCUMENTS}x{requests}", "system": system,
                     "concurrency": "", "requests": requests, "pairs_per_s": round(pairs / seconds, 1),
                     "p50_ms": round(1000 * seconds, 2), "p99_ms": "", "mfu_held_pct": round(
                         100 * flops_of(torch.cat(lengths)) / seconds / 1e12 / peak, 1)})
        print(f"{name:<24}{system:<15}      {rows[-1]['pairs_per_s']:>9.0f} pairs/s  {rows[-1]['p50_ms']} ms per "
              f"{requests} requests  MFU held {rows[-1]['mfu_held_pct']}%", flush=True)
    del engine
    torch.cuda.empty_cache()
    return rows


def bench_shape(name, family, config, template_name, args, meta, peak) -> list[dict]:
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    checkpoint = save_checkpoint(name, config, template_text(template_name), args.work / name, device)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    template = template_text(template_name)
    (triton_name, parameters), = plan_models([str(checkpoint)], PROJECT_ROOT / "model_repository").items()
    assert parameters.get("score_template") == template_name, "the checkpoint must be recognised with no flag"
    parameters = {**parameters, **dict(args.model_set)}
    plan = {triton_name: {**parameters, "served_model_name": name}}
    if "http_no_reuse" in args.systems:
        plan[f"{triton_name}-noreuse"] = {**parameters, "prefix_reuse": "off", "prefix_cache_tokens": "0",
                                          "served_model_name": f"{name}-noreuse"}
    rows: list[dict] = []
    if torch.cuda.is_available() and not args.smoke and not args.no_engine_rows:
        from poolserve_bench.bench_engine import build_model

        counter = Shape(name, family, {**config, "num_labels": 1}, ())
        meta_model = build_model(counter, torch.device("meta"), torch.bfloat16)
        rows += engine_rows(name, family, checkpoint, tokenizer, template, meta, peak,
                            lambda lengths: flops_per_request(counter, lengths, meta_model))
        if args.engine_only:
            return rows
    cpus = cpu_plan(args.pin_cpus)
    triton = TritonServer(PROJECT_ROOT / "model_repository", plan, log_path=args.work / f"{name}-triton.log",
                          ready_timeout_s=900)
    processes = []
    try:
        triton.start()
        if cpus["triton"]:
            pin_process_tree(triton.process.pid, cpu_set(cpus["triton"]))
        adapter_port, baseline_port = free_port(), free_port()
        processes.append(start([sys.executable, "-m", "poolserve_adapter"], {
            "ADAPTER_TRITON_GRPC_URL": triton.grpc_url, "ADAPTER_PORT": str(adapter_port),
            "ADAPTER_MAX_SEQUENCES_PER_TRITON_REQUEST": str(DOCUMENTS), "ADAPTER_WORKERS": str(args.adapter_workers)},
            args.work / f"{name}-adapter.log", cpus["adapter"]))
        if "baseline_http" in args.systems:
            processes.append(start([sys.executable, "-m", "poolserve_bench.baseline_server", str(checkpoint), "--port",
                                    str(baseline_port), "--score-template", template_name],
                                   {}, args.work / f"{name}-baseline.log", cpus["baseline"]))
        for process, url in zip(processes, (adapter_port, baseline_port)):
            wait_for_http(f"http://127.0.0.1:{url}/health", process, 600)
        held, computed, share = token_counts(tokenizer, template, 99)
        counter = Shape(name, family, {**config, "num_labels": 1}, ())
        from poolserve_bench.bench_engine import build_model

        meta_model = build_model(counter, torch.device("meta"), torch.bfloat16)
        flops_held = flops_per_request(counter, torch.tensor([round(held)]), meta_model)
        flops_computed = flops_per_request(counter, torch.tensor([round(computed)]), meta_model)
        rng = random.Random(12345)  # one stream of bodies for the whole run: none repeats
        systems = {"http_reuse": (f"http://127.0.0.1:{adapter_port}/rerank", name),
                   "http_no_reuse": (f"http://127.0.0.1:{adapter_port}/rerank", f"{name}-noreuse"),
                   "baseline_http": (f"http://127.0.0.1:{baseline_port}/rerank", name)}
        systems = {system: target for system, target in systems.items() if system in args.systems}
        for url, model in systems.values():  # compiled layers compile per new shape: kept out of the levels
            asyncio.run(closed_loop(url, lambda model=model: rerank_body(rng, model), 1, 3600.0, args.warmup))
        for concurrency in args.concurrency:
            for system, (url, model) in systems.items():
                pairs, seconds, latencies, refused = asyncio.run(closed_loop(
                    url, lambda model=model: rerank_body(rng, model), concurrency, args.seconds,
                    max(args.requests, 2 * concurrency)))
                rate = pairs / seconds
                computed_flops = flops_computed if system == "http_reuse" else flops_held
                row = {**meta, "model": name, "workload": f"rerank{DOCUMENTS}", "system": system,
                       "concurrency": concurrency, "requests": len(latencies), "refused": refused,
                       "pairs_per_s": round(rate, 1),
                       "p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
                       "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2) if latencies else None,
                       "tokens_per_pair_held": round(held, 1), "tokens_per_pair_computed": round(
                           computed if system == "http_reuse" else held, 1), "prefix_share": round(share, 3),
                       "mfu_computed_pct": round(100 * rate * computed_flops / 1e12 / peak, 1),
                       "mfu_held_pct": round(100 * rate * flops_held / 1e12 / peak, 1)}
                rows.append(row)
                print(f"{name:<24}{system:<15}c={concurrency:<3}{rate:>9.0f} pairs/s  refused {refused}/"
                      f"{refused + len(latencies)}  p50 {row['p50_ms']} ms  "
                      f"p99 {row['p99_ms']} ms  MFU computed {row['mfu_computed_pct']}% held {row['mfu_held_pct']}%  "
                      f"(prefix {100 * share:.0f}% of {held:.0f} tokens/pair)", flush=True)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        triton.stop()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--requests", type=int, default=64, help="request bound of one concurrency level")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-llm-rerankers"))
    parser.add_argument("--adapter-workers", type=int, default=4)
    parser.add_argument("--name", default="llm_rerankers")
    parser.add_argument("--pin-cpus", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--engine-only", action="store_true", help="only the engine rows (no servers)")
    parser.add_argument("--no-engine-rows", action="store_true", help="only the servers (no engine rows)")
    parser.add_argument("--warmup", type=int, default=12, help="requests per system, one at a time, before the levels")
    parser.add_argument("--systems", nargs="*", default=["http_reuse", "http_no_reuse", "baseline_http"])
    parser.add_argument("--model-set", type=lambda v: tuple(v.split("=", 1)), action="append", default=[],
                        metavar="KEY=VALUE", help="a parameter of the served model (e.g. prefix_cache_tokens=16384)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.seconds, args.requests, args.adapter_workers, args.warmup = [1, 2], 1.0, 3, 1, 1
    args.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not args.smoke
    peak = matmul_peak_tflops(torch.device("cuda")) if gpu else float("nan")
    meta = dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
                python=platform.python_version(), commit=args.commit, matmul_peak_tflops=round(peak, 1))
    rows = []
    for name, (family, config, template) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        if not args.models or name in args.models:
            rows += bench_shape(name, family, config, template, args, meta, peak)
            write_csv(args.out / f"{args.name}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
