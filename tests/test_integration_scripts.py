"""The CLI demo, the python/ scripts and what they write, on the tiny offline pipeline (as CI runs
them); the media helpers, the diagnostics masking, `check`'s timing spread and the quiet builders."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from bytheway_kernels.integration import diagnostics, media  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bytheway_script_{name}", REPO / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gif_frames(path):
    with Image.open(path) as image:
        return image.n_frames, image.size


def _png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_cli_demo(tmp_path, capsys):
    from bytheway_kernels.__main__ import main

    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "up_blocks.1" in printed and "up_blocks.2" in printed and "side_by_side.png" in printed
    frames, (width, height) = _gif_frames(tmp_path / "side_by_side.gif")
    assert frames == 16 and width > 3 * (height - media.LABEL_HEIGHT)
    strip = _png(tmp_path / "side_by_side.png")
    assert strip.shape[0] > 16 * strip.shape[1] / 3 * 0.9  # one comparison frame per row
    assert (tmp_path / "stats.txt").read_text().startswith("block")


def test_generate_script_tiny(tmp_path):
    assert _script("generate").main(["--tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    for name in ("stock", "bytheway", "side_by_side"):
        assert _gif_frames(tmp_path / f"{name}.gif")[0] == 16
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    stock = _png(tmp_path / "stock.png")
    assert stock.shape == (32, 16 * 32 + 15 * 2, 3)  # 16 frames of 32x32, 2-pixel gaps
    assert not np.array_equal(stock, _png(tmp_path / "bytheway.png"))


def test_generate_script_fast_temporal_attention(tmp_path, monkeypatch):
    """--fast-temporal-attention puts every temporal self-attention layer of the tiny pipeline on
    the fused path in both runs; this CPU has no fused kernel, so those layers run their original
    processors and the files equal a run without the option, bit for bit."""
    from bytheway_kernels.integration import runs

    layers_enabled = []
    enable = runs.enable_fast_temporal_attention

    def recording_enable(pipe):
        handle = enable(pipe)
        layers_enabled.append(len(handle.layer_names))
        return handle

    monkeypatch.setattr(runs, "enable_fast_temporal_attention", recording_enable)
    generate = _script("generate")
    common = ["--tiny", "--steps", "2", "--no-gif"]
    assert generate.main(common + ["--fast-temporal-attention", "--out", str(tmp_path / "fast")]) == 0
    assert layers_enabled == [20, 20]  # both runs, every motion-module attention
    assert generate.main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert layers_enabled == [20, 20]
    for name in ("stock", "bytheway"):
        assert np.array_equal(_png(tmp_path / "fast" / f"{name}.png"), _png(tmp_path / "plain" / f"{name}.png"))


def test_analyze_script_tiny_with_eight_frames(tmp_path):
    """--frames below 16 works with a valid --tau; edit values of inactive steps are masked."""
    argv = ["--tiny", "--frames", "8", "--tau", "3", "--beta", "2", "--steps", "3", "--out", str(tmp_path)]
    assert _script("analyze").main(argv) == 0
    for name in ("energy.png", "discrepancy.png", "beta.png", "diagnostics.csv"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "diagnostics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["run", "layer", "block", "step"] and len(rows) == 2 * 3 * 8
    for row in rows:
        active = row["active"] == "True"
        assert active == (row["run"] == "ByTheWay" and row["step"] == "0")
        assert math.isfinite(float(row["E1"])) and math.isfinite(float(row["discrepancy"]))
        assert all(math.isfinite(float(row[f])) == active for f in diagnostics.EDIT_FIELDS)
        if active:
            assert float(row["beta"]) >= 2.0 - 1e-6


def _rows(active_steps, steps=3):
    return [dict(layer=f"{block}.attn1", block=block, step=step, call=0, active=step in active_steps,
                 beta=1.5 + step, E1=0.1 + step / 10, E2=0.1, E2_low=0.05, E2_high=0.05, E3=0.2 + step / 10,
                 discrepancy=0.3, discrepancy_after=0.1)
            for block in ("up_blocks.1", "up_blocks.2") for step in range(steps)]


def test_tables_and_masks_hide_edit_values_of_inactive_steps():
    rows = _rows(active_steps={0})
    masked = diagnostics.masked_inactive(rows)
    assert all(math.isnan(r["beta"]) and math.isnan(r["E3"]) for r in masked if not r["active"])
    assert all(r["beta"] == 1.5 and r["E1"] == 0.1 for r in masked if r["active"])
    assert all(math.isfinite(r["E1"]) for r in masked)
    lines = diagnostics.format_table(rows, by="block").splitlines()
    header = lines[0].split()
    inactive = [line.split() for line in lines[2:] if line.split()[header.index("active")] == "False"]
    assert inactive and all(cells[header.index("beta")] == "-" and cells[header.index("E3")] == "-"
                            for cells in inactive)


@pytest.mark.parametrize("by", ["block_step", "layer"])
def test_a_step_active_in_some_loops_only_gets_an_entry_for_each(by):
    """FreeInit reruns the loop with more steps, so one step index can be inactive in one pass
    and active in the next: its active and inactive rows are summarised apart."""
    rows = _rows(active_steps=set(), steps=2) + _rows(active_steps={0, 1}, steps=2)
    summary = diagnostics.summarize(rows, by=by)
    assert len(summary) == 8 and sum(entry["active"] for entry in summary) == 4
    assert all(entry["beta"] == 1.5 + entry["step"] for entry in summary)


def test_analyze_plot_labels_and_legend_outside_the_axes(tmp_path):
    analyze = _script("analyze")
    runs = {"stock": diagnostics.masked_inactive(_rows(set())),
            "ByTheWay": diagnostics.masked_inactive(_rows({0, 1}))}
    _, field_labels, ylabel = analyze.FIGURES[0][0], analyze.FIGURES[0][2], analyze.FIGURES[0][3]
    path, figure, legend = analyze.plot(runs, field_labels, ylabel, "energy", str(tmp_path / "energy.png"))
    assert Path(path).stat().st_size > 0
    axes = figure.axes
    assert axes[0].get_ylabel() == ylabel and all(a.get_xlabel() == "denoising step" for a in axes)
    texts = [t.get_text() for t in legend.get_texts()]
    assert {"up_blocks.1", "up_blocks.2", "ByTheWay active"} <= set(texts)
    styles = {t.get_text(): (h.get_linestyle(), h.get_marker()) for t, h in zip(legend.get_texts(), legend.legend_handles)
              if t.get_text() in field_labels.values()}
    assert len(set(styles.values())) == 2, styles  # solid and dashed entries look different
    # The legend lies right of every panel: it covers no curve.
    figure.canvas.draw()
    legend_box = legend.get_window_extent()
    assert all(legend_box.x0 >= axis.get_window_extent().x1 for axis in axes)
    # Inactive steps are not drawn for the dashed (ByTheWay output) field.
    dashed = [line for line in axes[1].get_lines() if line.get_linestyle() == "--"]
    assert dashed and all(np.isnan(np.asarray(line.get_ydata(), float))[2] for line in dashed)


def test_amplified_difference_and_labelled_comparison():
    stock = np.zeros((2, 8, 8, 3), np.uint8)
    edited = stock.copy()
    edited[1, 3, 4, 0] = 3
    difference, factor = media.amplified_difference(stock, edited)
    assert factor == 85 and difference[1, 3, 4, 0] == 255 and difference.sum() == 255
    assert media.amplified_difference(stock, stock)[1] == 1
    video = media.comparison(stock, edited, min_size=32)
    assert video.shape == (2, 32 + media.LABEL_HEIGHT, 3 * 32 + 2 * 4, 3)
    label_band = video[0, : media.LABEL_HEIGHT]
    assert (label_band < 128).any()  # the labels are drawn


def test_png_strips_are_lossless(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    paths = media.write_videos({"stock": video}, str(tmp_path), gif=False)
    assert paths == [str(tmp_path / "stock.png")]
    strip = _png(tmp_path / "stock.png")
    for index in range(4):
        assert np.array_equal(strip[:, index * 7: index * 7 + 5], video[index])


def test_call_kwargs_keep_what_the_pipeline_accepts():
    from bytheway_kernels.integration.runs import GenerationSettings

    class Pipe:
        def __call__(self, prompt, num_frames, generator=None, output_type="pil"):
            raise NotImplementedError

    kwargs = GenerationSettings(prompt="a cat", num_frames=8, height=None).call_kwargs(Pipe())
    assert set(kwargs) == {"prompt", "num_frames", "generator", "output_type"}


def test_check_reports_spread_and_warns_when_noisy(monkeypatch, capsys):
    from bytheway_kernels import check

    monkeypatch.setattr(check, "backend_availability", lambda device: {
        "reference": (True, "pure torch"), "triton": (False, "off"), "cpp": (False, "off")})
    monkeypatch.setattr(check, "time_repeats", lambda fn, repeats: check.Timing(1e-3, 0.1))
    assert check.run_check(quick=True, repeats=2) == 0
    printed = capsys.readouterr().out
    assert "spread  10%" in printed and "noisy" not in printed
    monkeypatch.setattr(check, "time_repeats", lambda fn, repeats: check.Timing(1e-3, 0.6))
    assert check.run_check(quick=True, repeats=2) == 0
    assert "warning: timings are noisy (spread up to 60%" in capsys.readouterr().out
    timing = check.time_repeats(lambda: None, 5)
    assert timing.median >= 0 and timing.spread >= 0


@pytest.mark.parametrize("builder", ["tiny_animatediff_pipeline", "tiny_animatediff_sdxl_pipeline",
                                     "tiny_text_to_video_pipeline"])
def test_tiny_builders_print_no_float32_cast_warning(builder, caplog):
    """caplog sees every record that passes the emitting logger's filters, i.e. what diffusers'
    own stderr handler would print."""
    from bytheway_kernels.integration import tiny

    def cast_warnings():
        return [r for r in caplog.records if "should be kept in float32" in r.getMessage()]

    # Control: diffusers does log the warning when a model is cast outside our builders.
    tiny.tiny_motion_unet()[0].to(torch.float32)
    assert cast_warnings()
    caplog.clear()
    getattr(tiny, builder)()
    getattr(tiny, builder)(dtype=torch.bfloat16)
    assert not cast_warnings()
