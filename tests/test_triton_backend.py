"""The fused Triton kernels vs the reference, run by the Triton interpreter on CPU.

`TRITON_INTERPRET=1` (set in conftest.py) executes the very kernel source that runs on GPU.
"""

import pytest
import torch

from backend_cases import Case, PROB_TOLERANCES, case_matrix, check_backend_case, make_inputs
from bytheway_kernels import reference
from bytheway_kernels.triton_kernels import attention_probs_triton_out

ADVERSARIAL = {
    "uniform rows (E2_high = 0)": lambda s: torch.zeros_like(s),
    "one-hot rows": lambda s: torch.where(s == s.max(-1, keepdim=True).values, 1e4, -1e4),
    "logits +-1e4": lambda s: s.sign() * 1e4,
    "near the fp16 limit": lambda s: (s.sign() * 6.5e4),
}


@pytest.mark.parametrize("case", case_matrix(), ids=str)
def test_triton_matches_reference(case):
    check_backend_case(attention_probs_triton_out, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_inputs_stay_finite(name, dtype):
    case = Case(dtype=dtype, frames=8, tau=3, guide_size=(2, 2))
    scores, guide = make_inputs(case)
    scores = ADVERSARIAL[name](scores.float()).to(dtype)
    probs = torch.full_like(scores, float("nan"))
    stats = torch.full((1, 6), float("nan"))
    attention_probs_triton_out(scores, guide, 0.6, 1.5, 3, True, 2, 1, "batch", "nearest", None,
                               probs, stats)
    assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
    ref_probs, ref_stats = reference.bytheway_attention_probs(
        scores.double(), guide.double(), alpha=0.6, beta=1.5, tau=3, return_stats=True)
    atol, rtol = PROB_TOLERANCES[dtype]
    torch.testing.assert_close(probs.double(), ref_probs, atol=atol * float(ref_stats[0, 0]), rtol=rtol)


def test_uniform_rows_give_beta0():
    scores = torch.zeros((2, 2, 2, 1, 8, 8))
    probs = torch.full_like(scores, float("nan"))
    stats = torch.full((1, 6), float("nan"))
    attention_probs_triton_out(scores, None, 0.5, 1.5, 3, True, 2, 1, "batch", "nearest", None,
                               probs, stats)
    assert stats[0, 0] == 1.5
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / 8))


@pytest.mark.parametrize("frames,tau", [(16, 7), (16, 3), (7, 2)])
def test_fixed_beta_without_stats_is_one_launch(frames, tau, monkeypatch):
    from bytheway_kernels import triton_kernels

    launches = []
    for name in ("_stats_kernel", "_apply_kernel"):
        kernel = getattr(triton_kernels, name)

        class Counting:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launches.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(triton_kernels, name, Counting(kernel, name))
    case = Case(frames=frames, tau=tau, adaptive_beta=False)
    scores, guide = make_inputs(case)
    probs = torch.full_like(scores, float("nan"))
    attention_probs_triton_out(scores, guide, 0.6, 1.5, tau, False, 2, 1, "batch", "nearest", None,
                               probs, None)
    assert launches == ["_apply_kernel"]
    ref = reference.bytheway_attention_probs(scores.double(), guide.double(), alpha=0.6, beta=1.5,
                                             tau=tau, adaptive_beta=False)
    torch.testing.assert_close(probs.double(), ref, atol=2e-5, rtol=2e-5)
    launches.clear()
    attention_probs_triton_out(scores, guide, 0.6, 1.5, tau, True, 2, 1, "batch", "nearest", None,
                               probs, None)
    assert launches == ["_stats_kernel", "_apply_kernel"]


@pytest.mark.parametrize("batch,cfg_parts", [(1, (1, 0)), (0, (2, 1))])
def test_batch_of_one_and_empty_batch(batch, cfg_parts):
    case = Case(batch=batch, parts=cfg_parts[0], energy_part=cfg_parts[1])
    check_backend_case(attention_probs_triton_out, case)


def test_sample_scope_is_independent_of_the_batch():
    """With energy_scope="sample", a video's output is the same alone or next to others."""
    case = Case(batch=4, energy_scope="sample")
    scores, guide = make_inputs(case)
    together = torch.empty_like(scores)
    attention_probs_triton_out(scores, guide, 0.6, 1.5, 7, True, 2, 1, "sample", "nearest", None,
                               together, None)
    alone_scores = scores[[1, 3]]  # uncond and cond rows of video 1
    alone = torch.empty_like(alone_scores)
    attention_probs_triton_out(alone_scores, guide[[1, 3]], 0.6, 1.5, 7, True, 2, 1, "sample",
                               "nearest", None, alone, None)
    torch.testing.assert_close(alone, together[[1, 3]], atol=1e-6, rtol=1e-6)


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    scores, _ = make_inputs(Case(guide_size=None))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention_probs_triton_out(scores, None, 0.6, 1.5, 7, True, 2, 1, "batch", "nearest", None,
                                   torch.empty_like(scores), None)
