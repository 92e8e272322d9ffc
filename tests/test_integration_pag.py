"""AnimateDiffPAGPipeline: perturbed-attention guidance swaps processors for the length of each
call, on its `pag_applied_layers` (by default `mid_block.*attn1`, which takes in the middle
block's temporal self-attention), then puts the ones it found back.

That layer is one of ByTheWay's plain layers (sped up in fused calls, never modified), so it must
run PAG's processor while PAG holds it, and ByTheWay's layers must see the three-part batch
(unconditional, conditional, perturbed). A processed layer that PAG perturbs is refused clearly.
"""

from __future__ import annotations

import pytest
import torch

import bytheway_kernels.integration.controller as controller_module
import bytheway_kernels.integration.fast as fast_module
import bytheway_kernels.integration.processor as processor_module
from bytheway_kernels import apply_bytheway, enable_fast_temporal_attention
from bytheway_kernels.integration import ByTheWayAttnProcessor, tiny
from integration_helpers import OpSpy, run_frames, video_call_kwargs

pytest.importorskip("diffusers")

STEPS = 3  # ceil(0.2 * 3) = 1 active step
MIDDLE_TEMPORAL = "mid_block.motion_modules.0.transformer_blocks.0.attn1"
# as tests/test_integration_fused.py: the fused path's CPU composition against the materialised
# one, fp32 sums in another order, far below ByTheWay's own effect on the output (> 1e-3 here)
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _run(pipe):
    return run_frames(pipe, **video_call_kwargs(steps=STEPS, pag_scale=3.0))


@pytest.fixture(scope="module")
def pipe():
    return tiny.tiny_animatediff_pag_pipeline()


@pytest.fixture
def force_fused(monkeypatch):
    """Every device counts as having the fused kernel (the op then runs its CPU path)."""
    monkeypatch.setattr(controller_module, "fused_available", lambda device: True)
    monkeypatch.setattr(fast_module, "fused_available", lambda device: True)


@pytest.fixture
def pag_layers(monkeypatch, pipe):
    """The names of the layers PAG's processors ran in, as a list that fills as calls go."""
    from diffusers.models.attention_processor import (PAGCFGIdentitySelfAttnProcessor2_0,
                                                      PAGIdentitySelfAttnProcessor2_0)

    names = {id(module): name for name, module in pipe.unet.named_modules()}
    seen = []
    for processor_class in (PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0):
        original = processor_class.__call__

        def spy(self, attn, *args, _original=original, **kwargs):
            seen.append(names.get(id(attn)))
            return _original(self, attn, *args, **kwargs)

        monkeypatch.setattr(processor_class, "__call__", spy)
    return seen


@pytest.fixture
def fused_calls(monkeypatch):
    """The batch split of every guided (ByTheWay) temporal_attention call of the processor."""
    splits = []
    original = processor_module.temporal_attention

    def spy(q, k, v, **kwargs):
        if "batch_split" in kwargs:
            splits.append(tuple(kwargs["batch_split"]))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(processor_module, "temporal_attention", spy)
    return splits


def test_pag_runs_in_the_middle_block_while_bytheway_runs_in_the_decoder(pipe, pag_layers, fused_calls,
                                                                         monkeypatch):
    stock = _run(pipe)
    assert MIDDLE_TEMPORAL in pag_layers  # PAG's default layers take in a temporal layer

    outputs = {}
    for fused in (False, True):
        pag_layers.clear()
        fused_calls.clear()
        with monkeypatch.context() as patch:
            map_op_calls = OpSpy(patch)
            if fused:
                patch.setattr(controller_module, "fused_available", lambda device: True)
            with apply_bytheway(pipe, fused_attention=None if fused else False) as controller:
                assert (MIDDLE_TEMPORAL in controller.plain_layer_names) == fused
                outputs[fused] = _run(pipe)
                # PAG put the processors it found back: ByTheWay's, on its plain layer too
                middle = pipe.unet.get_submodule(MIDDLE_TEMPORAL)
                assert isinstance(middle.processor, ByTheWayAttnProcessor) == fused
                processed = len(controller.layer_names)
        assert MIDDLE_TEMPORAL in pag_layers
        # one active step, one guided call per processed layer, energies from the conditional
        # part of (unconditional, conditional, perturbed)
        splits = fused_calls if fused else [call.batch_split for call in map_op_calls.calls]
        assert len(splits) == processed and set(splits) == {(3, 1)}
        assert torch.isfinite(outputs[fused]).all() and not torch.equal(outputs[fused], stock)
    torch.testing.assert_close(outputs[True], outputs[False], **TOLERANCE)
    assert torch.equal(_run(pipe), stock)


def test_fast_attention_leaves_the_perturbed_layer_to_pag(pipe, pag_layers, force_fused):
    stock = _run(pipe)
    with enable_fast_temporal_attention(pipe) as handle:
        assert MIDDLE_TEMPORAL in handle.layer_names
        pag_layers.clear()
        fast = _run(pipe)
    assert MIDDLE_TEMPORAL in pag_layers
    torch.testing.assert_close(fast, stock, **TOLERANCE)
    assert torch.equal(_run(pipe), stock)


def test_pag_on_a_processed_layer_is_refused_clearly():
    pipe = tiny.tiny_animatediff_pag_pipeline()
    pipe.set_pag_applied_layers(["up_blocks.1.*attn1"])  # the anchor block's temporal layers too
    with apply_bytheway(pipe), pytest.raises(RuntimeError, match="pag_applied_layers") as error:
        _run(pipe)
    assert "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1" in str(error.value)
