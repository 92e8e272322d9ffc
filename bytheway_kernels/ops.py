"""The `torch.ops.bytheway.attention_probs` custom op and its backend dispatch.

The op's schema is declared once, here, with `torch.library.custom_op`; every backend (Triton,
the compiled C++ kernel from `csrc/`, the pure-torch reference) is a plain function with the
same arguments that the op's real implementation calls. The fake implementation only allocates
outputs, so the op traces under `torch.compile(fullgraph=True)`.

Backend choice: `BYTHEWAY_BACKEND=reference|triton|cpp` forces one; otherwise CUDA tensors use
Triton and CPU tensors use the C++ kernel when it is built, else the reference.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import reference

BACKENDS = ("reference", "triton", "cpp")
BACKEND_ENV = "BYTHEWAY_BACKEND"


def stats_rows(batch: int, parts: int, energy_scope: str) -> int:
    """Rows of the stats output: one for the batch scope, one per video for the sample scope."""
    return 1 if energy_scope == "batch" else batch // parts


def _reference_backend(scores, guide, alpha, beta, tau, adaptive_beta, parts, energy_part,
                       energy_scope, guide_upsample, beta_max, with_stats):
    result = reference.bytheway_attention_probs(
        scores, guide, alpha=alpha, beta=beta, tau=tau, adaptive_beta=adaptive_beta,
        energy_scope=energy_scope, guide_upsample=guide_upsample, beta_max=beta_max,
        return_stats=with_stats, batch_split=(parts, energy_part),
    )
    if with_stats:
        return result
    return result, scores.new_empty((0, 6), dtype=torch.float32)


def _fused_backend(load_out_launcher):
    """A backend from a fused kernel's `*_out` launcher: allocate the outputs, launch into them."""

    def run(scores, guide, alpha, beta, tau, adaptive_beta, parts, energy_part, energy_scope,
            guide_upsample, beta_max, with_stats):
        probs = torch.empty_like(scores, memory_format=torch.contiguous_format)
        rows = stats_rows(scores.shape[0], parts, energy_scope) if with_stats else 0
        stats = scores.new_empty((rows, 6), dtype=torch.float32)
        load_out_launcher()(scores, guide, alpha, beta, tau, adaptive_beta, parts, energy_part,
                            energy_scope, guide_upsample, beta_max, probs,
                            stats if with_stats else None)
        return probs, stats

    return run


def _triton_out_launcher():
    from .triton_kernels import attention_probs_triton_out  # imports triton only when used

    return attention_probs_triton_out


def _cpp_out_launcher():
    from .cpp_backend import attention_probs_cpp_out

    return attention_probs_cpp_out


_BACKEND_FUNCTIONS = {
    "reference": _reference_backend,
    "triton": _fused_backend(_triton_out_launcher),
    "cpp": _fused_backend(_cpp_out_launcher),
}


def select_backend(device: torch.device) -> str:
    """The backend the op uses for tensors on `device` (honours BYTHEWAY_BACKEND)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not one of {BACKENDS}")
        return forced
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        from .cpp_backend import cpp_status

        if cpp_status().available:
            return "cpp"
    return "reference"


@torch.library.custom_op("bytheway::attention_probs", mutates_args=())
def attention_probs(
    scores: torch.Tensor,
    guide: Optional[torch.Tensor],
    alpha: float,
    beta: float,
    tau: int,
    adaptive_beta: bool,
    parts: int,
    energy_part: int,
    energy_scope: str,
    guide_upsample: str,
    beta_max: Optional[float],
    with_stats: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ByTheWay map op on (B, H, W, heads, F, F) scores; returns (probs, stats).

    `stats` is float32 (rows, 6) = (beta, E1, E2, E2_low, E2_high, E3) when `with_stats`, else an
    empty (0, 6) tensor. Arguments are validated by `bytheway_kernels.bytheway_attention_probs`.
    """
    backend = _BACKEND_FUNCTIONS[select_backend(scores.device)]
    return backend(scores, guide, alpha, beta, tau, adaptive_beta, parts, energy_part,
                   energy_scope, guide_upsample, beta_max, with_stats)


@attention_probs.register_fake
def _(scores, guide, alpha, beta, tau, adaptive_beta, parts, energy_part, energy_scope,
      guide_upsample, beta_max, with_stats):
    rows = stats_rows(scores.shape[0], parts, energy_scope) if with_stats else 0
    probs = torch.empty_like(scores, memory_format=torch.contiguous_format)
    return probs, scores.new_empty((rows, 6), dtype=torch.float32)
