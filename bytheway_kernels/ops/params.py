"""The ByTheWay parameters of one call, as every op and backend receives them after validation."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..energy import STATS_FIELDS, stats_rows


class ByTheWayParams(NamedTuple):
    """Validated, plain-Python ByTheWay settings (built by an op's public function).

    The custom ops' schemas take these fields flat (a schema has no struct type); each op
    rebuilds the object inside and hands it to its backend.

    Examples:
        >>> params = ByTheWayParams(alpha=0.6, beta=1.5, tau=7, adaptive_beta=True, parts=2,
        ...                         energy_part=1, energy_scope="sample", guide_upsample="nearest",
        ...                         beta_max=None)
        >>> params.stats_rows(batch=4)  # one row per video: 4 entries = 2 CFG halves of 2 videos
        2
    """

    alpha: float
    beta: float
    tau: int
    adaptive_beta: bool
    parts: int
    energy_part: int
    energy_scope: str
    guide_upsample: str
    beta_max: Optional[float]

    def stats_rows(self, batch: int) -> int:
        """Rows of the stats output for a batch of `batch` entries."""
        return stats_rows(batch, self.parts, self.energy_scope)

    def empty_stats(self, like: torch.Tensor, batch: int) -> torch.Tensor:
        """An uninitialised float32 stats output (rows, 6) for `batch` entries, on `like`'s device."""
        return like.new_empty((self.stats_rows(batch), len(STATS_FIELDS)), dtype=torch.float32)
