"""The compiled CPU kernel from `csrc/`, built just in time on first use.

Schema split: the public op `torch.ops.bytheway.attention_probs` is declared once, in `op.py`
(`torch.library.custom_op`). The extension is a private Python module (pybind11) with one
function, `attention_probs`, which writes into the outputs it is given or allocates the probs
itself; `op.py`'s CPU branch reaches it through `attention_probs_cpp` below (and tests, with
poisoned outputs, through `attention_probs_cpp_out`). A pybind11 call costs well under a
microsecond of binding, where a torch.ops dispatcher entry with these 15 arguments cost ~4 us per
call, and allocating the probs in C++ saves most of `torch.empty_like`'s ~1 us.

Build: `torch.utils.cpp_extension.load` compiles `csrc/attention_probs_cpu.cpp` with the host C++
compiler and ninja (no download, no CUDA) into the torch extensions cache
(`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), under a directory keyed by what
changes the binary and nothing else: the source bytes, the compiler flags (which include the
instruction set torch detected on this CPU), the compiler's identity, the torch version and the
Python ABI. A finished build is loaded directly from there by later processes, without asking
ninja: ninja would rebuild whenever its own version or the include paths of the running
interpreter's torch (another venv) differ, because `cpp_extension.load` regenerates
`build.ninja` in every new process. One line on stderr announces a real build (about a minute).
Without a compiler or ninja, or when the build fails, `cpp_status()` reports `available=False`
with the reason (and warns once); nothing is raised at import.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, Optional

import torch

from ...band import high_band_matrix_float64, is_full_band
from ...energy import HIGH_ENERGY_FLOOR
from ..params import ByTheWayParams

_SOURCE_FILES = ("attention_probs_cpu.cpp",)
_EXTENSION_PREFIX = "attention_probs_cpu"
#: Written into a build directory once its library has been built and loaded: names the library.
_BUILT_MARKER = "built_library.txt"
BUILD_NOTICE = "bytheway_kernels: building the C++ CPU kernel (first use, about a minute)..."

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


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


@functools.lru_cache(maxsize=None)
def compiler_identity(compiler: str) -> str:
    """First line of `<compiler> --version` (e.g. "c++ (Debian 12.2.0-14) 12.2.0"), or "" if it fails."""
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = result.stdout.splitlines()
    return lines[0].strip() if lines else ""


def build_key(sources, flags) -> str:
    """Hash of what changes the binary: sources, flags, compiler, torch, Python ABI, machine.

    Deliberately not the interpreter's path, the venv or the ninja version: the same torch in two
    venvs loads the same library.
    """
    key = hashlib.sha256()
    for path in sources:
        key.update(path.read_bytes())
    abi = (sys.implementation.cache_tag, sysconfig.get_config_var("SOABI"))
    identity = (flags, compiler_identity(_compiler()), torch.__version__, torch.version.git_version, abi,
                platform.machine())
    key.update(repr(identity).encode())
    return key.hexdigest()[:16]


def _build_directory(sources, flags) -> Path:
    import torch.utils.cpp_extension as cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "bytheway_kernels" / f"{_EXTENSION_PREFIX}_{build_key(sources, flags)}"


def _missing_tool() -> Optional[str]:
    import torch.utils.cpp_extension as cpp_extension

    if sys.platform == "win32":
        return "the JIT build supports Linux and macOS compilers only"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    compiler = _compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; set CXX)"
    return None


def _built_library(build_directory: Path) -> Optional[Path]:
    """The library a finished build in `build_directory` left, or None."""
    marker = build_directory / _BUILT_MARKER
    if not marker.is_file():
        return None
    library = build_directory / marker.read_text().strip()
    return library if library.is_file() else None


def _load_module(name: str, library: Path) -> ModuleType:
    """Import the extension module `name` from its built library."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The loaded extension module: set by `cpp_status()` when it reports the kernel available.
_extension: Optional[ModuleType] = None


def _build_and_load() -> tuple:
    """(build directory, extension module): the cached build, or a new one."""
    import torch.utils.cpp_extension as cpp_extension

    directory = source_dir()
    if directory is None:
        raise RuntimeError("csrc/ sources not found next to the package (install from a source checkout)")
    sources = [directory / name for name in _SOURCE_FILES]
    flags = _compiler_flags()
    build_directory = _build_directory(sources, flags)
    library = _built_library(build_directory)
    if library is not None:
        module = _load_module(build_directory.name, library)
    else:
        build_directory.mkdir(parents=True, exist_ok=True)
        print(BUILD_NOTICE, file=sys.stderr, flush=True)
        started = time.perf_counter()
        module = cpp_extension.load(
            name=build_directory.name, sources=[str(path) for path in sources], extra_cflags=flags,
            build_directory=str(build_directory), is_python_module=True, verbose=False,
        )
        # Written last and atomically: another process never loads a half-linked library.
        partial = build_directory / f"{_BUILT_MARKER}.{os.getpid()}"
        partial.write_text(Path(module.__file__).name)
        partial.replace(build_directory / _BUILT_MARKER)
        _log.info("bytheway_kernels: C++ CPU kernel built in %.1f s", time.perf_counter() - started)
    if not hasattr(module, "attention_probs"):
        raise RuntimeError("the built module has no attention_probs")
    return build_directory, module


@functools.lru_cache(maxsize=None)
def cpp_status() -> CppStatus:
    """Whether the C++ kernel is usable here, and why not; builds it on the first call.

    Examples:
        >>> status = cpp_status()  # doctest: +SKIP
        >>> status.available, status.reason  # doctest: +SKIP
        (True, 'built in /home/me/.cache/torch_extensions/bytheway_kernels/attention_probs_cpu_...')
    """
    global _extension
    reason = _missing_tool()
    if reason is None:
        try:
            build_directory, _extension = _build_and_load()
            return CppStatus(True, f"built in {build_directory}")
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


def attention_probs_cpp(scores, guide, params: ByTheWayParams, with_stats: bool):
    """(probs, stats or None) for `scores`: the kernel allocates the probs (contiguous), stats are
    float32 (rows, 6) when `with_stats`.

    Examples:
        >>> import torch
        >>> from bytheway_kernels.ops.params import ByTheWayParams
        >>> scores = torch.randn(2, 2, 2, 1, 16, 16)
        >>> params = ByTheWayParams(0.0, 1.5, 7, False, 1, 0, "batch", "nearest", None)
        >>> probs, stats = attention_probs_cpp(scores, None, params, False)  # doctest: +SKIP
    """
    stats = None
    if with_stats:
        stats = params.empty_stats(scores, scores.shape[0])
    return _run(scores, guide, params, None, stats), stats


def attention_probs_cpp_out(scores, guide, params: ByTheWayParams, probs, stats) -> None:
    """Write the op's result into `probs` (and `stats`, float32 (rows, 6), unless it is None).

    Examples:
        >>> import torch
        >>> from bytheway_kernels.ops.params import ByTheWayParams
        >>> scores = torch.randn(2, 2, 2, 1, 16, 16)
        >>> params = ByTheWayParams(0.0, 1.5, 7, False, 1, 0, "batch", "nearest", None)
        >>> probs = torch.empty_like(scores)
        >>> attention_probs_cpp_out(scores, None, params, probs, None)  # doctest: +SKIP
    """
    _run(scores, guide, params, probs, stats)


def _run(scores, guide, params: ByTheWayParams, probs, stats) -> torch.Tensor:
    """The kernel's call; returns the probs written (allocated by the kernel when `probs` is
    None)."""
    if _extension is None:  # not built yet, or unavailable (then this raises)
        _require_extension()
    alpha, beta, tau, adaptive_beta, parts, energy_part, energy_scope, guide_upsample, beta_max = params
    band_matrix, full_band = _band_arguments(scores.shape[-1], tau)
    return _extension.attention_probs(
        scores, guide, band_matrix, full_band, alpha, beta, adaptive_beta, parts, energy_part,
        energy_scope, guide_upsample, beta_max, HIGH_ENERGY_FLOOR, probs, stats,
    )


@functools.lru_cache(maxsize=None)
def _band_arguments(frames: int, tau: int) -> tuple:
    """(P in float64, whether the band is the full band): the band rules come from Python
    (`band.py`), so the kernel never restates them."""
    return high_band_matrix_float64(frames, tau), is_full_band(frames, tau)
