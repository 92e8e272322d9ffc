"""Plot temporal-attention energy and cross-block discrepancy per block and step, before/after ByTheWay.

Runs the pipeline twice from one seed with diagnostics on every step:
- "stock": `observe_only=True` -- outputs unchanged, the maps measured (E1, discrepancy of the
  plain maps to the anchor map: the paper's Fig. 2 quantities);
- "ByTheWay": active on the first step_fraction of steps, measured on all steps.

Writes <out>/energy.png (E1 of the plain maps, solid; in the ByTheWay run also E3 of the maps
ByTheWay outputs, dashed), <out>/discrepancy.png (plain-map discrepancy to the anchor; in the
ByTheWay run also that of ByTheWay's output map, dashed),
<out>/diagnostics.csv (every layer/call/step row of both runs) and prints the per-block tables.

Examples:
    python python/analyze.py --tiny --steps 6 --out out/analysis
    python python/analyze.py --model ./animatediff-pipeline --device cuda --dtype float16 --steps 25
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

try:
    import bytheway_kernels  # noqa: F401 -- installed
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    from bytheway_kernels.integration.runs import add_run_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--out", default="bytheway_analysis")
    return parser.parse_args(argv)


def per_block_step(rows, field):
    """{block: ([steps], [mean of field over that block's layers and calls at each step])}."""
    sums = {}
    for row in rows:
        entry = sums.setdefault(row["block"], {}).setdefault(row["step"], [0.0, 0])
        entry[0] += row[field]
        entry[1] += 1
    return {
        block: (sorted(steps), [steps[s][0] / steps[s][1] for s in sorted(steps)])
        for block, steps in sums.items()
    }


def plot(runs, fields, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), sharey=True, squeeze=False)
    for axis, (run_name, rows) in zip(axes[0], runs.items()):
        # In the observe-only stock run only the plain-map quantity (the first field) is real.
        shown = fields if any(r["active"] for r in rows) else fields[:1]
        for style, field in zip(("-", "--"), shown):
            for color_index, (block, (steps, values)) in enumerate(per_block_step(rows, field).items()):
                axis.plot(steps, values, style, color=f"C{color_index}", marker="o", markersize=3,
                          label=f"{block} {field}")
        active = sorted({r["step"] for r in rows if r["active"]})
        if active:
            axis.axvspan(active[0] - 0.5, active[-1] + 0.5, color="0.9", zorder=0, label="ByTheWay active")
        axis.set_title(f"{title}: {run_name}")
        axis.set_xlabel("denoising step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from bytheway_kernels.integration import diagnostics
    from bytheway_kernels.integration.runs import generate, pipeline_and_settings

    pipe, settings = pipeline_and_settings(args)
    runs = {}
    for name in tqdm(("stock", "ByTheWay"), desc="runs"):
        stock = name == "stock"
        _, rows = generate(pipe, settings, args.device, bytheway=not stock, preset=args.preset,
                           diagnostics=True, observe_only=stock)
        runs[name] = rows
        print(f"\n{name} (per block; 'active' rows are the steps where ByTheWay changed the output)")
        print(diagnostics.format_table(rows, by="block"))

    os.makedirs(args.out, exist_ok=True)
    print(plot(runs, ("E1", "E3"), "energy", os.path.join(args.out, "energy.png")))
    print(plot(runs, ("discrepancy", "discrepancy_after"), "discrepancy to anchor",
               os.path.join(args.out, "discrepancy.png")))
    csv_path = os.path.join(args.out, "diagnostics.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        fields = ["run"] + list(next(iter(runs.values()))[0].keys())
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for name, rows in runs.items():
            writer.writerows(dict(row, run=name) for row in rows)
    print(csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
