"""Shared case matrix and checker: every fused backend against the pure-torch reference.

A backend is exercised through its `*_out` launcher, which writes into output tensors the test
allocates and poisons with NaN first, so any element the kernel fails to write fails the check.
The ground truth is the reference evaluated in float64 on the same (already rounded) inputs;
tolerances and poisoning come from `bytheway_kernels.testing`, shared with the benchmarks.
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
from bytheway_kernels.energy import STATS_FIELDS, stats_rows
from bytheway_kernels.ops.params import ByTheWayParams
from bytheway_kernels.testing import STATS_TOLERANCE, poisoned, poisoned_like, prob_tolerance

# Triton on CPU tensors runs only under the interpreter, which conftest.py selects on machines
# without CUDA; on a GPU machine the compiled kernels are tested by test_gpu.py instead.
needs_triton_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (GPU machines run tests/test_gpu.py)",
)

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


# Spatial layouts of the case table: guide upsampling and scale ratio -> (upsample mode,
# scores (H, W), guide (h, w) or None for no guide).
LAYOUTS = {
    "no guide": ("nearest", (4, 4), None),
    "nearest x1": ("nearest", (4, 6), (4, 6)),
    "nearest x2": ("nearest", (4, 4), (2, 2)),
    "nearest x4": ("nearest", (4, 8), (1, 2)),
    "nearest x1.67/x3.5": ("nearest", (5, 7), (3, 2)),
    "bilinear x1": ("bilinear", (4, 6), (4, 6)),
    "bilinear x2": ("bilinear", (4, 4), (2, 2)),
    "bilinear x4": ("bilinear", (4, 8), (1, 2)),
    "bilinear x1.67/x2.33": ("bilinear", (5, 7), (3, 3)),
}
# Batch splits: (parts, energy_part).
SPLITS = {"cfg": (2, 1), "no cfg": (1, 0), "3 parts": (3, 1)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# One row per case: every frame count (compiled-in C++ paths 8, 16, 24, 32 and runtime ones
# around them) at both tau bounds (0 and (F-2)//2; they coincide for F = 2, 3), with the dtypes,
# layouts, splits, scopes, adaptive/fixed beta and beta_0 below, 1.5, 10 spread over the rows.
FRAME_TABLE = (
    # F, tau, dtype, layout, split, scope, adaptive, beta
    (2, 0, F32, "nearest x1", "cfg", "batch", True, 1.5),
    (2, 0, F16, "bilinear x2", "no cfg", "sample", False, 10.0),
    (3, 0, BF16, "no guide", "3 parts", "batch", True, 0.5),
    (3, 0, F32, "bilinear x4", "cfg", "sample", True, 1.5),
    (8, 0, F16, "nearest x2", "no cfg", "batch", False, 10.0),
    (8, 3, BF16, "bilinear x1.67/x2.33", "cfg", "batch", True, 0.5),
    (15, 0, F32, "nearest x4", "3 parts", "sample", True, 1.5),
    (15, 6, F16, "no guide", "cfg", "sample", False, 10.0),
    (16, 0, BF16, "bilinear x2", "no cfg", "sample", True, 0.5),
    (16, 7, F32, "nearest x1.67/x3.5", "cfg", "batch", False, 10.0),
    (24, 0, F16, "bilinear x4", "cfg", "batch", True, 1.5),
    (24, 11, BF16, "nearest x1", "3 parts", "sample", True, 10.0),
    (32, 0, F32, "no guide", "no cfg", "batch", False, 0.5),
    (32, 15, F16, "bilinear x1", "cfg", "sample", True, 1.5),
    (33, 0, BF16, "nearest x2", "cfg", "batch", True, 10.0),
    (33, 15, F32, "bilinear x2", "no cfg", "sample", True, 1.5),
    (64, 0, F16, "nearest x4", "cfg", "sample", False, 1.5),
    (64, 31, F32, "bilinear x1.67/x2.33", "3 parts", "batch", True, 1.5),
)


def case_matrix():
    """The cases of the op issue: `FRAME_TABLE`, a dtype sweep of the preset shape, beta_max."""
    cases = []
    for frames, tau, dtype, layout, split, scope, adaptive, beta in FRAME_TABLE:
        assert tau in (0, max_tau(frames)), "the table covers the tau bounds"
        upsample, (height, width), guide_size = LAYOUTS[layout]
        parts, part = SPLITS[split]
        cases.append(Case(
            frames=frames, tau=tau, dtype=dtype, height=height, width=width,
            heads=1 if frames > 32 else 2, batch=2 * parts, guide_size=guide_size,
            guide_upsample=upsample, adaptive_beta=adaptive, parts=parts, energy_part=part,
            energy_scope=scope, beta=beta,
        ))
    # dtype sweep on the AnimateDiff/VideoCrafter2 configuration (F=16, tau=7: full band).
    for dtype, (size, upsample), beta in itertools.product(
        (F32, F16, BF16), [((2, 2), "nearest"), ((2, 2), "bilinear"), ((1, 2), "nearest")], (1.5, 10.0)
    ):
        cases.append(Case(dtype=dtype, guide_size=size, guide_upsample=upsample, beta=beta,
                          alpha=0.6 if beta == 1.5 else 0.1, height=4, width=8))
    cases.append(Case(beta_max=2.0, beta=1.5))
    cases.append(Case(frames=15, tau=3, beta_max=4.0, beta=1.5, energy_scope="sample", dtype=BF16))
    return cases


ADVERSARIAL = {
    "uniform rows (E2_high = 0)": lambda s: torch.zeros_like(s),
    "one-hot rows": lambda s: torch.where(s == s.max(-1, keepdim=True).values, 1e4, -1e4),
    "logits +-1e4": lambda s: s.sign() * 1e4,
    "near the fp16 limit": lambda s: s.sign() * 6.5e4,
}

LaunchOut = Callable[..., None]

#: Backends whose kernel does not follow the rules of issue 11 item 3 on this branch yet: the
#: rule tests below are expected failures for them (the Triton kernel gets the rules in its own
#: branch; remove its entry when merging it).
RULES_PENDING = {}

#: Guides whose guided row sums are <= 0 or not finite with alpha = 1 (F = 16, 2 x 2 guide).
BAD_GUIDES = {
    "all-zero guide": lambda g: torch.zeros_like(g),
    "negative rows": lambda g: -g,
    "one zero row": lambda g: g.index_fill(-2, torch.tensor([3]), 0.0),
    "row sum beyond float": lambda g: torch.full_like(g, torch.finfo(g.dtype).max / 2),
}


def run_poisoned(run_out: LaunchOut, scores, guide, case: Case, with_stats: bool = True):
    """Call `run_out(scores, guide, ..., probs, stats)` on NaN-filled outputs; return them."""
    probs = poisoned_like(scores)
    stats = None
    if with_stats:
        rows = stats_rows(scores.shape[0], case.parts, case.energy_scope)
        stats = poisoned((rows, len(STATS_FIELDS)), torch.float32, scores.device)
    run_out(scores, guide, case.params(), probs, stats)
    return probs, stats


def assert_matches_reference(scores, guide, case: Case, probs, stats=None, truth_dtype=torch.float64) -> None:
    """Compare with the reference evaluated in `truth_dtype` (float64 unless a case depends on
    the kernels' float32 range) on the same inputs."""
    ref_probs, ref_stats = reference.bytheway_attention_probs(
        scores.cpu().to(truth_dtype), None if guide is None else guide.cpu().to(truth_dtype),
        return_stats=True, **case.kwargs(),
    )
    ref_probs = ref_probs.double()
    if scores.dtype == torch.float16:  # the op's rule: float16 outputs saturate
        ref_probs = ref_probs.clamp(-torch.finfo(torch.float16).max, torch.finfo(torch.float16).max)
    atol, rtol = prob_tolerance(scores.dtype)
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

    def expect_rules(self):
        if self.backend in RULES_PENDING:
            pytest.xfail(RULES_PENDING[self.backend])

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("name", list(BAD_GUIDES))
    @pytest.mark.parametrize("adaptive", [True, False])
    def test_rows_with_bad_guided_sums_keep_the_unguided_map(self, name, dtype, adaptive):
        """alpha = 1 with a guide row summing to <= 0 or overflowing: that row uses A (finite)."""
        self.expect_rules()
        case = Case(dtype=dtype, alpha=1.0, adaptive_beta=adaptive, height=2, width=2, guide_size=(2, 2))
        scores, guide = make_inputs(case, seed=11)
        guide = BAD_GUIDES[name](guide)
        probs, stats = self.run(scores, guide, case)
        assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
        # Whether a sum overflows depends on the precision: compare at the kernels' float32.
        overflow = name == "row sum beyond float"
        assert_matches_reference(scores, guide, case, probs, stats,
                                 truth_dtype=torch.float32 if overflow else torch.float64)

    @pytest.mark.parametrize("with_stats", [False, True])
    @pytest.mark.parametrize("adaptive", [False, True])
    def test_alpha_one_takes_a_small_guide_exactly(self, adaptive, with_stats):
        """alpha = 1 with guide rows summing to 1e-12 (usable: > 0): A2 = U on every path, with
        or without the energies (A + alpha (U - A) cancelled to 0 there and fell back to A)."""
        self.expect_rules()
        case = Case(alpha=1.0, adaptive_beta=adaptive, guide_size=(2, 2), height=2, width=2)
        scores, guide = make_inputs(case, seed=13)
        guide = guide * 1e-12
        probs, stats = self.run(scores, guide, case, with_stats=with_stats)
        assert_matches_reference(scores, guide, case, probs, stats)
        if not adaptive:  # fixed beta: the row normalisation makes the output U's scale-free map
            as_guide = reference.bytheway_attention_probs(scores.double(), guide.double() * 1e12,
                                                          **case.kwargs())
            torch.testing.assert_close(probs.double(), as_guide, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("adaptive,beta_max", [(False, None), (True, None), (True, 1e6)])
    @pytest.mark.parametrize("frames,tau", [(16, 7), (8, 1)])
    def test_largest_beta_stays_finite(self, frames, tau, adaptive, beta_max, dtype):
        """beta = BETA_LIMIT = 1e6: finite (float16 saturates) and close to the reference."""
        self.expect_rules()
        case = Case(frames=frames, tau=tau, dtype=dtype, beta=1e6, adaptive_beta=adaptive, beta_max=beta_max)
        scores, guide = make_inputs(case, seed=12)
        probs, stats = self.run(scores, guide, case)
        assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
        assert_matches_reference(scores, guide, case, probs, stats)

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
        assert stats.shape == (1, len(STATS_FIELDS))
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
