"""Shared case matrix and checker: every fused backend against the pure-torch reference.

A backend is exercised through its `*_out` launcher, which writes into output tensors the test
allocates and poisons with NaN first, so any element the kernel fails to write fails the check.
The ground truth is the reference evaluated in float64 on the same (already rounded) inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Callable, Optional, Tuple

import pytest
import torch

from bytheway_kernels import reference
from bytheway_kernels.band import max_tau
from bytheway_kernels.energy import stats_rows
from bytheway_kernels.ops.params import ByTheWayParams

# Triton on CPU tensors runs only under the interpreter, which conftest.py selects on machines
# without CUDA; on a GPU machine the compiled kernels are tested by test_gpu.py instead.
needs_triton_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (GPU machines run tests/test_gpu.py)",
)

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

    def params(self) -> ByTheWayParams:
        return ByTheWayParams(self.alpha, self.beta, self.tau, self.adaptive_beta, self.parts,
                              self.energy_part, self.energy_scope, self.guide_upsample, self.beta_max)

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


ADVERSARIAL = {
    "uniform rows (E2_high = 0)": lambda s: torch.zeros_like(s),
    "one-hot rows": lambda s: torch.where(s == s.max(-1, keepdim=True).values, 1e4, -1e4),
    "logits +-1e4": lambda s: s.sign() * 1e4,
    "near the fp16 limit": lambda s: s.sign() * 6.5e4,
}

LaunchOut = Callable[..., None]


def run_poisoned(run_out: LaunchOut, scores, guide, case: Case, with_stats: bool = True):
    """Call `run_out(scores, guide, ..., probs, stats)` on NaN-filled outputs; return them."""
    probs = torch.full_like(scores, float("nan"), memory_format=torch.contiguous_format)
    stats = None
    if with_stats:
        rows = stats_rows(scores.shape[0], case.parts, case.energy_scope)
        stats = torch.full((rows, 6), float("nan"), dtype=torch.float32, device=scores.device)
    run_out(scores, guide, case.params(), probs, stats)
    return probs, stats


def assert_matches_reference(scores, guide, case: Case, probs, stats=None) -> None:
    """Compare with the reference evaluated in float64 on the same inputs."""
    ref_probs, ref_stats = reference.bytheway_attention_probs(
        scores.cpu().double(), None if guide is None else guide.cpu().double(),
        return_stats=True, **case.kwargs(),
    )
    atol, rtol = PROB_TOLERANCES.get(scores.dtype, PROB_TOLERANCES[torch.float32])
    scale = max(1.0, float(ref_stats[:, 0].max())) if ref_stats.numel() else 1.0  # band term x beta
    torch.testing.assert_close(probs.cpu().double(), ref_probs, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{case}: probs differ from reference\n{m}")
    if stats is not None:
        atol, rtol = STATS_TOLERANCE
        torch.testing.assert_close(stats.cpu().double(), ref_stats.double(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{case}: stats differ from reference\n{m}")


def check_backend_case(run_out: LaunchOut, case: Case, seed: int = 0, device="cpu") -> None:
    """Fresh random inputs for `case`, poisoned outputs, comparison with the reference."""
    scores, guide = make_inputs(case, seed, device)
    probs, stats = run_poisoned(run_out, scores, guide, case)
    assert_matches_reference(scores, guide, case, probs, stats)


class BackendContract:
    """Tests every fused backend must pass; subclass with `run_out` and `backend` set."""

    run_out: LaunchOut
    backend: str

    def run(self, scores, guide, case, with_stats=True):
        return run_poisoned(type(self).run_out, scores, guide, case, with_stats)

    @pytest.mark.parametrize("case", case_matrix(), ids=str)
    def test_matches_reference(self, case):
        check_backend_case(type(self).run_out, case)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("frames,tau", [(16, 7), (16, 3), (9, 2)])
    def test_fixed_beta_without_stats(self, frames, tau, dtype):
        case = Case(frames=frames, tau=tau, dtype=dtype, adaptive_beta=False, beta=10.0, alpha=0.3)
        scores, guide = make_inputs(case, seed=3)
        probs, _ = self.run(scores, guide, case, with_stats=False)
        assert_matches_reference(scores, guide, case, probs)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("name", list(ADVERSARIAL))
    @pytest.mark.parametrize("frames,tau", [(16, 7), (8, 1)])
    def test_adversarial_inputs_stay_finite(self, name, dtype, frames, tau):
        case = Case(dtype=dtype, frames=frames, tau=tau, guide_size=(2, 2))
        scores, guide = make_inputs(case)
        scores = ADVERSARIAL[name](scores.float()).to(dtype)
        probs, stats = self.run(scores, guide, case)
        assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
        assert_matches_reference(scores, guide, case, probs, stats)

    @pytest.mark.parametrize("guide_size", [None, (1, 1)])
    @pytest.mark.parametrize("frames,tau", [(16, 7), (15, 3)])
    def test_uniform_rows_give_beta0(self, frames, tau, guide_size):
        case = Case(frames=frames, tau=tau, guide_size=guide_size, beta=1.5)
        scores = torch.zeros((2, 2, 2, 1, frames, frames))
        guide = None if guide_size is None else torch.full((2, 1, 1, 1, frames, frames), 1 / frames)
        probs, stats = self.run(scores, guide, case)
        assert stats[0, 0] == 1.5 and stats[0, 4].abs() < 1e-6
        torch.testing.assert_close(probs, torch.full_like(probs, 1 / frames))

    def test_batch_of_one_without_cfg(self):
        case = Case(batch=1, parts=1, energy_part=0, energy_scope="sample",
                    guide_upsample="bilinear", guide_size=(1, 3))
        scores, guide = make_inputs(case)
        probs, stats = self.run(scores, guide, case)
        assert stats.shape == (1, 6)
        assert_matches_reference(scores, guide, case, probs, stats)

    @pytest.mark.parametrize("scope", ["batch", "sample"])
    @pytest.mark.parametrize("shape", [(0, 4, 4, 2, 16, 16), (2, 0, 3, 2, 16, 16)], ids=["B=0", "H=0"])
    def test_empty_inputs(self, shape, scope):
        case = Case(energy_scope=scope, beta_max=3.0)
        scores = torch.randn(shape)
        guide = torch.rand(shape[:1] + (min(shape[1], 2), 2) + shape[3:])
        probs, stats = self.run(scores, guide, case)
        ref_probs, ref_stats = reference.bytheway_attention_probs(scores, guide, return_stats=True,
                                                                  **case.kwargs())
        assert probs.shape == ref_probs.shape
        torch.testing.assert_close(stats, ref_stats)
        if scope == "batch":
            assert stats.tolist() == [[1.5, 0.0, 0.0, 0.0, 0.0, 0.0]]

    def test_guide_dtype_differs_and_inputs_not_contiguous(self):
        case = Case(dtype=torch.float16, guide_size=(3, 2), guide_upsample="bilinear", height=5,
                    width=4)
        scores, guide = make_inputs(case)
        scores = scores.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
        assert not scores.is_contiguous()
        guide = guide.float()
        probs, stats = self.run(scores, guide, case)
        assert_matches_reference(scores, guide, case, probs, stats)

    def test_sample_scope_is_independent_of_the_batch(self):
        """With energy_scope="sample", a video's output is the same alone or next to others."""
        case = Case(batch=4, energy_scope="sample")
        scores, guide = make_inputs(case)
        together, _ = self.run(scores, guide, case)
        alone, _ = self.run(scores[[1, 3]], guide[[1, 3]], Case(batch=2, energy_scope="sample"))
        torch.testing.assert_close(alone, together[[1, 3]], atol=1e-6, rtol=1e-6)

    @pytest.mark.parametrize("with_guide,with_stats,adaptive,upsample", [
        (True, True, True, "bilinear"), (True, False, False, "nearest"), (False, True, False, "nearest"),
    ])
    def test_opcheck(self, with_guide, with_stats, adaptive, upsample, monkeypatch):
        monkeypatch.setenv("BYTHEWAY_BACKEND", self.backend)
        scores, guide = make_inputs(Case(frames=8, tau=3, guide_size=(2, 2)))
        args = (scores, guide if with_guide else None, 0.6, 1.5, 3, adaptive, 2, 1, "batch", upsample,
                None, with_stats)
        torch.library.opcheck(torch.ops.bytheway.attention_probs.default, args)
