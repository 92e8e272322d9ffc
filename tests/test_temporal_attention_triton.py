"""The fused temporal attention kernels vs the float64 composed formula, by the Triton interpreter.

`TRITON_INTERPRET=1` (set in conftest.py) executes the very kernel source that runs on GPU. The
kernels write into outputs the test fills with NaN first, so any element they miss fails.
"""

import dataclasses

import pytest
import torch
import triton.language as tl

import bytheway_kernels as btw
from attention_probs_cases import needs_triton_interpreter
from bytheway_kernels.ops import triton_rules
from bytheway_kernels.ops.temporal_attention import triton as kernels
from bytheway_kernels.ops.temporal_attention.triton import (TileConfig,
                                                            temporal_attention_triton_out)
from temporal_attention_cases import (STASH_CASES, AttentionCase, assert_matches, case_matrix,
                                     energy_tiles, make_inputs)
from bytheway_kernels.testing import PROB_TOLERANCES

pytestmark = needs_triton_interpreter


@pytest.fixture(autouse=True)
def interpreter_bfloat16_dot(monkeypatch):
    """The interpreter stores bfloat16 as uint16 and its `tl.dot` multiplies those bit patterns
    (triton-lang/triton#11584, not supported upstream); convert bfloat16 operands to float32
    first, which is exact and what the GPU's bf16 MMA computes (exact products, fp32 sums).
    The kernel code is unchanged."""
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return original(self, a, b, d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def run_poisoned(case: AttentionCase, inputs, with_map=True, with_stats=True, config=None,
                 energy_config=None):
    """Launch into NaN-filled out / map / stats; return them (map, stats None when not asked)."""
    q, k, v, guide = inputs
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    plain_map = stats = None
    if with_map:
        plain_map = torch.full((case.batch, case.height, case.width, case.heads, case.frames,
                                case.frames), float("nan"), dtype=q.dtype)
    if with_stats:
        stats = torch.full((case.params().stats_rows(case.batch), 6), float("nan"))
    temporal_attention_triton_out(q, k, v, guide, case.heads, case.height, case.width,
                                  case.head_dim ** -0.5, case.params(), out, plain_map, stats,
                                  config, energy_config)
    return out, plain_map, stats


@pytest.mark.parametrize("case", case_matrix(), ids=str)
def test_matches_float64_formula(case):
    inputs = make_inputs(case, seed=7)
    out, plain_map, stats = run_poisoned(case, inputs)
    assert_matches(case, inputs, out, plain_map, stats)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("frames,tau,head_dim", [(16, 7, 40), (16, 3, 160), (12, 2, 80)])
def test_fixed_beta_out_only(frames, tau, head_dim, dtype):
    case = AttentionCase(frames=frames, tau=tau, head_dim=head_dim, dtype=dtype, beta=10.0,
                         alpha=0.3, guide_size=(2, 1), height=3)
    inputs = make_inputs(case, seed=3)
    out, _, _ = run_poisoned(case, inputs, with_map=False, with_stats=False)
    assert_matches(case, inputs, out)


@pytest.mark.parametrize("adaptive", [False, True])
def test_alpha_one_takes_a_small_guide_exactly(adaptive):
    """alpha = 1, guide rows summing to 1e-12 (usable): A2 = U, as in the map op's backends."""
    case = AttentionCase(alpha=1.0, adaptive_beta=adaptive, guide_size=(2, 2))
    q, k, v, guide = make_inputs(case, seed=8)
    inputs = (q, k, v, guide * 1e-12)
    out, plain_map, stats = run_poisoned(case, inputs)
    assert_matches(case, inputs, out, plain_map, stats)


def test_plain_attention_matches_sdpa():
    case = AttentionCase(head_dim=40, dtype=torch.float16, guide_size=None, alpha=0.0, beta=1.0)
    q, k, v, _ = inputs = make_inputs(case)
    out, _, _ = run_poisoned(case, inputs, with_map=False, with_stats=False)

    def split(values):
        return values.double().view(values.shape[0], values.shape[1], 2, -1).transpose(1, 2)

    ref = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    torch.testing.assert_close(out.double(), ref.transpose(1, 2).reshape(q.shape), atol=2e-3,
                               rtol=2e-3)


@pytest.mark.parametrize("config", [TileConfig(1, 16, 4), TileConfig(8, 32, 4), TileConfig(2, 64, 8),
                                    TileConfig(4, 32, 4, max_registers=96)])
def test_other_tile_configs(config):
    """The tuning configurations of benchmarks/temporal_attention_gpu_check.py, for both passes,
    are correct too; G = 8 with 3 * 2 * 3 * 2 = 36 sequences leaves a partly filled last program."""
    case = AttentionCase(head_dim=40, dtype=torch.float16, heads=2, height=3, width=3,
                         adaptive_beta=True, guide_upsample="bilinear", guide_size=(2, 2))
    inputs = make_inputs(case)
    out, plain_map, stats = run_poisoned(case, inputs, config=config, energy_config=config)
    assert_matches(case, inputs, out, plain_map, stats)


class _CountingKernel:
    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append((self.name, len(grid)))
        return self.kernel[grid]


def _count_launches(monkeypatch):
    launches = []
    for name in ("_energy_kernel", "_beta_kernel", "_attention_kernel"):
        monkeypatch.setattr(kernels, name, _CountingKernel(getattr(kernels, name), name, launches))
    return launches


def test_fixed_beta_is_one_launch_adaptive_three(monkeypatch):
    launches = _count_launches(monkeypatch)
    case = AttentionCase(adaptive_beta=False)
    inputs = make_inputs(case)
    out, plain_map, _ = run_poisoned(case, inputs, with_map=True, with_stats=False)
    assert launches == [("_attention_kernel", 1)]  # one launch, a 1-D grid (axis 0 only)
    assert_matches(case, inputs, out, plain_map)
    launches.clear()
    adaptive = AttentionCase(adaptive_beta=True)
    out, _, _ = run_poisoned(adaptive, inputs, with_map=False, with_stats=False)
    assert [name for name, _ in launches] == ["_energy_kernel", "_beta_kernel", "_attention_kernel"]
    assert_matches(adaptive, inputs, out)


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_adaptive_beta_is_bit_identical_run_to_run(scope):
    case = AttentionCase(adaptive_beta=True, energy_scope=scope, batch=4, height=3, width=3)
    inputs = make_inputs(case)
    first = run_poisoned(case, inputs)
    second = run_poisoned(case, inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_stats_match_the_map_op_on_the_same_scores():
    case = AttentionCase(adaptive_beta=True, energy_scope="sample", batch=4, beta_max=3.0)
    q, k, v, guide = inputs = make_inputs(case)
    _, _, stats = run_poisoned(case, inputs, with_map=False)
    scores = (q.double().view(-1, 16, 2, 8).transpose(1, 2) @ k.double().view(-1, 16, 2, 8)
              .permute(0, 2, 3, 1)) * 8 ** -0.5
    _, map_stats = btw.reference.bytheway_attention_probs(
        scores.float().view(4, 2, 2, 2, 16, 16), guide, return_stats=True, **case.kwargs())
    torch.testing.assert_close(stats, map_stats, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("logit_scale", [0.0, 300.0])
def test_uniform_and_one_hot_rows_stay_finite(logit_scale, dtype):
    """q = 0 gives uniform rows (E2_high = 0: beta falls back to beta_0); huge logits give
    one-hot rows; alpha = 1 makes guided = guide, so padded rows would divide 0 by 0."""
    case = AttentionCase(adaptive_beta=True, logit_scale=logit_scale, dtype=dtype, alpha=1.0,
                         guide_size=None if logit_scale == 0 else (1, 1), frames=12, tau=1)
    inputs = make_inputs(case)
    out, plain_map, stats = run_poisoned(case, inputs)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    if logit_scale == 0:
        assert stats[0, 0] == case.beta
    assert_matches(case, inputs, out, plain_map, stats)


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_empty_batch(scope):
    case = AttentionCase(batch=0, adaptive_beta=True, energy_scope=scope)
    inputs = make_inputs(case)
    out, plain_map, stats = run_poisoned(case, inputs)
    assert out.shape == inputs[0].shape and plain_map.numel() == 0
    assert stats.tolist() == ([[1.5, 0.0, 0.0, 0.0, 0.0, 0.0]] if scope == "batch" else [])


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = AttentionCase()
    q, k, v, guide = make_inputs(case)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        temporal_attention_triton_out(q, k, v, guide, 2, 2, 2, 0.3, case.params(),
                                      torch.empty_like(q))


def test_op_dispatches_to_the_kernel_and_float64_to_the_composed_path(monkeypatch):
    monkeypatch.setenv("BYTHEWAY_BACKEND", "triton")
    launches = _count_launches(monkeypatch)
    case = AttentionCase(adaptive_beta=True, dtype=torch.bfloat16)
    q, k, v, guide = inputs = make_inputs(case)
    out, stats = btw.temporal_attention(q, k, v, heads=2, height=2, width=2, guide=guide,
                                        return_stats=True, **case.kwargs())
    assert [name for name, _ in launches] == ["_energy_kernel", "_beta_kernel", "_attention_kernel"]
    assert_matches(case, inputs, out, stats=stats)
    launches.clear()
    double = tuple(t.double() for t in inputs)
    out = btw.temporal_attention(*double[:3], heads=2, height=2, width=2, guide=double[3],
                                 **case.kwargs())
    assert launches == [] and out.dtype == torch.float64
    assert_matches(AttentionCase(adaptive_beta=True, dtype=torch.float64), double, out)


def test_opcheck_and_compile_with_the_triton_backend(monkeypatch):
    monkeypatch.setenv("BYTHEWAY_BACKEND", "triton")
    case = AttentionCase(frames=8)
    q, k, v, guide = make_inputs(case)
    args = (q, k, v, guide, 2, 2, 2, 0.35, 0.6, 1.5, 3, True, 2, 1, "batch", "bilinear", None,
            True, True)
    torch.library.opcheck(torch.ops.bytheway.temporal_attention.default, args)
    torch._dynamo.reset()

    def layer(q, k, v, guide):
        return btw.temporal_attention(q, k, v, heads=2, height=2, width=2, guide=guide, alpha=0.6,
                                      beta=1.5, tau=3, adaptive_beta=True) * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, k, v, guide), layer(q, k, v, guide))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_identity_settings_skip_the_guide_and_the_band(dtype):
    """alpha = 0 never reads the guide and fixed beta = 1 skips the band step; both are exact
    identities, so the output equals plain attention bit for bit."""
    plain_case = AttentionCase(dtype=dtype, head_dim=40, guide_size=None, alpha=0.0, beta=1.0)
    inputs = make_inputs(plain_case)
    plain, _, _ = run_poisoned(plain_case, inputs, with_map=False, with_stats=False)
    assert_matches(plain_case, inputs, plain)
    guided_case = AttentionCase(dtype=dtype, head_dim=40, alpha=0.0, beta=1.0, tau=3,
                                guide_size=(1, 2))
    guide = make_inputs(guided_case)[3]
    guided, _, _ = run_poisoned(guided_case, inputs[:3] + (guide,), with_map=False,
                                with_stats=False)
    assert torch.equal(guided, plain)
    beta_one = AttentionCase(dtype=dtype, head_dim=40, alpha=0.5, beta=1.0, tau=3, guide_size=(1, 2))
    out, _, _ = run_poisoned(beta_one, inputs[:3] + (guide,), with_map=False, with_stats=False)
    assert_matches(beta_one, inputs[:3] + (guide,), out)


@pytest.mark.parametrize("adaptive,form",
                         [(False, "rows"), (True, "rows"), (True, "lean"), (True, "tile")],
                         ids=["fixed", "adaptive", "lean", "tile"])
def test_zero_guide_with_alpha_one_is_the_unguided_result(adaptive, form):
    """alpha = 1 with an all-zero guide makes every guided row sum 0: each row keeps the unguided
    map, in the energies too, so out, map and stats equal those without a guide bit for bit, in
    every energy form."""
    unguided = AttentionCase(adaptive_beta=adaptive, guide_size=None, alpha=0.0, head_dim=40,
                             dtype=torch.float16)
    q, k, v, _ = inputs = make_inputs(unguided)
    zero_guided = dataclasses.replace(unguided, guide_size=(1, 2), alpha=1.0)
    zero_guide = torch.zeros_like(make_inputs(zero_guided)[3])
    tiles = energy_tiles(unguided, form)
    expected = run_poisoned(unguided, inputs, energy_config=tiles)
    got = run_poisoned(zero_guided, (q, k, v, zero_guide), energy_config=tiles)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert_matches(zero_guided, (q, k, v, zero_guide), *got)


@pytest.mark.parametrize("form", list(kernels.ENERGY_FORMS))
def test_rows_with_a_zero_guide_row_keep_the_unguided_map(form):
    """Some guide rows zero (guided sum 0 with alpha = 1), the others a softmax: per-row choice."""
    case = AttentionCase(alpha=1.0, adaptive_beta=True, guide_size=(2, 2), height=3, width=3)
    q, k, v, guide = make_inputs(case)
    guide = guide.clone()
    guide[:, 0, :, :, ::3] = 0.0
    out, plain_map, stats = run_poisoned(case, (q, k, v, guide),
                                         energy_config=energy_tiles(case, form))
    assert_matches(case, (q, k, v, guide), out, plain_map, stats)


def check_with_two_energy_programs(case: AttentionCase, with_stats: bool, tiles: TileConfig,
                                   monkeypatch, seed: int = 5) -> None:
    """`case` with energy tiles `tiles` against the float64 formula, into poisoned outputs, with
    two energy programs per video so that each sums several tiles (the last ones partly or wholly
    past the end); a second run must give the same bits."""
    monkeypatch.setattr(kernels, "ENERGY_PROGRAMS", 2)
    kernels._launch_plan.cache_clear()
    inputs = make_inputs(case, seed=seed)
    first = run_poisoned(case, inputs, with_map=False, with_stats=with_stats, energy_config=tiles)
    second = run_poisoned(case, inputs, with_map=False, with_stats=with_stats, energy_config=tiles)
    kernels._launch_plan.cache_clear()
    assert_matches(case, inputs, first[0], stats=first[2])
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


# (case, stats asked for): the full band (F = 16) and the circulant band (F = 24, 32), each with
# and without a guide, in every dtype; 3 x 3 positions x 2 heads give 18 sequences per video,
# so the default 8-sequence tiles of 2-byte inputs leave a partly filled tile
LEAN_ENERGY_CASES = [
    (AttentionCase(head_dim=40, dtype=torch.float16, heads=2, height=3, width=3,
                   guide_size=(2, 2), adaptive_beta=True), False),
    (AttentionCase(head_dim=40, dtype=torch.bfloat16, heads=2, height=3, width=3, guide_size=None,
                   alpha=0.0, adaptive_beta=True, energy_scope="sample", batch=4), True),
    (AttentionCase(frames=24, tau=7, dtype=torch.float32, guide_upsample="bilinear",
                   guide_size=(2, 2), height=3, adaptive_beta=True, beta_max=4.0), True),
    (AttentionCase(frames=32, tau=5, dtype=torch.float16, guide_size=None, alpha=0.0,
                   adaptive_beta=True), False),
]


@pytest.mark.parametrize("form", [form for form in kernels.ENERGY_FORMS if form != "rows"])
@pytest.mark.parametrize("case,with_stats", LEAN_ENERGY_CASES,
                         ids=[f"{case}-{'stats' if stats else 'nostats'}"
                              for case, stats in LEAN_ENERGY_CASES])
def test_lean_energy_forms_match_float64_formula(case, with_stats, form, monkeypatch):
    """The energy pass's lean forms (`check_with_two_energy_programs`)."""
    check_with_two_energy_programs(case, with_stats, energy_tiles(case, form), monkeypatch)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_beta_at_its_limit_stays_finite(dtype, adaptive):
    """beta = BETA_LIMIT (1e6) puts A3 and out far beyond float16's range: float16 saturates at
    +-65504 (A3 before the product with v and out), the other dtypes match the formula."""
    case = AttentionCase(dtype=dtype, beta=1e6, adaptive_beta=adaptive, head_dim=40,
                         beta_max=1e6 if adaptive else None)
    inputs = make_inputs(case)
    out, plain_map, stats = run_poisoned(case, inputs)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    if dtype == torch.float16:
        assert (out.abs() == 65504).any()  # saturated, not inf
    else:
        assert_matches(case, inputs, out, plain_map, stats)


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_energy_programs_sum_several_tiles(scope, monkeypatch):
    """At most ENERGY_PROGRAMS energy programs per video, each summing `steps` tiles: 3 x 3 x 2 =
    18 sequences per video are 5 tiles of G = 4; with 2 programs each sums 3 tiles, the last
    one past the end (masked)."""
    monkeypatch.setattr(kernels, "ENERGY_PROGRAMS", 2)
    kernels._launch_plan.cache_clear()
    case = AttentionCase(adaptive_beta=True, energy_scope=scope, batch=4, height=3, width=3,
                         guide_upsample="bilinear", guide_size=(2, 2))
    inputs = make_inputs(case)
    plan = kernels._launch_plan(16, 8, 2, 3, 3, 4, 7, 2, (2, 2), 8 ** -0.5, False, True,
                                (True, 2, 1, scope == "sample", False), True, 4,
                                torch.device("cpu"), None, None, triton_rules.BAND_PRODUCT,
                                (48, 16, 48, 16, 48, 16), 0.6, 1.5, 1.5, False)
    assert plan.energy_grid == (2, 2) and plan.energy_constants["steps"] == 3
    out, plain_map, stats = run_poisoned(case, inputs)
    kernels._launch_plan.cache_clear()
    assert_matches(case, inputs, out, plain_map, stats)


@pytest.mark.parametrize("case,with_stats,form", STASH_CASES,
                         ids=[f"{case}-{'stats' if stats else 'nostats'}-{form}"
                              for case, stats, form in STASH_CASES])
def test_stashed_guided_maps_match_float64_formula(case, with_stats, form, monkeypatch):
    """The attention pass reading the energy pass's stash of guided maps, with the same bound as
    the recomputing path; each energy program stashes several tiles
    (`check_with_two_energy_programs`)."""
    # seed 7: a float16 stash of the one-frequency case's deviations D failed the bound there
    # (1.01x, beta times D's rounding); its base and band part stay within 0.4x
    check_with_two_energy_programs(case, with_stats, energy_tiles(case, form, stash_guided=True),
                                   monkeypatch, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("frames,tau", [(16, 7), (24, 7)], ids=["full-band", "circulant"])
def test_attention_pass_reads_the_stash(dtype, frames, tau):
    """Overwriting the stash between the passes with uniform rows (full band: band part 0;
    circulant band: base 1/F, band part 0) makes every energy-part row attend uniformly (A3 =
    1/F: out is the mean of v over the frames), while the other part's rows are those of the
    recomputing path bit for bit. 2 x 2 positions x 2 heads = 8 sequences per video: every
    program lies in one part."""
    case = AttentionCase(frames=frames, tau=tau, head_dim=40, dtype=dtype, adaptive_beta=True,
                         guide_size=(1, 2))
    q, k, v, guide = inputs = make_inputs(case)
    recomputed, _, _ = run_poisoned(case, inputs, with_map=False, with_stats=False)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    launches = kernels.kernel_launches(q, k, v, guide, case.heads, case.height, case.width,
                                       case.head_dim ** -0.5, case.params(), out,
                                       energy_config=energy_tiles(case, stash_guided=True))
    stash = launches[0].values["stash_ptr"]
    maps_per_sequence = 1 if frames == 16 else 2  # (band part) or (base, band part)
    assert stash.dtype == (torch.float32 if dtype == torch.float32 else torch.float16)
    assert stash.numel() == case.height * case.width * case.heads * frames ** 2 * maps_per_sequence
    for launch in launches:
        launch.run()
        if launch.kernel is kernels._energy_kernel:
            maps = stash.view(-1, maps_per_sequence, frames, frames)
            assert maps.abs().sum() > 0  # the energy pass wrote the maps
            maps.zero_()
            if maps_per_sequence == 2:
                maps[:, 0] = 1.0 / frames
    energy_rows = slice(case.height * case.width, None)  # the second half of the CFG batch
    assert torch.equal(out[:energy_rows.start], recomputed[:energy_rows.start])
    uniform = v[energy_rows].double().mean(dim=1, keepdim=True).expand_as(out[energy_rows])
    torch.testing.assert_close(out[energy_rows].double(), uniform,
                               **dict(zip(("atol", "rtol"), PROB_TOLERANCES[dtype])))


@pytest.mark.parametrize("frames,tau,dtype,stash_dtype", [
    (16, 7, torch.float16, torch.float16), (16, 7, torch.bfloat16, torch.float16),
    (16, 7, torch.float32, torch.float32), (16, 3, torch.float16, torch.float16),
    (24, 7, torch.bfloat16, torch.float16), (24, 7, torch.float32, torch.float32)])
def test_stash_dtype(frames, tau, dtype, stash_dtype):
    """float16 for 2-byte inputs (either band: a circulant band's stash keeps its band part
    apart, so beta scales only that part's rounding, which A3 holds beta times); float32 for
    float32 inputs."""
    case = AttentionCase(frames=frames, tau=tau, dtype=dtype, adaptive_beta=True)
    q, k, v, guide = make_inputs(case)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    launches = kernels.kernel_launches(q, k, v, guide, case.heads, case.height, case.width,
                                       case.head_dim ** -0.5, case.params(), out,
                                       energy_config=energy_tiles(case, stash_guided=True))
    assert launches[0].values["stash_ptr"].dtype == stash_dtype


def test_no_stash_with_the_anchor_map():
    """The anchor's plain map needs A, which the stash does not hold: with `return_map` the
    energy pass stashes nothing and the attention pass recomputes every row."""
    case = AttentionCase(adaptive_beta=True, dtype=torch.float16, head_dim=40)
    q, k, v, guide = inputs = make_inputs(case)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    plain_map = torch.empty((case.batch, case.height, case.width, case.heads, case.frames,
                             case.frames), dtype=q.dtype)
    launches = kernels.kernel_launches(q, k, v, guide, case.heads, case.height, case.width,
                                       case.head_dim ** -0.5, case.params(), out, plain_map,
                                       energy_config=energy_tiles(case, stash_guided=True))
    assert not any(launch.constants.get("STASH") for launch in launches)
    out, plain_map, stats = run_poisoned(case, inputs,
                                         energy_config=energy_tiles(case, stash_guided=True))
    assert_matches(case, inputs, out, plain_map, stats)


@pytest.mark.parametrize("frames,tau,stash,capped", [
    (24, 7, True, True), (32, 5, True, True), (24, 7, False, False), (16, 7, True, False),
    (64, 7, True, False)])
def test_register_cap_only_where_the_attention_pass_reads_a_circulant_stash(frames, tau, stash,
                                                                          capped):
    """F_PAD = 32 with a circulant stash: `STASHED_CIRCULANT_MAX_REGISTERS` (Triton 3.6 spilled
    there without it); every other attention pass leaves registers to ptxas."""
    case = AttentionCase(frames=frames, tau=tau, dtype=torch.float16, head_dim=40,
                         adaptive_beta=True)
    q, k, v, guide = make_inputs(case)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    launches = kernels.kernel_launches(q, k, v, guide, case.heads, case.height, case.width,
                                       case.head_dim ** -0.5, case.params(), out,
                                       energy_config=energy_tiles(case, stash_guided=stash))
    attention = [launch for launch in launches if launch.kernel is kernels._attention_kernel]
    expected = kernels.STASHED_CIRCULANT_MAX_REGISTERS if capped else None
    assert [launch.constants.get("maxnreg") for launch in attention] == [expected]


def test_no_stash_without_a_band_step():
    """Stats with fixed beta = 1 (no band step in the attention pass): nothing is stashed."""
    case = AttentionCase(beta=1.0, dtype=torch.float16, head_dim=40)
    q, k, v, guide = inputs = make_inputs(case)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    stats = torch.empty((case.params().stats_rows(case.batch), 6))
    launches = kernels.kernel_launches(q, k, v, guide, case.heads, case.height, case.width,
                                       case.head_dim ** -0.5, case.params(), out, stats=stats,
                                       energy_config=energy_tiles(case, stash_guided=True))
    assert len(launches) == 3 and not any(launch.constants.get("STASH") for launch in launches)
    out, _, stats = run_poisoned(case, inputs, with_map=False,
                                 energy_config=energy_tiles(case, stash_guided=True))
    assert_matches(case, inputs, out, stats=stats)


@pytest.mark.parametrize("stash", [True, False])
def test_stash_guided_switch_sets_the_default(monkeypatch, stash):
    """`STASH_GUIDED` (on by default) turns the stash on or off for every caller that leaves the
    energy tiles to the default (the public op included), once the launch plans are rebuilt."""
    assert kernels.STASH_GUIDED is True
    monkeypatch.setattr(kernels, "STASH_GUIDED", stash)
    kernels._launch_plan.cache_clear()
    try:
        case = AttentionCase(adaptive_beta=True, dtype=torch.float16, head_dim=40)
        q, k, v, guide = inputs = make_inputs(case)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        launches = kernels.kernel_launches(q, k, v, guide, case.heads, case.height, case.width,
                                           case.head_dim ** -0.5, case.params(), out)
        assert all(launch.constants["STASH"] is stash for launch in launches
                   if launch.kernel is not kernels._beta_kernel)
        out, _, stats = run_poisoned(case, inputs, with_map=False)
        assert_matches(case, inputs, out, stats=stats)
    finally:
        kernels._launch_plan.cache_clear()


@pytest.mark.parametrize("frames,guide_mode,with_map,dtype,tiles,energy_tiles", [
    (16, "nearest", False, torch.float16, (4, 32, 4), (8, 32, 8)),
    (24, "nearest", False, torch.float16, (1, 32, 2), (1, 32, 2)),  # energy form "lean"
    (64, "nearest", False, torch.float16, (1, 32, 4), (1, 32, 4)),
    (64, None, True, torch.float16, (1, 32, 4), (1, 32, 4)),  # the anchor: no guide
    # a guide and the map: the attention pass on 8 warps (spills on 4)
    (33, "bilinear", True, torch.float16, (1, 32, 8), (1, 32, 4)),
    (64, "nearest", False, torch.float32, (1, 16, 4), (1, 16, 8)),  # float32's energy pass: 8
])
def test_default_tiles(frames, guide_mode, with_map, dtype, tiles, energy_tiles):
    """The measured defaults (`default_config`, `default_energy_config`) reach the launches: at
    F_PAD = 64 the attention pass takes 4 warps unless it reads a guide and writes the map, the
    energy pass 4 unless its inputs are float32."""
    case = AttentionCase(frames=frames, tau=1, adaptive_beta=True, head_dim=80, dtype=dtype,
                         guide_upsample=guide_mode or "nearest")
    q, k, v, guide = make_inputs(case)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    plain_map = torch.empty((case.batch, case.height, case.width, case.heads, frames, frames),
                            dtype=q.dtype) if with_map else None
    launches = {launch.kernel.__name__: launch.constants for launch in kernels.kernel_launches(
        q, k, v, guide if guide_mode else None, case.heads, case.height, case.width, 0.1,
        case.params(), out, plain_map)}
    for name, expected in (("_attention_kernel", tiles), ("_energy_kernel", energy_tiles)):
        constants = launches[name]
        assert (constants["G"], constants["BLOCK_D"], constants["num_warps"]) == expected, name
    lean = kernels.padded_frames(frames) == 32
    assert launches["_energy_kernel"]["FORM"] == kernels.ENERGY_FORMS["lean" if lean else "rows"]
