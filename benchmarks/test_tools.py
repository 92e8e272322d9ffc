"""The reporting tools (make_results.py, compare.py) on hand-made runs: which time each target uses,
the limits per device, merging parts, sections kept, and the side-by-side ratios.

These use no benchmark fixture, so `--benchmark-only` skips them; the CI smoke run executes them.
"""

from __future__ import annotations

from typing import Dict, List

import pytest

import compare
import make_results


def case(group: str, impl: str, wall: float, variant: str = "", floor: bool = False, name: str = "",
         **extra) -> dict:
    return {
        "group": group, "name": name or f"{impl}-{variant}", "fullname": f"benchmarks/x.py::{name or impl + variant}",
        "stats": {"median": wall},
        "extra_info": dict(impl=impl, variant=variant, backend="", floor=floor, **extra),
    }


def run(benchmarks: List[dict], device_type: str = "cuda", device: str = "GPU X") -> dict:
    return {
        "datetime": "2026-11-26T00:00:00", "version": "5.3.1", "benchmarks": benchmarks,
        "machine_info": {"bytheway": {
            "device": device, "device_type": device_type, "versions": {"torch": "t"}, "command": "pytest benchmarks",
            "quick": False, "copy_bandwidth_bytes_per_s": 4e12,
        }},
    }


def targets_of(benchmarks: List[dict], device_type: str = "cuda") -> Dict[tuple, list]:
    """(target label, group) -> [timing, measured, goal, met, source]."""
    info = run(benchmarks, device_type)["machine_info"]["bytheway"]
    rows = make_results.target_rows(make_results.groups_of(benchmarks), device_type == "cuda",
                                     info["copy_bandwidth_bytes_per_s"])
    return {(row[0], row[1]): row[2:] for row in rows}


MAP = "map up_blocks.3 64x64 F16 float16"


def map_rows():
    return [
        case(MAP, "torch.softmax", 60e-6, floor=True, kernel_s=50e-6, host_s=10e-6),
        case(MAP, "triton", 130e-6, "fixed-guide", kernel_s=25e-6, host_s=20e-6, bytes_moved=100_000_000,
             peak_bytes=2**20),
        case(MAP, "triton", 200e-6, "adaptive-guide", kernel_s=60e-6, host_s=50e-6,
             kernels={"_stats_kernel": 8e-6, "_reduce_kernel": 2e-6, "_apply_kernel": 30e-6, "zero": 20e-6,
                      "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": 1e-6}),
        case(MAP, "official fft", 1.3e-3, "fixed-guide", kernel_s=1e-3),
        case(MAP, "official fft", 1.0e-3, "adaptive-guide", kernel_s=1e-3),
    ]


def test_gpu_map_targets_use_kernel_host_profiler_and_wall_times():
    found = targets_of(map_rows())
    assert found[("map op, fixed beta, × softmax", MAP)] == ["triton, kernel", "0.50×", "<= 0.60×", "yes", "issue 10"]
    assert found[("map op, adaptive beta (all kernels), × softmax", MAP)][1:4] == ["1.20×", "<= 1.00×", "**no**"]
    assert found[("map op, fixed beta: host per call", MAP)][1:4] == ["20.0 µs", "<= 25.0 µs", "yes"]
    assert found[("map op, adaptive beta: host per call", MAP)][1:4] == ["50.0 µs", "<= 40.0 µs", "**no**"]
    # the stats pass: its kernels and the fill that zeroes its workspace
    assert found[("map op, adaptive: stats pass (stats kernel and any workspace fill) per call", MAP)][:4] == [
        "triton, profiler", "11.0 µs", "<= 15.0 µs", "yes"]
    # wall time, worst variant: 1.0 ms / 200 µs
    assert found[("official fft baseline ÷ map op, wall (speed-up)", MAP)][:4] == ["triton, wall", "5.00×",
                                                                                    ">= 10.0×", "**no**"]


def test_cpu_map_targets_use_wall_time_and_issue_5_limits():
    rows = [case(MAP.replace("float16", "float32"), impl, wall, variant, floor=impl == "torch.softmax")
            for impl, wall, variant in (("torch.softmax", 1e-3, ""), ("cpp", 1.1e-3, "fixed-guide"),
                                        ("official fft", 20e-3, "fixed-guide"))]
    found = targets_of(rows, "cpu")
    assert found[("map op, fixed beta, × softmax", rows[0]["group"])] == ["cpp, wall", "1.10×", "<= 1.20×", "yes",
                                                                          "issue 5"]
    assert found[("official fft baseline ÷ map op, wall (speed-up)", rows[0]["group"])][1] == "18.2×"


def test_fft_speedup_from_interleaved_rounds_where_recorded():
    """The fft target reads the fft rows' interleaved-round ratios (worst variant) when every one
    is against the group's compiled backend, else the rows' medians; the table lists them."""
    group = MAP.replace("float16", "float32")
    rows = [case(group, "torch.softmax", 1e-3, floor=True), case(group, "cpp", 1e-3, "fixed-guide"),
            case(group, "cpp", 1e-3, "adaptive-guide"),
            case(group, "official fft", 5e-3, "fixed-guide", paired={"impl": "cpp", "ratio": 12.5}),
            case(group, "official fft", 9e-3, "adaptive-guide", paired={"impl": "cpp", "ratio": 11.0})]
    found = targets_of(rows, "cpu")
    assert found[("official fft baseline ÷ map op, wall (speed-up)", group)][:4] == [
        "cpp, wall, interleaved rounds", "11.0×", ">= 10.0×", "yes"]
    table = "\n".join(make_results.group_table(rows, None))
    assert "official fft fixed-guide ÷ cpp: 12.5×, official fft adaptive-guide ÷ cpp: 11×" in table
    rows[3]["extra_info"]["paired"]["impl"] = "reference"  # not the group's backend: the medians
    assert targets_of(rows, "cpu")[("official fft baseline ÷ map op, wall (speed-up)", group)][:2] == [
        "cpp, wall", "5.00×"]


def test_cpu_softmax_targets_from_interleaved_rounds_where_every_row_has_them():
    group = MAP.replace("float16", "float32")
    rows = [case(group, "torch.softmax", 1e-3, floor=True),
            case(group, "cpp", 1.5e-3, "fixed-guide", paired={"impl": "torch.softmax", "ratio": 1.1}),
            case(group, "cpp", 1.0e-3, "fixed-noguide", paired={"impl": "torch.softmax", "ratio": 0.9})]
    found = targets_of(rows, "cpu")
    assert found[("map op, fixed beta, × softmax", group)][:4] == ["cpp, wall, interleaved rounds", "1.10×",
                                                                  "<= 1.20×", "yes"]
    del rows[2]["extra_info"]["paired"]  # one row without: the medians of all
    assert found != targets_of(rows, "cpu")
    assert targets_of(rows, "cpu")[("map op, fixed beta, × softmax", group)][:2] == ["cpp, wall", "1.50×"]


def test_tiny_call_targets_on_cpu_only():
    group = "tiny-call map 2x1x1x1x16x16 float32"
    rows = [case(group, "torch.softmax", 4e-6, floor=True), case(group, "cpp", 36e-6, "fixed-noguide"),
            case(group, "cpp", 44e-6, "adaptive-noguide"), case(group, "official fft", 440e-6, "adaptive-noguide")]
    found = targets_of(rows, "cpu")
    assert found[("official fft baseline ÷ map op, wall (speed-up)", group)][1] == "10.0×"
    assert found[("tiny tensor, fixed beta, × softmax", group)][1:4] == ["9.00×", "<= 8.00×", "**no**"]
    assert found[("tiny tensor, adaptive beta, × softmax", group)][1:4] == ["11.0×", "<= 10.0×", "**no**"]
    assert [key[0] for key in targets_of(rows, "cuda")] == ["official fft baseline ÷ map op, wall (speed-up)"]


def test_attention_targets():
    group = "attention up_blocks.3 64x64 F16 d40 float16"
    rows = [
        case(group, "sdpa default", 1.2e-3, "plain", floor=True, kernel_s=1.0e-3, bytes_moved=int(320e6)),
        case(group, "sdpa efficient", 0.8e-3, "plain", kernel_s=0.7e-3, bytes_moved=int(320e6)),
        case(group, "fused", 0.2e-3, "fixed", kernel_s=0.14e-3, bytes_moved=int(320e6)),
        case(group, "fused", 0.25e-3, "adaptive", kernel_s=0.21e-3, bytes_moved=int(320e6)),
        case(group, "fused", 0.22e-3, "adaptive-stash", kernel_s=0.154e-3, bytes_moved=int(320e6)),
    ]
    found = targets_of(rows)
    assert found[("fused fixed beta × best SDPA backend", group)][:4] == ["kernel, vs sdpa efficient", "0.20×",
                                                                          "<= 0.25×", "yes"]
    assert found[("fused adaptive × fused fixed", group)][1:4] == ["1.50×", "<= 1.30×", "**no**"]
    assert found[("fused adaptive, guided maps stashed, × fused fixed", group)][1:4] == [
        "1.10×", "<= 1.30×", "yes"]
    # 320 MB in 140 µs = 2.29 TB/s = 57% of 4 TB/s
    assert found[("fused fixed beta, share of copy bandwidth", group)][1:4] == ["57%", ">= 50%", "yes"]
    other_frames = {key[0] for key in targets_of([dict(r, group=group.replace("F16", "F24")) for r in rows])}
    assert "fused fixed beta × best SDPA backend" not in other_frames  # the issue's shapes are F = 16


def test_denoiser_targets_use_wall_time():
    group = "denoiser sd15-motion 64x64 F16 (random weights) float16"
    rows = [case(group, "bytheway off", 100e-3, floor=True, kernel_s=1.0),
            case(group, "bytheway materialised", 102e-3, kernel_s=1.0),
            case(group, "bytheway fused", 90e-3, kernel_s=1.0),
            case(group, "fast stock", 93e-3, kernel_s=1.0),
            case(group, "bytheway fused + fast stock, stash", 91e-3, kernel_s=1.0)]
    found = targets_of(rows)
    assert found[("denoiser step overhead, ByTheWay (materialised) on vs off", group)][1:4] == ["+2.0%", "< 3.0%", "yes"]
    assert found[("denoiser step, ByTheWay fused × off (stock)", group)][1:4] == ["0.90×", "<= 0.92×", "yes"]
    assert found[("denoiser step, fast stock processor × stock", group)][1:4] == ["0.93×", "<= 0.92×", "**no**"]
    stashed = "denoiser step, ByTheWay fused (guided maps stashed) + fast stock processor × off (stock)"
    assert found[(stashed, group)][1:4] == ["0.91×", "<= 0.92×", "yes"]


def test_issue_9_targets_only_on_a_gpu():
    """Issue 9's targets are measured on an H100/H200: on a CPU the "fused" rows run the composed
    path, so a CPU run shows issue 5's denoiser target and none of issue 9's."""
    attention = "attention up_blocks.3 64x64 F16 d40 float32"
    denoiser = "denoiser tiny-animatediff 8x8 F16 float32"
    rows = [case(attention, "sdpa default", 1e-3, floor=True),
            case(attention, "fused", 2e-3, "fixed", bytes_moved=320e6),
            case(attention, "fused", 2e-3, "adaptive"),
            case(denoiser, "bytheway off", 100e-3, floor=True), case(denoiser, "bytheway materialised", 101e-3),
            case(denoiser, "fast stock", 96e-3)]
    cpu = targets_of(rows, device_type="cpu")
    assert {row[0] for row in cpu} == {"denoiser step overhead, ByTheWay (materialised) on vs off"}
    assert {source for *_, source in cpu.values()} == {"issue 5"}
    gpu = {label for label, _ in targets_of(rows)}
    assert {"fused adaptive × fused fixed", "denoiser step, fast stock processor × stock"} <= gpu


def test_group_table_columns_and_kernel_breakdown():
    section = make_results.device_section(run(map_rows()), label="a label", notes="Some notes.")
    assert "## GPU X (a label)\n\nSome notes.\n" in section
    assert ("| name | kernel | host/call | wall | × floor | × reference | bandwidth | memory floor | peak mem |"
            in section)
    # 100 MB in 25 µs: 4 TB/s, all of the copy bandwidth, whose floor for these bytes is 25 µs
    assert "| triton fixed-guide | 25 µs | 20 µs | 130 µs | 0.50 | — | 4000.00 GB/s (100% of copy) | 25 µs | 1.0 MiB |" \
        in section
    assert "- triton adaptive-guide: `_apply_kernel` 30 µs, `zero` 20 µs, `_stats_kernel` 8 µs, `_reduce_kernel` 2 µs" in section
    cpu = make_results.device_section(run([case(MAP, "torch.softmax", 1e-3, floor=True)], "cpu"))
    assert "| name | wall | × floor | × reference |" in cpu and "peak memory: n/a (CPU)" in cpu


def test_update_results_keeps_other_sections(tmp_path):
    results = tmp_path / "RESULTS.md"
    make_results.update_results(run(map_rows(), device="GPU A"), results)
    make_results.update_results(run(map_rows(), device="GPU A"), results, label="old run")
    make_results.update_results(run(map_rows(), device="GPU A"), results)  # replaces the first only
    text = results.read_text()
    assert text.count("<!-- device: GPU A -->") == 1 and text.count("<!-- device: GPU A (old run) -->") == 1


def test_merge_runs():
    first, second = run(map_rows()[:2]), run(map_rows()[2:])
    first["machine_info"]["bytheway"]["load_average"] = [1.0, 2.0]
    second["machine_info"]["bytheway"]["load_average"] = [3.0, 4.0]
    merged = make_results.merge_runs([first, second])
    assert [b["extra_info"]["impl"] for b in merged["benchmarks"]] == [b["extra_info"]["impl"] for b in map_rows()]
    # before the first part, after the last
    assert merged["machine_info"]["bytheway"]["load_average"] == [1.0, 4.0]
    with pytest.raises(SystemExit, match="different devices"):
        make_results.merge_runs([run([], device="A"), run([], device="B")])
    with pytest.raises(SystemExit, match="more than one part"):
        make_results.merge_runs([first, first])
    foreign = {"benchmarks": [], "machine_info": {}}
    with pytest.raises(SystemExit, match="not written by the benchmarks/ suite"):
        make_results.merge_runs([first, foreign])


def test_unreadable_json_is_named(tmp_path):
    empty = tmp_path / "part.json"
    empty.write_text("")  # what a part that timed out leaves
    with pytest.raises(SystemExit, match="part.json: not a readable"):
        make_results.main([str(empty), "--results", str(tmp_path / "R.md")])
    assert not (tmp_path / "R.md").exists()


def test_measured_values_never_read_as_the_goal():
    """A value that would round to the goal's figure gets one more digit, so that "no" never
    stands beside a value that reads as the goal."""
    ratio = make_results.TARGETS["fixed-gpu"]  # <= 0.60×
    assert (ratio.measured(0.6030), ratio.met(0.6030)) == ("0.603×", False)
    assert (ratio.measured(0.5970), ratio.met(0.5970)) == ("0.597×", True)
    assert ratio.measured(0.6) == "0.60×" and ratio.measured(0.84) == "0.84×"
    stats = make_results.TARGETS["stats"]  # <= 15.0 µs
    assert stats.measured(15.04e-6) == "15.04 µs" and stats.measured(14.4e-6) == "14.4 µs"
    overhead = make_results.TARGETS["denoiser"]  # < 3.0%
    assert overhead.measured(0.0302) == "+3.02%" and overhead.measured(0.052) == "+5.2%"


def test_format_time_picks_the_unit_after_rounding():
    assert make_results.format_time(0.9996e-3) == "1 ms"
    assert make_results.format_time(0.9996e-6) == "1 µs"
    assert make_results.format_time(999.4e-6) == "999 µs" and make_results.format_time(12.34e-6) == "12.3 µs"


def test_layer_target_is_the_worst_backend():
    group = "layer up_blocks.1 16x16 F16 C1280 float16"
    rows = [case(group, "stock layer", 1e-3, floor=True, kernel_s=1e-3),
            case(group, "bytheway layer", 1.2e-3, name="triton", kernel_s=1.2e-3),
            case(group, "bytheway layer", 1.8e-3, name="fused", kernel_s=1.8e-3)]
    rows[1]["extra_info"]["backend"], rows[2]["extra_info"]["backend"] = "triton", "fused"
    found = targets_of(rows)
    assert found[("ByTheWay layer × stock layer", group)][:4] == ["fused, kernel", "1.80×", "<= 1.50×", "**no**"]


def test_compare_ratio_table():
    base = run([case(MAP, "triton", 200e-6, "v", name="a", kernel_s=40e-6),
                case(MAP, "triton", 1e-3, name="gone")])
    current = run([case(MAP, "triton", 100e-6, "v", name="a", kernel_s=30e-6),
                   case(MAP, "triton", 1e-3, name="new")])
    lines = compare.ratio_table(base, current)
    assert lines[0] == "| case | wall base | wall current | wall ratio | kernel base | kernel current | kernel ratio |"
    assert lines[2] == "| a | 200 µs | 100 µs | 0.50 | 40 µs | 30 µs | 0.75 |"
    assert lines[3] == "| new | — | 1 ms | — | — | — | — |"
    assert lines[4] == "(only in base: benchmarks/x.py::gone)"


def test_interleaved_ratio_is_the_median_round_quotient(monkeypatch):
    """Rounds alternate which function runs first; each run's first call is a warm-up; a slow
    spell that hits one round leaves the median alone."""
    import harness

    clock = iter(range(100_000))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(harness, "MIN_RUN_S", 0)  # runs of MIN_RUN_CALLS
    calls_per_run = harness.MIN_RUN_CALLS
    runs = 2 * harness.MIN_ROUNDS
    # two calls of each set the run length, then each run's first call is a warm-up
    order, durations = [], {"fn": [3] * (2 + runs * calls_per_run), "other": [1] * (2 + runs * calls_per_run)}
    durations["fn"][2] = durations["other"][2] = 100  # the first run's warm-ups: left out
    durations["fn"][2 + 2 * calls_per_run + 1] = 90  # a spell in the third round's fn run

    def timed(name):
        def call():
            order.append(name)
            for _ in range(durations[name].pop(0) - 1):
                next(clock)
        return call

    ratio = harness.interleaved_ratio(timed("fn"), timed("other"), budget_s=0)
    assert ratio == 3.0
    assert order[:4] == ["fn", "fn", "other", "other"]
    runs_order = order[4::calls_per_run]
    assert runs_order[:6] == ["fn", "other", "other", "fn", "fn", "other"]  # alternating first
    assert len(order) == 4 + runs * calls_per_run
