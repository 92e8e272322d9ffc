"""Shared case matrix and checker: every fused backend against the pure-torch reference.

A backend is exercised through its `*_out` launcher, which writes into output tensors the test
allocates and poisons with NaN first, so any element the kernel fails to write fails the check.
The ground truth is the reference evaluated in float64 on the same (already rounded) inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional, Tuple

import torch

from bytheway_kernels import reference
from bytheway_kernels._validation import max_tau
from bytheway_kernels.ops import stats_rows

# (atol, rtol) on probabilities. The kernels accumulate in fp32 from the same inputs, so the
# difference to a float64 evaluation is one final rounding to the output dtype (half an ulp:
# 2**-11 for fp16, 2**-8 for bf16, relative) plus fp32 arithmetic over <= 64 terms (~1e-6),
# amplified at most by beta (<= 10 in these cases) in the band term. Tolerances are 2 ulps.
PROB_TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# Stats are means over all rows in scope, accumulated in fp32 (sums of <= 1e4 positive terms).
STATS_TOLERANCE = (1e-5, 1e-4)


@dataclasses.dataclass(frozen=True)
class Case:
    frames: int = 16
    tau: int = 7
    dtype: torch.dtype = torch.float32
    batch: int = 2
    height: int = 4
    width: int = 4
    heads: int = 2
    guide_size: Optional[Tuple[int, int]] = (2, 2)  # None: no guide
    guide_upsample: str = "nearest"
    alpha: float = 0.6
    beta: float = 1.5
    adaptive_beta: bool = True
    parts: int = 2
    energy_part: int = 1
    energy_scope: str = "batch"
    beta_max: Optional[float] = None
    logit_scale: float = 3.0

    def kwargs(self) -> dict:
        return dict(
            alpha=self.alpha, beta=self.beta, tau=self.tau, adaptive_beta=self.adaptive_beta,
            energy_scope=self.energy_scope, guide_upsample=self.guide_upsample,
            beta_max=self.beta_max, batch_split=(self.parts, self.energy_part),
        )

    def __str__(self) -> str:
        guide = "noguide" if self.guide_size is None else f"{self.guide_upsample}{self.guide_size}"
        return (f"F{self.frames}-tau{self.tau}-{str(self.dtype)[6:]}-{self.batch}x{self.height}x"
                f"{self.width}x{self.heads}-{guide}-a{self.alpha}-b{self.beta}"
                f"-{'adaptive' if self.adaptive_beta else 'fixed'}-split{self.parts}.{self.energy_part}"
                f"-{self.energy_scope}")


def make_inputs(case: Case, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.height, case.width, case.heads, case.frames, case.frames)
    scores = (torch.randn(shape, generator=gen) * case.logit_scale).to(case.dtype).to(device)
    guide = None
    if case.guide_size is not None:
        h, w = case.guide_size
        guide_logits = torch.randn((case.batch, h, w, case.heads, case.frames, case.frames), generator=gen)
        guide = torch.softmax(guide_logits * 2.0, dim=-1).to(case.dtype).to(device)
    return scores, guide


def case_matrix():
    """The cases of the op issue: every F, both tau bounds, guides, dtypes, flags."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    guides = [
        (None, "nearest"), ((4, 4), "nearest"), ((2, 2), "nearest"), ((1, 1), "bilinear"),
        ((2, 2), "bilinear"), ((3, 2), "nearest"), ((3, 3), "bilinear"),
    ]
    flags = [  # adaptive, (parts, energy_part), scope
        (True, (2, 1), "batch"), (False, (2, 1), "batch"), (True, (1, 0), "sample"),
        (True, (2, 1), "sample"), (False, (1, 0), "batch"), (True, (3, 1), "batch"),
    ]
    cycle = itertools.count()
    cases = []
    for frames in (2, 3, 8, 15, 16, 24, 32):
        for tau in sorted({0, max_tau(frames)}):
            for _ in range(2):
                i = next(cycle)
                guide_size, upsample = guides[i % len(guides)]
                adaptive, (parts, part), scope = flags[i % len(flags)]
                height, width = ((4, 4), (5, 7), (4, 6))[i % 3]
                if guide_size is not None and guide_size == (4, 4):
                    guide_size = (height, width)  # ratio 1
                cases.append(Case(
                    frames=frames, tau=tau, dtype=dtypes[i % 3], height=height, width=width,
                    batch=2 * parts if parts > 1 else 2, guide_size=guide_size,
                    guide_upsample=upsample, adaptive_beta=adaptive, parts=parts, energy_part=part,
                    energy_scope=scope, beta=(1.5, 10.0, 0.5)[i % 3],
                ))
    # dtype sweep on the AnimateDiff/VideoCrafter2 configuration (F=16, tau=7: full band).
    for dtype, (size, upsample), beta in itertools.product(
        dtypes, [((2, 2), "nearest"), ((2, 2), "bilinear"), ((1, 2), "nearest")], (1.5, 10.0)
    ):
        cases.append(Case(dtype=dtype, guide_size=size, guide_upsample=upsample, beta=beta,
                          alpha=0.6 if beta == 1.5 else 0.1, height=4, width=8))
    cases.append(Case(beta_max=2.0, beta=1.5))
    cases.append(Case(frames=64, tau=31, heads=1, height=2, width=2, guide_size=(1, 1)))
    cases.append(Case(frames=33, tau=15, heads=1, height=2, width=3, guide_size=(1, 2),
                      guide_upsample="bilinear", energy_scope="sample"))
    return cases


LaunchOut = Callable[..., None]


def check_backend_case(run_out: LaunchOut, case: Case, seed: int = 0, device="cpu") -> None:
    """Run `run_out(scores, guide, **args, probs=..., stats=...)` on poisoned outputs; compare."""
    scores, guide = make_inputs(case, seed, device)
    probs = torch.full_like(scores, float("nan"))
    rows = stats_rows(case.batch, case.parts, case.energy_scope)
    stats = torch.full((rows, 6), float("nan"), dtype=torch.float32, device=scores.device)
    run_out(scores, guide, case.alpha, case.beta, case.tau, case.adaptive_beta, case.parts,
            case.energy_part, case.energy_scope, case.guide_upsample, case.beta_max, probs, stats)
    ref_probs, ref_stats = reference.bytheway_attention_probs(
        scores.cpu().double(), None if guide is None else guide.cpu().double(),
        return_stats=True, **case.kwargs(),
    )
    atol, rtol = PROB_TOLERANCES[case.dtype]
    scale = max(1.0, float(ref_stats[:, 0].max()))  # the band term is amplified by beta
    torch.testing.assert_close(probs.cpu().double(), ref_probs, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{case}: probs differ from reference\n{m}")
    atol, rtol = STATS_TOLERANCE
    torch.testing.assert_close(stats.cpu().double(), ref_stats.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{case}: stats differ from reference\n{m}")
