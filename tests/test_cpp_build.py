"""The JIT build of the C++ CPU kernel (`ops/attention_probs/cpp.py`): cache, key, tools, locking and
recorded failures.

No test here compiles the kernel: `torch.utils.cpp_extension.load` (or the compile step beneath its
lock) is replaced by a stand-in, except in the one test that compiles a one-line broken source.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from bytheway_kernels.ops.attention_probs import cpp as cpp_backend
from bytheway_kernels.ops.attention_probs.cpp import CppStatus

REPO = Path(__file__).resolve().parents[1]
COMPILER = shutil.which(cpp_backend._compiler())


def _fake_build(monkeypatch, tmp_path):
    """Stand-ins for the compiler and the loader; returns the list of calls made."""
    calls = []

    def fake_module(library):
        return types.SimpleNamespace(__file__=str(library), attention_probs=None)

    def fake_load(name, build_directory, is_python_module, **_):
        assert is_python_module
        calls.append(("build", name))
        library = tmp_path / "cache" / "bytheway_kernels" / name / f"{name}.so"
        library.write_bytes(b"not a real library")
        return fake_module(library)

    def fake_import(name, library):
        calls.append(("load", str(library)))
        return fake_module(library)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_backend, "_load_module", fake_import)
    monkeypatch.setattr(cpp_backend, "_extension", cpp_backend._extension)  # a fake one is put back after
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    return calls


def _build_directory():
    directory = cpp_backend.source_dir()
    sources = [directory / name for name in cpp_backend._SOURCE_FILES]
    return cpp_backend._build_directory(sources, cpp_backend._compiler_flags())


def test_build_notice_only_on_a_real_build(monkeypatch, tmp_path, capsys):
    calls = _fake_build(monkeypatch, tmp_path)
    first, _ = cpp_backend._build_and_load()
    assert capsys.readouterr().err.splitlines() == [cpp_backend.BUILD_NOTICE]
    assert calls == [("build", first.name)]
    second, _ = cpp_backend._build_and_load()  # a later process: the cache hit loads without ninja
    assert second == first and capsys.readouterr().err == ""
    assert calls[1:] == [("load", str(first / f"{first.name}.so"))]


def test_unfinished_build_is_not_loaded(monkeypatch, tmp_path, capsys):
    """A directory without the completion marker (an interrupted build) is built again."""
    calls = _fake_build(monkeypatch, tmp_path)
    directory, _ = cpp_backend._build_and_load()
    (directory / "built_library.txt").unlink()
    cpp_backend._build_and_load()
    assert [kind for kind, _ in calls] == ["build", "build"]
    assert capsys.readouterr().err.count(cpp_backend.BUILD_NOTICE) == 2


# --- Builds in other processes: torch's real `load` and its `lock` file, with the compile step and the
# import of the library replaced (torch-private names; `load` itself is the code under test here).
BUILD_IN_A_PROCESS = textwrap.dedent("""
    import sys, time, types
    from pathlib import Path
    import torch.utils.cpp_extension as cpp_extension
    from bytheway_kernels.ops.attention_probs import cpp

    log, processes = Path(sys.argv[1]), int(sys.argv[2])

    def append(line):
        with log.open("a") as file:
            file.write(line + "\\n")

    def compile_library(name, build_directory, **_):
        append("build")
        while log.read_text().count("start") < processes:  # every process is past its imports
            time.sleep(0.05)
        time.sleep(1.0)  # the others now wait for this build
        Path(build_directory, name + ".so").write_bytes(b"")

    def library_module(library):
        return types.SimpleNamespace(__file__=str(library), attention_probs=None)

    def load_finished_build(name, library):
        append("load")
        return library_module(library)

    cpp_extension._write_ninja_file_and_build_library = compile_library
    cpp_extension._import_module_from_library = (
        lambda name, path, is_python_module: library_module(Path(path, name + ".so")))
    cpp._load_module = load_finished_build
    append("start")
    status = cpp.cpp_status()
    print(status.reason)
    sys.exit(0 if status.available else 1)
""")


def _start_builds(tmp_path, processes):
    log = tmp_path / "log"
    log.touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-c", BUILD_IN_A_PROCESS, str(log), str(processes)]
    started = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(processes)]
    return log, started


def _finish(process, timeout=120):
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the build still waited after {timeout} s:\n{output}")
    assert process.returncode == 0, output
    return output


def test_lock_file_left_by_a_killed_build_does_not_hang_the_next(monkeypatch, tmp_path):
    """A build killed midway leaves torch's `lock` file; `load` alone would wait on it forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    directory = _build_directory()
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    log, (process,) = _start_builds(tmp_path, 1)
    _finish(process)
    assert log.read_text().split() == ["start", "build"]
    assert (directory / "built_library.txt").is_file() and not (directory / "lock").exists()


def test_concurrent_first_builds_build_once_and_both_load(tmp_path):
    log, processes = _start_builds(tmp_path, 2)
    for process in processes:
        _finish(process)
    assert sorted(log.read_text().split()) == ["build", "load", "start", "start"]


# --- Tools.
def _without_ninja(monkeypatch, tmp_path):
    """PATH without ninja, `$CXX` the compiler's full path, the interpreter in an empty folder and
    no `ninja` package."""
    monkeypatch.setenv("CXX", COMPILER)
    (tmp_path / "path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python" / "bin" / "python"))
    monkeypatch.setitem(sys.modules, "ninja", None)


def _install_ninja(directory):
    directory.mkdir(parents=True, exist_ok=True)
    ninja = directory / "ninja"
    ninja.write_text("#!/bin/sh\necho 1.13.0\n")
    ninja.chmod(0o755)
    return ninja


@pytest.mark.parametrize("where", ["next to the interpreter", "ninja.BIN_DIR"])
def test_ninja_outside_path_is_found_and_on_path_for_the_build(monkeypatch, tmp_path, where):
    """A venv run by the interpreter's full path, not activated: pip's ninja is not on PATH."""
    _without_ninja(monkeypatch, tmp_path)
    if where == "next to the interpreter":
        ninja = _install_ninja(Path(sys.executable).parent)
    else:
        ninja = _install_ninja(tmp_path / "user" / "bin")
        monkeypatch.setitem(sys.modules, "ninja", types.SimpleNamespace(BIN_DIR=str(ninja.parent)))
    _fake_build(monkeypatch, tmp_path)
    ninja_seen_by_load = []
    fake_load = torch.utils.cpp_extension.load

    def load(**arguments):
        ninja_seen_by_load.append(shutil.which("ninja"))
        return fake_load(**arguments)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    status = cpp_backend.cpp_status.__wrapped__()
    assert status.available, status.reason
    assert ninja_seen_by_load == [str(ninja)]
    assert os.environ["PATH"] == str(tmp_path / "path")  # only for the build


def test_missing_ninja_reports_unavailable_without_raising(monkeypatch, tmp_path):
    _without_ninja(monkeypatch, tmp_path)
    with pytest.warns(RuntimeWarning, match="ninja"):
        status = cpp_backend.cpp_status.__wrapped__()
    assert status == CppStatus(False, "ninja is not installed (pip install ninja)")


def test_compiler_command_with_a_launcher_or_arguments(monkeypatch):
    """`CXX="ccache g++"`: the first word is the program, the rest its arguments."""
    monkeypatch.setenv("CXX", f"env {COMPILER} -O2")
    assert cpp_backend._missing_tool() is None
    assert cpp_backend.compiler_identity(cpp_backend._compiler()) == cpp_backend.compiler_identity(COMPILER)
    monkeypatch.setenv("CXX", "no-such-compiler -O2")
    assert cpp_backend._missing_tool() == "no C++ compiler found ('no-such-compiler -O2' is not on PATH; set CXX)"


def test_compiler_identity_is_the_first_version_line():
    identity = cpp_backend.compiler_identity(cpp_backend._compiler())
    assert identity and "\n" not in identity
    assert cpp_backend.compiler_identity("/nonexistent/compiler") == ""


# --- The build key.
def _key(sources=None, flags=None):
    sources = sources or [cpp_backend.source_dir() / name for name in cpp_backend._SOURCE_FILES]
    return cpp_backend.build_key(sources, flags or cpp_backend._compiler_flags())


def test_build_key_ignores_the_venv_the_interpreter_path_and_ninja(monkeypatch, tmp_path):
    key = _key()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "other-venv" / "bin" / "python"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "other-venv"))
    monkeypatch.setenv("PATH", str(tmp_path / "other-venv" / "bin") + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(sys, "version", sys.version + " [another build of the same Python]")
    assert _key() == key


def test_build_key_follows_source_flags_compiler_and_torch(monkeypatch, tmp_path):
    key = _key()
    changed = tmp_path / cpp_backend._SOURCE_FILES[0]
    changed.write_bytes((cpp_backend.source_dir() / cpp_backend._SOURCE_FILES[0]).read_bytes() + b"\n")
    assert _key(sources=[changed]) != key
    assert _key(flags=cpp_backend._compiler_flags() + ["-DSOMETHING"]) != key
    monkeypatch.setattr(cpp_backend, "compiler_identity", lambda compiler: "c++ (another) 99.1")
    assert _key() != key
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert _key() != key


def test_build_key_follows_the_compiler_command_behind_the_same_version(monkeypatch):
    """A wrapper (ccache, a script adding options) reports the version of the compiler it runs."""
    monkeypatch.setattr(cpp_backend, "compiler_identity", lambda compiler: "g++ (Debian 12.2.0-14) 12.2.0")
    monkeypatch.setenv("CXX", "g++")
    key = _key()
    monkeypatch.setenv("CXX", "/opt/wrappers/g++")
    assert _key() != key


# --- Failed builds.
def test_compiler_error_is_recorded_and_reported_without_compiling_again(monkeypatch, tmp_path):
    (tmp_path / "attention_probs_cpu.cpp").write_text("#error simulated broken source\n")
    monkeypatch.setattr(cpp_backend, "source_dir", lambda: tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="build failed"):
        first = cpp_backend.cpp_status.__wrapped__()
    assert not first.available and "simulated broken source" in first.reason
    record = _build_directory() / "build_failed.txt"
    assert f"recorded in {record}" in first.reason and "simulated broken source" in record.read_text()

    def compile_again(**_):
        raise AssertionError("compiled again")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_again)
    with pytest.warns(RuntimeWarning, match="build failed"):
        assert cpp_backend.cpp_status.__wrapped__() == first  # a later process, at once
    record.unlink()  # how to retry
    with pytest.warns(RuntimeWarning, match="compiled again"):
        cpp_backend.cpp_status.__wrapped__()


def _ninja_failure(output, returncode=1):
    """`load`'s exception for a failed ninja run with this output."""
    try:
        raise subprocess.CalledProcessError(returncode, ["ninja", "-v"], output.encode())
    except subprocess.CalledProcessError as ninja_run:
        try:
            raise RuntimeError(f"Error building extension 'attention_probs_cpu': {output}") from ninja_run
        except RuntimeError as exc:
            return exc


@pytest.mark.parametrize("failure", [
    _ninja_failure("FAILED: a.o\nc++: fatal error: Killed signal terminated program cc1plus\n"),
    _ninja_failure("FAILED: a.so\ncollect2: fatal error: ld terminated with signal 9 [Killed]\n"),
    _ninja_failure("FAILED: a.o\na.cpp:1:1: fatal error: error writing to /tmp/cc.s: No space left on device\n"),
    _ninja_failure("FAILED: a.o\nninja: build stopped: interrupted by user.\n", returncode=2),
    _ninja_failure("FAILED: a.o\na.cpp:1:1: error: partial output of a killed ninja\n", returncode=-9),
    RuntimeError("Ninja is required to load C++ extensions"),
], ids=["compiler killed", "linker killed", "disk full", "interrupted", "ninja killed", "no ninja failure"])
def test_killed_or_starved_build_is_not_recorded(monkeypatch, tmp_path, failure):
    calls = _fake_build(monkeypatch, tmp_path)
    working_load = torch.utils.cpp_extension.load

    def failing_load(**_):
        calls.append(("failed", None))
        raise failure

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_load)
    with pytest.warns(RuntimeWarning, match="build failed"):
        status = cpp_backend.cpp_status.__wrapped__()
    assert "recorded" not in status.reason and not (_build_directory() / "build_failed.txt").exists()
    monkeypatch.setattr(torch.utils.cpp_extension, "load", working_load)
    assert cpp_backend.cpp_status.__wrapped__().available  # the next process builds again
    assert [kind for kind, _ in calls] == ["failed", "build"]


def test_compiler_command_the_shell_cannot_run_is_the_reason(monkeypatch, tmp_path):
    """Torch 2.13 quotes `$CXX` as one program name in build.ninja: its shell's complaint is the reason."""
    _fake_build(monkeypatch, tmp_path)
    failure = _ninja_failure("[1/2] 'ccache g++' -c a.cpp -o a.o\nFAILED: a.o\n/bin/sh: 1: ccache g++: not found\n")

    def failing_load(**_):
        raise failure

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_load)
    with pytest.warns(RuntimeWarning, match="build failed"):
        status = cpp_backend.cpp_status.__wrapped__()
    assert status == CppStatus(False, "build failed: /bin/sh: 1: ccache g++: not found")
