"""Kernel tests run the real kernels: on a GPU when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, so the root conftest sets
it for machines without CUDA; here we only pick the device.
"""

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
