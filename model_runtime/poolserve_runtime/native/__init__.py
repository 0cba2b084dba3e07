"""Architectures that upstream ships only as remote code, served by the project's own modules.

Each module here builds the model from ``config.json`` and the checkpoint's weights without
importing the checkpoint's Python files (remote code never runs unless the user asks for the
generic path with ``trust_remote_code``), and exposes the implementation (``FAMILY``, a
:class:`~poolserve_runtime.implementations.Family`) of a family declared in :mod:`poolserve_contract.families`.
Golden outputs recorded once from the upstream code pin them down (``tests/goldens/``).
"""

from poolserve_runtime.native import (
            gte_new,
            internlm2,
            llama_bidirectional,
            llama_nemotron_vl,
            llama_normal_weights,
            nomic_bert,
            qwen2_reward,
)

FAMILIES: tuple = (gte_new.FAMILY, gte_new.EMBEDDING_FAMILY, nomic_bert.FAMILY, llama_bidirectional.FAMILY,
            llama_normal_weights.FAMILY, internlm2.FAMILY, qwen2_reward.FAMILY, llama_nemotron_vl.FAMILY)
