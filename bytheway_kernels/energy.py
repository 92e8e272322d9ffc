"""The attention energies behind adaptive beta: the shared constants and the stats layout."""

from __future__ import annotations

#: Below this fraction of E2 the high-band energy counts as zero and beta falls back to beta_0.
HIGH_ENERGY_FLOOR = 1e-6

#: Columns of the float32 stats an op returns with `return_stats=True`.
STATS_FIELDS = ("beta", "E1", "E2", "E2_low", "E2_high", "E3")


def stats_rows(batch: int, parts: int, energy_scope: str) -> int:
    """Rows of the stats output: one for the batch scope, one per video for the sample scope.

    Examples:
        >>> stats_rows(4, 2, "batch"), stats_rows(4, 2, "sample"), len(STATS_FIELDS)
        (1, 2, 6)
    """
    return 1 if energy_scope == "batch" else batch // parts
