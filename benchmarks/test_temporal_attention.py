"""Temporal attention, q, k, v -> out: the fused op (`bytheway_kernels.temporal_attention`) against
every SDPA backend and the materialised path (baddbmm -> map op -> bmm), one group per shape.

q, k and v are strided slices of one (B*H*W, F, 3C) tensor, as a fused qkv projection gives them.
The memory floor of every row is one read of q, k, v and one write of out at the measured copy
bandwidth. ByTheWay rows use the AnimateDiff preset with a 16x16 up_blocks.1 guide.
"""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F_nn

import bytheway_kernels as btw
import harness

#: GPUs time the dtype AnimateDiff runs in; the CPU runs fp32.
DTYPE = torch.float16 if harness.DEVICE.type == "cuda" else torch.float32
#: The fused op, once it is part of the package (skips its rows before that).
temporal_attention: Optional[Callable] = getattr(btw, "temporal_attention", None)

#: ByTheWay settings per variant: None is plain attention (ByTheWay off).
VARIANTS = {"plain": None, "fixed": False, "adaptive": True}

#: SDPA backends by name; None lets PyTorch pick (what stock diffusers runs).
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")


def group_name(shape: harness.Shape) -> str:
    return (f"attention {shape.label} d{shape.channels // shape.heads} "
            f"{str(DTYPE).removeprefix('torch.')}")


@pytest.fixture(scope="module")
def attn_inputs(shape):
    """(q, k, v, guide): q, k, v slices of one (N, F, 3C) tensor; scores of standard deviation 2."""
    gen = torch.Generator().manual_seed(4)
    rows = shape.batch * shape.height * shape.width
    qkv = torch.randn(rows, shape.frames, 3 * shape.channels, generator=gen)
    qkv[..., : shape.channels] *= 2.0
    q, k, v = qkv.to(harness.DEVICE, DTYPE).chunk(3, dim=-1)
    _, guide = harness.make_map_inputs(shape, DTYPE)
    return q, k, v, guide


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, F, heads*d) -> (N, heads, F, d), a strided view, as diffusers' SDPA processor makes it."""
    rows, frames, channels = x.shape
    return x.view(rows, frames, heads, channels // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    rows, heads, frames, head_dim = x.shape
    return x.transpose(1, 2).reshape(rows, frames, heads * head_dim)


@pytest.fixture(scope="module")
def expected(shape, attn_inputs):
    """variant -> float64 ground truth: scores, the reference map op (softmax when plain), @ v."""
    q, k, v, guide = attn_inputs
    cache = {}

    def lookup(variant: str) -> torch.Tensor:
        if variant not in cache:
            heads = shape.heads
            scale = (q.shape[-1] // heads) ** -0.5
            scores = split_heads(q.double(), heads) @ split_heads(k.double(), heads).transpose(-1, -2) * scale
            adaptive = VARIANTS[variant]
            if adaptive is None:
                probs = torch.softmax(scores, dim=-1)
            else:
                grid = scores.view(-1, shape.height, shape.width, heads, shape.frames, shape.frames)
                probs = btw.reference.bytheway_attention_probs(grid, guide.double(), **harness.op_kwargs(adaptive))
                probs = probs.view(scores.shape)
            cache[variant] = merge_heads(probs @ split_heads(v.double(), heads))
        return cache[variant]

    return lookup


def attention_bytes(q: torch.Tensor) -> int:
    """The compulsory traffic: q, k, v read once and out written once."""
    return 4 * q.numel() * q.element_size()


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_sdpa(bench, shape, attn_inputs, expected, backend):
    """Plain attention as diffusers' AttnProcessor2_0 runs it: strided per-head views, SDPA, and
    the copy back to (N, F, C)."""
    from torch.nn.attention import sdpa_kernel

    q, k, v, _ = attn_inputs
    heads = shape.heads

    def attend():
        return merge_heads(F_nn.scaled_dot_product_attention(
            split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)))

    def with_backend():
        with sdpa_kernel(sdpa_backend(backend)):
            return attend()

    fn = attend if backend == "default" else with_backend
    if backend != "default":
        try:
            fn()
        except RuntimeError as error:  # no kernel of this backend for this device, dtype or shape
            pytest.skip(f"SDPA backend {backend} does not run here: {str(error).splitlines()[0]}")
    out = bench(fn, group=group_name(shape), impl=f"sdpa {backend}", variant="plain",
                floor=backend == "default", bytes_moved=attention_bytes(q))
    harness.assert_close_to(out, expected("plain"), DTYPE, scale=harness.COMPOSITE_TOLERANCE_SCALE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_materialised(bench, shape, attn_inputs, expected, variant):
    """What the ByTheWay processor runs without the fused op: per-head copies, baddbmm, the map op
    (softmax when plain) on the scores, bmm, and the copy back to (N, F, C)."""
    q, k, v, guide = attn_inputs
    heads = shape.heads
    rows, frames, channels = q.shape
    scale = (channels // heads) ** -0.5
    adaptive = VARIANTS[variant]
    backend = btw.select_backend(harness.DEVICE)  # on CPU this builds the C++ kernel, before timing

    def per_head(x):
        return split_heads(x, heads).reshape(rows * heads, frames, channels // heads)

    def materialised():
        scores = torch.baddbmm(torch.empty(rows * heads, frames, frames, dtype=q.dtype, device=q.device),
                               per_head(q), per_head(k).transpose(1, 2), beta=0, alpha=scale)
        if adaptive is None:
            probs = torch.softmax(scores, dim=-1)
        else:
            grid = scores.view(-1, shape.height, shape.width, heads, frames, frames)
            probs = btw.bytheway_attention_probs(grid, guide, **harness.op_kwargs(adaptive)).view(scores.shape)
        return merge_heads(torch.bmm(probs, per_head(v)).view(rows, heads, frames, -1))

    out = bench(materialised, group=group_name(shape), impl="materialised", variant=variant,
                backend="" if adaptive is None else backend, bytes_moved=attention_bytes(q))
    harness.assert_close_to(out, expected(variant), DTYPE, scale=harness.COMPOSITE_TOLERANCE_SCALE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused(bench, shape, attn_inputs, expected, variant):
    if temporal_attention is None:
        pytest.skip("bytheway_kernels.temporal_attention is not in this revision")
    q, k, v, guide = attn_inputs
    adaptive = VARIANTS[variant]
    kwargs = dict(heads=shape.heads, height=shape.height, width=shape.width)
    if adaptive is not None:
        kwargs.update(guide=guide, cfg=True, **harness.op_kwargs(adaptive))
    out = bench(lambda: temporal_attention(q, k, v, **kwargs), group=group_name(shape),
                impl="fused", variant=variant, bytes_moved=attention_bytes(q), breakdown=True)
    harness.assert_close_to(out, expected(variant), DTYPE, scale=harness.COMPOSITE_TOLERANCE_SCALE)
