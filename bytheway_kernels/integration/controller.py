"""`apply_bytheway` and the controller that owns one application of ByTheWay to a denoiser."""

from __future__ import annotations

import functools
import math
import sys
from typing import Dict, List, Optional, Tuple, Union

import torch

from .._validation import batch_parts, check_flag, check_tau
from ..config import PRESETS, ByTheWayConfig
from ..ops.temporal_attention import fused_available
from . import diagnostics as diagnostics_module
from .layers import (ModelFamily, TemporalLayer, all_temporal_layers, decoder_temporal_layers, family_of, frames_of,
                     resolve_anchor, split_inference_wrappers)
from .processor import (BINDING_ATTR, BYTHEWAY_COPY_ADVICE, ByTheWayAttnProcessor, LayerBinding, PlainLayerBinding,
                        RefusesCopy, RunState, projects_fused_qkv, replace_orphaned_processors,
                        standard_scale)

#: Attribute of the denoiser module holding its active ByTheWayController (`remove_bytheway`).
CONTROLLER_ATTR = "_bytheway_controller"


def active_step_count(step_fraction: float, num_steps: int) -> int:
    """ceil(step_fraction * num_steps), at least one (rounded first so 0.2 * 15 gives 3, not 4)."""
    return max(1, math.ceil(round(step_fraction * num_steps, 9)))


def split_target(target):
    """(pipeline or None, denoiser as called, denoiser module) from a pipeline or a bare denoiser.

    The last two differ for a torch.compile'd denoiser: layers and geometry hooks go on the real
    module, the step-tracking hooks on the compiled wrapper so that they run outside the graph.
    """
    if isinstance(target, torch.nn.Module):
        pipeline, denoiser = None, target
    else:
        pipeline = target
        denoiser = getattr(target, "unet", None)
        if denoiser is None:
            denoiser = getattr(target, "transformer", None)
        if not isinstance(denoiser, torch.nn.Module):
            raise ValueError(
                f"bytheway_kernels needs a diffusers pipeline with a `unet` or `transformer`, or a denoiser "
                f"module; got {type(target).__name__}"
            )
    return pipeline, denoiser, getattr(denoiser, "_orig_mod", denoiser)


def _batch_split_override(pipeline, cfg, batch_split) -> Optional[Tuple[int, int]]:
    """The fixed (parts, energy part) from `cfg` / `batch_split`, or None to ask the pipeline per
    call; a ValueError when neither is given and the pipeline cannot tell."""
    if isinstance(cfg, tuple):
        raise ValueError(
            f"cfg must be None or a bool, got the tuple {cfg!r}: pass a (parts, energy_part) split as "
            f"batch_split={cfg!r}"
        )
    if cfg is not None:
        cfg = check_flag("cfg", cfg)
    if cfg is not None or batch_split is not None:
        return batch_parts(bool(cfg), batch_split)  # an explicit batch_split overrides cfg
    if pipeline is None:
        raise ValueError(
            "cfg is required when applying ByTheWay to a bare denoiser: pass cfg=True when the batch "
            "is (unconditional, conditional) halves, cfg=False otherwise (or batch_split=(parts, part))"
        )
    if not hasattr(type(pipeline), "do_classifier_free_guidance"):
        raise ValueError(
            f"{type(pipeline).__name__} does not expose do_classifier_free_guidance: pass cfg=True "
            f"(guidance_scale > 1) or cfg=False to apply_bytheway"
        )
    return None


def _select_layers(denoiser, family: ModelFamily, anchor) -> Tuple[str, List[TemporalLayer]]:
    """(anchor block name, every processed layer from the anchor block on), with a
    ValueError when a processed layer has no anchor layer at the same position."""
    blocks = decoder_temporal_layers(denoiser, family)
    if not any(layers for _, layers in blocks):
        raise ValueError(
            f"found no temporal self-attention layers in the decoder of {type(denoiser).__name__}; "
            f"searched {[name for name, _ in blocks]} for {family.name} temporal modules"
        )
    block_names = [name for name, _ in blocks]
    anchor = resolve_anchor(anchor, denoiser, family, block_names)
    anchor_index = block_names.index(anchor)
    anchor_layers = blocks[anchor_index][1]
    if not anchor_layers:
        raise ValueError(f"anchor block {anchor!r} of {family.name} has no temporal self-attention")
    selected = [layer for _, layers in blocks[anchor_index:] for layer in layers]
    anchor_positions = {layer.position for layer in anchor_layers}
    missing = [layer.name for layer in selected if layer.position not in anchor_positions]
    if missing:
        raise ValueError(
            f"layers {missing} have no layer at the same position in the anchor block {anchor!r} "
            f"(positions there: {sorted(anchor_positions)})"
        )
    for layer in selected:
        if getattr(layer.attn, BINDING_ATTR, None) is not None:
            raise ValueError(
                f"ByTheWay is already applied to {layer.name}; call remove() on the existing controller first "
                f"(bytheway_kernels.remove_bytheway(pipe) finds it if it is lost)"
            )
    return anchor, selected


def _plain_layers(denoiser, family: ModelFamily, selected: List[TemporalLayer]) -> List[TemporalLayer]:
    """The temporal self-attention layers ByTheWay fuses but does not process: every one outside
    `selected` that runs a standard diffusers processor (others, the fast attention's and
    ByTheWay's own included, keep theirs)."""
    processed = {id(layer.attn) for layer in selected}
    return [
        layer for layer in all_temporal_layers(denoiser, family)
        if id(layer.attn) not in processed and standard_scale(layer.attn.processor, layer.attn)[0]
    ]


def _guide_heads(anchor: str, layers: List[TemporalLayer]) -> Dict[Tuple, Tuple[int, ...]]:
    """Per anchor position, the head counts of the later layers its map guides."""
    heads: Dict[Tuple, set] = {}
    for layer in layers:
        if layer.block != anchor:
            heads.setdefault(layer.position, set()).add(layer.attn.heads)
    return {position: tuple(sorted(counts)) for position, counts in heads.items()}


class ByTheWayController(RefusesCopy):
    """ByTheWay applied to one denoiser: the installed processors, hooks and run state.

    Create it with `apply_bytheway`. `remove()` (or leaving a `with` block) restores the original
    processors and removes every hook. Per denoiser call the controller
    - reads the step index from the position of the timestep in `scheduler.timesteps` (the
      pipeline's scheduler at the time of the call, so a swapped one counts; a second-order
      scheduler's two calls per step count as one step), counted from the first timestep of the
      current denoising loop (FreeInit restarts count from zero; video-to-video with strength < 1
      counts from its first step), and enables ByTheWay for the first ceil(step_fraction * steps)
      of the loop's steps; without a scheduler (a bare denoiser) every call is active;
    - reads whether classifier-free guidance (and PAG) is on from the pipeline, unless `cfg` or
      `batch_split` was given;
    - unless `fused_attention` is False, runs the temporal layers it does not process (`plain`
      layers: encoder, middle block, decoder blocks before the anchor) through the fused op's plain
      attention in the active steps of fused calls, and through their own processors otherwise;
    - checks tau against the frame count, and the fused kernel's availability on the sample's
      device, before the denoiser runs;
    - frees the recorded anchor maps when the call ends.

    The model cannot be deep-copied or pickled while the controller is active (a TypeError says to
    call remove() first).
    """

    copy_advice = BYTHEWAY_COPY_ADVICE

    def __init__(self, target, config: ByTheWayConfig, *, cfg: Optional[bool] = None,
                 batch_split: Optional[Tuple[int, int]] = None, anchor=None, diagnostics: bool = False,
                 observe_only: bool = False, scheduler=None, fused_attention: Optional[bool] = None):
        pipeline, called_denoiser, denoiser = split_target(target)
        self._pipeline = pipeline
        self._call_pipeline = pipeline  # the pipeline running the current call (`_calling_pipeline`)
        self._denoiser = denoiser
        self._family: ModelFamily = family_of(denoiser)
        self._scheduler = scheduler  # None: the pipeline's, read at each call (it may be swapped)
        self._batch_split_override = _batch_split_override(pipeline, cfg, batch_split)
        self._fused_attention = fused_attention
        self._observe_only = observe_only
        self._diagnostics = diagnostics or observe_only
        self._state = RunState(config=config)
        self._calls_without_scheduler = 0
        self._records: List[Tuple] = []  # diagnostics of the calls before the last (`_take_records`)
        self._run_schedule, self._run_begin, self._run_last_position = None, 0, -1
        replace_orphaned_processors(denoiser)
        self._anchor, self._layers = _select_layers(denoiser, self._family, anchor)
        _refuse_split_inference(denoiser, self._layers, ValueError)
        self._plain_layers = [] if fused_attention is False else _plain_layers(denoiser, self._family, self._layers)
        self._install_processors()
        self._hooks = self._register_hooks(called_denoiser)
        self._removed = False
        setattr(denoiser, CONTROLLER_ATTR, self)  # found by `remove_bytheway` when the handle is lost

    def _install_processors(self) -> None:
        """Bind every selected and plain layer and give it the (shared, stateless) ByTheWay processor."""
        guide_heads = _guide_heads(self._anchor, self._layers)
        processor = ByTheWayAttnProcessor()
        for layer in self._layers:
            is_anchor = layer.block == self._anchor
            binding = LayerBinding(
                state=self._state, layer=layer, original=layer.attn.processor, is_anchor=is_anchor,
                guide_heads=guide_heads.get(layer.position, ()) if is_anchor else (),
                fused_projection=projects_fused_qkv(layer.attn, layer.attn.processor),
            )
            setattr(layer.attn, BINDING_ATTR, binding)
            layer.attn.set_processor(processor)
        for layer in self._plain_layers:
            original = layer.attn.processor
            binding = PlainLayerBinding(self._state, original, standard_scale(original, layer.attn)[1],
                                        projects_fused_qkv(layer.attn, original))
            setattr(layer.attn, BINDING_ATTR, binding)
            layer.attn.set_processor(processor)

    def _register_hooks(self, called_denoiser) -> list:
        """Geometry pre-hooks on the temporal modules, step tracking around the denoiser."""
        owners = {id(layer.owner): layer for layer in self._layers}
        hooks = [
            layer.owner.register_forward_pre_hook(functools.partial(self._capture_geometry, layer), with_kwargs=True)
            for layer in owners.values()
        ]
        hooks.append(called_denoiser.register_forward_pre_hook(self._begin_denoiser_call, with_kwargs=True))
        hooks.append(called_denoiser.register_forward_hook(self._end_denoiser_call, always_call=True))
        return hooks

    # -- public ---------------------------------------------------------------------------------
    @property
    def config(self) -> ByTheWayConfig:
        return self._state.config

    @property
    def anchor(self) -> str:
        """Name of the anchor block (e.g. "up_blocks.1")."""
        return self._anchor

    @property
    def layer_names(self) -> List[str]:
        """Full names of the attention modules ByTheWay processes, anchor first."""
        return [layer.name for layer in self._layers]

    @property
    def plain_layer_names(self) -> List[str]:
        """Full names of the other temporal self-attention modules, which run plain attention
        through the fused op in the active steps where the call is fused (empty with
        `fused_attention=False`; layers without a standard diffusers processor are not among them)."""
        return [layer.name for layer in self._plain_layers]

    def remove(self) -> None:
        """Restore the original processors and remove every hook (idempotent). A layer whose
        processor was replaced since (`set_attn_processor`, `fuse_qkv_projections()`) keeps the
        new one, as the fast temporal attention's `remove()` does."""
        if self._removed:
            return
        for hook in self._hooks:
            hook.remove()
        for layer in self._layers + self._plain_layers:
            binding = getattr(layer.attn, BINDING_ATTR, None)
            if binding is not None and binding.state is self._state:
                if isinstance(layer.attn.processor, ByTheWayAttnProcessor):
                    layer.attn.set_processor(binding.original)
                delattr(layer.attn, BINDING_ATTR)
        self._state.guides.clear()
        self._state.calls.clear()
        if getattr(self._denoiser, CONTROLLER_ATTR, None) is self:
            delattr(self._denoiser, CONTROLLER_ATTR)
        self._removed = True

    def __enter__(self) -> "ByTheWayController":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def diagnostics(self) -> List[dict]:
        """Recorded per-layer, per-call stats as dicts (converted to Python numbers here, once).
        They accumulate over denoiser and pipeline calls until `clear_diagnostics()`."""
        self._take_records()
        return diagnostics_module.rows(self._records)

    def diagnostics_table(self, by: str = "block") -> str:
        """The diagnostics as a text table; `by` is "block", "block_step" or "layer"."""
        return diagnostics_module.format_table(self.diagnostics(), by=by)

    def clear_diagnostics(self) -> None:
        """Drop the recorded diagnostics."""
        self._records.clear()
        self._state.records.clear()

    def _take_records(self) -> None:
        """Move the last denoiser call's records (`RunState.records`) here, with that call's step."""
        state = self._state
        self._records.extend((layer, block, state.step, call, active, values)
                             for layer, block, call, active, values in state.records)
        state.records.clear()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._layers)} layers, anchor {self._anchor}"
        return f"ByTheWayController({type(self._denoiser).__name__}, {state}, {self.config})"

    # -- hooks ----------------------------------------------------------------------------------
    def _capture_geometry(self, layer: TemporalLayer, module, args, kwargs) -> None:
        # A bound method (not a closure), so that pickling the hooked model reaches this
        # controller's refusal instead of failing on a local function.
        geometry = layer.geometry
        geometry.batch, geometry.height, geometry.width = self._family.geometry(module, args, kwargs)

    # Step tracking reads the timestep's position in the schedule: host work that must not be
    # traced by torch.compile (it would specialise the graph on the step). Disabled for dynamo, it
    # costs one graph break at the denoiser's entry when the denoiser is compiled after
    # apply_bytheway, and none when it was compiled before (the hook sits on the wrapper).
    @torch.compiler.disable
    def _begin_denoiser_call(self, module, args, kwargs):
        self._check_layers_in_place()
        caller = _calling_pipeline(self._denoiser)
        self._call_pipeline = self._pipeline if caller is None else caller
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        state = self._state
        frames = frames_of(sample, self._family)
        if frames is not None:
            check_tau(state.config.tau, self._attention_frames(frames))
        split = self._current_batch_split()
        if isinstance(sample, torch.Tensor) and sample.shape[0] % split[0] != 0:
            raise ValueError(
                f"the denoiser batch {sample.shape[0]} is not divisible into {split[0]} parts "
                f"(cfg / batch split {split}); pass the right cfg= to apply_bytheway"
            )
        self._take_records()  # the previous call's, before the step changes
        step, active = self._locate_step(timestep)
        state.step = step
        state.modify = active and not self._observe_only
        state.measure = self._diagnostics
        state.fused = self._fused_on(sample if isinstance(sample, torch.Tensor) else None)
        state.batch_split = split
        state.guides.clear()
        state.calls.clear()

    def _end_denoiser_call(self, module, args, output):
        self._state.guides.clear()
        self._state.calls.clear()

    # -- helpers --------------------------------------------------------------------------------
    def _fused_on(self, sample: Optional[torch.Tensor]) -> bool:
        """Whether this call runs the fused op: fused_attention=None follows the kernel's
        availability on the sample's device, True requires it, False never fuses."""
        if self._fused_attention is False:
            return False
        device = sample.device if sample is not None else next(self._denoiser.parameters()).device
        available = fused_available(device)
        if self._fused_attention and not available:
            raise RuntimeError(
                f"apply_bytheway(fused_attention=True): the fused temporal attention kernel is not available "
                f"on {device} (it needs CUDA, or BYTHEWAY_BACKEND=triton with TRITON_INTERPRET=1 on CPU); "
                f"pass fused_attention=None to fall back to the materialised path where it is unavailable"
            )
        return available

    def _check_layers_in_place(self) -> None:
        """Every processed layer still runs ByTheWay. The plain layers (a speed-up only) are not
        checked: one given another processor runs that one, as a pipeline may do for the length of
        a call (AnimateDiffPAGPipeline perturbs the middle block's temporal self-attention by
        default, then puts the processors back)."""
        for layer in self._layers:
            if getattr(layer.parent, layer.attribute, None) is not layer.attn or not isinstance(
                layer.attn.processor, ByTheWayAttnProcessor
            ) or _submodule(self._denoiser, layer.name) is not layer.attn:
                # split inference wrapped the layer's block since: its path no longer resolves
                _refuse_split_inference(self._denoiser, self._layers, RuntimeError)
                if type(layer.attn.processor).__name__.startswith("PAG"):
                    raise RuntimeError(
                        f"perturbed-attention guidance (PAG) runs its own processor in the temporal layer "
                        f"{layer.name}, which ByTheWay processes: choose pag_applied_layers outside the "
                        f"processed blocks ({self._anchor} and the decoder blocks after it), as PAG's "
                        f"default 'mid_block.*attn1' is"
                    )
                raise RuntimeError(
                    f"the temporal layer {layer.name} was replaced or given another processor after "
                    f"apply_bytheway (e.g. by enable_free_noise or set_attn_processor): call remove() and "
                    f"apply_bytheway again after such changes"
                )

    def _attention_frames(self, frames: int) -> int:
        """F seen by the temporal attention: FreeNoise runs context windows of its own length."""
        pipeline = self._call_pipeline
        if pipeline is not None and getattr(pipeline, "free_noise_enabled", False):
            return min(frames, int(pipeline._free_noise_context_length))
        return frames

    def _current_batch_split(self) -> Tuple[int, int]:
        if self._batch_split_override is not None:
            return self._batch_split_override
        pipeline = self._call_pipeline
        try:
            cfg = bool(pipeline.do_classifier_free_guidance)
        except AttributeError as error:  # the property reads values set by the pipeline's __call__
            raise RuntimeError(
                f"{type(pipeline).__name__}.do_classifier_free_guidance is only defined during a pipeline "
                f"call; pass cfg= to apply_bytheway to call the denoiser directly"
            ) from error
        pag = bool(getattr(pipeline, "do_perturbed_attention_guidance", False))
        # Batch order: (uncond, cond, perturbed) with PAG; energies come from the conditional part.
        return (1 + int(cfg) + int(pag), 1 if cfg else 0)

    def _locate_step(self, timestep) -> Tuple[int, bool]:
        """(step index, active) for a denoiser call at `timestep`.

        Steps, not calls, are counted (`_step_of_position`), so all calls of a step are active or
        none is."""
        scheduler = self._scheduler
        if scheduler is None:
            scheduler = getattr(self._call_pipeline, "scheduler", None)
        if scheduler is None:  # a pipeline without one: the applied-to pipeline's, as for direct calls
            scheduler = getattr(self._pipeline, "scheduler", None)
        if scheduler is None:
            step = self._calls_without_scheduler
            self._calls_without_scheduler += 1
            return step, True
        schedule = getattr(scheduler, "timesteps", None)
        if not isinstance(schedule, torch.Tensor) or schedule.numel() == 0:
            raise RuntimeError(f"{type(scheduler).__name__}.timesteps is not set: call set_timesteps first")
        if timestep is None:
            raise RuntimeError("the denoiser was called without a timestep; ByTheWay cannot tell the step")
        position = _schedule_position(timestep, schedule)
        # A run (one denoising loop) starts with a new schedule tensor (set_timesteps: every
        # pipeline call, every FreeInit iteration) or when the position goes back. Steps count from
        # the run's first timestep, so image/video-to-video pipelines that skip the start of the
        # schedule (strength < 1) still get their first step_fraction.
        if schedule is not self._run_schedule or position < self._run_last_position:
            self._run_schedule, self._run_begin = schedule, position
        self._run_last_position = position
        step = _step_of_position(scheduler, position - self._run_begin)
        steps = _step_of_position(scheduler, schedule.numel() - 1 - self._run_begin) + 1
        return step, step < active_step_count(self.config.step_fraction, steps)


def _calling_pipeline(denoiser, max_frames: int = 64):
    """The diffusers pipeline whose code called `denoiser` (the hooked module): the nearest
    caller's `self` that is a `DiffusionPipeline` whose `unet` or `transformer` is the denoiser
    or a torch.compile wrapper of it; None for a call from anything else (a direct call, a
    custom sampler holding the denoiser).

    Pipelines made with `from_pipe` share the denoiser, and so its hooks, with the pipeline
    ByTheWay was applied to; whether CFG and PAG are on, the scheduler and FreeNoise are read
    from the one running (the applied-to one keeps its last call's values). Frames of torch's
    own modules (the module call machinery, torch.compile) are skipped unread; the walk costs
    tens of microseconds once per denoiser call, not per layer. Components are read from the
    instance's dict, as diffusers registers them: a caller's `self` whose attribute access
    raises (a lazy property, an AttrDict) is never asked.
    """
    pipeline_type = _pipeline_type()
    if pipeline_type is None:
        return None
    frame = sys._getframe(1)
    for _ in range(max_frames):
        frame = frame.f_back
        if frame is None:
            return None
        code = frame.f_code
        if not code.co_argcount or code.co_varnames[0] != "self" or frame.f_globals.get(
                "__name__", "").startswith("torch."):
            continue
        owner = frame.f_locals.get("self")
        if not isinstance(owner, pipeline_type):
            continue
        components = getattr(owner, "__dict__", {})
        for name in ("unet", "transformer"):
            module = components.get(name)
            if module is not None and getattr(module, "_orig_mod", module) is denoiser:
                return owner
    return None


@functools.lru_cache(maxsize=None)
def _pipeline_type():
    """diffusers' DiffusionPipeline, or None without diffusers (no pipeline can be calling)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return None
    return DiffusionPipeline


def _step_of_position(scheduler, position: int) -> int:
    """The denoising step of the call at `position` of a run (its first call is 0; a run of an
    image/video-to-video pipeline starts inside `scheduler.timesteps`, PNDM's warm-up with it).

    Most schedulers call the denoiser `scheduler.order` times per step (Heun and KDPM2: twice,
    their timesteps holding 2n - 1 entries for n steps). PNDM says order 1 but warms up
    differently (`prk_timesteps`, then `plms_timesteps`): four calls per step for its first
    three steps (Runge-Kutta), or, with `skip_prk_steps` (Stable Diffusion's configs), two
    calls for the first step.
    """
    if hasattr(scheduler, "prk_timesteps") and hasattr(scheduler, "plms_timesteps"):
        warmup_calls = len(scheduler.prk_timesteps)
        if position < warmup_calls:
            return position // 4
        if getattr(scheduler.config, "skip_prk_steps", False):  # no warm-up calls then
            return max(position - 1, 0)
        return warmup_calls // 4 + position - warmup_calls
    order = getattr(scheduler, "order", 1)
    order = order if type(order) is int and order >= 1 else 1
    return position // order


def _refuse_split_inference(denoiser, layers: List[TemporalLayer], error: type) -> None:
    """FreeNoise's split inference runs the processed layers on chunks of a video's B*H*W rows,
    where ByTheWay needs them all in one call (the energies of adaptive beta, the guide's
    upsampling by position)."""
    wrappers = split_inference_wrappers(denoiser, layers)
    if wrappers:
        raise error(
            f"FreeNoise's split inference (enable_free_noise_split_inference) wraps the processed "
            f"temporal blocks {wrappers[:2]}{'...' if len(wrappers) > 2 else ''} and runs them on chunks of "
            f"the B*H*W rows, which ByTheWay cannot process: use FreeNoise without split inference "
            f"(enable_fast_temporal_attention works with it)"
        )


def _submodule(denoiser, name: str):
    """The module at `name` in `denoiser`, or None when the path no longer resolves."""
    try:
        return denoiser.get_submodule(name)
    except AttributeError:  # a module on the path was replaced or wrapped
        return None


def _schedule_position(timestep, schedule: torch.Tensor) -> int:
    """Index of `timestep` in `schedule`.

    Pipelines pass an element of `scheduler.timesteps` (a view, possibly expanded); its storage
    offset gives the index without reading the device. Other timesteps are compared by value.
    """
    if (
        isinstance(timestep, torch.Tensor)
        and timestep.device == schedule.device
        and schedule.dim() == 1
        and timestep.numel() > 0
        and timestep.untyped_storage().data_ptr() == schedule.untyped_storage().data_ptr()
    ):
        offset = timestep.storage_offset() - schedule.storage_offset()
        if offset % schedule.stride(0) == 0 and 0 <= offset // schedule.stride(0) < schedule.numel():
            return offset // schedule.stride(0)
    value = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
    values = schedule.detach().double().cpu()
    matches = torch.nonzero(torch.isclose(values, torch.tensor(value, dtype=torch.float64), rtol=1e-6, atol=1e-6))
    if matches.numel() == 0:
        raise RuntimeError(
            f"timestep {value} is not in the scheduler's timesteps; ByTheWay cannot tell the denoising step"
        )
    return int(matches[0, 0])


def apply_bytheway(
    pipe_or_denoiser,
    preset: Union[str, ByTheWayConfig] = "animatediff",
    *,
    cfg: Optional[bool] = None,
    batch_split: Optional[Tuple[int, int]] = None,
    anchor=None,
    diagnostics: bool = False,
    observe_only: bool = False,
    scheduler=None,
    fused_attention: Optional[bool] = None,
    **overrides,
) -> ByTheWayController:
    """Turn ByTheWay on inside a diffusers video pipeline (or a bare denoiser).

    Args:
        pipe_or_denoiser: a pipeline with `unet`/`transformer` (AnimateDiff*, PIA, TextToVideoSD,
            I2VGenXL, StableVideoDiffusion, Latte) or the denoiser module itself.
        preset: a name in `bytheway_kernels.PRESETS` ("animatediff", "videocrafter2") or a
            ByTheWayConfig.
        cfg: None (ask the pipeline's `do_classifier_free_guidance`), True (the batch is
            (unconditional, conditional) halves) or False. Required, or `batch_split`, for a bare
            denoiser and for pipelines without that property (TextToVideoSDPipeline).
        batch_split: an explicit (parts, energy_part) split of the batch, e.g. (3, 1) for PAG with
            CFG; it overrides `cfg`.
        anchor: the guide block: None (default: "up_blocks.1"; Latte: temporal block N // 2), a
            decoder block name or its index. It and every later decoder block are processed.
        diagnostics: record per-layer, per-step stats (see `ByTheWayController.diagnostics`).
        observe_only: record diagnostics on every step but never change outputs (the baseline).
        scheduler: the scheduler whose `timesteps` give the step index when a bare denoiser is
            passed (a pipeline's own scheduler is used otherwise). Without one, every call is active.
        fused_attention: None (default) runs the fused `temporal_attention` op in the active steps
            where its kernel is available (CUDA), the materialised map (scores, map op, bmm)
            elsewhere; True requires the fused kernel (a RuntimeError at the first denoiser call on
            a device without it, before the denoiser runs); False always materialises. Calls with
            an attention mask and calls recording diagnostics are always materialised. Unless it
            is False, the active steps of fused calls also run every other temporal self-attention
            layer with a standard diffusers processor (encoder, middle block, decoder blocks before
            the anchor; `controller.plain_layer_names`) through the fused op's plain attention,
            equal to stock within floating-point tolerance; outside those steps they run stock.
        **overrides: ByTheWayConfig fields replacing the preset's (alpha, beta, tau, step_fraction,
            adaptive_beta, energy_scope, guide_upsample, beta_max).

    Returns:
        The controller; call `.remove()` or use it as a context manager.

    Raises:
        ValueError: unknown preset or field, a bad field value or type, missing anchor block, no
            temporal layers found, a pipeline without CFG information and no `cfg`. A tau invalid
            for the frame count is a ValueError raised at the first denoiser call, before the
            denoiser runs.

    Examples:
        >>> import torch, bytheway_kernels as btw
        >>> from bytheway_kernels.integration.tiny import tiny_animatediff_pipeline
        >>> pipe = tiny_animatediff_pipeline()
        >>> with btw.apply_bytheway(pipe, "animatediff", alpha=0.5) as controller:
        ...     video = pipe("a cat", num_frames=16, height=16, width=16, num_inference_steps=5,
        ...                  output_type="pt").frames
        >>> controller.anchor
        'up_blocks.1'
    """
    if isinstance(preset, ByTheWayConfig):
        config = preset
    elif isinstance(preset, str) and preset in PRESETS:
        config = PRESETS[preset]
    else:
        raise ValueError(f"unknown ByTheWay preset {preset!r}; presets are {sorted(PRESETS)}")
    if overrides:
        config = config.replace(**overrides)
    if fused_attention is not None:
        fused_attention = check_flag("fused_attention", fused_attention)
    if scheduler is not None and not hasattr(scheduler, "set_timesteps"):
        raise ValueError(f"scheduler must be a diffusers scheduler (with set_timesteps), got {type(scheduler).__name__}")
    return ByTheWayController(
        pipe_or_denoiser, config, cfg=cfg, batch_split=batch_split, anchor=anchor,
        diagnostics=check_flag("diagnostics", diagnostics), observe_only=check_flag("observe_only", observe_only),
        scheduler=scheduler, fused_attention=fused_attention,
    )
