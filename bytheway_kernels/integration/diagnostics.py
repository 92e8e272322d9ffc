"""Turning the processor's device-side records into rows and text tables (after the run).

Examples:
    >>> with apply_bytheway(pipe, diagnostics=True) as controller:  # doctest: +SKIP
    ...     pipe(prompt="a cat", num_frames=16)
    ...     print(format_table(controller.diagnostics(), by="block"))
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Sequence

import torch

#: Values of one record, in the order the processor stores them.
VALUE_FIELDS = ("beta", "E1", "E2", "E2_low", "E2_high", "E3", "discrepancy", "discrepancy_after")
TABLE_FIELDS = ("beta", "E1", "E2", "E3", "discrepancy", "discrepancy_after")
#: Values that describe ByTheWay's edit (guided map, beta, output map). At an inactive step they
#: are what ByTheWay would have done, not what happened: tables, plots and CSVs hide them there.
EDIT_FIELDS = ("beta", "E2", "E2_low", "E2_high", "E3", "discrepancy_after")
#: How `format_table` shows an EDIT_FIELDS value of inactive steps.
INACTIVE_CELL = "-"


def rows(records: Sequence[tuple]) -> List[dict]:
    """One dict per processor call: layer, block, step, call, active and the VALUE_FIELDS.

    `discrepancy` is the RMS over rows of the L2 distance between the layer's plain softmax map
    and the (upsampled, head-reduced) anchor map -- the paper's Fig. 2 measure; for the anchor
    itself it is 0. `discrepancy_after` compares ByTheWay's output map with the anchor map.
    Energies are means over the rows in scope (the conditional part with CFG); with
    energy_scope="sample" the per-video values are averaged. Rows of inactive steps keep the
    EDIT_FIELDS values ByTheWay would have produced; `masked_inactive` hides them.
    """
    if not records:
        return []
    values = torch.stack([record[-1].detach().float().cpu() for record in records]).tolist()
    return [
        dict(layer=layer, block=block, step=step, call=call, active=active, **dict(zip(VALUE_FIELDS, numbers)))
        for (layer, block, step, call, active, _), numbers in zip(records, values)
    ]


def masked_inactive(table_rows: Sequence[dict]) -> List[dict]:
    """Copies of `table_rows` with the EDIT_FIELDS of inactive steps set to NaN (plots leave
    those points out, CSVs show "nan"), so they cannot be read as something ByTheWay did.

    Examples:
        >>> masked_inactive([dict(active=False, beta=1.5, E1=0.2, E3=0.3)])[0]["beta"]
        nan
    """
    return [row if row["active"] else dict(row, **{f: math.nan for f in EDIT_FIELDS if f in row})
            for row in table_rows]


def summarize(table_rows: Sequence[dict], by: str = "block") -> List[dict]:
    """Means of TABLE_FIELDS grouped by block, (block, step) or (layer, step), and by active.

    Rows recorded outside the active steps (diagnostics or observe_only runs) describe what
    ByTheWay would have done there; every grouping keeps them apart from the active steps. A
    step can be both when the rows come from several denoising loops (FreeInit's iterations,
    runs with other step counts): it then has an active and an inactive entry.
    """
    keys = {"block": ("block", "active"), "block_step": ("block", "step", "active"),
            "layer": ("layer", "step", "active")}
    if by not in keys:
        raise ValueError(f"by must be one of {sorted(keys)}, got {by!r}")
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for row in table_rows:
        groups.setdefault(tuple(row[k] for k in keys[by]), []).append(row)
    summary = []
    for group_key, members in groups.items():
        entry = dict(zip(keys[by], group_key))
        entry["steps"] = len({m["step"] for m in members})
        for field in TABLE_FIELDS:
            entry[field] = sum(m[field] for m in members) / len(members)
        summary.append(entry)
    return summary


def format_table(table_rows: Sequence[dict], by: str = "block") -> str:
    """A fixed-width text table of `summarize(table_rows, by)`; EDIT_FIELDS of inactive entries
    are shown as INACTIVE_CELL."""
    summary = summarize(table_rows, by)
    if not summary:
        return "(no diagnostics recorded)"
    key_fields = [k for k in ("layer", "block", "step") if k in summary[0]]
    columns = key_fields + (["steps"] if "step" not in key_fields else []) + ["active"] + list(TABLE_FIELDS)
    short_names = {"discrepancy": "disc", "discrepancy_after": "disc_after"}
    header = [short_names.get(c, c) for c in columns]
    cells = [[INACTIVE_CELL if c in EDIT_FIELDS and not entry["active"] else _cell(entry[c]) for c in columns]
             for entry in summary]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
