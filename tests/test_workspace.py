"""Which calls reuse a stats workspace (bytheway_kernels/ops/workspace.py); that a reused one
gives the fresh result is tested with the kernels (tests/test_attention_probs_triton.py,
tests/test_attention_probs_gpu.py)."""

import threading

import torch

from bytheway_kernels.ops import launch as launch_module
from bytheway_kernels.ops import workspace as workspace_module
from bytheway_kernels.ops.workspace import zeroed_workspace


class _Plan:
    """Stands in for a launch plan: the workspace's owner, compared by identity."""


def test_one_workspace_per_plan_and_thread():
    """A plan's eager calls on one thread and stream share a zeroed workspace; another plan or
    another thread gets its own (two threads' launches on one stream can interleave), and a call
    that may not reuse gets a new one every time."""
    workspace_module.clear_reused_workspaces()
    like = torch.zeros(1)
    plan, other_plan = _Plan(), _Plan()
    first = zeroed_workspace(plan, 8, like, reuse=True)
    assert first.dtype == torch.float32 and first.shape == (8,) and torch.count_nonzero(first) == 0
    assert zeroed_workspace(plan, 8, like, reuse=True) is first
    assert zeroed_workspace(other_plan, 8, like, reuse=True) is not first
    assert zeroed_workspace(plan, 8, like, reuse=False) is not first
    from_thread = []
    thread = threading.Thread(target=lambda: from_thread.append(zeroed_workspace(plan, 8, like, reuse=True)))
    thread.start()
    thread.join()
    assert from_thread[0] is not first and torch.count_nonzero(from_thread[0]) == 0
    workspace_module.clear_reused_workspaces()
    assert zeroed_workspace(plan, 8, like, reuse=True) is not first
    workspace_module.clear_reused_workspaces()


class _CudaTensorStandIn:
    """Answers what `_reusable_stream` asks of a tensor on cuda:`index`."""

    def __init__(self, index):
        self.index = index

    def get_device(self):
        return self.index


def test_no_reuse_off_the_current_device_or_while_capturing(monkeypatch):
    monkeypatch.setattr(launch_module, "current_device", lambda: 0)
    monkeypatch.setattr(launch_module, "current_stream", lambda device: 77 + device)
    capturing = [False]
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: capturing[0], raising=False)
    assert workspace_module._reusable_stream(_CudaTensorStandIn(0)) == (0, 77)
    assert workspace_module._reusable_stream(_CudaTensorStandIn(1)) is None  # cuda:1, cuda:0 current
    capturing[0] = True
    assert workspace_module._reusable_stream(_CudaTensorStandIn(0)) is None
