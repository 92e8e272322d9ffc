"""The reference against an independent float64 evaluation of the paper's formulas, plus properties."""

import math

import numpy as np
import pytest
import torch

import bytheway_kernels as btw
from bytheway_kernels import reference


def nearest_source(dst, src_size, dst_size):
    scale = np.float32(src_size) / np.float32(dst_size)
    return min(int(np.floor(np.float32(dst) * scale)), src_size - 1)


def bilinear_taps(dst, src_size, dst_size):
    scale = src_size / dst_size
    src = max((dst + 0.5) * scale - 0.5, 0.0)
    lo = int(src)
    hi = lo + (1 if lo < src_size - 1 else 0)
    return [(lo, 1.0 - (src - lo)), (hi, src - lo)]


def paper_formulas(scores, guide, alpha, beta0, tau, mode, adaptive=True, cfg=True):
    """Loops over rows with an explicit DFT: the paper's equations written out, nothing shared."""
    scores = scores.numpy().astype(np.float64)
    B, H, W, heads, F, _ = scores.shape
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    guided = attn.copy()
    if guide is not None:
        g = guide.numpy().astype(np.float64)
        h, w = g.shape[1:3]
        up = np.zeros_like(attn)
        for y in range(H):
            for x in range(W):
                if mode == "nearest":
                    up[:, y, x] = g[:, nearest_source(y, h, H), nearest_source(x, w, W)]
                else:
                    for ys, wy in bilinear_taps(y, h, H):
                        for xs, wx in bilinear_taps(x, w, W):
                            up[:, y, x] += wy * wx * g[:, ys, xs]
        guided = attn + alpha * (up - attn)
    n = np.arange(F)
    dft = np.exp(-2j * np.pi * np.outer(n, n) / F)  # X_k = sum_n a_n e^{-2 pi i k n / F}
    spectrum = guided @ dft.T
    band = [k for k in range(F) if F // 2 - tau <= k <= F // 2 + tau]
    cond = slice(B // 2, B) if cfg else slice(0, B)
    energy = lambda m: (m[cond] ** 2).sum(-1).mean()  # (1/F) sum_i sum_j A_ij^2, averaged
    e1, e2 = energy(attn), energy(guided)
    e2_high = (np.abs(spectrum[cond][..., band]) ** 2).sum(-1).mean() / F
    e2_low = e2 - e2_high
    beta = max(beta0, math.sqrt(max(e1 - e2_low, 0) / e2_high)) if adaptive else beta0
    spectrum[..., band] *= beta
    out = (spectrum @ np.conj(dft).T / F).real
    out /= out.sum(-1, keepdims=True)
    e3 = (out[cond] ** 2).sum(-1).mean()
    return out, np.array([beta, e1, e2, e2_low, e2_high, e3])


@pytest.mark.parametrize(
    "frames,tau,guide_size,mode,adaptive,cfg",
    [
        (16, 7, (2, 2), "nearest", True, True),
        (16, 3, (3, 2), "bilinear", True, True),
        (8, 0, (2, 3), "nearest", False, False),
        (15, 6, (1, 1), "bilinear", True, False),
        (5, 1, None, "nearest", True, True),
        (2, 0, (2, 2), "bilinear", True, True),
    ],
)
def test_reference_matches_paper_formulas(frames, tau, guide_size, mode, adaptive, cfg):
    gen = torch.Generator().manual_seed(frames * 31 + tau)
    scores = torch.randn((2, 4, 5, 2, frames, frames), generator=gen, dtype=torch.float64) * 3
    guide = None
    if guide_size is not None:
        guide = torch.softmax(torch.randn((2, *guide_size, 2, frames, frames), generator=gen,
                                          dtype=torch.float64) * 2, -1)
    probs, stats = reference.bytheway_attention_probs(
        scores, guide, alpha=0.6, beta=1.5, tau=tau, adaptive_beta=adaptive, cfg=cfg,
        guide_upsample=mode, return_stats=True)
    expected, expected_stats = paper_formulas(scores, guide, 0.6, 1.5, tau, mode, adaptive, cfg)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.double().numpy()[0], expected_stats, rtol=1e-6)


def _random(shape, seed=0, scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_rows_sum_to_one_and_adaptive_energy_at_least_e1():
    scores = _random((2, 4, 4, 2, 16, 16)).double()
    guide = torch.softmax(_random((2, 2, 2, 2, 16, 16), seed=1), -1).double()
    for frames_tau in [(16, 7), (16, 2)]:
        probs, stats = reference.bytheway_attention_probs(
            scores, guide, alpha=0.6, beta=1.0, tau=frames_tau[1], return_stats=True)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
        beta, e1, e3 = stats[0, 0], stats[0, 1], stats[0, 5]
        assert beta >= 1.0
        assert e3 >= e1 * (1 - 1e-6)  # even F: symmetric band, Parseval gives E3 = E2_low + beta^2 E2_high


def test_energy_grows_with_beta():
    scores = _random((2, 3, 3, 2, 16, 16)).double()
    energies = [
        reference.bytheway_attention_probs(scores, alpha=0.0, beta=b, tau=4, adaptive_beta=False,
                                           return_stats=True)[1][0, 5]
        for b in (1.0, 1.5, 3.0, 10.0)
    ]
    assert all(a < b for a, b in zip(energies, energies[1:]))


def test_identity_settings_give_plain_softmax():
    scores = _random((2, 3, 3, 2, 8, 8)).double()
    guide = torch.softmax(_random((2, 1, 1, 2, 8, 8), seed=2), -1).double()
    probs = reference.bytheway_attention_probs(scores, guide, alpha=0.0, beta=1.0, tau=3,
                                               adaptive_beta=False)
    torch.testing.assert_close(probs, torch.softmax(scores, -1), rtol=1e-12, atol=1e-14)


def test_full_band_closed_form():
    """F=16, tau=7 (the presets): A3 = beta * A2 + (1 - beta) / F, negative entries allowed."""
    scores = _random((2, 2, 2, 2, 16, 16), scale=6.0).double()
    probs = reference.bytheway_attention_probs(scores, alpha=0.0, beta=10.0, tau=7,
                                               adaptive_beta=False)
    torch.testing.assert_close(probs, 10.0 * torch.softmax(scores, -1) - 9.0 / 16)
    assert (probs < 0).any()


def test_uniform_rows_fall_back_to_beta0():
    scores = torch.zeros((2, 2, 2, 1, 8, 8))
    probs, stats = reference.bytheway_attention_probs(scores, alpha=0.5, beta=1.5, tau=3,
                                                      return_stats=True)
    assert stats[0, 0] == 1.5 and torch.isfinite(stats).all()
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / 8))


def test_public_function_matches_reference_on_cpu():
    scores = _random((2, 4, 4, 2, 16, 16))
    guide = torch.softmax(_random((2, 2, 2, 2, 16, 16), seed=3), -1)
    kwargs = dict(alpha=0.6, beta=1.5, tau=7, return_stats=True)
    probs, stats = btw.bytheway_attention_probs(scores, guide, **kwargs)
    ref_probs, ref_stats = reference.bytheway_attention_probs(scores, guide, **kwargs)
    torch.testing.assert_close(probs, ref_probs, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rows_with_nonpositive_guided_sum_keep_the_unguided_map(adaptive):
    """alpha = 1 and guide rows summing to 0 or less: those rows (only) use A, as if unguided."""
    scores = _random((2, 3, 3, 2, 8, 8), seed=4).double()
    guide = torch.softmax(_random((2, 3, 3, 2, 8, 8), seed=5), -1).double()  # ratio 1: rows align
    bad_rows = torch.zeros(guide.shape[:-1], dtype=torch.bool)
    bad_rows[0, 1, 2, 0, 3] = bad_rows[1, 0, 0, 1, 7] = bad_rows[1, 2, 1, 0, 0] = True
    broken = guide.clone()
    broken[bad_rows] = 0.0
    broken[1, 2, 1, 0, 0] = -guide[1, 2, 1, 0, 0]  # a negative sum
    kwargs = dict(alpha=1.0, beta=3.0, tau=2, adaptive_beta=adaptive, cfg=False, energy_scope="sample")
    probs, stats = reference.bytheway_attention_probs(scores, broken, return_stats=True, **kwargs)
    assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
    # Expected rows: the unguided map's where the guide is broken, the guide's elsewhere, each
    # enhanced with the beta the mixed map gives (fixed beta: beta_0).
    fixed = {**kwargs, "adaptive_beta": False}
    beta_rows = stats[:, 0].double()
    for video in range(2):
        fixed["beta"] = float(beta_rows[video])
        guided = reference.bytheway_attention_probs(scores[video:video + 1], guide[video:video + 1], **fixed)
        unguided = reference.bytheway_attention_probs(scores[video:video + 1], None, **fixed)
        expected = torch.where(bad_rows[video:video + 1, ..., None], unguided, guided)
        torch.testing.assert_close(probs[video:video + 1], expected, rtol=1e-12, atol=1e-13)


def test_zero_guide_with_alpha_one_is_the_unguided_op():
    scores = _random((2, 4, 4, 2, 16, 16), seed=6)
    zero_guide = torch.zeros((2, 2, 2, 2, 16, 16))
    kwargs = dict(beta=1.5, tau=7, return_stats=True)
    probs, stats = reference.bytheway_attention_probs(scores, zero_guide, alpha=1.0, **kwargs)
    expected, expected_stats = reference.bytheway_attention_probs(scores, alpha=1.0, **kwargs)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    torch.testing.assert_close(stats, expected_stats, rtol=0, atol=0)
    assert stats[0, 1] == stats[0, 2]  # E2 = E1: the energies use A for those rows too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
def test_largest_beta_is_finite(dtype, adaptive):
    """beta = BETA_LIMIT: finite everywhere; float16 saturates at its largest value."""
    scores = (_random((2, 2, 2, 2, 16, 16), seed=7) * 3).to(dtype)
    guide = torch.softmax(_random((2, 1, 1, 2, 16, 16), seed=8), -1).to(dtype)
    probs, stats = reference.bytheway_attention_probs(scores, guide, alpha=0.5, beta=1e6, tau=3,
                                                      adaptive_beta=adaptive, return_stats=True)
    assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
    if dtype == torch.float16:
        assert probs.abs().max() == torch.finfo(torch.float16).max  # saturated, not inf
    exact = reference.bytheway_attention_probs(scores.double(), guide.double(), alpha=0.5, beta=1e6, tau=3,
                                               adaptive_beta=adaptive)
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-6}.get(dtype)
    if tolerance is not None:  # fp32 evaluation divides by rowsum(A2), no cancellation at large beta
        torch.testing.assert_close(probs.double(), exact, rtol=tolerance, atol=tolerance * 1e6)


def test_huge_beta_is_a_value_error_not_runtime_error():
    scores = _random((2, 2, 2, 1, 8, 8))
    for name in ("beta", "beta_max"):
        with pytest.raises(ValueError, match=name):
            reference.bytheway_attention_probs(scores, alpha=0.5, tau=3, **{"beta": 1.5, name: 1e39})
