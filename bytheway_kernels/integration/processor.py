"""The attention processor that applies ByTheWay inside diffusers' temporal self-attention.

`ByTheWayAttnProcessor` has a zero-argument constructor and no state of its own, because diffusers
re-creates motion-module processors with `processor.__class__()` (UNetMotionModel.from_unet2d,
IP-Adapter loading). Everything a call needs is reachable from the `Attention` module through a
`LayerBinding` stored on it by the controller; a module without a binding gets the stock
computation (`AttnProcessor2_0`).

Per call the processor either
- delegates to the layer's original processor (outside the active steps, or when the call is not
  temporal self-attention): bit-identical to never installing ByTheWay; or
- computes q, k, v and the scaled scores exactly as diffusers' `Attention.get_attention_scores`
  (baddbmm with `attn.scale`, masks, upcasting), views the scores as (B, H, W, heads, F, F), calls
  `bytheway_attention_probs`, multiplies by v and runs `to_out`, the residual and the rescale.
  In the anchor block it first records the plain softmax map as the guide of the later blocks.

Nothing here synchronises with the host: diagnostics are appended as device tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..config import ByTheWayConfig
from ..ops.attention_probs import bytheway_attention_probs
from ..guide import upsample_guide
from .layers import TemporalLayer

#: Attribute of a diffusers `Attention` module holding its LayerBinding while ByTheWay is applied.
BINDING_ATTR = "_bytheway_binding"


@dataclasses.dataclass(eq=False)
class RunState:
    """Mutable state of one controller, shared by all its layers (never global).

    The controller's denoiser pre-hook sets `modify`, `measure`, `step` and `batch_split` and
    empties `guides` and `calls` before every denoiser call; the forward hook empties them after.
    """

    config: ByTheWayConfig
    modify: bool = False  # this denoiser call is in the active steps: outputs are ByTheWay's
    measure: bool = False  # record diagnostics in this call
    step: int = -1
    batch_split: Tuple[int, int] = (1, 0)  # (parts, part whose rows give the energies)
    guides: Dict[Tuple, Dict[int, torch.Tensor]] = dataclasses.field(default_factory=dict)
    calls: Dict[str, int] = dataclasses.field(default_factory=dict)
    records: List[Tuple] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class LayerBinding:
    """What the processor needs to know about one selected layer."""

    state: RunState
    layer: TemporalLayer
    original: Any  # the processor installed before ByTheWay
    is_anchor: bool
    guide_heads: Tuple[int, ...]  # anchor only: head counts of the layers consuming its map


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


def _delegate(processor, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
    """Call `processor` the way `Attention.forward` would have (temb only when it was given)."""
    extra = {} if temb is None else {"temb": temb}
    return processor(
        attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **extra
    )


class ByTheWayAttnProcessor:
    """diffusers attention processor running ByTheWay on temporal self-attention layers.

    Install it with `bytheway_kernels.apply_bytheway`, which binds the layers it selects; on any
    other module it behaves exactly like `AttnProcessor2_0`.
    """

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
        binding = getattr(attn, BINDING_ATTR, None)
        if binding is None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        state = binding.state
        if (not state.modify and not state.measure) or encoder_hidden_states is not None:
            return _delegate(binding.original, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        output = self._bytheway(attn, binding, hidden_states, attention_mask, temb)
        if state.modify:
            return output
        # Diagnostics outside the active steps: stats were recorded, the output stays stock.
        return _delegate(binding.original, attn, hidden_states, None, attention_mask, temb)

    def _bytheway(self, attn, binding: LayerBinding, hidden_states, attention_mask, temb):
        state, layer = binding.state, binding.layer
        call = state.calls.get(layer.name, 0)
        state.calls[layer.name] = call + 1
        key = (layer.position, call)

        if hidden_states.dim() != 3:
            raise RuntimeError(
                f"{layer.name}: expected temporal hidden states (B*H*W, F, C), got {tuple(hidden_states.shape)}"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        rows, frames, _ = hidden_states.shape
        geometry = layer.geometry
        if rows != geometry.batch * geometry.height * geometry.width:
            raise RuntimeError(
                f"{layer.name}: {rows} attention rows do not match the captured video geometry "
                f"B={geometry.batch}, H={geometry.height}, W={geometry.width} (B*H*W = "
                f"{geometry.batch * geometry.height * geometry.width}); chunked/split inference of "
                f"the temporal layers is not supported with ByTheWay"
            )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, frames, rows)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key_states = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        heads = attn.heads
        head_dim = key_states.shape[-1] // heads
        query = query.view(rows, frames, heads, head_dim).transpose(1, 2)
        key_states = key_states.view(rows, frames, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key_states = attn.norm_k(key_states)
        # (rows*heads, F, d) with row index row*heads + head, as diffusers' head_to_batch_dim.
        query = query.reshape(rows * heads, frames, head_dim)
        key_states = key_states.reshape(rows * heads, frames, head_dim)
        value = value.view(rows, frames, heads, head_dim).transpose(1, 2).reshape(rows * heads, frames, head_dim)

        # Scores with the semantics of Attention.get_attention_scores (before its softmax).
        if attn.upcast_attention:
            query, key_states = query.float(), key_states.float()
        if attention_mask is None:
            scores = torch.baddbmm(
                torch.empty(rows * heads, frames, frames, dtype=query.dtype, device=query.device),
                query, key_states.transpose(-1, -2), beta=0, alpha=attn.scale,
            )
        else:
            scores = torch.baddbmm(attention_mask, query, key_states.transpose(-1, -2), beta=1, alpha=attn.scale)
        if attn.upcast_softmax:
            scores = scores.float()
        scores = scores.view(geometry.batch, geometry.height, geometry.width, heads, frames, frames)

        plain = None
        guide = None  # for the anchor itself: its own map as guide is a no-op (A + alpha*(A - A) = A)
        if binding.is_anchor:
            if binding.guide_heads or state.measure:
                plain = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
                state.guides[key] = {h: reduce_heads(plain, h) for h in binding.guide_heads}
        else:
            recorded = state.guides.get(key)
            if recorded is None:
                raise RuntimeError(
                    f"{layer.name}: no anchor map recorded for position {layer.position}, call {call} in "
                    f"this denoiser call (the anchor layer must run before the layers it guides)"
                )
            guide = recorded[heads]

        config = state.config
        result = bytheway_attention_probs(
            scores, guide, **config.op_kwargs(), batch_split=state.batch_split, return_stats=state.measure,
        )
        if state.measure:
            probs, stats = result
            self._record(state, binding, call, scores, plain, guide, probs, stats)
        else:
            probs = result

        hidden_states = torch.bmm(probs.view(rows * heads, frames, frames).to(value.dtype), value)
        hidden_states = hidden_states.view(rows, heads, frames, head_dim).transpose(1, 2)
        hidden_states = hidden_states.reshape(rows, frames, heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _record(state: RunState, binding: LayerBinding, call, scores, plain, guide, probs, stats):
        """Append (layer, block, step, call, modified, [beta, E1, E2, E2_low, E2_high, E3,
        discrepancy before, discrepancy after]) with the values as one fp32 device tensor."""
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
        state.records.append((layer.name, layer.block, state.step, call, state.modify, values))
