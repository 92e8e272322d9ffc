"""User-facing configuration of ByTheWay and the paper's presets."""

from __future__ import annotations

import dataclasses
import types
from typing import Optional

from ._validation import BETA_LIMIT, ENERGY_SCOPES, GUIDE_UPSAMPLE_MODES, check_flag, check_integer, check_number


def _check_choice(name: str, value, choices) -> str:
    """One of `choices`, as a plain str (a numpy.str_ passes, converted: torch.compile cannot
    trace one into the ops)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return str(value)


@dataclasses.dataclass(frozen=True)
class ByTheWayConfig:
    """Hyper-parameters of one ByTheWay run.

    Attributes:
        alpha: Temporal Self-Guidance strength in [0, 1] (0 disables guidance).
        beta: beta_0, the minimum high-frequency gain of Fourier Motion Enhancement, in
            [0, BETA_LIMIT] (1e6).
        tau: half-width of the high band centred on F // 2; valid for 0 <= tau <= (F - 2) // 2.
        step_fraction: fraction of the denoising steps (from the start) in which ByTheWay is
            active; the number of active steps is ceil(step_fraction * steps), at least one.
        adaptive_beta: raise beta so that the map energy after enhancement is at least the
            energy before guidance (the paper's adaptive rule).
        energy_scope: "batch" (one energy for the whole conditional half, as the official code)
            or "sample" (one per video, so results do not depend on the rest of the batch).
        guide_upsample: "nearest" or "bilinear", how the anchor map is upsampled in space.
        beta_max: optional cap on the adaptive beta, in [beta, BETA_LIMIT].

    Every field is checked, types included, when the config is made (a ValueError naming it):
    numbers may be Python or numpy scalars and are stored as Python float/int, flags may be
    `bool` or `numpy.bool_` (not 0/1).

    Examples:
        >>> from bytheway_kernels import PRESETS, ByTheWayConfig
        >>> ByTheWayConfig(alpha=0.6, beta=1.5, tau=7).step_fraction
        0.2
        >>> PRESETS["animatediff"].replace(alpha=0.3).alpha
        0.3
    """

    alpha: float
    beta: float
    tau: int
    step_fraction: float = 0.2
    adaptive_beta: bool = True
    energy_scope: str = "batch"
    guide_upsample: str = "nearest"
    beta_max: Optional[float] = None

    def __post_init__(self) -> None:
        """Validate every field, types included, and store Python scalars (numpy scalars such as
        `np.float32(0.5)` or `np.int64(7)` are accepted like the Python numbers they hold)."""
        fields = dict(
            alpha=check_number("alpha", self.alpha, low=0.0, high=1.0),
            beta=check_number("beta", self.beta, low=0.0, high=BETA_LIMIT),
            tau=check_integer("tau", self.tau),
            step_fraction=check_number("step_fraction", self.step_fraction),
            adaptive_beta=check_flag("adaptive_beta", self.adaptive_beta),
            energy_scope=_check_choice("energy_scope", self.energy_scope, ENERGY_SCOPES),
            guide_upsample=_check_choice("guide_upsample", self.guide_upsample, GUIDE_UPSAMPLE_MODES),
            beta_max=None if self.beta_max is None else check_number(
                "beta_max", self.beta_max, low=self.beta, high=BETA_LIMIT
            ),
        )
        if fields["tau"] < 0:
            raise ValueError(f"tau must be a non-negative integer, got {self.tau!r}")
        if not 0.0 < fields["step_fraction"] <= 1.0:  # one message for every value outside
            raise ValueError(f"step_fraction must be in (0, 1], got {self.step_fraction!r}")
        for name, value in fields.items():  # frozen: the normalised values go in through object
            object.__setattr__(self, name, value)

    def replace(self, **overrides) -> "ByTheWayConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ByTheWayConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def op_kwargs(self) -> dict:
        """The keyword arguments of `bytheway_attention_probs` that this config fixes."""
        return dict(
            alpha=self.alpha,
            beta=self.beta,
            tau=self.tau,
            adaptive_beta=self.adaptive_beta,
            energy_scope=self.energy_scope,
            guide_upsample=self.guide_upsample,
            beta_max=self.beta_max,
        )


#: The paper's settings (Sec. 4.1): AnimateDiff and VideoCrafter2, both active for 20% of steps.
#: Read-only (the defaults of apply_bytheway and the scripts): derive others with `.replace()`.
PRESETS = types.MappingProxyType({
    "animatediff": ByTheWayConfig(alpha=0.6, beta=1.5, tau=7, step_fraction=0.2),
    "videocrafter2": ByTheWayConfig(alpha=0.1, beta=10.0, tau=7, step_fraction=0.2),
})
