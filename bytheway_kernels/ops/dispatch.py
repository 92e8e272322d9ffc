"""Which backend an op runs on: one rule for every op in `bytheway_kernels.ops`.

`BYTHEWAY_BACKEND=reference|triton|cpp` forces one; otherwise CUDA tensors use Triton and CPU
tensors use the compiled C++ kernel when it is built, else the pure-torch reference.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("reference", "triton", "cpp")
BACKEND_ENV = "BYTHEWAY_BACKEND"


def select_backend(device: torch.device) -> str:
    """The backend the ops use for tensors on `device` (honours BYTHEWAY_BACKEND).

    Called on every eager op call, so the common case (no override) does one environment lookup.
    """
    forced = os.environ.get(BACKEND_ENV)
    if forced and forced.strip():
        forced = forced.strip().lower()
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not one of {BACKENDS}")
        return forced
    device_type = device.type
    if device_type == "cuda":
        return "triton"
    if device_type == "cpu" and _cpp_available():
        return "cpp"
    return "reference"


@functools.lru_cache(maxsize=None)
def _cpp_module():
    from .attention_probs import cpp  # imported once, on first use (not for CUDA-only callers)

    return cpp


def _cpp_available() -> bool:
    return _cpp_module().cpp_status().available  # builds the C++ kernel on first use (cached)
