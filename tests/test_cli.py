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


def _without_modules(monkeypatch, *names):
    """find_spec reports `names` as not installed (as without the [diffusers] extra)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in names else find_spec(name, *args))


@pytest.mark.parametrize("script, module", [("generate", "tqdm"), ("generate", "diffusers"),
                                            ("analyze", "matplotlib"), ("analyze", "transformers")])
def test_scripts_without_the_diffusers_extra_name_it_before_any_work(script, module, no_model, monkeypatch,
                                                                     capsys, tmp_path):
    _without_modules(monkeypatch, module)
    line = _refused(_script(script).main, ["--tiny"], capsys, tmp_path / "out")
    assert f"missing module {module}: install the [diffusers] extra (pip install -e \".[diffusers]\")" in line


@pytest.mark.parametrize("module", ["diffusers", "PIL"])
def test_demo_without_the_diffusers_extra_names_it_before_any_work(module, monkeypatch, capsys, tmp_path):
    _without_modules(monkeypatch, module)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--out", str(tmp_path / "demo")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert f"missing module {module}: install the [diffusers] extra (pip install -e \".[diffusers]\")" in line
    assert not (tmp_path / "demo").exists()


def test_missing_modules_are_named_together(monkeypatch):
    _without_modules(monkeypatch, "tqdm", "PIL")
    assert runs.missing_modules_problem(["diffusers", "tqdm", "PIL"]).startswith("missing modules tqdm, PIL:")


def _model_folders(tmp_path):
    """{name: path} of inputs the scripts must refuse, and of valid ones (a pipeline folder with
    model_index.json, a MotionAdapter folder with config.json, a PNG)."""
    from PIL import Image

    folders = {"empty": tmp_path / "empty", "pipeline": tmp_path / "pipeline", "adapter": tmp_path / "adapter"}
    for folder in folders.values():
        folder.mkdir()
    (folders["pipeline"] / "model_index.json").write_text("{}")
    (folders["adapter"] / "config.json").write_text("{}")
    folders["text"] = tmp_path / "notes.txt"
    folders["text"].write_text("not an image\n")
    folders["png"] = tmp_path / "frame.png"
    Image.new("RGB", (8, 8)).save(folders["png"])
    return folders


BAD_INPUTS = [
    (["--tiny", "--image", "{text}"], "--image '{text}' cannot be read as an image"),
    (["--tiny", "--image", "{empty}"], "--image '{empty}' is a folder, not an image file"),
    (["--tiny", "--image", "{png}"], "--image is for image-to-video pipelines: the --tiny pipeline"),
    (["--model", "{text}"], "--model '{text}' is not a folder: give a local diffusers pipeline folder"),
    (["--model", "{empty}"], "--model '{empty}' has no model_index.json: it is not a diffusers pipeline folder"),
    (["--model", "{pipeline}", "--motion-adapter", "{empty}"],
     "--motion-adapter '{empty}' has no config.json: it is not a MotionAdapter folder"),
    (["--tiny", "--motion-adapter", "{adapter}"],
     "--motion-adapter goes with an SD1.5 --model folder, not with --tiny"),
    (["--tiny", "--seed", str(2**64)], f"--seed {2**64} is out of range: torch seeds are from -2**63 to 2**64 - 1"),
    (["--tiny", "--seed", str(-2**63 - 1)], "is out of range"),
]


@pytest.mark.parametrize("script", ["generate", "analyze"])
@pytest.mark.parametrize("options, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_scripts_refuse_unusable_inputs_and_seeds_up_front(script, options, message, no_model, capsys, tmp_path):
    folders = _model_folders(tmp_path)
    options = [option.format(**folders) for option in options]
    line = _refused(_script(script).main, options, capsys, tmp_path / "out")
    assert message.format(**folders) in line


def test_scripts_accept_usable_inputs_and_the_seed_range(no_model, tmp_path):
    """Valid folders, image and extreme seeds pass every check: the run gets as far as loading."""
    folders = _model_folders(tmp_path)
    for options in (["--model", str(folders["pipeline"]), "--motion-adapter", str(folders["adapter"])],
                    ["--model", str(folders["pipeline"]), "--image", str(folders["png"])],
                    ["--tiny", "--seed", str(2**64 - 1)], ["--tiny", "--seed", str(-2**63)]):
        with pytest.raises(AssertionError, match="a model was loaded"):
            _script("generate").main(options + ["--out", str(tmp_path / "out")])


class TextToVideo:
    """A loaded pipeline that takes no conditioning image (and must not run)."""

    def __init__(self):
        from bytheway_kernels.integration.tiny import tiny_ddim_scheduler

        self.scheduler = tiny_ddim_scheduler()

    def __call__(self, prompt, num_frames):
        pytest.fail("the pipeline ran")


def test_scripts_refuse_an_image_for_a_pipeline_that_takes_none_before_running(monkeypatch, capsys, tmp_path):
    """Known only once the pipeline is loaded; checked before it runs."""
    folders = _model_folders(tmp_path)
    monkeypatch.setattr(runs, "load_pipeline", lambda *args, **kwargs: TextToVideo())
    with pytest.raises(SystemExit) as exit_info:
        _script("generate").main(["--model", str(folders["pipeline"]), "--image", str(folders["png"]),
                                  "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "--image: TextToVideo takes no conditioning image" in error


def test_generation_settings_open_the_image_only_for_pipelines_that_take_one(tmp_path):
    settings = runs.GenerationSettings(image=str(tmp_path / "not_read.png"))  # opening it would fail
    assert settings.call_kwargs(TextToVideo()) == {"prompt": settings.prompt, "num_frames": 16}


def test_help_shows_the_defaults(capsys):
    for main, argv, defaults in (
        (_script("generate").main, [], ["video frames (default: 16)", "(>= 1; default: 25)",
                                        "(default: bytheway_out)", "second of the GIF and MP4 files (default: 8)"]),
        (_script("analyze").main, [], ["(default: bytheway_analysis)", "(>= 1; default: 25)"]),
        (cli_main, ["demo"], ["(>= 1; default: 10)", "such as cpu or cuda (default: cpu)",
                              "images and stats (default: bytheway_demo)"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--help"])
        shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
        assert exit_info.value.code == 0
        for default in defaults:
            assert default in shown


@pytest.mark.parametrize("argv0, program", [("/venv/bin/bytheway-kernels", "bytheway-kernels"),
                                            ("bytheway-kernels.exe", "bytheway-kernels"),
                                            ("/src/bytheway_kernels/__main__.py", "python -m bytheway_kernels")])
def test_cli_usage_names_the_command_as_it_was_run(argv0, program, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [argv0])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--steps", "0"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.startswith(f"usage: {program} demo ") and f"{program} demo: error:" in error
