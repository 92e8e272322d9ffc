"""Run the same benchmarks on this checkout and on another git revision; print the ratios.

    python benchmarks/compare.py --base REV [pytest args]
    python benchmarks/compare.py --base main benchmarks/test_temporal_attention.py -k up_blocks.3

REV is checked out into a temporary git worktree. This checkout's benchmarks/ folder is copied
over the worktree's, so both runs time the same cases with the same code and only the package
differs; cases the older package cannot run skip there and show as "—". The pytest arguments
(default: `benchmarks`) get `--benchmark-only` and a `--benchmark-json` added, and run from each
tree's root with that tree first on PYTHONPATH. Ratios are this checkout ÷ REV: below 1 is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from make_results import format_time  # benchmarks/ is on sys.path, as the script's folder

ROOT = Path(__file__).resolve().parent.parent

#: (column, extra_info key or None for pytest-benchmark's median wall time, formatter)
METRICS = (
    ("wall", None, format_time),
    ("kernel", "kernel_s", format_time),
    ("host/call", "host_s", format_time),
    ("peak mem", "peak_bytes", lambda size: f"{size / 2**20:.1f} MiB"),
)


def metric(bench: dict, key: Optional[str]) -> Optional[float]:
    return bench["stats"]["median"] if key is None else bench["extra_info"].get(key)


def ratio_table(base: dict, current: dict) -> List[str]:
    """Markdown rows: each case timed in both runs, per metric base, current and current ÷ base."""
    base_cases: Dict[str, dict] = {b["fullname"]: b for b in base["benchmarks"]}
    pairs = [(b, base_cases.get(b["fullname"])) for b in current["benchmarks"]]
    metrics = [m for m in METRICS if any(metric(b, m[1]) is not None for b, _ in pairs)]
    header = ["case"] + [f"{name} {label}" for name, *_ in metrics for label in ("base", "current", "ratio")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for bench, old in pairs:
        cells = [bench["fullname"].split("::", 1)[-1]]
        for _, key, show in metrics:
            new_value = metric(bench, key)
            old_value = metric(old, key) if old else None
            cells += [show(value) if value is not None else "—" for value in (old_value, new_value)]
            cells.append(f"{new_value / old_value:.2f}" if new_value is not None and old_value else "—")
        lines.append("| " + " | ".join(cells) + " |")
    missing = sorted(set(base_cases) - {b["fullname"] for b in current["benchmarks"]})
    lines += [f"(only in base: {name})" for name in missing]
    return lines


def run_suite(tree: Path, pytest_args: List[str], json_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", *pytest_args, "--benchmark-only", f"--benchmark-json={json_path}"]
    print(f"[{tree}] {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=tree, env=env, check=False)  # failures still write the JSON
    if not json_path.exists():
        raise SystemExit(f"the run in {tree} wrote no {json_path}")
    return json.loads(json_path.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage="%(prog)s --base REV [pytest args]")
    parser.add_argument("--base", required=True, help="git revision to compare against (branch, tag, commit)")
    args, pytest_args = parser.parse_known_args(argv)
    if not any(not arg.startswith("-") for arg in pytest_args):
        pytest_args = ["benchmarks", *pytest_args]
    with tempfile.TemporaryDirectory(prefix="bytheway-compare-") as scratch:
        scratch = Path(scratch)
        base_tree = scratch / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.base], check=True)
        try:
            shutil.rmtree(base_tree / "benchmarks", ignore_errors=True)
            shutil.copytree(ROOT / "benchmarks", base_tree / "benchmarks",
                            ignore=shutil.ignore_patterns("__pycache__", ".benchmarks"))
            base = run_suite(base_tree, pytest_args, scratch / "base.json")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
        current = run_suite(ROOT, pytest_args, scratch / "current.json")
    print(f"\nthis checkout ÷ {args.base} (below 1: faster now)\n")
    print("\n".join(ratio_table(base, current)))


if __name__ == "__main__":
    main()
