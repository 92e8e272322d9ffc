"""Both ops' Triton kernel tests again, under Triton 3.6.0 (the GPU images' version).

The interpreter tests (`tests/test_attention_probs_triton.py`, `tests/test_temporal_attention_triton.py`)
the launcher's (`tests/test_launch.py`, which checks the direct launcher's C-launch call
against Triton 3.6's own launcher there) and the interpreter speed-up's
(`tests/test_interpreter_lang_patch.py`) run with the current Triton in the main session; this
runs them in a subprocess with the copy
of Triton 3.6.0 in `.triton36/` first on the path (installed by the README's test command, see
`tests/test_triton_sm90.py`), so that kernel code the older frontend or interpreter cannot run
fails here, not on a GPU. Triton 3.6's interpreter turns loop bounds given at run time into
Python ints with `int()` of a one-element array, which numpy 2.4 refuses, so that folder holds
numpy < 2.4 as well. The F = 64 cases and the opcheck/compile tests (torch.library, not Triton)
are left to the main session. The files run at once, one process each.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bytheway_kernels.testing import run_at_once
from test_triton_sm90 import REPO, TRITON36_ENV, triton36_dir

KERNEL_TEST_FILES = ("tests/test_attention_probs_triton.py", "tests/test_temporal_attention_triton.py",
                     "tests/test_launch.py", "tests/test_interpreter_lang_patch.py")
SELECTION = "not F64 and not opcheck"


def _environment(directory) -> dict:
    path_entries = [str(directory), str(REPO), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path_entries))


@pytest.mark.skipif(
    triton36_dir() is None,
    reason=f"Triton 3.6.0 not installed: pip install --target .triton36 triton==3.6.0 'numpy<2.4' "
           f"(or set {TRITON36_ENV})")
def test_kernel_tests_pass_under_triton36():
    env = _environment(triton36_dir())
    versions = subprocess.run(
        [sys.executable, "-c", "import numpy, triton; print(triton.__version__, numpy.__version__)"],
        env=env, capture_output=True, text=True, check=True).stdout.split()
    assert versions[0].startswith("3.6."), versions
    numpy_version = tuple(int(part) for part in versions[1].split(".")[:2])
    assert numpy_version < (2, 4), (
        f"numpy {versions[1]} comes first on the path: Triton 3.6's interpreter needs numpy < 2.4 "
        f"(pip install --target .triton36 'numpy<2.4')")
    # one pytest process per file, at once: the interpreter runs on one thread (two cores in CI)
    runs = run_at_once([([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", test_file,
                          "-k", SELECTION], env) for test_file in KERNEL_TEST_FILES], timeout=1500, cwd=REPO)
    for test_file, (returncode, stdout, stderr) in zip(KERNEL_TEST_FILES, runs):
        summary = stdout.splitlines()[-1] if stdout.strip() else ""
        assert returncode == 0, f"{test_file}:\n" + stdout[-4000:] + stderr[-2000:]
        assert " passed" in summary and "failed" not in summary, (test_file, summary)
