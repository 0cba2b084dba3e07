"""CUDA graphs of the varlen body for small chunks: one graph per token bucket, captured at load.

A short request is launch-bound: one 37-token text through MiniLM-L6's eager packed forward is
hundreds of small kernels, 6.6 ms on an H200, where a CUDA graph of the same forward replays in
0.45 ms. A graph replays fixed shapes at fixed addresses, so :class:`GraphedVarlenBody` captures one
graph per **bucket** (16, 32, 64, ... tokens up to the ``cuda_graph_max_tokens`` parameter) over
static input buffers, and a chunk runs in the smallest bucket that holds it; a larger chunk runs
eagerly through the :class:`~poolserve_runtime.bodies.VarlenBody` it wraps.

A chunk of ``tokens`` tokens in ``n`` sequences fills a bucket of ``B`` tokens as (:class:`BucketInputs`):

* ``input_ids`` / ``token_type_ids`` ``[1, B]``: the chunk's tokens, then padding rows;
* ``cu_seqlens`` ``[B + 2]``: the chunk's ``n + 1`` boundaries, then ``B`` (one dummy sequence
  holding the padding rows), then ``B`` repeated (zero-length sequences up to the fixed count);
* ``position_ids`` ``[1, B]``: each real token's position in its sequence, the padding rows at the
  first position (inside the position table whatever the bucket);
* ``max_length`` = ``B``: any upper bound on the sequence lengths is valid for varlen attention.

Attention keeps sequences apart by ``cu_seqlens`` and every other op is per token, so the padding
rows never reach a real row: whatever ids they hold (the pad id, or an earlier chunk's tokens left
in the buffer) the real rows are those of the plain varlen forward. The graph captures
:func:`run_bucket`, the same function the CPU tests run eagerly on :meth:`BucketInputs.load`'s
buffers, so those tests check the exact padded computation the graphs replay.

Nothing in the captured forward may wait for the device. The stock HF bodies checked for it (BERT,
XLM-R, ERNIE, DistilBERT, ModernBERT, Qwen2/3, Llama, Mistral, Gemma, Phi-3, GPT-2 in transformers
5) read nothing back, with one exception handled upstream: ``masking_utils.find_packed_sequence_indices``
tests ``(packed_sequence_mask[:, -1] == 0).all()`` on the host for every forward given
``position_ids``, but skips the test while a stream is capturing (``is_tracing`` includes
``torch.cuda.is_current_stream_capturing``), and the varlen mask function ignores its result. Dynamic
RoPE (``rope_type`` "dynamic": ``if seq_len > max_seq_len_cached``) does wait, so such models run
eagerly (:func:`buckets_to_capture`). Positions and ``cu_seqlens`` are built on the host from the
chunk's host copy and copied in without a sync; ``max_length`` is a Python int.

All buckets share one graph memory pool, captured largest first so the smaller graphs reuse the
memory the larger one freed. Graphs sharing a pool may overwrite each other's outputs, so one replay
runs at a time (the engine's forwards are serial) and its real rows are copied out at once.
Compiled layers (``compile``) are not captured: an engine with compiled layers runs eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from poolserve_runtime import varlen
from poolserve_runtime.bodies import Chunk, VarlenBody

logger = logging.getLogger(__name__)

SMALLEST_BUCKET = 16
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # varlen attention's FlashAttention path (varlen.py)


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """Powers of two from 16 below ``max_tokens``, then ``max_tokens`` itself; none for 0."""
    buckets = []
    size = SMALLEST_BUCKET
    while size < max_tokens:
        buckets.append(size)
        size *= 2
    if max_tokens > 0:
        buckets.append(max_tokens)
    return tuple(buckets)


def bucket_for(tokens: int, sequences: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest of the ascending ``buckets`` that holds the chunk; None: it runs eagerly.
    ``cu_seqlens`` has ``B + 2`` entries, room for at most ``B`` real sequences."""
    for bucket in buckets:
        if tokens <= bucket and sequences <= bucket:
            return bucket
    return None


def padded_cu_seqlens(host_cu: torch.Tensor, bucket: int) -> torch.Tensor:
    """``[bucket + 2]`` int32 on the host: the chunk's boundaries, then the end of the dummy sequence
    of padding rows (``bucket``), then zero-length sequences ending there too."""
    layout = torch.full((bucket + 2,), bucket, dtype=torch.int32)
    layout[: host_cu.numel()] = host_cu
    return layout


def padded_positions(host_cu: torch.Tensor, bucket: int, position_offset: int) -> torch.Tensor:
    """``[1, bucket]`` int64 on the host: each real token's position in its sequence (plus the
    family's offset), the padding rows at the first position."""
    tokens = int(host_cu[-1])
    positions = torch.full((1, bucket), position_offset, dtype=torch.int64)
    positions[:, :tokens] = varlen.packed_positions(host_cu, tokens, position_offset)
    return positions


@dataclass(frozen=True)
class BucketInputs:
    """One bucket's inputs to the varlen body: a graph's static buffers (its replays read them where
    they are), or the buffers of an eager run of the same padded computation."""

    input_ids: torch.Tensor  # [1, bucket] int64
    position_ids: torch.Tensor  # [1, bucket] int64
    cu_seqlens: torch.Tensor  # [bucket + 2] int32
    token_type_ids: torch.Tensor | None  # [1, bucket] int64, for families that read token types

    @property
    def bucket(self) -> int:
        return self.input_ids.shape[1]

    @classmethod
    def allocate(cls, bucket: int, device: torch.device, pad_token_id: int, position_offset: int,
                 token_types: bool) -> BucketInputs:
        """Buffers holding a chunk of padding only (one dummy sequence of ``bucket`` pad ids)."""
        return cls(
            input_ids=torch.full((1, bucket), pad_token_id, dtype=torch.int64, device=device),
            position_ids=torch.full((1, bucket), position_offset, dtype=torch.int64, device=device),
            cu_seqlens=padded_cu_seqlens(torch.zeros(1, dtype=torch.int32), bucket).to(device),
            token_type_ids=torch.zeros((1, bucket), dtype=torch.int64, device=device) if token_types else None,
        )

    def load(self, chunk: Chunk, position_offset: int) -> None:
        """Write ``chunk`` in: its tokens first, the rest of the rows padding. The padding rows keep
        the ids they held (pad ids, or an earlier chunk's tokens): valid ids of a sequence of their
        own, which no real row sees, so they need no writing."""
        tokens = chunk.host_ids.numel()
        self.input_ids[:, :tokens].copy_(chunk.input_ids)
        # Built on the host from the chunk's host copy; an asynchronous copy does not wait for the device.
        self.position_ids.copy_(padded_positions(chunk.host_cu, self.bucket, position_offset), non_blocking=True)
        self.cu_seqlens.copy_(padded_cu_seqlens(chunk.host_cu, self.bucket), non_blocking=True)
        if self.token_type_ids is not None:
            if chunk.token_type_ids is None:
                self.token_type_ids.zero_()  # HF's default when a batch has no token types: segment 0
            else:
                self.token_type_ids[:, :tokens].copy_(chunk.token_type_ids)


def run_bucket(body: VarlenBody, inputs: BucketInputs) -> torch.Tensor:
    """``[bucket, hidden]``: the varlen body over a bucket's inputs, the forward a graph captures."""
    return body.packed_forward(inputs.input_ids, inputs.position_ids, inputs.cu_seqlens, inputs.bucket,
                               inputs.token_type_ids)


def host_sync_reason(model: torch.nn.Module) -> str | None:
    """Why ``model``'s forward waits for the device (so no graph can hold it), or None."""
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        kinds = rope_type.values() if isinstance(rope_type, dict) else (rope_type,)  # dict: per layer type
        if any(isinstance(kind, str) and "dynamic" in kind for kind in kinds):
            return "dynamic RoPE compares the longest position with its cache on the host"
    return None


def buckets_to_capture(body: object, device: torch.device, dtype: torch.dtype, max_tokens: int,
                       compiled: bool) -> tuple[int, ...]:
    """The buckets an engine captures graphs for: none unless its body is the varlen one on CUDA in
    fp16 / bf16 (the fp32 attention fallback reads ``cu_seqlens`` on the host), its layers are not
    compiled, and its forward never waits for the device."""
    if not (isinstance(body, VarlenBody) and device.type == "cuda" and dtype in FLASH_DTYPES and not compiled):
        return ()
    reason = host_sync_reason(body.model)
    if reason is not None:
        logger.info("no CUDA graphs: %s", reason)
        return ()
    return token_buckets(max_tokens)


@dataclass(frozen=True)
class BucketGraph:
    graph: torch.cuda.CUDAGraph
    inputs: BucketInputs  # the static buffers the graph reads
    output: torch.Tensor  # [bucket, hidden], the graph's own buffer, rewritten by every replay


class GraphedVarlenBody:
    """The varlen body with a CUDA graph per bucket: a chunk that fits a bucket replays its graph, a
    larger one runs through ``body`` eagerly. Returns ``[tokens, hidden]`` like every body."""

    def __init__(self, body: VarlenBody, buckets: tuple[int, ...], pad_token_id: int, device: torch.device):
        self.body = body
        self.buckets = tuple(sorted(buckets))
        self.graphs: dict[int, BucketGraph] = {}
        token_types = body.family.uses_token_types
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device), torch.inference_mode():
            for bucket in sorted(buckets, reverse=True):  # largest first: the smaller reuse its freed memory
                inputs = BucketInputs.allocate(bucket, device, pad_token_id, body.position_offset, token_types)
                self.graphs[bucket] = self.capture(inputs, pool)

    def capture(self, inputs: BucketInputs, pool) -> BucketGraph:
        """Warm up on a side stream (lazy initialisation, cuBLAS workspaces: kept out of the graph),
        then capture, as PyTorch's CUDA graph notes do it."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_bucket(self.body, inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = run_bucket(self.body, inputs)
        return BucketGraph(graph, inputs, output)

    @torch.inference_mode()  # the static buffers are inference tensors: they are written in place
    def hidden_states(self, chunk: Chunk) -> torch.Tensor:
        tokens = chunk.host_ids.numel()
        bucket = bucket_for(tokens, chunk.host_cu.numel() - 1, self.buckets)
        if bucket is None:
            return self.body.hidden_states(chunk)
        bucket_graph = self.graphs[bucket]
        bucket_graph.inputs.load(chunk, self.body.position_offset)
        bucket_graph.graph.replay()
        # Copied out: the next replay of any bucket may overwrite this buffer (one pool).
        return bucket_graph.output[:tokens].clone()


def graphed_or_eager(body: VarlenBody, buckets: tuple[int, ...], pad_token_id: int, device: torch.device,
                     vocab_size: int) -> tuple[VarlenBody | GraphedVarlenBody, tuple[int, ...]]:
    """The graphed body and its buckets, checked at load against the eager body on a few sequences; the
    eager body and no buckets, with a warning, when capture fails or a replay disagrees. A model whose
    forward cannot be captured is then served as before, only slower, instead of failing to load."""
    try:
        graphed = GraphedVarlenBody(body, buckets, pad_token_id, device)
        mismatch = replay_mismatch(graphed, body, device, vocab_size)
    except Exception as error:  # any capture failure: the eager body still works
        # A capture that failed inside torch.cuda.graph leaves its side stream current.
        torch.cuda.set_stream(torch.cuda.default_stream(device))
        logger.warning("CUDA graphs off: capturing the forward failed (%s: %s); running it eagerly",
                       type(error).__name__, error)
        return body, ()
    if mismatch is not None:
        logger.warning("CUDA graphs off: a replay differs from the eager forward (%s); running it eagerly", mismatch)
        return body, ()
    return graphed, buckets


def replay_mismatch(graphed: GraphedVarlenBody, body: VarlenBody, device: torch.device,
                    vocab_size: int) -> str | None:
    """How a replay of three short sequences differs from the eager forward beyond bf16 rounding; None if not."""
    generator = torch.Generator().manual_seed(0)
    host_cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    host_ids = torch.randint(0, vocab_size, (int(host_cu[-1]),), generator=generator)
    chunk = Chunk(input_ids=host_ids.to(device), cu_seqlens=host_cu.to(device), host_ids=host_ids, host_cu=host_cu,
                  max_length=9, token_type_ids=None)
    with torch.inference_mode():
        replayed = graphed.hidden_states(chunk).float()
        eager = body.hidden_states(chunk).float()
    error = float((replayed - eager).abs().max())
    scale = float(eager.abs().max()) or 1.0
    return None if error <= 0.05 * scale else f"largest difference {error:.3g} at a scale of {scale:.3g}"
