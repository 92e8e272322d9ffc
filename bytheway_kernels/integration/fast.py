"""Fast temporal attention with ByTheWay off: `enable_fast_temporal_attention(pipe)`.

The fused `temporal_attention` op with alpha = 0, beta = 1 and no guide is plain attention; it
packs many short (F <= 64) sequences per program, where every SDPA backend pads them into tall
tiles. `enable_fast_temporal_attention` puts it on every temporal self-attention layer of a
supported denoiser (`layers.all_temporal_layers`: encoder, middle and decoder blocks and the
temporal modules outside them; never SVD's temporal cross-attention `attn2`).

- Only layers running one of diffusers' standard (plain-attention) processors are taken over,
  with that processor's score scale (`processor.standard_scale`): `AttnProcessor2_0` (SDPA,
  d**-0.5 whatever `attn.scale` says), `FusedAttnProcessor2_0` (the same with q, k, v from the
  module's `to_qkv`, as `fuse_qkv_projections()` installs; the fused path projects through
  `to_qkv` too), and `AttnProcessor`, `XFormersAttnProcessor`, `SlicedAttnProcessor` (all three
  `attn.scale`) where the module has none of the norms they skip and this package's paths apply
  (per-head q/k norms; the sliced one also the spatial norm). Layers with any other processor
  (IP-Adapter, custom) keep it.
- Per call, `FastTemporalAttnProcessor` runs the fused op when the denoiser's input is on a
  device with the fused kernel (CUDA; on CPU only BYTHEWAY_BACKEND=triton under
  TRITON_INTERPRET=1), decided once per denoiser call by a pre-hook. Anything else runs the
  layer's original processor: attention masks, cross-attention calls, other devices (a CPU-only
  torch keeps stock outputs: installing is harmless there, so a pipeline can be set up on CPU
  and moved to CUDA afterwards).
- `remove()` puts the original processor objects back, so outputs are stock again, bit for bit.

Composition with `apply_bytheway`, in either order: ByTheWay keeps the processor it replaced as
its layer binding's `original` and runs it outside its active steps. Enabling the fast attention
on a layer where ByTheWay is applied replaces that `original` (so inactive steps run fused), and
removing it puts the saved processor back there; ByTheWay applied after the fast attention saves
the fast processor as its `original`. The same holds for the temporal layers ByTheWay does not
process but fuses in its active steps (`PlainLayerBinding`): enabled after ByTheWay, the fast
attention replaces their `original`; enabled before, it keeps them (ByTheWay binds only layers
with a standard processor, and those run fused in every step already). Either object can be
removed first.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, List, Optional

import torch

from ..ops.temporal_attention import fused_available
from .controller import split_target
from .layers import TemporalLayer, all_temporal_layers, family_of
from .processor import (BINDING_ATTR, BoundProcessor, RefusesCopy, plain_attention, projects_fused_qkv,
                        replace_orphaned_processors, standard_scale)

#: Attribute of a diffusers `Attention` module holding its FastBinding while the fast attention is on.
FAST_ATTR = "_bytheway_fast_binding"
#: Attribute of the denoiser module holding its active FastTemporalAttention (`remove_bytheway`).
FAST_HANDLE_ATTR = "_bytheway_fast_attention"

_COPY_ADVICE = (
    "the fast temporal attention is enabled on it; call remove() on the handle returned by "
    "enable_fast_temporal_attention first, then enable it on each copy"
)


@dataclasses.dataclass(eq=False)
class FastState:
    """Whether the current denoiser call runs fused (set by the handle's denoiser pre-hook)."""

    fused: bool = False


@dataclasses.dataclass(eq=False)
class FastBinding(RefusesCopy):
    """One layer taken over by the fast attention: the processor it replaced and its score scale."""

    copy_advice = _COPY_ADVICE

    state: FastState
    original: Any  # the replaced standard diffusers processor (run whenever the call is not fused)
    scale: Optional[float]  # None: the op's default d**-0.5, as SDPA
    fused_projection: bool  # q, k, v from attn.to_qkv (`processor.projects_fused_qkv`)


def _base_processor(attn):
    """The processor that runs this layer outside ByTheWay: ByTheWay's saved original when it is
    applied to the layer, else the installed processor."""
    binding = getattr(attn, BINDING_ATTR, None)
    return attn.processor if binding is None else binding.original


def _set_base_processor(attn, processor) -> None:
    binding = getattr(attn, BINDING_ATTR, None)
    if binding is None:
        attn.set_processor(processor)
    else:
        binding.original = processor


class FastTemporalAttnProcessor(BoundProcessor):
    """diffusers attention processor running temporal self-attention through the fused op.

    Installed by `enable_fast_temporal_attention`; on a module it did not bind it behaves exactly
    like `AttnProcessor2_0`.
    """

    binding_attr = FAST_ATTR

    def bound_call(self, binding: FastBinding, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        return plain_attention(binding.state.fused, binding, attn, hidden_states, encoder_hidden_states,
                               attention_mask, temb)


class FastTemporalAttention(RefusesCopy):
    """The handle of `enable_fast_temporal_attention`: `remove()` (or leaving a `with` block)
    restores the original processors and removes the hook. The model cannot be deep-copied or
    pickled while it is enabled (a TypeError says to call remove() first)."""

    copy_advice = _COPY_ADVICE

    def __init__(self, target):
        _, called_denoiser, denoiser = split_target(target)
        self._denoiser = denoiser
        self._state = FastState()
        self._processor = FastTemporalAttnProcessor()
        replace_orphaned_processors(denoiser)
        self._layers = self._install(all_temporal_layers(denoiser, family_of(denoiser)))
        self._hook = called_denoiser.register_forward_pre_hook(self._begin_denoiser_call, with_kwargs=True)
        self._removed = False
        setattr(denoiser, FAST_HANDLE_ATTR, self)  # found by `remove_bytheway` when the handle is lost

    def _install(self, candidates: List[TemporalLayer]) -> List[TemporalLayer]:
        for layer in candidates:
            if getattr(layer.attn, FAST_ATTR, None) is not None:
                raise ValueError(
                    f"the fast temporal attention is already enabled on {layer.name}; call remove() on the "
                    f"existing handle first (bytheway_kernels.remove_bytheway(pipe) finds it if it is lost)"
                )
        installed, kept = [], set()
        for layer in candidates:
            original = _base_processor(layer.attn)
            standard, scale = standard_scale(original, layer.attn)
            if not standard:
                kept.add(type(original).__name__)
                continue
            binding = FastBinding(self._state, original, scale, projects_fused_qkv(layer.attn, original))
            setattr(layer.attn, FAST_ATTR, binding)
            _set_base_processor(layer.attn, self._processor)
            installed.append(layer)
        if candidates and not installed:  # nothing to gain: surely not what the caller expects
            warnings.warn(
                f"enable_fast_temporal_attention took over none of the {len(candidates)} temporal "
                f"self-attention layers: they all run processors it does not replace "
                f"({', '.join(sorted(kept))}; see the function's docstring for the ones it does)",
                stacklevel=4)  # the caller of enable_fast_temporal_attention
        return installed

    @property
    def layer_names(self) -> List[str]:
        """Full names of the attention modules running the fast processor."""
        return [layer.name for layer in self._layers]

    def remove(self) -> None:
        """Restore the original processors (idempotent); a layer whose processor was replaced by
        someone else since keeps that processor."""
        if self._removed:
            return
        self._hook.remove()
        for layer in self._layers:
            binding = getattr(layer.attn, FAST_ATTR, None)
            if binding is None or binding.state is not self._state:
                continue
            if _base_processor(layer.attn) is self._processor:
                _set_base_processor(layer.attn, binding.original)
            delattr(layer.attn, FAST_ATTR)
        if getattr(self._denoiser, FAST_HANDLE_ATTR, None) is self:
            delattr(self._denoiser, FAST_HANDLE_ATTR)
        self._removed = True

    def __enter__(self) -> "FastTemporalAttention":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._layers)} layers"
        return f"FastTemporalAttention({type(self._denoiser).__name__}, {state})"

    # Host work (the backend choice reads the environment): kept out of torch.compile graphs.
    @torch.compiler.disable
    def _begin_denoiser_call(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        device = sample.device if isinstance(sample, torch.Tensor) else next(self._denoiser.parameters()).device
        self._state.fused = fused_available(device)


def enable_fast_temporal_attention(pipe_or_denoiser) -> FastTemporalAttention:
    """Run every temporal self-attention layer through the fused `temporal_attention` op, ByTheWay off.

    Outputs equal stock within floating-point tolerance (the op accumulates in fp32). Only layers
    with diffusers' plain-attention processors (`AttnProcessor2_0`, `FusedAttnProcessor2_0`,
    `AttnProcessor`, `XFormersAttnProcessor`, `SlicedAttnProcessor`; see the module docstring)
    are taken over; calls with an attention mask, and calls on a device without the fused kernel
    (a CPU-only torch, unless BYTHEWAY_BACKEND=triton under TRITON_INTERPRET=1), run the original
    processor, so enabling on CPU and moving the pipeline to CUDA later works. Composes with
    `apply_bytheway` in either order (ByTheWay's inactive steps then run fused too); either can be
    removed first. diffusers' `fuse_qkv_projections()` and
    `enable_xformers_memory_efficient_attention()` replace every processor: call them before this.

    Args:
        pipe_or_denoiser: a supported pipeline (AnimateDiff*, PIA, TextToVideoSD, I2VGenXL,
            StableVideoDiffusion, Latte) or its denoiser module.

    Returns:
        A handle; `.remove()` (or leaving a `with` block) restores the exact original processors,
        so outputs are stock again, bit for bit.

    Raises:
        ValueError: an unsupported pipeline or denoiser, or the fast attention already enabled.

    Warns:
        UserWarning: no temporal layer runs one of those processors, so nothing changes.

    Examples:
        >>> import torch, bytheway_kernels as btw
        >>> from bytheway_kernels.integration.tiny import tiny_animatediff_pipeline
        >>> pipe = tiny_animatediff_pipeline()
        >>> with btw.enable_fast_temporal_attention(pipe) as fast:
        ...     video = pipe("a cat", num_frames=16, height=16, width=16, num_inference_steps=2,
        ...                  output_type="pt").frames
        >>> len(fast.layer_names)  # every motion-module attention, encoder and decoder
        20
    """
    return FastTemporalAttention(pipe_or_denoiser)
