"""The prefix cache across requests: engine throughput of LLM-reranker requests with it on and off.

    python -m poolserve_bench.bench_prefix_cache --out benchmarks/results [--models NAME ...] [--smoke]

Requests are shaped as an LLM reranker's rendered prompts (Qwen3-Reranker's template): every request
starts with the same system prompt and instruction (``--shared-tokens``), then its query (6-20
tokens, drawn from ``--queries`` distinct ones, so queries come back as in real traffic), then each
document (log-normal lengths, median ~140 tokens) and the template's fixed tail. ``--batch``
requests go to the engine at once, as Triton's dynamic batcher would hand them over. Random
weights of the real config (no hub), one process, bf16 on a GPU (fp32 on the CPU).

Two systems on the same model, both with the within-request shared-prefix reuse:

* ``cache_off``: ``prefix_cache_tokens=0`` (each request computes its prefix once);
* ``cache_on``: ``prefix_cache_tokens=--cache-tokens``: prefixes' keys and values are kept across
  requests, so a request computes only what no earlier request had (after a warm-up pass, so the
  timed requests see a warm cache as a serving instance does).

Reported per system: pairs/s, tokens computed per pair, and for ``cache_on`` the cache's hit rate
(prefix tokens read / looked up), hits / lookups and evicted tokens.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from poolserve_bench.bench_engine import build_model, model_shapes, synchronize
from poolserve_bench.results_csv import write_csv
from poolserve_runtime import prefix_reuse
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.prefix_cache import PrefixCacheStats
from poolserve_runtime.settings import ModelSettings

# Qwen3-Reranker's template after the document: "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
TAIL_TOKENS = 12


def requests(vocab: int, count: int, shared_tokens: int, queries: int, documents: int,
             seed: int) -> list[RequestSequences]:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(5, vocab, (n,), generator=generator)  # noqa: E731
    shared, tail = draw(shared_tokens), draw(TAIL_TOKENS)
    pool = [draw(int(torch.randint(6, 21, (1,), generator=generator))) for _ in range(queries)]
    out = []
    for _ in range(count):
        prefix = torch.cat([shared, pool[int(torch.randint(queries, (1,), generator=generator))]])
        lengths = torch.exp(torch.randn(documents, generator=generator) * 0.45 + math.log(140)).long().clamp(8, 480)
        rows = [torch.cat([prefix, draw(int(n)), tail]) for n in lengths]
        out.append(RequestSequences(torch.cat(rows), torch.tensor([len(r) for r in rows]), None))
    return out


def batches(per_request: list[RequestSequences], size: int) -> list[PackedBatch]:
    return [PackedBatch.pack(per_request[i:i + size]) for i in range(0, len(per_request), size)]


def computed_tokens_without_cache(batch: PackedBatch, max_tokens: int) -> int:
    chunks = prefix_reuse.plan_chunks(batch.input_ids, batch.cu_seqlens, batch.sequences_per_request, max_tokens)
    return sum(chunk.tokens for chunk in chunks) if chunks else int(batch.lengths.sum())


def run(args, device: torch.device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, commit=args.commit)
    rows = []
    for shape in model_shapes(args.smoke):
        if not (shape.family.causal and shape.family.packed) or (args.models and shape.name not in args.models):
            continue
        model = build_model(shape, device, dtype)
        for documents in args.documents:
            rows += measure(args, shape, model, documents, device, dtype, meta)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_csv(args.out / "prefix_cache.csv", rows)
    return rows


def measure(args, shape, model, documents: int, device: torch.device, dtype: torch.dtype, meta: dict) -> list[dict]:
    """Both systems on requests of ``documents`` documents each."""
    rows = []
    vocab = shape.config["vocab_size"]
    warm = batches(requests(vocab, args.requests // 4, args.shared_tokens, args.queries, documents, 0), args.batch)
    timed = batches(requests(vocab, args.requests, args.shared_tokens, args.queries, documents, 1), args.batch)
    pairs = sum(batch.num_seqs for batch in timed)
    held = sum(int(batch.lengths.sum()) for batch in timed)
    for system, cache_tokens in (("cache_off", 0), ("cache_on", args.cache_tokens)):
        settings = ModelSettings(
            model_name=shape.name, checkpoint="<random>", device=device, dtype=dtype,
            max_tokens_per_forward=args.max_tokens, max_model_len=4096, logit_mean=0.0, logit_sigma=1.0,
            attention="varlen", output_names=("logits", "scores"),
            # The model's layers stay compiled once the first engine compiled them.
            compile="layers" if args.compile and system == "cache_off" else "none",
            prefix_cache_tokens=cache_tokens)
        engine = PackedEngine(shape.family, model, settings)
        for batch in warm:
            engine.run(batch)
        cache = engine.prefix_cache
        if cache is not None:
            cache.stats = PrefixCacheStats()  # count the timed requests only
        synchronize(device)
        start = time.perf_counter()
        for batch in timed:
            engine.run(batch)
        synchronize(device)
        seconds = time.perf_counter() - start
        computed = (cache.stats.computed_tokens if cache is not None
                    else sum(computed_tokens_without_cache(b, args.max_tokens) for b in timed))
        row = {**meta, "model": shape.name, "system": system, "requests": args.requests, "batch": args.batch,
               "documents": documents, "shared_tokens": args.shared_tokens, "queries": args.queries,
               "cache_tokens": cache_tokens, "pairs": pairs, "seconds": round(seconds, 4),
               "pairs_per_s": round(pairs / seconds, 1), "held_tokens_per_pair": round(held / pairs, 1),
               "computed_tokens_per_pair": round(computed / pairs, 1)}
        if cache is not None:
            stats = cache.stats
            row.update(hit_rate=round(stats.hit_rate, 4), lookups=stats.lookups, hits=stats.hits,
                       hit_tokens=stats.hit_tokens, evicted_tokens=stats.evicted_tokens,
                       cached_tokens=cache.cached_tokens)
        rows.append(row)
        print(f"{shape.name:<24}{documents:>3} docs  {system:<10} {row['pairs_per_s']:>9.1f} pairs/s  computed "
              f"{row['computed_tokens_per_pair']:>6.1f} of {row['held_tokens_per_pair']:.1f} tokens/pair"
              + (f"  hit rate {row['hit_rate']:.1%} ({stats.hits}/{stats.lookups} prefixes hit, "
                 f"{stats.evicted_tokens} tokens evicted)" if cache is not None else ""))
        del engine
    off, on = rows
    print(f"{shape.name:<24}{documents:>3} docs  cache on / off: x{on['pairs_per_s'] / off['pairs_per_s']:.3f}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--models", nargs="*", default=None, help="causal model shape names (default: all)")
    parser.add_argument("--requests", type=int, default=256, help="timed requests per system")
    parser.add_argument("--batch", type=int, default=4, help="requests per engine call")
    parser.add_argument("--documents", type=int, nargs="+", default=[1, 16],
                        help="documents per request (1: /score of one pair, where the prefix is most of the prompt)")
    parser.add_argument("--shared-tokens", type=int, default=96, help="system prompt + instruction tokens")
    parser.add_argument("--queries", type=int, default=64, help="distinct queries the requests draw from")
    parser.add_argument("--cache-tokens", type=int, default=16384, help="prefix_cache_tokens of cache_on")
    parser.add_argument("--max-tokens", type=int, default=16384, help="max_tokens_per_forward")
    parser.add_argument("--compile", action="store_true", help="torch.compile the layers (the GPU default)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.documents = min(args.requests, 16), [min(n, 4) for n in args.documents]
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    return run(args, device)


if __name__ == "__main__":
    main()
