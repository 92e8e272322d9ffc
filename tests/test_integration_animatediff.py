"""apply_bytheway on a tiny offline AnimateDiffPipeline (UNetMotionModel): the thorough set."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import bytheway_kernels
from bytheway_kernels.integration import ByTheWayAttnProcessor, active_step_count, apply_bytheway, reduce_heads
from bytheway_kernels.integration.processor import BINDING_ATTR
from bytheway_kernels.integration.tiny import tiny_animatediff_pipeline
from integration_helpers import FRAMES, STEPS, OpSpy, run_frames, unet_inputs, video_call_kwargs

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe():
    return tiny_animatediff_pipeline()


@pytest.fixture(scope="module")
def stock_frames(pipe):
    return run_frames(pipe, **video_call_kwargs())


def _temporal_attention_names(unet):
    return sorted(
        name for name, module in unet.named_modules()
        if ".motion_modules." in name and name.endswith(("attn1", "attn2"))
    )


def test_public_names():
    assert bytheway_kernels.apply_bytheway is apply_bytheway
    assert bytheway_kernels.ByTheWayController.__name__ == "ByTheWayController"
    ByTheWayAttnProcessor()  # diffusers re-creates processors with processor.__class__()


def test_processors_installed_on_exactly_the_decoder_layers_from_the_anchor(pipe):
    before = {name: proc for name, proc in pipe.unet.attn_processors.items()}
    with apply_bytheway(pipe) as controller:
        expected = [n for n in _temporal_attention_names(pipe.unet) if n.startswith(("up_blocks.1.", "up_blocks.2."))]
        assert sorted(controller.layer_names) == expected
        assert controller.anchor == "up_blocks.1"
        # the other temporal layers (down/mid blocks, up_blocks.0) are bound to run fused in active steps
        plain = [n for n in _temporal_attention_names(pipe.unet) if n not in expected]
        assert sorted(controller.plain_layer_names) == plain and plain
        for name, proc in pipe.unet.attn_processors.items():
            layer = name[: -len(".processor")]
            if layer in expected or layer in plain:
                assert isinstance(proc, ByTheWayAttnProcessor), name
            else:
                assert proc is before[name], name  # untouched: spatial attention
    after = pipe.unet.attn_processors
    assert all(after[name] is before[name] for name in before)
    assert not any(hasattr(m, BINDING_ATTR) for m in pipe.unet.modules())
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks


def test_active_on_exactly_the_first_ceil_fraction_of_steps(pipe):
    for steps, fraction in ((5, 0.2), (7, 0.2), (6, 0.5)):
        with apply_bytheway(pipe, diagnostics=True, step_fraction=fraction) as controller:
            run_frames(pipe, **video_call_kwargs(steps=steps))
            rows = controller.diagnostics()
        active_steps = sorted({r["step"] for r in rows if r["active"]})
        assert active_steps == list(range(math.ceil(round(fraction * steps, 9)))), (steps, fraction)
        assert sorted({r["step"] for r in rows}) == list(range(steps))
    assert active_step_count(0.2, 15) == 3 and active_step_count(0.01, 3) == 1


def test_stock_outputs_outside_active_steps_and_changed_inside(pipe):
    unet = pipe.unet
    pipe.scheduler.set_timesteps(STEPS)
    sample, text = unet_inputs(pipe)
    with torch.no_grad():
        stock = [unet(sample, t, encoder_hidden_states=text).sample for t in pipe.scheduler.timesteps]
        with apply_bytheway(pipe, cfg=True):
            outputs = [unet(sample, t, encoder_hidden_states=text).sample for t in pipe.scheduler.timesteps]
    assert not torch.equal(outputs[0], stock[0])
    for step in range(1, STEPS):
        assert torch.equal(outputs[step], stock[step]), step


def test_unselected_layers_and_unbound_modules_match_stock(pipe):
    # A ByTheWayAttnProcessor on an Attention module without a binding is the stock processor.
    attn = pipe.unet.up_blocks[0].motion_modules[0].transformer_blocks[0].attn1
    hidden = torch.randn(3 * 4, FRAMES, attn.to_q.in_features)
    with torch.no_grad():
        assert torch.equal(ByTheWayAttnProcessor()(attn, hidden), attn.processor(attn, hidden))


def test_remove_restores_bit_identical_pipeline_output(pipe, stock_frames):
    controller = apply_bytheway(pipe)
    changed = run_frames(pipe, **video_call_kwargs())
    controller.remove()
    controller.remove()  # idempotent
    assert not torch.equal(changed, stock_frames)
    assert torch.equal(run_frames(pipe, **video_call_kwargs()), stock_frames)


@pytest.mark.parametrize("height,width", [(16, 16), (16, 24)])
def test_anchor_maps_recorded_and_consumed_with_matching_shapes(pipe, monkeypatch, height, width):
    spy = OpSpy(monkeypatch)
    with apply_bytheway(pipe) as controller:
        run_frames(pipe, **video_call_kwargs(height=height, width=width))
        layers = controller.layer_names
    latent_h, latent_w = height // 2, width // 2
    assert len(spy.calls) == len(layers)  # one active step, each layer once
    anchor_calls = [c for c in spy.calls if c.guide_shape is None]
    guided_calls = [c for c in spy.calls if c.guide_shape is not None]
    assert len(anchor_calls) == len(guided_calls) == 4
    for call in anchor_calls:  # up_blocks.1: latents / 2, 4 heads
        assert call.scores_shape == (2, latent_h // 2, latent_w // 2, 4, FRAMES, FRAMES)
    for call in guided_calls:  # up_blocks.2: full latent size, 2 heads; guide at the anchor's size
        assert call.scores_shape == (2, latent_h, latent_w, 2, FRAMES, FRAMES)
        assert call.guide_shape == (2, latent_h // 2, latent_w // 2, 2, FRAMES, FRAMES)
        assert call.batch_split == (2, 1) and call.alpha == 0.6 and call.tau == 7


def test_cfg_on_and_off_and_two_prompts_times_two_videos(pipe, monkeypatch):
    spy = OpSpy(monkeypatch)
    with apply_bytheway(pipe):
        run_frames(pipe, **video_call_kwargs(guidance_scale=1.0))
        assert {c.batch_split for c in spy.calls} == {(1, 0)}
        assert {c.scores_shape[0] for c in spy.calls} == {1}
        spy.calls.clear()
        # AnimateDiffPipeline forces num_videos_per_prompt=1: two prompts x two seeds as four entries.
        generators = [torch.Generator().manual_seed(seed) for seed in (0, 1, 0, 1)]
        prompts = ["a cat", "a cat", "a dog", "a dog"]
        frames = run_frames(pipe, **video_call_kwargs(prompt=prompts, generator=generators))
    assert frames.shape[0] == 4 and torch.isfinite(frames).all()
    assert {c.batch_split for c in spy.calls} == {(2, 1)}
    assert {c.scores_shape[0] for c in spy.calls} == {8}


def _latents(pipe, seeds, energy_scope=None):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs = video_call_kwargs(prompt=["a cat"] * len(seeds), generator=generators, output_type="latent")
    if energy_scope is None:
        return run_frames(pipe, **kwargs)
    with apply_bytheway(pipe, energy_scope=energy_scope):
        return run_frames(pipe, **kwargs)


def test_sample_energy_scope_makes_each_video_independent_of_the_batch(pipe):
    # Batched convolutions alone change the last bits (~1e-4 here); the batch-wide beta of the
    # "batch" scope changes a video by far more (~7e-3) when another video joins the batch.
    numerical_noise = (_latents(pipe, [0, 1])[1] - _latents(pipe, [1])[0]).abs().max()
    sample_scope = (_latents(pipe, [0, 1], "sample")[1] - _latents(pipe, [1], "sample")[0]).abs().max()
    batch_scope = (_latents(pipe, [0, 1], "batch")[1] - _latents(pipe, [1], "batch")[0]).abs().max()
    assert sample_scope < 1e-3 and numerical_noise < 1e-3
    assert batch_scope > 5 * max(sample_scope, numerical_noise)


def test_two_pipelines_with_different_settings_do_not_interfere(monkeypatch):
    first, second = tiny_animatediff_pipeline(seed=0), tiny_animatediff_pipeline(seed=0)
    spy = OpSpy(monkeypatch)
    with apply_bytheway(first, alpha=0.1), apply_bytheway(second, "videocrafter2"):
        run_frames(first, **video_call_kwargs())
        assert {c.alpha for c in spy.calls} == {0.1}
        spy.calls.clear()
        run_frames(second, **video_call_kwargs())
        assert {(c.alpha, c.beta) for c in spy.calls} == {(0.1, 10.0)}


def test_diagnostics_table(pipe):
    with apply_bytheway(pipe, diagnostics=True) as controller:
        run_frames(pipe, **video_call_kwargs())
        rows = controller.diagnostics()
        table = controller.diagnostics_table()
    assert len(rows) == STEPS * len(controller.layer_names)
    for row in rows:
        assert all(math.isfinite(row[k]) for k in ("beta", "E1", "E2", "E3", "discrepancy", "discrepancy_after"))
        if row["block"] == "up_blocks.1":
            assert row["discrepancy"] == 0.0 and row["beta"] == pytest.approx(1.5)
        else:
            assert row["discrepancy"] > 0 and row["beta"] >= 1.5 - 1e-6
    assert "up_blocks.1" in table and "up_blocks.2" in table and "disc" in table


def test_observe_only_records_but_keeps_stock_output(pipe, stock_frames):
    with apply_bytheway(pipe, observe_only=True) as controller:
        frames = run_frames(pipe, **video_call_kwargs())
        rows = controller.diagnostics()
    assert torch.equal(frames, stock_frames)
    assert rows and not any(r["active"] for r in rows)


def test_free_init_restarts_the_step_count(pipe):
    pipe.enable_free_init(num_iters=2)
    try:
        with apply_bytheway(pipe, diagnostics=True) as controller:
            run_frames(pipe, **video_call_kwargs(steps=3))
            rows = controller.diagnostics()
    finally:
        pipe.disable_free_init()
    per_layer = [r for r in rows if r["layer"] == controller.layer_names[0]]
    assert [r["step"] for r in per_layer] == [0, 1, 2, 0, 1, 2]
    assert [r["active"] for r in per_layer] == [True, False, False] * 2


def test_free_noise_context_windows_keep_one_map_per_call(monkeypatch):
    pipe = tiny_animatediff_pipeline()
    stale = apply_bytheway(pipe)
    pipe.enable_free_noise(context_length=16, context_stride=4)
    with pytest.raises(RuntimeError, match="replaced"):
        run_frames(pipe, **video_call_kwargs(num_frames=24, steps=1))
    stale.remove()
    spy = OpSpy(monkeypatch)
    with apply_bytheway(pipe, diagnostics=True) as controller:
        frames = run_frames(pipe, **video_call_kwargs(num_frames=24, steps=1))
        rows = controller.diagnostics()
    assert frames.shape[1] == 24 and torch.isfinite(frames).all()
    windows = 3  # frames 0-15, 4-19, 8-23
    assert len(spy.calls) == windows * len(controller.layer_names)
    assert {c.scores_shape[-1] for c in spy.calls} == {16}
    assert sorted({r["call"] for r in rows}) == list(range(windows))


def test_head_reduction_rule():
    maps = torch.softmax(torch.randn(1, 2, 2, 4, 6, 6), dim=-1)
    grouped = reduce_heads(maps, 2)
    torch.testing.assert_close(grouped[..., 0, :, :], maps[..., 0:2, :, :].mean(3))
    torch.testing.assert_close(grouped[..., 1, :, :], maps[..., 2:4, :, :].mean(3))
    broadcast = reduce_heads(maps, 3)
    for head in range(3):
        torch.testing.assert_close(broadcast[..., head, :, :], maps.mean(3))
    assert reduce_heads(maps, 4) is maps
    torch.testing.assert_close(broadcast.sum(-1), torch.ones(1, 2, 2, 3, 6))


def test_bad_configuration_fails_before_denoising(pipe, monkeypatch):
    with pytest.raises(ValueError, match="unknown ByTheWay preset"):
        apply_bytheway(pipe, "modelscope")
    with pytest.raises(ValueError, match="unknown ByTheWayConfig field"):
        apply_bytheway(pipe, gamma=1.0)
    with pytest.raises(ValueError, match="anchor block 'up_blocks.5' does not exist"):
        apply_bytheway(pipe, anchor="up_blocks.5")
    with pytest.raises(ValueError, match="anchor=7 is out of range"):
        apply_bytheway(pipe, anchor=7)
    with pytest.raises(ValueError, match="cfg is required"):
        apply_bytheway(pipe.unet)
    assert not any(hasattr(m, BINDING_ATTR) for m in pipe.unet.modules())

    spy = OpSpy(monkeypatch)
    denoiser_ran = []
    handle = pipe.unet.up_blocks[0].register_forward_pre_hook(lambda *args: denoiser_ran.append(1))
    try:
        with apply_bytheway(pipe):
            with pytest.raises(ValueError, match=r"tau=7 is invalid for F=8 frames"):
                run_frames(pipe, **video_call_kwargs(num_frames=8))
    finally:
        handle.remove()
    assert not denoiser_ran and not spy.calls


def test_applying_twice_is_refused(pipe):
    with apply_bytheway(pipe):
        with pytest.raises(ValueError, match="already applied"):
            apply_bytheway(pipe)


def test_torch_compile_fullgraph_with_bytheway_active(pipe):
    # fullgraph=True fails on any graph break, so the processors (and the whole UNet) trace as
    # one graph in an active step; the step-tracking hook runs outside the graph.
    unet = pipe.unet
    pipe.scheduler.set_timesteps(STEPS)
    sample, text = unet_inputs(pipe)
    active_t = pipe.scheduler.timesteps[0]
    torch._dynamo.reset()
    try:
        with apply_bytheway(pipe, cfg=True), torch.no_grad():
            eager = unet(sample, active_t, encoder_hidden_states=text).sample
            compiled = torch.compile(unet, backend="eager", fullgraph=True)
            traced = compiled(sample, active_t, encoder_hidden_states=text).sample
        with torch.no_grad():
            stock = unet(sample, active_t, encoder_hidden_states=text).sample
    finally:
        torch._dynamo.reset()
    assert torch.equal(traced, eager) and not torch.equal(traced, stock)


def test_torch_compile_fullgraph_with_diagnostics_compiles_active_and_inactive_once():
    """Diagnostics record each call's values inside the compiled denoiser and get their step
    outside it: one graph for the active steps, one for the others, whatever the step count."""
    from torch._dynamo.utils import counters

    pipe = tiny_animatediff_pipeline()
    with apply_bytheway(pipe, diagnostics=True) as controller:
        eager = run_frames(pipe, **video_call_kwargs(steps=4))
        eager_rows = controller.diagnostics()
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)
    try:
        with apply_bytheway(pipe, diagnostics=True) as controller:
            compiled = run_frames(pipe, **video_call_kwargs(steps=4))
            rows = controller.diagnostics()
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    assert [(r["step"], r["active"]) for r in rows] == [(r["step"], r["active"]) for r in eager_rows]
    assert sorted({r["step"] for r in rows}) == [0, 1, 2, 3]


def test_a_swapped_scheduler_and_a_second_order_one_count_whole_steps():
    """The step comes from the pipeline's scheduler at call time (swapped after apply_bytheway
    here); Heun (order 2) calls the denoiser twice per step, 2 * 7 - 1 calls for 7 steps, and both
    calls of a step are active or neither is."""
    from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler, PNDMScheduler

    pipe = tiny_animatediff_pipeline()
    ddim = pipe.scheduler
    # PNDM (Stable Diffusion's default) says order 1, but its first step takes two calls with
    # skip_prk_steps, and its first three steps four calls each (Runge-Kutta) without
    pndm = functools.partial(PNDMScheduler.from_config, skip_prk_steps=True)
    pndm_prk = functools.partial(PNDMScheduler.from_config, skip_prk_steps=False)
    with apply_bytheway(pipe, diagnostics=True) as controller:
        for make_scheduler, steps, calls, active in (
                (DPMSolverMultistepScheduler.from_config, 10, 10, 2),
                (HeunDiscreteScheduler.from_config, 7, 13, 4),
                (pndm, 10, 11, 3), (pndm, 4, 5, 2), (pndm_prk, 10, 19, 8)):
            pipe.scheduler = make_scheduler(ddim.config)
            controller.clear_diagnostics()
            run_frames(pipe, **video_call_kwargs(steps=steps))
            per_layer = [r for r in controller.diagnostics() if r["layer"] == controller.layer_names[0]]
            assert len(per_layer) == calls
            assert [r["active"] for r in per_layer] == [True] * active + [False] * (calls - active)
            assert max(r["step"] for r in per_layer) == steps - 1
    pipe.scheduler = ddim


def test_a_pipeline_sharing_the_denoiser_runs_with_its_own_guidance_and_scheduler():
    """`from_pipe` shares the denoiser, and so ByTheWay, with the pipeline it was applied to; each
    call reads CFG, PAG and the scheduler from the pipeline running it, so the sharing one gets
    what ByTheWay applied to it directly gives."""
    from diffusers import AnimateDiffPAGPipeline, DPMSolverMultistepScheduler

    base = tiny_animatediff_pipeline()
    shared_pag = AnimateDiffPAGPipeline.from_pipe(base)
    shared_dpm = type(base).from_pipe(base, scheduler=DPMSolverMultistepScheduler.from_config(base.scheduler.config))
    for pipe in (shared_pag, shared_dpm):
        pipe.set_progress_bar_config(disable=True)
    # the two that ran silently wrong: PAG split (2, 1) for (3, 1), and CFG halves that were not there
    calls = ((shared_pag, dict(prompt=["a cat", "a dog"], pag_scale=3.0)),
             (shared_dpm, dict(guidance_scale=1.0, num_videos_per_prompt=2)))
    expected = []
    for pipe, extra in calls:
        with apply_bytheway(pipe):
            expected.append(run_frames(pipe, **video_call_kwargs(steps=2, **extra)))
    with apply_bytheway(base):
        # compiled after apply_bytheway: the pipelines hold the wrapper, the hooks the module
        base.unet = shared_pag.unet = shared_dpm.unet = torch.compile(base.unet, backend="eager")
        run_frames(base, **video_call_kwargs(steps=2))  # leaves the base pipeline's CFG flag on
        for (pipe, extra), frames in zip(calls, expected):
            assert torch.equal(run_frames(pipe, **video_call_kwargs(steps=2, **extra)), frames)


def test_a_sampler_holding_the_denoiser_is_not_taken_for_a_pipeline():
    """A user's sampling loop keeping the denoiser as `self.unet` (its other attributes raising,
    as an AttrDict's do) reads the applied-to pipeline's scheduler and flags, as a direct call
    does; only a diffusers pipeline calling the denoiser is read instead."""
    pipe = tiny_animatediff_pipeline()
    sample, text = unet_inputs(pipe)

    class Sampler:
        def __init__(self):
            self.unet = pipe.unet

        def __getattr__(self, name):
            raise KeyError(name)

        def run(self, steps):
            pipe.scheduler.set_timesteps(steps)
            with torch.no_grad():
                for timestep in pipe.scheduler.timesteps:
                    self.unet(sample, timestep, encoder_hidden_states=text)

    with apply_bytheway(pipe, cfg=True, diagnostics=True) as controller:
        for _ in range(2):  # each run restarts the step count
            controller.clear_diagnostics()
            Sampler().run(5)
            rows = [r for r in controller.diagnostics() if r["layer"] == controller.layer_names[0]]
            assert [(r["step"], r["active"]) for r in rows] == [(0, True)] + [(s, False) for s in range(1, 5)]


def test_pndm_in_video_to_video_counts_steps_from_the_run_start():
    """Video-to-video with strength < 1 starts inside the schedule; PNDM's warm-up restarts with
    the run, so its first step's calls (two with skip_prk_steps) are one step."""
    from diffusers import AnimateDiffVideoToVideoPipeline, PNDMScheduler

    base = tiny_animatediff_pipeline()
    pipe = AnimateDiffVideoToVideoPipeline.from_pipe(base)
    pipe.scheduler = PNDMScheduler.from_config(base.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    video = [torch.rand(3, 16, 16) for _ in range(FRAMES)]
    call = {k: v for k, v in video_call_kwargs(steps=10).items() if k != "num_frames"}
    with apply_bytheway(pipe, diagnostics=True, step_fraction=0.5) as controller:
        run_frames(pipe, video=video, strength=0.5, **call)
        rows = [r for r in controller.diagnostics() if r["layer"] == controller.layer_names[0]]
    assert [(r["step"], r["active"]) for r in rows] == [(0, True), (0, True), (1, True), (2, True),
                                                        (3, False), (4, False)]


def test_lost_handles_are_found_and_removed(stock_frames):
    """`btw.apply_bytheway(pipe)` without keeping the handle (a notebook cell): remove_bytheway
    finds both handles on the denoiser and removes them, after which everything works again."""
    import copy

    pipe = tiny_animatediff_pipeline()
    apply_bytheway(pipe)
    bytheway_kernels.enable_fast_temporal_attention(pipe)
    with pytest.raises(ValueError, match=r"remove_bytheway\(pipe\) finds it"):
        apply_bytheway(pipe)
    with pytest.raises(ValueError, match=r"remove_bytheway\(pipe\) finds it"):
        bytheway_kernels.enable_fast_temporal_attention(pipe)
    assert bytheway_kernels.remove_bytheway(pipe) == ["bytheway", "fast temporal attention"]
    assert bytheway_kernels.remove_bytheway(pipe.unet) == []
    assert torch.equal(run_frames(pipe, **video_call_kwargs()), stock_frames)
    copy.deepcopy(pipe.unet)  # refused while either was on
    with apply_bytheway(pipe):
        assert bytheway_kernels.remove_bytheway(pipe) == ["bytheway"]  # the with block's exit: a no-op


def test_processors_left_behind_without_their_binding_count_as_stock():
    """A snapshot of attn_processors taken while applied, restored after remove(), leaves
    ByTheWay's (and the fast attention's) processors without a binding; they compute stock
    attention, and applying again replaces them instead of calling back into them."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tiny_animatediff_pipeline()
    stock = run_frames(pipe, **video_call_kwargs())
    with apply_bytheway(pipe):
        applied = run_frames(pipe, **video_call_kwargs())
    controller, fast = apply_bytheway(pipe), bytheway_kernels.enable_fast_temporal_attention(pipe)
    snapshot = pipe.unet.attn_processors
    fast.remove()
    controller.remove()
    pipe.unet.set_attn_processor(snapshot)
    assert torch.equal(run_frames(pipe, **video_call_kwargs()), stock)  # the orphans run stock
    with apply_bytheway(pipe):
        assert torch.equal(run_frames(pipe, **video_call_kwargs()), applied)
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    with bytheway_kernels.enable_fast_temporal_attention(pipe) as fast:
        assert len(fast.layer_names) == 20


def test_fuse_apply_unfuse_then_apply_again():
    """README's order for fuse_qkv_projections() after apply_bytheway: remove(), and diffusers'
    unfuse_qkv_projections() then puts back the processors saved when fusing (ByTheWay's)."""
    pipe = tiny_animatediff_pipeline()
    with apply_bytheway(pipe):
        applied = run_frames(pipe, **video_call_kwargs())
    controller = apply_bytheway(pipe)
    pipe.unet.fuse_qkv_projections()
    controller.remove()
    pipe.unet.unfuse_qkv_projections()
    with apply_bytheway(pipe):
        assert torch.equal(run_frames(pipe, **video_call_kwargs()), applied)


def test_free_noise_split_inference_is_refused_clearly():
    pipe = tiny_animatediff_pipeline()
    pipe.enable_free_noise(context_length=8, context_stride=4)
    controller = apply_bytheway(pipe, tau=3)
    pipe.enable_free_noise_split_inference(spatial_split_size=32, temporal_split_size=8)
    with pytest.raises(RuntimeError, match="split inference"):
        run_frames(pipe, **video_call_kwargs(num_frames=24, steps=1))
    controller.remove()
    with pytest.raises(ValueError, match="split inference"):
        apply_bytheway(pipe, tau=3)
