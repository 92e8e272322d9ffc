"""A whole temporal self-attention layer: diffusers' stock processor (AttnProcessor2_0, SDPA)
vs the ByTheWay processor, same module weights, same (B*H*W, F, C) input.

The ByTheWay layer is a non-anchor layer in an active step, guided by a 16x16 up_blocks.1 map,
with the op backend the dispatcher picks by default (Triton on CUDA, C++ on CPU when built).
"""

from __future__ import annotations

import copy

import pytest
import torch

import bytheway_kernels as btw
import harness

pytest.importorskip("diffusers", reason="the layer benchmarks need diffusers (pip install -e .[diffusers])")
from bytheway_kernels import integration  # noqa: E402

from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from bytheway_kernels.ops.dispatch import BACKEND_ENV  # noqa: E402
from bytheway_kernels.integration.layers import Geometry, TemporalLayer  # noqa: E402
from bytheway_kernels.integration.processor import BINDING_ATTR, LayerBinding, RunState  # noqa: E402

#: Anchor key of the benchmarked layer: (module index in block, transformer block, attribute).
POSITION = (0, 0, "attn1")


def group_name(shape: harness.Shape, dtype: torch.dtype) -> str:
    return f"layer {shape.label} C{shape.channels} {str(dtype).removeprefix('torch.')}"


def temporal_attention(shape: harness.Shape) -> Attention:
    """An AnimateDiff motion-module self-attention (heads of channels / 8, no qkv bias)."""
    torch.manual_seed(0)
    return Attention(query_dim=shape.channels, heads=shape.heads, dim_head=shape.channels // shape.heads,
                     bias=False).eval()


class BoundLayer:
    """An Attention module running the ByTheWay processor as one guided decoder layer would,
    with a guide recorded as the anchor layer at the same position would have recorded it."""

    def __init__(self, attn: Attention, shape: harness.Shape, guide: torch.Tensor, fused: bool = False):
        self.attn = attn
        self.state = RunState(config=harness.PRESET, modify=True, batch_split=(2, 1),
                              **({"fused": True} if fused else {}))
        layer = TemporalLayer(
            name="benchmark.attn1", block="up_blocks.2", position=POSITION, attn=attn, parent=None,
            attribute="attn1", owner=None, geometry=Geometry(shape.batch, shape.height, shape.width),
        )
        setattr(attn, BINDING_ATTR, LayerBinding(self.state, layer, original=AttnProcessor2_0(),
                                                 is_anchor=False, guide_heads=()))
        attn.set_processor(integration.ByTheWayAttnProcessor())
        self.guide = guide

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # What the controller's denoiser pre-hook does before each call: a fresh call count and
        # the anchor map for this step.
        self.state.calls.clear()
        self.state.guides[(POSITION, 0)] = {self.attn.heads: self.guide}
        return self.attn(hidden_states)


@pytest.fixture(scope="module")
def layer_inputs(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    rows = shape.batch * shape.height * shape.width
    hidden = torch.randn(rows, shape.frames, shape.channels, generator=gen)
    _, guide = harness.make_map_inputs(shape, dtype)
    return hidden.to(harness.DEVICE, dtype), guide


def test_stock_layer(bench, shape, dtype, layer_inputs):
    hidden, _ = layer_inputs
    attn = temporal_attention(shape)
    attn.set_processor(AttnProcessor2_0())
    attn.to(harness.DEVICE, dtype)
    reference = copy.deepcopy(attn).double()  # same (rounded) weights
    with torch.no_grad():
        out = bench(lambda: attn(hidden), group=group_name(shape, dtype), impl="stock layer (SDPA)", floor=True)
        expected = reference(hidden.double())
    harness.assert_close_to(out, expected, dtype, scale=harness.COMPOSITE_TOLERANCE_SCALE)


@pytest.mark.parametrize("fused", [False, True], ids=["materialised", "fused"])
def test_bytheway_layer(bench, monkeypatch, shape, dtype, layer_inputs, fused):
    if fused and not (harness.fused_kernel_available() and "fused" in RunState.__dataclass_fields__):
        pytest.skip(f"the ByTheWay processor has no fused path on {harness.DEVICE.type} in this revision")
    hidden, guide = layer_inputs
    backend = "fused" if fused else btw.select_backend(harness.DEVICE)  # on CPU this builds the C++ kernel
    attn = temporal_attention(shape).to(harness.DEVICE, dtype)
    reference_attn = copy.deepcopy(attn).double()  # same (rounded) weights
    layer = BoundLayer(attn, shape, guide, fused)
    with torch.no_grad():
        out = bench(lambda: layer(hidden), group=group_name(shape, dtype), impl="bytheway layer",
                    variant="adaptive-guide", backend=backend)
        monkeypatch.setenv(BACKEND_ENV, "reference")
        expected = BoundLayer(reference_attn, shape, guide.double())(hidden.double())
    harness.assert_close_to(out, expected, dtype, scale=harness.COMPOSITE_TOLERANCE_SCALE)
