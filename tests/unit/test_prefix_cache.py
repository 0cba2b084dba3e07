"""The prefix cache across requests gives the scores of computing every prefix (fp32 CPU, 1e-5).

A tiny Qwen3 / Qwen2 reranker on the varlen body with the cache on against the same engine with it
off: the same request twice, requests sharing only the system-prompt part, a batch mixing a hit and
a miss, small token budgets that split batches into chunks, a lone document, eviction under a small
budget; the cache off runs today's reused streams bit for bit; cached blocks are not computed again.
"""

from __future__ import annotations

import pytest
import torch

from poolserve_runtime import families, prefix_reuse
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.prefix_cache import BLOCK_TOKENS, PrefixCache
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import build_checkpoint

FAMILIES = {"qwen3": families.QWEN3, "qwen2": families.QWEN2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_cache")
    return {kind: build_checkpoint(kind, root / kind) for kind in FAMILIES}


def engine(checkpoint, kind: str, cache_tokens: int, budget: int = 16384) -> PackedEngine:
    settings = ModelSettings(model_name="cache", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"), compile="none",
                             prefix_cache_tokens=cache_tokens)
    return PackedEngine.load(FAMILIES[kind], settings)


def ids(seed: int, length: int) -> torch.Tensor:
    return torch.randint(5, 200, (length,), generator=torch.Generator().manual_seed(seed))


SYSTEM = ids(1, 45)  # the template's system prompt and instruction: every request's first tokens


def rerank(query_seed: int, document_lengths: list[int], document_seed: int = 0) -> RequestSequences:
    prefix = torch.cat([SYSTEM, ids(100 + query_seed, 13)])  # 58 tokens: 3 full blocks, then 10 more
    rows = [torch.cat([prefix, ids(1000 + document_seed + i, n)]) for i, n in enumerate(document_lengths)]
    return RequestSequences(torch.cat(rows), torch.tensor([len(r) for r in rows]), None)


def assert_same_scores(got: dict, expected: dict) -> None:
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_the_same_request_twice_hits_and_scores_as_computed(checkpoints, kind):
    plain, cached = engine(checkpoints[kind], kind, 0), engine(checkpoints[kind], kind, 4096)
    batch = PackedBatch.pack([rerank(0, [5, 30, 1, 12])])
    expected = plain.run(batch)
    first = cached.run(batch)
    stats = cached.prefix_cache.stats
    assert (stats.lookups, stats.hits, stats.inserted_tokens) == (1, 0, 3 * BLOCK_TOKENS)
    second = cached.run(batch)
    assert (stats.lookups, stats.hits, stats.hit_tokens) == (2, 1, 3 * BLOCK_TOKENS)
    assert_same_scores(first, expected)
    assert_same_scores(second, expected)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_requests_sharing_only_the_system_prompt_hit_its_blocks(checkpoints, kind):
    plain, cached = engine(checkpoints[kind], kind, 4096), engine(checkpoints[kind], kind, 0)
    plain, cached = cached, plain  # the cache off is the reference
    cached.run(PackedBatch.pack([rerank(0, [7, 9])]))
    batch = PackedBatch.pack([rerank(1, [4, 22, 3], document_seed=50)])
    got = cached.run(batch)
    stats = cached.prefix_cache.stats
    # The two prefixes agree on SYSTEM's 45 tokens: blocks 0 and 1 (32 tokens) are read, not computed.
    assert (stats.hits, stats.hit_tokens) == (1, 2 * BLOCK_TOKENS)
    assert_same_scores(got, plain.run(batch))


@pytest.mark.parametrize("budget", [16384, 60])
def test_a_batch_mixing_a_hit_and_a_miss(checkpoints, budget):
    """``budget`` 60 puts each request in a forward of its own (chunks after a store read it)."""
    plain, cached = engine(checkpoints["qwen3"], "qwen3", 0, budget), engine(checkpoints["qwen3"], "qwen3", 4096, budget)
    cached.run(PackedBatch.pack([rerank(0, [6, 6])]))
    unrelated = ids(7, 40)
    batch = PackedBatch.pack([
        RequestSequences(torch.cat([unrelated, ids(8, 20), unrelated, ids(9, 3)]), torch.tensor([60, 43]), None),
        rerank(0, [11, 2, 17], document_seed=20),  # its whole prefix's full blocks are cached
        rerank(2, [8], document_seed=40),  # one document: its prompt up to its last token is looked up
        RequestSequences(ids(10, 25), torch.tensor([12, 13]), None),  # nothing shared
    ])
    got = cached.run(batch)
    stats = cached.prefix_cache.stats
    # The first run missed; now the unrelated pair's 40 shared tokens miss, the other two hit.
    assert (stats.lookups, stats.hits) == (1 + 3, 2)
    assert_same_scores(got, plain.run(batch))
    # Run again: every cached prefix now hits, and the scores stay.
    assert_same_scores(cached.run(batch), plain.run(batch))
    assert stats.hits == 2 + 3


def test_a_cached_prefix_is_not_computed_again(checkpoints):
    cached = engine(checkpoints["qwen3"], "qwen3", 4096)
    batch = PackedBatch.pack([rerank(0, [5, 30, 1, 12])])
    (first,) = cached.reused_prefix_chunks(batch)
    cached.run(batch)
    (second,) = cached.reused_prefix_chunks(batch)
    assert first.cached_kv is None and first.capture_rows.numel() == 3 * BLOCK_TOKENS
    assert second.tokens == first.tokens - 3 * BLOCK_TOKENS and second.capture_rows is None
    assert second.cached_kv.shape[2] == 3 * BLOCK_TOKENS
    assert int(second.positions[0]) == 3 * BLOCK_TOKENS  # the stream continues after the cached part


def test_eviction_keeps_the_budget_and_the_scores(checkpoints):
    plain, cached = engine(checkpoints["qwen3"], "qwen3", 0), engine(checkpoints["qwen3"], "qwen3", 12 * BLOCK_TOKENS)
    cache, stats = cached.prefix_cache, cached.prefix_cache.stats
    # Each request stores 3 blocks (a quarter of the budget): SYSTEM's 2, shared by all, and 1 with
    # its query's first tokens. 12 queries make 14 blocks: the 2 least recently used go.
    for query in range(12):
        batch = PackedBatch.pack([rerank(query, [3, 9])])
        assert_same_scores(cached.run(batch), plain.run(batch))
        assert cache.cached_tokens <= cache.budget_tokens
    assert (stats.lookups, stats.hits, stats.misses) == (12, 11, 1)
    assert (stats.inserted_tokens, stats.evicted_tokens) == (14 * BLOCK_TOKENS, 2 * BLOCK_TOKENS)
    for query, hit_blocks in ((0, 2), (11, 3)):  # query 0's own block was evicted; SYSTEM's stayed
        before = stats.hit_tokens
        batch = PackedBatch.pack([rerank(query, [3, 9])])
        assert_same_scores(cached.run(batch), plain.run(batch))
        assert stats.hit_tokens - before == hit_blocks * BLOCK_TOKENS


def test_lru_evicts_the_least_recently_used_leaf_first():
    cache = PrefixCache(budget_tokens=16 * BLOCK_TOKENS, layers=1, kv_heads=1, head_dim=2, dtype=torch.float32,
                        device=torch.device("cpu"))

    def store(prefix: list[int]) -> None:
        hit = cache.lookup(prefix)
        blocks = cache.storable_blocks(len(prefix))
        new = blocks - len(hit)
        captured = torch.arange(new * BLOCK_TOKENS * 4, dtype=torch.float32).reshape(1, 2, -1, 1, 2)
        cache.store((prefix_reuse.PendingStore(tuple(prefix[:blocks * BLOCK_TOKENS]), tuple(hit), 0),), captured)

    shared = list(range(2 * BLOCK_TOKENS))
    store(shared + [100] * BLOCK_TOKENS * 2)  # 4 blocks (a quarter of the budget)
    store(shared + [200] * BLOCK_TOKENS * 2)  # 2 new blocks
    store(shared + [300] * BLOCK_TOKENS * 2)  # 2 new blocks
    store(shared + [100] * BLOCK_TOKENS * 2)  # a hit: touched
    assert cache.cached_tokens == 8 * BLOCK_TOKENS
    cache.budget_tokens = 6 * BLOCK_TOKENS
    store(list(range(500, 500 + BLOCK_TOKENS)))  # one new block: 200's two blocks go, then 300's leaf
    assert cache.stats.evicted_tokens == 3 * BLOCK_TOKENS
    assert len(cache.lookup(shared + [100] * BLOCK_TOKENS * 2)) == 4
    assert len(cache.lookup(shared + [200] * BLOCK_TOKENS * 2)) == 2  # its own blocks were evicted
    assert len(cache.lookup(shared + [300] * BLOCK_TOKENS * 2)) == 3


def test_a_hit_compares_token_ids_not_only_hashes():
    cache = PrefixCache(budget_tokens=64, layers=1, kv_heads=1, head_dim=1, dtype=torch.float32,
                        device=torch.device("cpu"))
    prefix = list(range(BLOCK_TOKENS))
    cache.store((prefix_reuse.PendingStore(tuple(prefix), (), 0),), torch.zeros(1, 2, BLOCK_TOKENS, 1, 1))
    assert len(cache.lookup(prefix)) == 1
    assert cache.lookup(prefix[:-1] + [-1]) == [] and cache.lookup(prefix[1:] + [0]) == []


def test_cache_off_runs_today_s_reused_streams(checkpoints):
    off = engine(checkpoints["qwen3"], "qwen3", 0)
    assert off.prefix_cache is None and off.reuses_prefix
    batch = PackedBatch.pack([rerank(0, [5, 30]), rerank(1, [9])])
    (chunk,) = off.reused_prefix_chunks(batch)
    assert chunk.cached_kv is None and chunk.capture_rows is None and not chunk.stores
    # The prefix (58) once, then each suffix; a lone document is one plain segment (58 + 9 = 67).
    prefix, first, second, lone = (torch.arange(a, b) for a, b in ((0, 58), (58, 63), (63, 93), (93, 160)))
    assert torch.equal(chunk.key_index, torch.cat([prefix, prefix, first, prefix, second, lone]))
    assert chunk.cu_seqlens_q.tolist() == [0, 58, 63, 93, 160]
    assert torch.equal(chunk.positions, torch.cat([torch.arange(63), torch.arange(58, 88), torch.arange(67)]))
    first_run, second_run = off.run(batch), off.run(batch)
    for name in first_run:
        assert torch.equal(first_run[name], second_run[name])


def test_the_budget_parameter_is_a_whole_number_off_by_default():
    from poolserve_contract.parameters import ModelParameters

    assert ModelParameters.from_mapping({}).prefix_cache_tokens == 0  # off until measured on a GPU
    assert ModelParameters.from_mapping({"prefix_cache_tokens": "4096"}).prefix_cache_tokens == 4096
    with pytest.raises(ValueError, match="prefix_cache_tokens parameter '-1' is not a whole number"):
        ModelParameters.from_mapping({"prefix_cache_tokens": "-1"})


def test_a_budget_too_small_to_store_a_prefix_is_refused():
    from poolserve_contract.parameters import MIN_PREFIX_CACHE_TOKENS, ModelParameters

    assert ModelParameters.from_mapping({"prefix_cache_tokens": str(MIN_PREFIX_CACHE_TOKENS)}).prefix_cache_tokens == 64
    with pytest.raises(ValueError, match="too small to store a prefix"):
        ModelParameters.from_mapping({"prefix_cache_tokens": "63"})
