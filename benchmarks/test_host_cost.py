"""benchmarks/host_cost.py on CPU: both columns it can measure without a GPU (our Python alone,
and with the direct launcher in front of a stand-in compiled kernel) for every call it times.

No benchmark fixture, so `--benchmark-only` skips this; the CI smoke run executes it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU mode of the script")
def test_host_cost_script_measures_both_cpu_columns():
    env = {name: value for name, value in os.environ.items()
           if name not in ("TRITON_INTERPRET", "BYTHEWAY_BACKEND", "BYTHEWAY_DIRECT_LAUNCH")}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "host_cost.py")], env=env,
                            capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].endswith("python only / direct launcher, stubbed")
    rows = {}
    for line in lines[1:]:
        match = re.fullmatch(r"\s+(.+?)\s+([\d.]+) /\s+([\d.]+)", line)
        assert match, line
        rows[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    assert set(rows) == {"map op fixed", "map op adaptive", "attention plain", "attention fixed",
                         "attention adaptive"}
    assert all(python_only > 0 and with_launcher > 0 for python_only, with_launcher in rows.values())
