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
    assert re.fullmatch(r"torch calls, host us/call: torch.softmax [\d.]+, torch.empty_like [\d.]+, "
                        r"torch.zeros\(600\) [\d.]+", lines[-1]), lines[-1]
    rows = {}
    for line in lines[1:-1]:
        match = re.fullmatch(r"\s+(.+?)\s+([\d.]+) /\s+([\d.]+)", line)
        assert match, line
        rows[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    assert set(rows) == {"map op fixed", "map op adaptive", "attention plain", "attention fixed",
                         "attention adaptive"}
    assert all(python_only > 0 and with_launcher > 0 for python_only, with_launcher in rows.values())


def test_the_tensor_argument_column_changes_only_what_the_launcher_is_handed():
    """The "direct, tensors" column must differ from "direct launch" in one thing only: the C
    launcher gets the tensors instead of their pointers (same cache key, same argument order)."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import host_cost
    finally:
        sys.path.remove(str(BENCHMARKS))
    from bytheway_kernels.ops import launch

    storage = torch.zeros(64, dtype=torch.float16)
    values = dict(scores_ptr=storage[1:], probs_ptr=torch.zeros(8), count=5, alpha=0.5, FLAG=True)
    signature, pointers = launch._call_arguments(values)
    old_signature, arguments = host_cost._tensors_passed_whole(values)
    assert old_signature == signature
    assert arguments == list(values.values()) and arguments[0] is values["scores_ptr"]
    assert pointers == [values["scores_ptr"].data_ptr(), values["probs_ptr"].data_ptr(), 5, 0.5, True]
    with host_cost._tensor_arguments():
        assert launch._call_arguments is host_cost._tensors_passed_whole
    assert launch._call_arguments is not host_cost._tensors_passed_whole
