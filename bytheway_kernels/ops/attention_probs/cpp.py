"""The compiled CPU kernel from `csrc/`, built just in time on first use.

Schema split: the public op `torch.ops.bytheway.attention_probs` is declared once, in `op.py`
(`torch.library.custom_op`). The extension registers only a private helper,
`torch.ops.bytheway_cpu.attention_probs_out`, which writes into given outputs; `op.py`'s CPU
branch reaches it through `attention_probs_cpp_out` below.

Build: `torch.utils.cpp_extension.load` compiles `csrc/attention_probs_cpu.cpp` with the host C++
compiler and ninja (no download, no CUDA) into the torch extensions cache
(`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), under a directory keyed by a hash
of the sources, the compiler flags (which include the instruction set torch detected on this CPU),
torch and Python versions. A source change or a CPU with another instruction set therefore never
reuses a stale build. Without a compiler or ninja, or when the build fails, `cpp_status()` reports
`available=False` with the reason (and warns once); nothing is raised at import.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from ..params import ByTheWayParams

_SOURCE_FILES = ("attention_probs_cpu.cpp",)
_EXTENSION_PREFIX = "attention_probs_cpu"

_log = logging.getLogger(__name__)


class CppStatus(NamedTuple):
    available: bool
    reason: str


def source_dir() -> Optional[Path]:
    """`csrc/` of a source checkout or editable install, else the copy shipped in the package."""
    package = Path(__file__).resolve().parents[2]
    for candidate in (package.parent / "csrc", package / "csrc"):
        if all((candidate / name).is_file() for name in _SOURCE_FILES):
            return candidate
    return None


def _isa_flags() -> list:
    """Vector ISA flags for the instruction set torch detected here (never -march=native)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
                "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _compiler_flags() -> list:
    # -fopenmp makes at::parallel_for use torch's OpenMP runtime (resolved through libtorch_cpu at
    # load time, so no second OpenMP runtime is linked in) and enables the `omp simd` hints.
    # No -ffast-math: it would fold away the rounding trick of the kernel's exp.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    return ["-O3", "-ffp-contract=fast", "-fno-trapping-math", *openmp, *_isa_flags()]


def _build_directory(sources, flags) -> Path:
    import torch.utils.cpp_extension as cpp_extension

    key = hashlib.sha256()
    for path in sources:
        key.update(path.read_bytes())
    key.update(repr((flags, torch.__version__, sys.version, platform.machine())).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "bytheway_kernels" / f"{_EXTENSION_PREFIX}_{key.hexdigest()[:16]}"


def _missing_tool() -> Optional[str]:
    import torch.utils.cpp_extension as cpp_extension

    if sys.platform == "win32":
        return "the JIT build supports Linux and macOS compilers only"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; set CXX)"
    return None


def _build_and_load() -> Path:
    import torch.utils.cpp_extension as cpp_extension

    directory = source_dir()
    if directory is None:
        raise RuntimeError("csrc/ sources not found next to the package (install from a source checkout)")
    sources = [directory / name for name in _SOURCE_FILES]
    flags = _compiler_flags()
    build_directory = _build_directory(sources, flags)
    build_directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _log.info("bytheway_kernels: building/loading the C++ CPU kernel in %s", build_directory)
    cpp_extension.load(
        name=build_directory.name, sources=[str(path) for path in sources], extra_cflags=flags,
        build_directory=str(build_directory), is_python_module=False, verbose=False,
    )
    _log.info("bytheway_kernels: C++ CPU kernel ready after %.1f s", time.perf_counter() - started)
    if not hasattr(torch.ops.bytheway_cpu, "attention_probs_out"):
        raise RuntimeError("the built library did not register bytheway_cpu::attention_probs_out")
    return build_directory


@functools.lru_cache(maxsize=None)
def cpp_status() -> CppStatus:
    """Whether the C++ kernel is usable here, and why not; builds it on the first call."""
    reason = _missing_tool()
    if reason is None:
        try:
            return CppStatus(True, f"built in {_build_and_load()}")
        except Exception as exc:  # a failed build must degrade to the reference, not crash
            # One line: the first compiler diagnostic, else the exception's first line.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            diagnostics = [line for line in lines if "error:" in line]
            reason = f"build failed: {(diagnostics or lines or [type(exc).__name__])[0]}"
    warnings.warn(f"bytheway_kernels: C++ CPU kernel unavailable, CPU calls use the reference ({reason})",
                  RuntimeWarning, stacklevel=2)
    return CppStatus(False, reason)


def _require_extension() -> None:
    status = cpp_status()
    if not status.available:
        raise RuntimeError(f"BYTHEWAY_BACKEND=cpp: the C++ CPU kernel is unavailable: {status.reason}")


def attention_probs_cpp_out(scores, guide, params: ByTheWayParams, probs, stats) -> None:
    """Write the op's result into `probs` (and `stats`, float32 (rows, 6), unless it is None)."""
    _require_extension()
    torch.ops.bytheway_cpu.attention_probs_out(scores, guide, *params, probs, stats)
