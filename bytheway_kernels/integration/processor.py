"""The attention processor that applies ByTheWay inside diffusers' temporal self-attention.

`ByTheWayAttnProcessor` has a zero-argument constructor and no state of its own, because diffusers
re-creates motion-module processors with `processor.__class__()` (UNetMotionModel.from_unet2d,
IP-Adapter loading). Everything a call needs is reachable from the `Attention` module through a
`LayerBinding` stored on it by the controller; a module without a binding gets the stock
computation (`AttnProcessor2_0`).

A layer the controller selected (the anchor block and every decoder block after it) gets a
`LayerBinding`. Per call the processor either
- delegates to the layer's original processor (outside the active steps, or when the call is not
  temporal self-attention): bit-identical to never installing ByTheWay (or, when the fast
  temporal attention was enabled first, the fast processor's output); or
- computes q, k, v as diffusers does (spatial_norm, group_norm, to_q/to_k/to_v, or to_qkv where
  the layer's stock processor is `FusedAttnProcessor2_0`, norm_q/norm_k),
  then the attention with ByTheWay in one of two ways, and runs `to_out`, the residual and the
  rescale:
  - fused (`temporal_attention`, the F x F map never in memory) when the controller resolved
    `fused_attention` to True for this call's device, the call has no attention mask and no
    diagnostics are recorded (they need the maps); the anchor records its plain map with
    `return_map=True` in the same pass. Scores are `attn.scale * q k^T` in fp32 whatever the
    input dtype (as `upcast_attention` would); float64 and F > 64 run the op's composed path;
  - materialised otherwise: scores exactly as `Attention.get_attention_scores` (baddbmm with
    `attn.scale`, masks, upcasting), viewed as (B, H, W, heads, F, F), `bytheway_attention_probs`,
    then bmm with v. The anchor first records its plain softmax map.
  Either way the recorded anchor map is reduced to each consumer's head count (`reduce_heads`).

Every other temporal self-attention layer running one of diffusers' standard processors gets a
`PlainLayerBinding` when `fused_attention` is not False: in the active steps of a fused call it
runs plain attention through the fused op (`plain_attention`, equal to its standard
processor within floating-point tolerance), so that every temporal layer of those steps is fused;
in any other call it delegates to its original processor, bit-identical to stock.

Nothing here synchronises with the host: diagnostics are appended as device tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import ByTheWayConfig
from ..ops.attention_probs import bytheway_attention_probs
from ..ops.temporal_attention import temporal_attention
from ..guide import upsample_guide
from .layers import TemporalLayer

#: Attribute of a diffusers `Attention` module holding its LayerBinding while ByTheWay is applied.
BINDING_ATTR = "_bytheway_binding"


#: What to do before copying a model with ByTheWay applied (see `RefusesCopy`).
BYTHEWAY_COPY_ADVICE = (
    "ByTheWay is applied to it; call remove() on the ByTheWayController first, then apply_bytheway to each copy"
)


class RefusesCopy:
    """Mixin for objects tied to one model by hooks and processors (controllers, bindings).

    A deep copy would keep pointing at the original model and a pickle cannot carry the hooks, so
    both are refused (`copy.deepcopy` and `pickle` go through `__reduce_ex__`), naming what to
    remove first. Subclasses set `copy_advice`.
    """

    copy_advice = "call remove() first"

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"cannot copy or pickle a model while {self.copy_advice}: copy.deepcopy and pickle would "
            f"keep hooks and processors bound to the original model"
        )


@dataclasses.dataclass(eq=False)
class RunState:
    """Mutable state of one controller, shared by all its layers (never global).

    The controller's denoiser pre-hook sets `modify`, `measure`, `fused`, `step` and `batch_split`
    and empties `guides` and `calls` before every denoiser call; the forward hook empties them after.
    """

    config: ByTheWayConfig
    modify: bool = False  # this denoiser call is in the active steps: outputs are ByTheWay's
    measure: bool = False  # record diagnostics in this call
    fused: bool = False  # run the fused temporal_attention op (the call's device has the kernel)
    step: int = -1
    batch_split: Tuple[int, int] = (1, 0)  # (parts, part whose rows give the energies)
    guides: Dict[Tuple, Dict[int, torch.Tensor]] = dataclasses.field(default_factory=dict)
    calls: Dict[str, int] = dataclasses.field(default_factory=dict)
    # this denoiser call's diagnostics (layer, block, call, modified, values), without the step:
    # the controller takes them, with the step, at the next call's start and when they are read
    # (an empty list at every call's start: torch.compile would guard on a growing one's length)
    records: List[Tuple] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class LayerBinding(RefusesCopy):
    """What the processor needs to know about one selected layer."""

    copy_advice = BYTHEWAY_COPY_ADVICE

    state: RunState
    layer: TemporalLayer
    original: Any  # the processor installed before ByTheWay
    is_anchor: bool
    guide_heads: Tuple[int, ...]  # anchor only: head counts of the layers consuming its map
    fused_projection: bool = False  # q, k, v from attn.to_qkv (`projects_fused_qkv`, at binding)


@dataclasses.dataclass(eq=False)
class PlainLayerBinding(RefusesCopy):
    """A temporal self-attention layer ByTheWay does not process (encoder and middle blocks, decoder
    blocks before the anchor): fused plain attention in the active steps of fused calls."""

    copy_advice = BYTHEWAY_COPY_ADVICE

    state: RunState
    original: Any  # the standard diffusers processor installed before ByTheWay
    scale: Optional[float]  # None: the op's default d**-0.5, as SDPA
    fused_projection: bool  # q, k, v from attn.to_qkv (`projects_fused_qkv`, at binding)


def standard_scale(processor, attn) -> Tuple[bool, Optional[float]]:
    """(True, score scale) for diffusers' standard processors, (False, None) for any other.

    - `AttnProcessor2_0` runs SDPA, whose scale is d**-0.5 whatever `attn.scale` says (None, the
      fused op's default).
    - `FusedAttnProcessor2_0` (what `fuse_qkv_projections()` installs) is the same attention with
      q, k, v from the module's one `to_qkv` projection: standard where the module has one.
    - `AttnProcessor`, `XFormersAttnProcessor` (`enable_xformers_memory_efficient_attention()`) and
      `SlicedAttnProcessor` (`enable_attention_slicing()`) compute plain attention with
      `attn.scale` but skip per-head norm_q / norm_k, which this package's paths apply (the sliced
      one skips spatial_norm too): standard where the module has none of the norms they skip.
    """
    from diffusers.models.attention_processor import (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0,
                                                      SlicedAttnProcessor, XFormersAttnProcessor)

    kind = type(processor)
    if kind is AttnProcessor2_0:
        return True, None
    if kind is FusedAttnProcessor2_0:
        return getattr(attn, "to_qkv", None) is not None, None
    if kind is AttnProcessor or kind is XFormersAttnProcessor or kind is SlicedAttnProcessor:
        skipped = (attn.norm_q, attn.norm_k) + ((attn.spatial_norm,) if kind is SlicedAttnProcessor else ())
        if all(norm is None for norm in skipped):
            return True, attn.scale
    return False, None


def projects_fused_qkv(attn, processor) -> bool:
    """Whether the processor that runs `attn` outside this package, `processor` or the one this
    package's processors keep behind it (ByTheWay's and the fast attention's bindings), is
    diffusers' `FusedAttnProcessor2_0`: q, k and v then come from `attn.to_qkv`, as there.
    Asked once, when a layer is bound (the bindings keep the answer): the processor behind this
    package's own stays the same while they are installed."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    for _ in range(2):  # ByTheWay's binding, then the fast attention's behind it
        binding = getattr(attn, processor.binding_attr, None) if isinstance(processor, BoundProcessor) else None
        if binding is None:
            break
        processor = binding.original
    return type(processor) is FusedAttnProcessor2_0


def plain_attention(fuse: bool, binding, attn, hidden_states: torch.Tensor, encoder_hidden_states,
                    attention_mask, temb) -> torch.Tensor:
    """A plain (ByTheWay-free) attention layer's output: through the fused op (alpha = 0, beta = 1,
    no guide) when `fuse` and the call is temporal self-attention without a mask, else through
    `binding.original`, the layer's standard processor. `binding` (a `PlainLayerBinding` or the
    fast attention's binding) also gives the score scale and the projection.

    Plain attention needs no video geometry: every row is its own 1 x 1 "video", no CFG split.
    A single frame (F = 1, which the op refuses) runs the original processor too."""
    if (not fuse or encoder_hidden_states is not None or attention_mask is not None
            or hidden_states.dim() != 3 or hidden_states.shape[1] < 2):
        return delegate(binding.original, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
    query, key, value = project_qkv(attn, normed_input(attn, hidden_states, temb), stacked=True,
                                    fused_projection=binding.fused_projection)
    attended = temporal_attention(query, key, value, heads=attn.heads, height=1, width=1, scale=binding.scale,
                                  cfg=False)
    return finish_output(attn, attended, hidden_states)


def reduce_heads(attention_map: torch.Tensor, heads: int) -> torch.Tensor:
    """Bring an anchor map (B, h, w, heads_a, F, F) to `heads` heads.

    Rule: equal counts are kept; when heads_a is a multiple of `heads`, consecutive groups of
    heads_a / heads anchor heads are averaged (target head g gets anchor heads g*r .. g*r + r - 1);
    otherwise all anchor heads are averaged and the mean is used for every target head. Rows stay
    stochastic in every case.
    """
    anchor_heads = attention_map.shape[3]
    if anchor_heads == heads:
        return attention_map
    if anchor_heads % heads == 0:
        return attention_map.unflatten(3, (heads, anchor_heads // heads)).mean(4)
    mean = attention_map.mean(3, keepdim=True)
    return mean.expand(*mean.shape[:3], heads, *mean.shape[4:]).contiguous()


def _rms_row_distance(maps: torch.Tensor, reference_maps: torch.Tensor) -> torch.Tensor:
    """sqrt(mean over rows of the squared L2 distance between matching rows), as fp32."""
    difference = maps.float() - reference_maps.float()
    return (difference * difference).sum(-1).mean().sqrt()


def delegate(processor, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """Call `processor` the way `Attention.forward` would have (temb only when it was given)."""
    extra = {} if temb is None else {"temb": temb}
    return processor(
        attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **extra
    )


def normed_input(attn, hidden_states: torch.Tensor, temb) -> torch.Tensor:
    """The input of the q, k, v projections: spatial_norm and group_norm as diffusers applies them."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def project_qkv(attn, hidden_states: torch.Tensor, stacked: bool = False,
                fused_projection: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention q, k, v as (N, F, heads*d), with diffusers' per-head norm_q / norm_k applied.

    Without those norms the projections are returned as they are (no copy); with one, its output
    is brought back to the (N, F, heads*d) layout. `fused_projection` (the layer's stock processor
    is `FusedAttnProcessor2_0`, see `projects_fused_qkv`): q, k and v are the three slices of
    `attn.to_qkv`'s output, exactly as that processor computes them. Otherwise `stacked` (for the
    fused op, which takes strided slices): one GEMM with the three weights stacked where
    `_stacks_qkv` allows it, q, k and v then being slices of its output; equal to the three
    projections up to the GEMM's rounding order.
    """
    if fused_projection:
        projected = attn.to_qkv(hidden_states)
        query, key, value = projected.split(projected.shape[-1] // 3, dim=-1)
    elif stacked and _stacks_qkv(attn, hidden_states):
        projections = (attn.to_q, attn.to_k, attn.to_v)
        weight = torch.cat([projection.weight for projection in projections])
        bias = None
        if attn.to_q.bias is not None:
            bias = torch.cat([projection.bias for projection in projections])
        sizes = [projection.out_features for projection in projections]
        query, key, value = torch.nn.functional.linear(hidden_states, weight, bias).split(sizes, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    return _head_normed(attn.norm_q, query, attn.heads), _head_normed(attn.norm_k, key, attn.heads), value


def _stacks_qkv(attn, hidden_states: torch.Tensor) -> bool:
    """Whether one stacked GEMM may replace to_q, to_k and to_v: all three plain `nn.Linear`
    modules (not LoRA or quantised wrappers) with no hooks and no instance-level forward (as
    accelerate's offload installs), their parameters of one dtype on the input's device, biases
    on all or none; and enough rows that reading the input once instead of three times saves more
    than stacking the weights costs (rows > 3 * out_features: per call the stack writes and reads
    3 * out * in values, the two skipped reads of the input 2 * rows * in)."""
    projections = (attn.to_q, attn.to_k, attn.to_v)
    for projection in projections:
        if (type(projection) is not torch.nn.Linear or projection._forward_hooks
                or projection._forward_pre_hooks or "forward" in projection.__dict__):
            return False
    biases = [projection.bias for projection in projections if projection.bias is not None]
    if len(biases) not in (0, len(projections)):
        return False
    parameters = [projection.weight for projection in projections] + biases
    if any(p.device != hidden_states.device or p.dtype != hidden_states.dtype for p in parameters):
        return False
    rows = hidden_states.numel() // hidden_states.shape[-1]
    return rows > 3 * attn.to_q.out_features


def _head_normed(norm, values: torch.Tensor, heads: int) -> torch.Tensor:
    if norm is None:
        return values
    rows, frames, channels = values.shape
    per_head = values.view(rows, frames, heads, channels // heads).transpose(1, 2)
    return norm(per_head).transpose(1, 2).reshape(rows, frames, channels)


def finish_output(attn, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """to_out (projection, dropout), the residual connection and the output rescale, as diffusers.

    A rescale factor of 1 (every supported motion module's) is skipped: x / 1 is x bit for bit,
    and diffusers' division reads and writes the layer's whole output once more."""
    hidden_states = attn.to_out[1](attn.to_out[0](attended))
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    if attn.rescale_output_factor == 1.0:
        return hidden_states
    return hidden_states / attn.rescale_output_factor


def _split_heads(values: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, F, heads*d) -> (N*heads, F, d) with row index n*heads + head, as head_to_batch_dim."""
    rows, frames, channels = values.shape
    return values.view(rows, frames, heads, channels // heads).transpose(1, 2).reshape(rows * heads, frames, -1)


class BoundProcessor:
    """Base of this package's diffusers attention processors.

    diffusers re-creates processors with `processor.__class__()`, so the constructor takes no
    argument and a call's state lives in a binding stored on the `Attention` module under
    `binding_attr`; a module without one gets the stock computation (`AttnProcessor2_0`).
    Subclasses implement `bound_call`.
    """

    binding_attr: str

    def __init__(self):
        # Imported here so that `import bytheway_kernels` does not import diffusers.
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._stock = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        binding = getattr(attn, self.binding_attr, None)
        if binding is None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.bound_call(binding, attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def bound_call(self, binding, attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> torch.Tensor:
        raise NotImplementedError


def replace_orphaned_processors(denoiser) -> None:
    """Give every module that runs one of this package's processors without its binding the stock
    processor such a processor runs there (`AttnProcessor2_0`): same outputs.

    Orphans come back when a user restores a snapshot of `attn_processors` taken while ByTheWay or
    the fast attention was applied, or when diffusers' `unfuse_qkv_projections()` puts back the
    processors `fuse_qkv_projections()` saved. A new binding must not keep one as the layer's
    original processor: it would find the new binding and call back into itself."""
    for module in denoiser.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, BoundProcessor) and getattr(module, processor.binding_attr, None) is None:
            module.set_processor(type(processor._stock)())


class ByTheWayAttnProcessor(BoundProcessor):
    """diffusers attention processor running ByTheWay on temporal self-attention layers.

    Install it with `bytheway_kernels.apply_bytheway`, which binds the layers it selects
    (`LayerBinding`) and the other temporal layers it fuses in the active steps
    (`PlainLayerBinding`); on any other module it behaves exactly like `AttnProcessor2_0`.
    """

    binding_attr = BINDING_ATTR

    def bound_call(self, binding, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        state = binding.state
        if isinstance(binding, PlainLayerBinding):
            return plain_attention(state.modify and state.fused, binding, attn, hidden_states,
                                   encoder_hidden_states, attention_mask, temb)
        if (not state.modify and not state.measure) or encoder_hidden_states is not None:
            return delegate(binding.original, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        output = self._bytheway(attn, binding, hidden_states, attention_mask, temb)
        if state.modify:
            return output
        # Diagnostics outside the active steps: stats were recorded, the output stays stock.
        return delegate(binding.original, attn, hidden_states, None, attention_mask, temb)

    def _bytheway(self, attn, binding: LayerBinding, hidden_states, attention_mask, temb):
        """The layer's output with ByTheWay: fused where the state says so and the call allows
        (no attention mask, no diagnostics, which need the maps), materialised otherwise."""
        state = binding.state
        call = _count_call(state, binding.layer)
        _check_geometry(binding.layer, hidden_states)
        residual = hidden_states
        hidden_states = normed_input(attn, hidden_states, temb)
        fused = state.fused and attention_mask is None and not state.measure
        query, key, value = project_qkv(attn, hidden_states, stacked=fused, fused_projection=binding.fused_projection)
        if fused:
            attended = self._attend_fused(attn, binding, call, query, key, value)
        else:
            attended = self._attend_materialised(attn, binding, call, query, key, value, attention_mask)
        return finish_output(attn, attended, residual)

    @staticmethod
    def _attend_fused(attn, binding: LayerBinding, call: int, query, key, value) -> torch.Tensor:
        """One `temporal_attention` call; the anchor records its plain map in the same pass."""
        state, geometry = binding.state, binding.layer.geometry
        record = binding.is_anchor and bool(binding.guide_heads)
        result = temporal_attention(
            query, key, value, heads=attn.heads, height=geometry.height, width=geometry.width,
            scale=attn.scale, guide=_guide_for(binding, call, attn.heads), **state.config.op_kwargs(),
            batch_split=state.batch_split, return_map=record,
        )
        if not record:
            return result
        attended, plain = result
        _store_guide(binding, call, plain)
        return attended

    def _attend_materialised(self, attn, binding: LayerBinding, call: int, query, key, value, attention_mask):
        """baddbmm scores (as `Attention.get_attention_scores`), the map op, then bmm with v."""
        state, geometry = binding.state, binding.layer.geometry
        rows, frames, _ = query.shape
        heads, channels = attn.heads, value.shape[-1]
        scores = _scores(attn, _split_heads(query, heads), _split_heads(key, heads), attention_mask)
        scores = scores.view(geometry.batch, geometry.height, geometry.width, heads, frames, frames)

        plain = None
        if binding.is_anchor and (binding.guide_heads or state.measure):
            plain = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
            _store_guide(binding, call, plain)
        guide = _guide_for(binding, call, heads)
        result = bytheway_attention_probs(
            scores, guide, **state.config.op_kwargs(), batch_split=state.batch_split, return_stats=state.measure,
        )
        if state.measure:
            probs, stats = result
            self._record(state, binding, call, scores, plain, guide, probs, stats)
        else:
            probs = result

        value = _split_heads(value, heads)
        attended = torch.bmm(probs.view(rows * heads, frames, frames).to(value.dtype), value)
        return attended.view(rows, heads, frames, -1).transpose(1, 2).reshape(rows, frames, channels)

    @staticmethod
    def _record(state: RunState, binding: LayerBinding, call, scores, plain, guide, probs, stats):
        """Append (layer, block, call, modified, [beta, E1, E2, E2_low, E2_high, E3,
        discrepancy before, discrepancy after]) to this call's records, the values as one fp32
        device tensor. The controller adds the step outside the denoiser call
        (`ByTheWayController._take_records`): read here, torch.compile would guard on its value
        and compile the denoiser again for every step."""
        if plain is None:
            plain = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if guide is None:  # anchor: compare with its own plain map
            target = plain
        else:
            target = upsample_guide(guide, scores.shape[1], scores.shape[2], state.config.guide_upsample)
        values = torch.cat([
            stats.float().mean(0),
            _rms_row_distance(plain, target).view(1),
            _rms_row_distance(probs, target).view(1),
        ])
        layer = binding.layer
        state.records.append((layer.name, layer.block, call, state.modify, values))


def _count_call(state: RunState, layer: TemporalLayer) -> int:
    """This call's index among the calls of `layer` in the current denoiser call (FreeNoise runs
    each layer once per context window); the anchor maps are keyed by (position, call)."""
    call = state.calls.get(layer.name, 0)
    state.calls[layer.name] = call + 1
    return call


def _check_geometry(layer: TemporalLayer, hidden_states: torch.Tensor) -> None:
    if hidden_states.dim() != 3:
        raise RuntimeError(
            f"{layer.name}: expected temporal hidden states (B*H*W, F, C), got {tuple(hidden_states.shape)}"
        )
    geometry = layer.geometry
    expected = geometry.batch * geometry.height * geometry.width
    if hidden_states.shape[0] != expected:
        raise RuntimeError(
            f"{layer.name}: {hidden_states.shape[0]} attention rows do not match the captured video geometry "
            f"B={geometry.batch}, H={geometry.height}, W={geometry.width} (B*H*W = {expected}); "
            f"chunked/split inference of the temporal layers is not supported with ByTheWay"
        )


def _scores(attn, query: torch.Tensor, key: torch.Tensor, attention_mask) -> torch.Tensor:
    """scale * q k^T (+ mask) with the semantics of `Attention.get_attention_scores` before its
    softmax: upcasting, and the mask prepared by `prepare_attention_mask`."""
    batch_heads, frames, _ = query.shape
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    if attention_mask is None:
        scores = torch.baddbmm(
            torch.empty(batch_heads, frames, frames, dtype=query.dtype, device=query.device),
            query, key.transpose(-1, -2), beta=0, alpha=attn.scale,
        )
    else:
        mask = attn.prepare_attention_mask(attention_mask, frames, batch_heads // attn.heads)
        scores = torch.baddbmm(mask, query, key.transpose(-1, -2), beta=1, alpha=attn.scale)
    return scores.float() if attn.upcast_softmax else scores


def _store_guide(binding: LayerBinding, call: int, plain: torch.Tensor) -> None:
    """Record the anchor's plain map for the layers at the same position, one copy per head count."""
    key = (binding.layer.position, call)
    binding.state.guides[key] = {heads: reduce_heads(plain, heads) for heads in binding.guide_heads}


def _guide_for(binding: LayerBinding, call: int, heads: int) -> Optional[torch.Tensor]:
    """The anchor map guiding this call: None for the anchor itself (its own map as guide is a
    no-op, A + alpha * (A - A) = A), else the map recorded at the same position and call."""
    if binding.is_anchor:
        return None
    layer = binding.layer
    recorded = binding.state.guides.get((layer.position, call))
    if recorded is None:
        raise RuntimeError(
            f"{layer.name}: no anchor map recorded for position {layer.position}, call {call} in "
            f"this denoiser call (the anchor layer must run before the layers it guides)"
        )
    return recorded[heads]
