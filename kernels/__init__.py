"""Pooling, score-head and similarity operations on packed (unpadded) hidden states.

Every operation takes hidden states ``[total_tokens, hidden]`` and ``cu_seqlens`` ``[num_seqs + 1]``
(int32, starting at 0), so no padding is ever read. ``pooling`` holds the torch implementations
used on CPU and as the reference for the GPU kernels.
"""

from kernels.pooling import POOLING_METHODS, pool, pool_reference

__all__ = ["POOLING_METHODS", "pool", "pool_reference"]
