"""Zeroed workspaces for the map op's stats pass, reused per stream by plain eager calls.

The stats pass (`attention_probs.triton`) takes tickets on int32 counters in a float32 workspace
that also holds its partial sums and betas; the counters must be zero when it starts. A fresh
`torch.zeros` per call costs a fill kernel (0.7-0.8 us of device time on an H200, about 5% of an
adaptive call at up_blocks.2) and 9-13 us of host time. But the kernel sets every counter back to
zero once its last ticket is drawn, and the work on one CUDA stream runs in order, so one
workspace per (launch plan, device, stream, thread) serves every later call there as it is: the
partials and betas are written before they are read. The thread is in the key because two
threads' calls on one stream can interleave their launches (Triton's launcher releases the GIL):
stats A, stats B, apply A would hand A the beta of B.

A workspace is reused only where that ordering holds and nothing else tracks the memory:
- plain eager calls through the public function (the op's direct path), never the custom op
  (torch.compile, tracing: CUDA-graph trees check their memory pool for allocations they did
  not make);
- not while the current stream is capturing a CUDA graph (a graph can replay on any stream, next
  to eager calls), and only on the current device (whose current stream is the one launched on).
Every other call zeroes a new workspace, as before. CPU tensors (the Triton interpreter) reuse as
CUDA does, so the interpreter tests exercise the same reset. The stream is keyed by its raw
handle: torch's own streams live as long as the process, but an external stream
(`torch.cuda.ExternalStream`) destroyed with work pending and another created at the same handle
would share a workspace unordered; call `clear_reused_workspaces()` after destroying one.
"""

from __future__ import annotations

import threading

import torch

from . import launch

_REUSED: dict = {}  # (id(owner), device index, stream, thread) -> (owner, workspace)
_REUSED_LIMIT = 256
_CPU_STREAM = (-1, None)


def _reusable_stream(like: torch.Tensor):
    """(device index, raw stream) whose work is ordered with this call's launches, or None where
    a workspace must not be reused (another device is current, or the stream is capturing)."""
    index = like.get_device()
    if index < 0:
        return _CPU_STREAM if like.device.type == "cpu" else None
    if index != launch.current_device() or torch._C._cuda_isCurrentStreamCapturing():
        return None
    return index, launch.current_stream(index)


def zeroed_workspace(owner, size: int, like: torch.Tensor, reuse: bool) -> torch.Tensor:
    """A float32 workspace of `size` elements on `like`'s device whose counters are zero.

    `owner` is the launch plan that lays the workspace out (kept alive by the cache, compared by
    identity). With `reuse` (plain eager calls only), the workspace this plan last used on the
    current stream, else a new one remembered for the next call; without it, always a new one.
    """
    if reuse:
        stream = _reusable_stream(like)
        if stream is not None:
            key = (id(owner), *stream, _thread_id())
            entry = _REUSED.get(key)
            if entry is not None and entry[0] is owner:
                return entry[1]
            workspace = torch.zeros(size, dtype=torch.float32, device=like.device)
            if len(_REUSED) >= _REUSED_LIMIT:
                _REUSED.clear()  # freed on their streams: the caching allocator orders any reuse
            _REUSED[key] = (owner, workspace)
            return workspace
    return torch.zeros(size, dtype=torch.float32, device=like.device)


_thread_id = threading.get_ident


def clear_reused_workspaces() -> None:
    """Forget the reused workspaces (their memory goes back to the caching allocator)."""
    _REUSED.clear()
