"""Command-line refusals: every script rejects bad options up front -- one clear line on stderr,
exit status 2, no traceback, no model loaded and no file written (issue 11, item 8)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import bytheway_kernels.integration.media as media  # noqa: E402
import bytheway_kernels.integration.runs as runs  # noqa: E402
from bytheway_kernels.__main__ import main as cli_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bytheway_cli_{name}", REPO / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is the first piece of work: any refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(runs, "load_pipeline", refuse)


def _refused(main, argv, capsys, out_dir):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(out_dir)])
    elapsed = time.perf_counter() - start
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert "error:" in error[-1]
    assert not any("Traceback" in line for line in error)
    assert not out_dir.exists(), "a refused run wrote files"
    assert elapsed < 5.0, f"refusal took {elapsed:.1f} s: work was done first"
    return error[-1]


BAD_OPTIONS = [
    (["--preset", "nonsense"], "invalid choice: 'nonsense'"),
    (["--tau", "100"], "tau 100 is too large for --frames 16"),
    (["--frames", "8"], "tau 7 is too large for --frames 8"),  # the preset's tau
    (["--steps", "-3"], "--steps: must be >= 1, got -3"),
    (["--steps", "x"], "--steps: expected an integer >= 1"),
    (["--alpha", "2"], "alpha"),
    (["--beta", "-1"], "beta"),
    (["--step-fraction", "0"], "step_fraction"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["--image", "/nonexistent/image.png"], "--image '/nonexistent/image.png' does not exist"),
    (["--frames", "1", "--tau", "0"], "--frames 1: ByTheWay needs at least 2 frames"),
    (["--height", "17"], "--height 17 is not a multiple of 8"),
    (["--device", "meta"], "--device meta holds shapes but no data"),
]


@pytest.mark.parametrize("script", ["generate", "analyze"])
def test_scripts_refuse_an_output_path_they_cannot_write_before_loading(script, no_model, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out, message in ((blocker, "exists and is not a folder"), (blocker / "below", "cannot be created")):
        with pytest.raises(SystemExit) as exit_info:
            _script(script).main(["--tiny", "--out", str(out)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_scripts_refuse_more_steps_than_the_scheduler_has_before_running(monkeypatch, capsys, tmp_path):
    """Checked against the loaded pipeline's scheduler, before any denoising."""
    monkeypatch.setattr(runs, "generate", lambda *args, **kwargs: pytest.fail("the pipeline ran"))
    with pytest.raises(SystemExit) as exit_info:
        _script("generate").main(["--tiny", "--steps", "1001", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "--steps 1001 is more than the scheduler's 1000" in error


@pytest.mark.parametrize("script", ["generate", "analyze"])
@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_scripts_refuse_bad_options_up_front(script, options, message, no_model, capsys, tmp_path):
    line = _refused(_script(script).main, ["--tiny"] + options, capsys, tmp_path / "out")
    assert message in line


@pytest.mark.skipif(not NO_CUDA, reason="needs a torch without CUDA")
@pytest.mark.parametrize("script", ["generate", "analyze"])
def test_scripts_refuse_cuda_without_cuda(script, no_model, capsys, tmp_path):
    line = _refused(_script(script).main, ["--tiny", "--device", "cuda"], capsys, tmp_path / "out")
    assert "no usable CUDA device" in line


def test_generate_refuses_mp4_without_imageio_ffmpeg(no_model, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(media, "mp4_available", lambda: False)
    line = _refused(_script("generate").main, ["--tiny", "--mp4"], capsys, tmp_path / "out")
    assert "--mp4 needs the imageio-ffmpeg package" in line


def test_small_frame_counts_pass_with_a_valid_tau(no_model, capsys, tmp_path):
    """--frames 8 --tau 3 passes every check: the run gets as far as loading the model."""
    for script in ("generate", "analyze"):
        with pytest.raises(AssertionError, match="a model was loaded"):
            _script(script).main(["--tiny", "--frames", "8", "--tau", "3", "--out", str(tmp_path / script)])


@pytest.mark.skipif(not NO_CUDA, reason="needs a torch without CUDA")
def test_demo_refuses_cuda_without_cuda(capsys, tmp_path, monkeypatch):
    import bytheway_kernels.integration.demo as demo

    monkeypatch.setattr(demo, "tiny_animatediff_pipeline", lambda **kwargs: pytest.fail("pipeline built"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--device", "cuda", "--out", str(tmp_path / "demo")])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "no usable CUDA device" in error[-1]
    assert not (tmp_path / "demo").exists()
    with pytest.raises(ValueError, match="no usable CUDA device"):
        demo.run_demo(out_dir=str(tmp_path / "demo"), steps=1, device="cuda")


def test_demo_refuses_bad_steps(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--steps", "0", "--out", str(tmp_path / "demo")])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--steps", "1001"], "--steps 1001 is more than the scheduler's 1000 training timesteps"),
    (["--device", "meta"], "--device meta holds shapes but no data"),
    (["--out", "{file}"], "exists and is not a folder"),
])
def test_demo_refuses_what_would_fail_later_up_front(options, message, capsys, tmp_path, monkeypatch):
    import bytheway_kernels.integration.demo as demo

    monkeypatch.setattr(demo, "tiny_animatediff_pipeline", lambda **kwargs: pytest.fail("pipeline built"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    options = [option.format(file=blocker) for option in options]
    out = [] if "--out" in options else ["--out", str(tmp_path / "demo")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo"] + options + out)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("command", [
    [str(REPO / "python" / "generate.py"), "--tiny", "--preset", "nonsense"],
    [str(REPO / "python" / "analyze.py"), "--tiny", "--tau", "100"],
    ["-m", "bytheway_kernels", "demo", "--device", "cuda" if NO_CUDA else "nonsense"],
])
def test_refusals_as_a_user_sees_them(command, tmp_path):
    """The real processes: exit 2, one error line after the usage line, no traceback, no files."""
    result = subprocess.run([sys.executable] + command + ["--out", str(tmp_path / "out")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].count("error:") == 1
    assert not (tmp_path / "out").exists()
