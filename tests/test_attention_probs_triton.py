"""The fused Triton kernels vs the reference, run by the Triton interpreter on CPU.

`TRITON_INTERPRET=1` (set in conftest.py) executes the very kernel source that runs on GPU.
"""

import pytest
import torch

from attention_probs_cases import (BackendContract, Case, assert_matches_reference, make_inputs,
                           needs_triton_interpreter)
from bytheway_kernels.ops.attention_probs import triton as triton_kernels
from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out

pytestmark = needs_triton_interpreter


class TestTritonContract(BackendContract):
    run_out = staticmethod(attention_probs_triton_out)
    backend = "triton"


@pytest.mark.parametrize("frames,tau", [(16, 7), (16, 3), (7, 2)])
def test_fixed_beta_without_stats_is_one_launch(frames, tau, monkeypatch):
    launches = []

    class CountingKernel:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_stats_kernel", "_apply_kernel"):
        monkeypatch.setattr(triton_kernels, name, CountingKernel(getattr(triton_kernels, name), name))
    case = Case(frames=frames, tau=tau, adaptive_beta=False)
    scores, guide = make_inputs(case)
    probs = torch.full_like(scores, float("nan"))
    attention_probs_triton_out(scores, guide, case.params(), probs, None)
    assert launches == ["_apply_kernel"]
    assert_matches_reference(scores, guide, case, probs)
    launches.clear()
    attention_probs_triton_out(scores, guide, case.params()._replace(adaptive_beta=True), probs, None)
    assert launches == ["_stats_kernel", "_apply_kernel"]


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    scores, _ = make_inputs(Case(guide_size=None))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention_probs_triton_out(scores, None, Case().params(), torch.empty_like(scores), None)
