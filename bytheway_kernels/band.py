"""The Fourier band step as a real matrix (docs/DESIGN.md, section 2).

"DFT along the last axis, scale the band K = {F//2 - tau, ..., F//2 + tau} by beta, inverse DFT,
real part" equals `a + (beta - 1) * a @ P` for each row a, where P is the real symmetric circulant
P[s, j] = c[(j - s) mod F], c[n] = (1/F) * sum_{k in K} cos(2 pi k n / F). The band's energy is
<a, a @ P> = (1/F) * sum_{k in K} |DFT(a)_k|^2.
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import torch


def max_tau(frames: int) -> int:
    """Largest valid tau for F frames: the band [F//2 - tau, F//2 + tau] must stay in [1, F-1].

    Examples:
        >>> max_tau(16), max_tau(15)
        (7, 6)
    """
    return (frames - 2) // 2


def high_band(frames: int, tau: int) -> range:
    """The DFT indices scaled by beta: c - tau .. c + tau with c = F // 2.

    Examples:
        >>> list(high_band(16, 2))
        [6, 7, 8, 9, 10]
    """
    centre = frames // 2
    return range(centre - tau, centre + tau + 1)


def _checked_band(frames: int, tau: int) -> range:
    """`high_band(frames, tau)`, or a ValueError where tau is out of range for F."""
    if not 0 <= tau <= max_tau(frames):
        raise ValueError(f"tau={tau} is out of range for F={frames} (0 <= tau <= {max_tau(frames)})")
    return high_band(frames, tau)


def is_full_band(frames: int, tau: int) -> bool:
    """True when the band is every k != 0 (even F, tau = (F-2)/2): then a @ P = a - mean(a).

    The one source of this rule: the Triton and C++ kernels take it from here.

    Examples:
        >>> is_full_band(16, 7), is_full_band(16, 6), is_full_band(15, 6)
        (True, False, False)
    """
    return frames % 2 == 0 and tau == max_tau(frames)


@functools.lru_cache(maxsize=64)
def high_band_matrix_float64(frames: int, tau: int) -> torch.Tensor:
    """P as an (F, F) float64 CPU tensor, built once per (F, tau) and shared: do not modify it.

    Examples:
        >>> p = high_band_matrix_float64(8, 3)  # the full band: P = I - 1/F
        >>> bool(torch.allclose(p, torch.eye(8, dtype=torch.float64) - 1 / 8))
        True
    """
    band = _checked_band(frames, tau)
    kernel = [sum(math.cos(2.0 * math.pi * k * n / frames) for k in band) / frames for n in range(frames)]
    kernel = torch.tensor(kernel, dtype=torch.float64)
    shift = (torch.arange(frames)[None, :] - torch.arange(frames)[:, None]) % frames
    return kernel[shift]


@functools.lru_cache(maxsize=64)
def high_band_matrix(frames: int, tau: int, padded: int, device: torch.device) -> torch.Tensor:
    """P in float32 on `device`, zero-padded to (padded, padded); built once per key and cached.

    Build it before CUDA graph capture (any eager call does): the first call copies it to the GPU.

    Examples:
        >>> high_band_matrix(15, 3, 16, torch.device("cpu")).shape
        torch.Size([16, 16])
    """
    matrix = torch.zeros((padded, padded), dtype=torch.float32)
    matrix[:frames, :frames] = high_band_matrix_float64(frames, tau).to(torch.float32)
    return matrix.to(device)


def tf32_round(matrix: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to the nearest tf32 number (10 stored mantissa bits, ties away from
    zero), the host twin of `ops.triton_rules.tf32_round`.

    Examples:
        >>> tf32_round(torch.tensor([1.0 + 2.0**-11, 1.0 + 2.0**-12])).tolist()
        [1.0009765625, 1.0]
    """
    bits = matrix.to(torch.float32).contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


@functools.lru_cache(maxsize=64)
def high_band_matrix_tf32_split(frames: int, tau: int, padded: int, device: torch.device) -> torch.Tensor:
    """(2, padded, padded) float32 on `device`: P's tf32 high part, then the tf32 rounding of the
    rest, for the kernels' three-product band step on tensor cores (`ops.triton_rules.band_product`).
    Their sum is P to ~2^-22 relative. Built once per key and cached, like `high_band_matrix`.

    Examples:
        >>> split = high_band_matrix_tf32_split(24, 7, 32, torch.device("cpu"))
        >>> exact = high_band_matrix_float64(24, 7)
        >>> bool(((split[0] + split[1])[:24, :24].double() - exact).abs().max() < 1e-7)
        True
    """
    matrix = high_band_matrix(frames, tau, padded, torch.device("cpu"))
    high = tf32_round(matrix)
    return torch.stack([high, tf32_round(matrix - high)]).to(device)


def frequency_eigenvalue(frames: int, tau: int, k: int) -> float:
    """P's eigenvalue at DFT index k (0 <= k <= F // 2), shared by the cosine and sine of k:
    ([k in K] + [F - k in K]) / 2 for the band K (1 for the even F's symmetric band, 1/2 where
    only one of k, F - k is in it, as for odd F).

    Self-contained (arithmetic on ints only): the Triton kernels evaluate it at compile time
    (`ops.triton_rules.band_eigenvalue`), so it calls no other function.

    Examples:
        >>> [frequency_eigenvalue(16, 2, k) for k in (5, 6, 8)], frequency_eigenvalue(7, 1, 2)
        ([0.0, 1.0, 1.0], 0.5)
    """
    low, high = frames // 2 - tau, frames // 2 + tau
    return ((low <= k <= high) + (low <= (frames - k) % frames <= high)) / 2


def rank_one_complement(frames: int, tau: int) -> bool:
    """Whether I - P has fewer rank-one terms than P (each k with 0 < k < F / 2 gives a cosine
    and a sine, k = 0 and F / 2 a cosine): `band_rank_one_terms_float64`'s choice.

    Self-contained like `frequency_eigenvalue` (the kernels evaluate it at compile time).

    Examples:
        >>> rank_one_complement(24, 7), rank_one_complement(32, 7)
        (True, False)
    """
    low, high = frames // 2 - tau, frames // 2 + tau
    band_terms = 0
    complement_terms = 0
    for k in range(frames // 2 + 1):
        eigenvalue = ((low <= k <= high) + (low <= (frames - k) % frames <= high)) / 2
        vectors = 2 if 0 < 2 * k < frames else 1
        band_terms += vectors if eigenvalue > 0 else 0
        complement_terms += vectors if eigenvalue < 1 else 0
    return complement_terms < band_terms


@functools.lru_cache(maxsize=64)
def band_rank_one_terms_float64(frames: int, tau: int) -> Tuple[torch.Tensor, bool]:
    """(V, complement): (R, F) float64 rows v_k with P = sum_k v_k^T v_k, or with `complement`
    P = I - sum_k v_k^T v_k, whichever sum has fewer terms (`rank_one_complement`). Built once
    per (F, tau); do not modify.

    P is circulant, so the DFT diagonalises it: frequency k has eigenvalue lambda_k
    (`frequency_eigenvalue`), shared by the cosine and sine of k (orthonormal real vectors). P is
    the sum of those vectors scaled by sqrt(lambda_k), I - P that with sqrt(1 - lambda_k). So
    a @ P takes R dot products and R scaled additions per row instead of an F x F product: at
    F = 24, tau = 7, R = 9 (the complement); at F = 32, tau = 7, R = 15.

    Examples:
        >>> terms, complement = band_rank_one_terms_float64(24, 7)
        >>> terms.shape, complement
        (torch.Size([9, 24]), True)
        >>> p = torch.eye(24, dtype=torch.float64) - terms.T @ terms
        >>> bool(torch.allclose(p, high_band_matrix_float64(24, 7)))
        True
    """
    _checked_band(frames, tau)
    complement = rank_one_complement(frames, tau)
    n = torch.arange(frames, dtype=torch.float64)
    terms = []
    for k in range(frames // 2 + 1):
        eigenvalue = frequency_eigenvalue(frames, tau, k)
        weight = 1.0 - eigenvalue if complement else eigenvalue
        if weight == 0:
            continue
        paired = 0 < 2 * k < frames  # k and F - k: a cosine and a sine
        angle = 2.0 * math.pi * k * n / frames
        norm = math.sqrt((2.0 if paired else 1.0) / frames)
        for vector in ([torch.cos(angle), torch.sin(angle)] if paired else [torch.cos(angle)]):
            terms.append(vector * (norm * math.sqrt(weight)))
    return torch.stack(terms), complement


@functools.lru_cache(maxsize=64)
def band_rank_one_terms(frames: int, tau: int, padded: int, device: torch.device) -> torch.Tensor:
    """`band_rank_one_terms_float64`'s rows in float32 on `device`, zero-padded to `padded`
    columns: (R, padded), cached like `high_band_matrix`."""
    terms, _ = band_rank_one_terms_float64(frames, tau)
    rows = torch.zeros((terms.shape[0], padded), dtype=torch.float32)
    rows[:, :frames] = terms.to(torch.float32)
    return rows.to(device)


def band_operand(frames: int, tau: int, padded: int, device: torch.device, split: bool) -> torch.Tensor:
    """P as the Triton kernels' band product reads it (`ops.triton_rules.band_product`): the
    tf32 split when `split`, else the padded fp32 matrix. Cached (both builders are)."""
    builder = high_band_matrix_tf32_split if split else high_band_matrix
    return builder(frames, tau, padded, device)
