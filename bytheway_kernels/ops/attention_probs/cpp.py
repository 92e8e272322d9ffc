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
instruction set torch detected on this CPU), the compiler command (`$CXX`) and its identity, the
torch version and the Python ABI. A finished build is loaded directly from there by later processes,
without asking ninja: ninja would rebuild whenever its own version or the include paths of the
running interpreter's torch (another venv) differ, because `cpp_extension.load` regenerates
`build.ninja` in every new process. One line on stderr announces a real build (about a minute).
Builds of one directory take turns under an flock, which the OS releases when its holder dies: a
build killed midway leaves torch's own `lock` file behind, which would otherwise hold every later
build forever, and the next holder deletes it. A ninja that is not on PATH but next to the
interpreter, or where the `ninja` package installed it (a venv that is not activated), is put on
PATH for the build. A compiler or linker error is recorded in the build directory
(`build_failed.txt`): later processes report it without compiling again, until that file is
deleted; a build that was killed or ran out of memory or disk is not recorded.
Without a compiler or ninja, or when the build fails, `cpp_status()` reports `available=False`
with the reason (and warns once); nothing is raised at import.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shlex
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

try:
    import fcntl
except ImportError:  # not on Windows, where the JIT build is refused anyway
    fcntl = None

_SOURCE_FILES = ("attention_probs_cpu.cpp",)
_EXTENSION_PREFIX = "attention_probs_cpu"
#: Written into a build directory once its library has been built and loaded: names the library.
_BUILT_MARKER = "built_library.txt"
#: Written into a build directory when its build failed with a compiler or linker error: the
#: build's output. Later processes report it instead of compiling again; deleting it retries.
_FAILED_MARKER = "build_failed.txt"
#: Locked (flock) by the process building in a build directory; never deleted.
_BUILD_LOCK = "build.flock"
#: The file `cpp_extension.load` creates in the build directory while it builds, and deletes after.
_TORCH_LOCK = "lock"
#: Build output of a compiler or ninja that was killed, interrupted or starved of memory or disk:
#: such a failure may not happen again, so it is not recorded.
_TRANSIENT_FAILURE_SIGNS = (
    "terminated with signal", "Killed signal terminated", "Killed (program", "due to signal",
    "unable to execute command", "interrupted by user", "out of memory", "Cannot allocate memory",
    "virtual memory exhausted", "No space left on device", "Disk quota exceeded",
    "Resource temporarily unavailable", "Input/output error", "Stale file handle",
)
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
    """The compiler command torch's build uses: `$CXX`, which may carry a launcher or arguments
    (e.g. "ccache g++"), else "c++"."""
    return os.environ.get("CXX", "c++")


def _command_words(command: str) -> list:
    """`command` split as a shell would split it; [] if it cannot be (an unclosed quote)."""
    try:
        return shlex.split(command)
    except ValueError:
        return []


@functools.lru_cache(maxsize=None)
def compiler_identity(compiler: str) -> str:
    """First line of `<compiler> --version` (e.g. "c++ (Debian 12.2.0-14) 12.2.0"), or "" if it fails."""
    words = _command_words(compiler)
    if not words:
        return ""
    try:
        result = subprocess.run([*words, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = result.stdout.splitlines()
    return lines[0].strip() if lines else ""


def build_key(sources, flags) -> str:
    """Hash of what changes the binary: sources, flags, compiler, torch, Python ABI, machine.

    The compiler counts by its command as well as its `--version` line: a wrapper (ccache, a
    script adding options) reports the version of the compiler it runs, and a failure recorded
    for one command must not stick to another. Deliberately not the interpreter's path, the venv
    or the ninja version: the same torch in two venvs loads the same library.
    """
    key = hashlib.sha256()
    for path in sources:
        key.update(path.read_bytes())
    abi = (sys.implementation.cache_tag, sysconfig.get_config_var("SOABI"))
    compiler = _compiler()
    identity = (flags, compiler, compiler_identity(compiler), torch.__version__, torch.version.git_version, abi,
                platform.machine())
    key.update(repr(identity).encode())
    return key.hexdigest()[:16]


def _build_directory(sources, flags) -> Path:
    import torch.utils.cpp_extension as cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / "bytheway_kernels" / f"{_EXTENSION_PREFIX}_{build_key(sources, flags)}"


def _ninja_directory() -> Optional[str]:
    """The directory of the ninja the build runs, or None if there is none.

    PATH first, as torch runs "ninja" through it; else the one pip installed with this interpreter,
    which is not on PATH when its venv is not activated: next to the interpreter, or where the
    `ninja` package says (a user install).
    """
    found = shutil.which("ninja")
    if found is not None:
        return os.path.dirname(found)
    directories = [os.path.dirname(sys.executable)]
    try:
        import ninja

        directories.append(ninja.BIN_DIR)
    except ImportError:
        pass
    for directory in directories:
        if directory and shutil.which("ninja", path=directory) is not None:
            return directory
    return None


@contextlib.contextmanager
def _ninja_on_path():
    """PATH with ninja's directory in front while in the block, where ninja is not on PATH."""
    directory = None if shutil.which("ninja") else _ninja_directory()
    if directory is None:
        yield
        return
    path = os.environ.get("PATH")
    os.environ["PATH"] = directory if not path else os.pathsep.join((directory, path))
    try:
        yield
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def _missing_tool() -> Optional[str]:
    """Why the JIT build cannot run here (no ninja, no compiler, Windows), or None."""
    if sys.platform == "win32":
        return "the JIT build supports Linux and macOS compilers only"
    if _ninja_directory() is None:
        return "ninja is not installed (pip install ninja)"
    compiler = _compiler()
    words = _command_words(compiler)
    if not words or shutil.which(words[0]) is None:
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


class _RecordedBuildFailure(RuntimeError):
    """The build failed with a compiler or linker error, recorded in `record` (the build's output):
    later processes raise it again without compiling, until that file is deleted."""

    def __init__(self, output: str, record: Path):
        super().__init__(output)
        self.record = record


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that no reader ever sees part of it."""
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


def _raise_recorded_failure(build_directory: Path) -> None:
    """Raise the compiler or linker error recorded in `build_directory`, if there is one."""
    record = build_directory / _FAILED_MARKER
    if record.is_file():
        raise _RecordedBuildFailure(record.read_text(), record)


def _is_compiler_error(exc: Exception) -> bool:
    """Whether `exc` is `load`'s report of a compiler or linker error (ninja failed with a
    diagnostic), which the next try would repeat, rather than a killed or starved build."""
    ninja_run = exc.__cause__
    if not isinstance(ninja_run, subprocess.CalledProcessError) or ninja_run.returncode <= 0:
        return False  # no ninja failure, or ninja killed by a signal
    output = str(exc)
    return "error:" in output and not any(sign in output for sign in _TRANSIENT_FAILURE_SIGNS)


@contextlib.contextmanager
def _build_lock(build_directory: Path):
    """Hold the build directory's lock: one process builds, the others wait for it.

    The lock is an flock, which the OS releases when its holder dies, so a killed build never
    blocks the next one. Torch's `lock` file, which `load` creates and deletes around its build,
    outlives a killed holder (and `load` then waits for it forever); under the flock it can only be
    such a leftover, so it is deleted. Without fcntl, torch's `lock` file is the only guard.
    """
    if fcntl is None:
        yield
        return
    with open(build_directory / _BUILD_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or its process ends
        (build_directory / _TORCH_LOCK).unlink(missing_ok=True)
        yield


def _load_built(build_directory: Path) -> Optional[ModuleType]:
    """The extension a finished build in `build_directory` left, imported; None if there is none."""
    library = _built_library(build_directory)
    return None if library is None else _load_module(build_directory.name, library)


def _build(build_directory: Path, sources: list, flags: list) -> ModuleType:
    """Compile the extension in `build_directory` and import it; the caller holds its build lock.

    A compiler or linker error is recorded there and raised as a `_RecordedBuildFailure`.
    """
    import torch.utils.cpp_extension as cpp_extension

    started = time.perf_counter()
    try:
        with _ninja_on_path():
            module = cpp_extension.load(
                name=build_directory.name, sources=[str(path) for path in sources], extra_cflags=flags,
                build_directory=str(build_directory), is_python_module=True, verbose=False,
            )
    except RuntimeError as exc:
        if not _is_compiler_error(exc):
            raise
        record = build_directory / _FAILED_MARKER
        _write_atomically(record, str(exc))
        raise _RecordedBuildFailure(str(exc), record) from exc
    # Written last: another process never loads a half-linked library.
    _write_atomically(build_directory / _BUILT_MARKER, Path(module.__file__).name)
    _log.info("bytheway_kernels: C++ CPU kernel built in %.1f s", time.perf_counter() - started)
    return module


def _build_and_load() -> tuple:
    """(build directory, extension module): the cached build, or a new one."""
    directory = source_dir()
    if directory is None:
        raise RuntimeError("csrc/ sources not found next to the package (install from a source checkout)")
    sources = [directory / name for name in _SOURCE_FILES]
    flags = _compiler_flags()
    build_directory = _build_directory(sources, flags)
    module = _load_built(build_directory)
    if module is None:
        _raise_recorded_failure(build_directory)
        build_directory.mkdir(parents=True, exist_ok=True)
        print(BUILD_NOTICE, file=sys.stderr, flush=True)
        with _build_lock(build_directory):
            # Another process may have finished, or failed, this build while this one waited.
            module = _load_built(build_directory)
            if module is None:
                _raise_recorded_failure(build_directory)
                module = _build(build_directory, sources, flags)
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
            # One line: the first compiler diagnostic, else the exception's first line. The shell's
            # "not found" counts: torch >= 2.13 quotes `$CXX` as one program name, so a CXX with
            # arguments ("ccache g++") passes `_missing_tool` but is not found when ninja runs it.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            diagnostics = [line for line in lines if "error:" in line or line.endswith(": not found")]
            reason = f"build failed: {(diagnostics or lines or [type(exc).__name__])[0]}"
            if isinstance(exc, _RecordedBuildFailure):
                reason += f" (recorded in {exc.record}: delete it to build again)"
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
