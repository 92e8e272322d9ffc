"""The CLI demo and the python/ scripts, on the tiny offline pipeline (as CI runs them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bytheway_script_{name}", REPO / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gif_frames(path):
    with Image.open(path) as image:
        return image.n_frames, image.size


def test_cli_demo(tmp_path, capsys):
    from bytheway_kernels.__main__ import main

    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "up_blocks.1" in printed and "up_blocks.2" in printed and "side_by_side.gif" in printed
    frames, (width, height) = _gif_frames(tmp_path / "side_by_side.gif")
    assert frames == 16 and width > 2 * height


def test_generate_script_tiny(tmp_path):
    assert _script("generate").main(["--tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    for name in ("stock", "bytheway", "side_by_side"):
        assert _gif_frames(tmp_path / f"{name}.gif")[0] == 16


def test_analyze_script_tiny(tmp_path):
    assert _script("analyze").main(["--tiny", "--steps", "3", "--out", str(tmp_path)]) == 0
    for name in ("energy.png", "discrepancy.png", "diagnostics.csv"):
        assert (tmp_path / name).stat().st_size > 0
    lines = (tmp_path / "diagnostics.csv").read_text().splitlines()
    assert lines[0].startswith("run,layer,block,step") and len(lines) == 1 + 2 * 3 * 8
