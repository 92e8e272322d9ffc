"""Shared cases and checker for fused temporal attention: any path against the float64 formula.

The ground truth is built independently of the op: scores = scale * q k^T in float64 from the
(already rounded) inputs, the map op's pure-torch reference in float64, then @ v in float64.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Tuple

import torch

from bytheway_kernels.testing import PROB_TOLERANCES, STATS_TOLERANCE
from bytheway_kernels import reference
from bytheway_kernels.band import max_tau
from bytheway_kernels.ops.params import ByTheWayParams

# Relative error per term of out = sum_j A3[i, j] v[j]: the fused kernel feeds A3 to the product
# rounded to the input dtype (half an ulp), accumulates in fp32 and rounds out once more (half an
# ulp of |out| <= sum_j |A3[i, j]| |v[j]|); 2 ulps, as PROB_TOLERANCES, leave room for the fp32
# score and softmax arithmetic. So each element is checked against the bound
#   |out - ref| <= tol * sum_j |A3[i, j]| |v[j]|  (+ a tiny floor for all-zero rows of v),
# which scales with beta (the band term) and with |v| as the error does.
OUT_TOLERANCE = {dtype: atol for dtype, (atol, _) in PROB_TOLERANCES.items()}


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    frames: int = 16
    head_dim: int = 8
    heads: int = 2
    batch: int = 2
    height: int = 2
    width: int = 2
    dtype: torch.dtype = torch.float32
    guide_size: Optional[Tuple[int, int]] = (1, 1)  # None: no guide
    guide_upsample: str = "nearest"
    alpha: float = 0.6
    beta: float = 1.5
    tau: Optional[int] = None  # None: the full band (F - 2) // 2
    adaptive_beta: bool = False
    parts: int = 2
    energy_part: int = 1
    energy_scope: str = "batch"
    beta_max: Optional[float] = None
    fused_qkv: bool = True  # q, k, v as slices of one (N, F, 3C) tensor
    logit_scale: float = 2.0

    @property
    def band_tau(self) -> int:
        return (self.frames - 2) // 2 if self.tau is None else self.tau

    def kwargs(self) -> dict:
        return dict(alpha=self.alpha, beta=self.beta, tau=self.band_tau,
                    adaptive_beta=self.adaptive_beta, energy_scope=self.energy_scope,
                    guide_upsample=self.guide_upsample, beta_max=self.beta_max,
                    batch_split=(self.parts, self.energy_part))

    def params(self) -> ByTheWayParams:
        return ByTheWayParams(self.alpha, self.beta, self.band_tau, self.adaptive_beta, self.parts,
                              self.energy_part, self.energy_scope, self.guide_upsample,
                              self.beta_max)

    def __str__(self) -> str:
        guide = "noguide" if self.guide_size is None else f"{self.guide_upsample}{self.guide_size}"
        return (f"F{self.frames}-d{self.head_dim}x{self.heads}-{str(self.dtype)[6:]}-"
                f"{self.batch}x{self.height}x{self.width}-{guide}-a{self.alpha}-b{self.beta}-"
                f"tau{self.band_tau}-{'adaptive' if self.adaptive_beta else 'fixed'}"
                f"{'' if self.beta_max is None else f'-max{self.beta_max}'}-split{self.parts}."
                f"{self.energy_part}-{self.energy_scope}{'-qkv' if self.fused_qkv else ''}")


def make_inputs(case: AttentionCase, seed: int = 0, device="cpu"):
    """(q, k, v, guide) with q k^T * d**-0.5 of standard deviation `logit_scale`."""
    gen = torch.Generator().manual_seed(seed)
    sequences = case.batch * case.height * case.width
    channels = case.heads * case.head_dim
    qkv = torch.randn((sequences, case.frames, 3 * channels), generator=gen)
    qkv[..., :channels] *= case.logit_scale
    qkv = qkv.to(case.dtype).to(device)
    if case.fused_qkv:
        q, k, v = qkv.split(channels, dim=-1)
    else:
        q, k, v = (part.contiguous() for part in qkv.split(channels, dim=-1))
    guide = None
    if case.guide_size is not None:
        h, w = case.guide_size
        logits = torch.randn((case.batch, h, w, case.heads, case.frames, case.frames), generator=gen)
        guide = torch.softmax(2.0 * logits, dim=-1).to(case.dtype).to(device)
    return q, k, v, guide


def expected(case: AttentionCase, q, k, v, guide, scale: Optional[float] = None):
    """(out, plain map, stats) in float64 from the map op's reference."""
    sequences, frames, channels = q.shape
    heads = case.heads
    scale = case.head_dim ** -0.5 if scale is None else scale

    def split(values):
        return values.cpu().double().view(sequences, frames, heads, -1).transpose(1, 2)

    scores = scale * split(q) @ split(k).transpose(-1, -2)
    scores = scores.view(case.batch, case.height, case.width, heads, frames, frames)
    probs, stats = reference.bytheway_attention_probs(
        scores, None if guide is None else guide.cpu().double(), return_stats=True, **case.kwargs())
    values = split(v)
    probs_rows = probs.view(sequences, heads, frames, frames)
    out = (probs_rows @ values).transpose(1, 2).reshape(sequences, frames, channels)
    bound = (probs_rows.abs() @ values.abs()).transpose(1, 2).reshape(sequences, frames, channels)
    return out, torch.softmax(scores, dim=-1), stats, bound


def assert_matches(case: AttentionCase, inputs, out, plain_map=None, stats=None, scale=None):
    """Compare a path's outputs with the float64 formula on the same inputs."""
    q, k, v, guide = inputs
    ref_out, ref_map, ref_stats, bound = expected(case, q, k, v, guide, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    tol = OUT_TOLERANCE.get(q.dtype, OUT_TOLERANCE[torch.float32])
    error = (out.cpu().double() - ref_out).abs()
    allowed = tol * bound + 1e-6
    worst = (error / allowed).max() if error.numel() else torch.tensor(0.0)
    assert not torch.isnan(error).any() and worst <= 1, (
        f"{case}: out differs from the float64 formula; max error {error.max():.3g}, "
        f"{float(worst):.3g} x the allowed bound")
    if plain_map is not None:
        assert plain_map.shape == ref_map.shape and plain_map.dtype == q.dtype
        atol, rtol = PROB_TOLERANCES.get(q.dtype, PROB_TOLERANCES[torch.float32])
        torch.testing.assert_close(plain_map.cpu().double(), ref_map, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{case}: map differs\n{m}")
    if stats is not None:
        atol, rtol = STATS_TOLERANCE
        assert stats.dtype == torch.float32
        torch.testing.assert_close(stats.cpu().double(), ref_stats.double(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{case}: stats differ\n{m}")


def case_matrix():
    """Every F, head dim, dtype, guide mode, batch split, scope and beta mode, cycled together
    (not their full product: the interpreter is slow), plus the AnimateDiff configurations."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    guides = [(None, "nearest"), ((1, 1), "nearest"), ((2, 3), "bilinear"), ((1, 2), "nearest"),
              ((2, 2), "bilinear")]
    flags = [  # adaptive, (parts, energy_part), scope, beta_max
        (True, (2, 1), "batch", None), (False, (2, 1), "batch", None),
        (True, (1, 0), "sample", None), (True, (3, 1), "sample", 4.0),
        (False, (1, 0), "batch", None), (True, (3, 1), "batch", None),
        (True, (2, 1), "sample", 2.0),
    ]
    cycle = itertools.count()
    cases = []
    for frames, head_dim in [(2, 8), (8, 40), (8, 16), (16, 80), (24, 8), (33, 24), (64, 8)]:
        for tau in sorted({0, max_tau(frames)}):
            i = next(cycle)
            guide_size, upsample = guides[i % len(guides)]
            adaptive, (parts, part), scope, beta_max = flags[i % len(flags)]
            height, width = 2 + i % 2, 3 - i % 2
            if guide_size is not None:
                guide_size = (min(guide_size[0], height), min(guide_size[1], width))
            cases.append(AttentionCase(
                frames=frames, tau=tau, head_dim=head_dim, dtype=dtypes[i % 3],
                heads=1 if frames >= 33 else 2, batch=parts * (1 + i % 2), height=height,
                width=width, guide_size=guide_size, guide_upsample=upsample,
                adaptive_beta=adaptive, parts=parts, energy_part=part, energy_scope=scope,
                beta_max=None if beta_max is None else max(beta_max, (1.5, 10.0, 0.5)[i % 3]),
                beta=(1.5, 10.0, 0.5)[i % 3], alpha=(0.6, 0.1, 1.0)[i % 3],
                fused_qkv=i % 4 != 3,
            ))
    # the AnimateDiff layers (F = 16, full band; d = 40, 80, 160) in every dtype and beta mode
    for (head_dim, dtype), (adaptive, upsample) in zip(
        itertools.product((40, 80, 160), dtypes),
        itertools.cycle([(False, "nearest"), (True, "bilinear"), (True, "nearest")]),
    ):
        cases.append(AttentionCase(head_dim=head_dim, dtype=dtype, adaptive_beta=adaptive,
                                   guide_upsample=upsample, guide_size=(1, 2), heads=3))
    return cases


# (case, stats asked for, energy form): the stash with the full band and the circulant band, every
# dtype, guide mode and scope, fixed beta with stats (an energy pass without adaptive beta), a
# 3-part split whose energy part is in the middle, beta 10 on near-uniform rows and on a band of
# one frequency (where the band term amplifies the stash's rounding most), and each energy form. 3 x 3 positions x 2 heads are
# 18 sequences per video: the programs of 4 sequences across a part's edge recompute theirs.
STASH_CASES = [
    (AttentionCase(head_dim=40, dtype=torch.float16, heads=2, height=3, width=3,
                   guide_size=(2, 2), adaptive_beta=True), False, "rows"),
    (AttentionCase(head_dim=40, dtype=torch.float16, heads=2, height=3, width=3, beta=10.0,
                   logit_scale=0.3, guide_size=(1, 1), adaptive_beta=True), True, "lean"),
    (AttentionCase(head_dim=40, dtype=torch.bfloat16, heads=2, height=3, width=3, guide_size=None,
                   alpha=0.0, adaptive_beta=True, energy_scope="sample", batch=4), True, "tile"),
    (AttentionCase(frames=24, tau=7, dtype=torch.float32, guide_upsample="bilinear",
                   guide_size=(2, 2), height=3, adaptive_beta=True, beta_max=4.0), True, "rows"),
    (AttentionCase(frames=32, tau=5, dtype=torch.float16, guide_size=None, alpha=0.0,
                   adaptive_beta=True), False, "lean"),
    (AttentionCase(head_dim=80, dtype=torch.float16, beta=10.0, parts=3, batch=3,
                   guide_size=(1, 2), fused_qkv=False), True, "rows"),
    # one frequency in the band and beta 10: a float16 stash of D exceeded the bound here
    # (1.01x); the float16 base and band part stay within 0.4x (seeds 5, 7, 11)
    (AttentionCase(frames=8, tau=0, head_dim=40, dtype=torch.float16, beta=10.0, alpha=0.1,
                   height=3, guide_size=(1, 1), batch=4), True, "rows"),
]


def energy_tiles(case: AttentionCase, form: str = "rows", stash_guided: bool = False):
    """The fused kernel's default energy-pass tiles for `case`, in energy form `form`
    (`ENERGY_FORMS`), stashing the guided maps for the attention pass if `stash_guided`."""
    from bytheway_kernels.ops.temporal_attention.triton import default_energy_config

    tiles = default_energy_config(case.frames, case.head_dim, case.dtype.itemsize)
    return tiles._replace(energy_form=form, stash_guided=stash_guided)
