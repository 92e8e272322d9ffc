"""Plot temporal-attention energy, beta and cross-block discrepancy per block and step, before/after ByTheWay.

Runs the pipeline twice from one seed with diagnostics on every step:
- "stock": `observe_only=True` -- outputs unchanged, the plain maps measured (E1 and their
  discrepancy to the anchor map: the paper's Fig. 2 quantities);
- "ByTheWay": active on the first step_fraction of steps, measured on all steps.

Writes into --out:
  energy.png        E1 of the plain maps (solid) and E3 of the maps ByTheWay outputs (dashed);
  discrepancy.png   discrepancy of the plain maps to the anchor (solid) and of ByTheWay's output
                    maps (dashed);
  beta.png          the beta ByTheWay used (adaptive: at least beta_0);
  diagnostics.csv   every layer/call/step row of both runs.
Values that describe ByTheWay's edit (beta, E2*, E3, discrepancy_after) exist only where it was
active: at other steps the plots leave them out and the CSV holds "nan". The per-block tables are
printed. Every option is checked before the model is loaded, and the modules of the [diffusers]
extra it needs before anything else.

Examples:
    python python/analyze.py --tiny --steps 6 --out out/analysis
    python python/analyze.py --tiny --frames 8 --tau 3 --steps 4 --out out/analysis8
    python python/analyze.py --model ./animatediff-pipeline --device cuda --dtype float16 --steps 25
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

try:
    import bytheway_kernels  # noqa: F401 -- installed
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The modules of the [diffusers] extra this script imports (pipelines, progress bars, plots;
#: PIL reads --image).
REQUIRED_MODULES = ("diffusers", "transformers", "tqdm", "matplotlib", "PIL")
#: (file name, runs shown, {field: legend text} -- solid line first, dashed second, y-axis label)
FIGURES = (
    ("energy.png", ("stock", "ByTheWay"), {"E1": "E1: plain map", "E3": "E3: ByTheWay's output map"},
     "map energy: mean over rows of sum_j A_ij^2"),
    ("discrepancy.png", ("stock", "ByTheWay"),
     {"discrepancy": "plain map", "discrepancy_after": "ByTheWay's output map"}, "RMS L2 distance to the anchor map"),
    ("beta.png", ("ByTheWay",), {"beta": "beta used"}, "beta (high-band gain)"),
)
#: (line style, marker) of the first and second field: a lone active step still shows which is which.
LINE_STYLES = (("-", "."), ("--", "x"))


def parser_and_args(argv=None):
    """(parser, parsed options); the options are not checked yet (see `main`)."""
    from bytheway_kernels.integration.runs import add_run_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--out", default="bytheway_analysis", help="output folder, created (default: %(default)s)")
    return parser, parser.parse_args(argv)


def per_block_step(rows, field):
    """{block: ([steps], [mean of field over that block's layers and calls at each step])};
    NaN (masked) values stay NaN, so a plot leaves those steps out."""
    sums = {}
    for row in rows:
        entry = sums.setdefault(row["block"], {}).setdefault(row["step"], [0.0, 0])
        entry[0] += row[field]
        entry[1] += 1
    return {
        block: (sorted(steps), [steps[s][0] / steps[s][1] for s in sorted(steps)])
        for block, steps in sums.items()
    }


def plot(runs, field_labels, ylabel, title, path):
    """One panel per run; colour = block, line style = field (the first of `field_labels` solid with
    dots, the second dashed with crosses). The legend sits to the right of the panels, outside the axes, so it covers
    no curve. Returns (path, figure, legend); the figure is closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs) + 3, 4), sharey=True, squeeze=False)
    blocks = []
    shown_fields = list(field_labels)
    for axis, (run_name, rows) in zip(axes[0], runs.items()):
        for (style, marker), field in zip(LINE_STYLES, shown_fields):
            for block, (steps, values) in per_block_step(rows, field).items():
                if block not in blocks:
                    blocks.append(block)
                axis.plot(steps, values, style, color=f"C{blocks.index(block)}", marker=marker, markersize=6)
        all_steps = sorted({r["step"] for r in rows})
        axis.set_xlim(all_steps[0] - 0.5, all_steps[-1] + 0.5)  # every step, even where nothing is drawn
        active = sorted({r["step"] for r in rows if r["active"]})
        if active:
            axis.axvspan(active[0] - 0.5, active[-1] + 0.5, color="0.9", zorder=0)
        axis.set_title(f"{title}: {run_name}")
        axis.set_xlabel("denoising step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel(ylabel)
    handles = [Line2D([], [], color=f"C{i}", lw=3, label=block) for i, block in enumerate(blocks)]
    handles += [Line2D([], [], color="black", linestyle=style, marker=marker, markersize=6, label=field_labels[f])
                for (style, marker), f in zip(LINE_STYLES, shown_fields)]
    handles.append(Patch(color="0.9", label="ByTheWay active"))
    legend = figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
                           handlelength=3.5)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight", bbox_extra_artists=[legend])
    plt.close(figure)
    return path, figure, legend


def write_csv(runs, path):
    """Every row of every run, with a leading `run` column; returns the path."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        fields = ["run"] + list(next(iter(runs.values()))[0].keys())
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for name, rows in runs.items():
            writer.writerows(dict(row, run=name) for row in rows)
    return path


def main(argv=None) -> int:
    """Check the options, run stock (observed) then ByTheWay, write plots and CSV; returns 0."""
    from bytheway_kernels.integration import diagnostics
    from bytheway_kernels.integration.runs import (generate, missing_modules_problem, out_dir_problem,
                                                   pipeline_and_settings, run_config)

    parser, args = parser_and_args(argv)
    problem = missing_modules_problem(REQUIRED_MODULES)
    if problem:
        parser.error(problem)
    config = run_config(parser, args)
    problem = out_dir_problem(args.out)
    if problem:
        parser.error(problem)
    from tqdm.auto import tqdm

    pipe, settings = pipeline_and_settings(parser, args)
    runs = {}
    for name in tqdm(("stock", "ByTheWay"), desc="runs"):
        stock = name == "stock"
        _, rows = generate(pipe, settings, config=config, diagnostics=True, observe_only=stock)
        runs[name] = diagnostics.masked_inactive(rows)
        print(f"\n{name} (per block; 'active' rows are the steps where ByTheWay changed the output)")
        print(diagnostics.format_table(rows, by="block"))

    os.makedirs(args.out, exist_ok=True)
    for file_name, run_names, field_labels, ylabel in FIGURES:
        shown = {name: runs[name] for name in run_names}
        print(plot(shown, field_labels, ylabel, file_name[:-4], os.path.join(args.out, file_name))[0])
    print(write_csv(runs, os.path.join(args.out, "diagnostics.csv")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
