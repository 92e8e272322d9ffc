"""The fused Triton kernels vs the reference, run by the Triton interpreter on CPU.

`TRITON_INTERPRET=1` (set in conftest.py) executes the very kernel source that runs on GPU.
"""

import pytest
import torch

from attention_probs_cases import (BAD_GUIDES, BackendContract, Case, assert_matches_reference,
                                   make_inputs, needs_triton_interpreter, run_poisoned)
from bytheway_kernels import reference
from bytheway_kernels.ops import triton_rules
from bytheway_kernels.ops.attention_probs import triton as triton_kernels
from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out

pytestmark = needs_triton_interpreter

KERNELS = ("_stats_kernel", "_apply_kernel")


class TestTritonContract(BackendContract):
    run_out = staticmethod(attention_probs_triton_out)
    backend = "triton"


@pytest.fixture
def launches(monkeypatch):
    """The names of the kernels launched, in order."""
    names = []

    class CountingKernel:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            names.append(self.name)
            return self.kernel[grid]

    for name in KERNELS:
        monkeypatch.setattr(triton_kernels, name, CountingKernel(getattr(triton_kernels, name), name))
    return names


@pytest.mark.parametrize("frames,tau", [(16, 7), (16, 3), (7, 2)])
def test_launch_counts(frames, tau, launches):
    """Fixed beta without stats: one launch. Adaptive or with stats: stats then apply (no zeroing
    or reduce launch: the last stats program sums the slots)."""
    case = Case(frames=frames, tau=tau, adaptive_beta=False)
    scores, guide = make_inputs(case)
    probs, _ = run_poisoned(attention_probs_triton_out, scores, guide, case, with_stats=False)
    assert launches == ["_apply_kernel"]
    assert_matches_reference(scores, guide, case, probs)
    for adaptive, with_stats in [(True, False), (False, True), (True, True)]:
        launches.clear()
        adaptive_case = Case(frames=frames, tau=tau, adaptive_beta=adaptive)
        probs, stats = run_poisoned(attention_probs_triton_out, scores, guide, adaptive_case, with_stats)
        assert launches == list(KERNELS)
        assert_matches_reference(scores, guide, adaptive_case, probs, stats)


@pytest.fixture(params=["flat", "tiered"])
def many_stats_programs(request, monkeypatch):
    """Force several tiles per stats program, many programs and several summing iterations; the
    slots summed by the last program ("flat") or in tiers of 2 slots ("tiered")."""
    monkeypatch.setattr(triton_kernels, "TARGET_STATS_PROGRAMS", 4)
    monkeypatch.setattr(triton_kernels, "MAX_STATS_TILES", 2)
    monkeypatch.setattr(triton_kernels, "REDUCE_CHUNK", 2)
    if request.param == "tiered":
        monkeypatch.setattr(triton_kernels, "FLAT_SUM_SLOTS", 2)
    triton_kernels.clear_launch_plans()
    yield request.param
    triton_kernels.clear_launch_plans()


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_stats_are_deterministic_with_many_partials(scope, many_stats_programs):
    """Partial slots summed in a fixed order by the last program (or by the last of each tier,
    then the last tier's): the same input gives the same bits run to run."""
    # F = 8, tau = 1: the band's frequencies, with one row per thread in both passes by default
    # (128-row stats tiles: 10 x 7 positions give 5 programs per video)
    case = Case(batch=4, height=10, width=7, frames=8, tau=1, energy_scope=scope,
                guide_upsample="bilinear", guide_size=(3, 2))
    scores, guide = make_inputs(case, seed=5)
    plan = triton_kernels._launch_plan(tuple(scores.shape), (3, 2), case.params(), True,
                                       triton_rules.BAND_PRODUCT)
    programs, videos = plan.stats_grid
    groups = videos if scope == "sample" else 1
    assert plan.stats_args["TILES"] == 2 and programs * videos // groups > 2 * 2
    assert plan.stats_args["TIERED"] is (many_stats_programs == "tiered")
    # tiers of 2 slots per video, the last one short (odd program count): fp64 sums and a counter each
    tiers = videos * -(-programs // 2) if plan.stats_args["TIERED"] else 0
    assert programs % 2 == 1 or not tiers
    partial_count = programs * videos * triton_kernels.PARTIAL_FIELDS
    assert plan.workspace_size == partial_count + 2 * triton_kernels.PARTIAL_FIELDS * tiers + tiers + groups + 1
    first = run_poisoned(attention_probs_triton_out, scores, guide, case)
    second = run_poisoned(attention_probs_triton_out, scores, guide, case)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert_matches_reference(scores, guide, case, *first)


def _counter_views(workspace: torch.Tensor, plan) -> tuple:
    """Int32 views of the ticket counters in a stats workspace laid out by `plan`: the tier
    counters (before the betas), then the main counter (after them)."""
    args = plan.stats_args
    bits = workspace.view(torch.int32)
    return bits[args["tier_counters_at"]:args["betas_at"]], bits[args["counter_at"]:][:1]


def _counters(workspace: torch.Tensor, plan) -> torch.Tensor:
    """Every ticket counter of `workspace`, in one tensor."""
    return torch.cat(_counter_views(workspace, plan))


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_stats_pass_leaves_its_counters_at_zero(scope, many_stats_programs):
    """The program that draws a counter's last ticket sets it back to zero, so a workspace can
    serve the next call on its stream unzeroed (bytheway_kernels/ops/workspace.py)."""
    from bytheway_kernels.ops.launch import run_on_device_of

    case = Case(batch=4, height=5, width=7, frames=8, tau=1, energy_scope=scope,
                guide_upsample="bilinear", guide_size=(3, 2))
    scores, guide = make_inputs(case, seed=3)
    params = case.params()
    stats = params.empty_stats(scores, scores.shape[0])
    launches = triton_kernels.kernel_launches(scores, guide, params, torch.empty_like(scores), stats)
    workspace = launches[0].values["workspace_ptr"]
    plan = triton_kernels._launch_plan(tuple(scores.shape), (3, 2), params, True, triton_rules.BAND_PRODUCT)
    counters = _counters(workspace, plan)
    assert counters.numel() == (1 + plan.stats_grid[1] * -(-plan.stats_grid[0] // 2)
                                if plan.stats_args["TIERED"] else 1)
    run_on_device_of(scores, launches)
    assert torch.count_nonzero(_counters(workspace, plan)) == 0
    assert torch.count_nonzero(workspace[:plan.stats_grid[0] * plan.stats_grid[1]]) > 0  # partials


@pytest.mark.parametrize("with_stats", [False, True])
def test_a_reused_workspace_gives_the_same_bits(with_stats, many_stats_programs, monkeypatch):
    """Eager calls through the public function reuse their stream's workspace (its partials and
    betas left as the last call wrote them, here poisoned): each call equals a call on a freshly
    zeroed one, bit for bit. The custom op (torch.compile's path) never reuses one."""
    import bytheway_kernels as btw
    from bytheway_kernels.ops import workspace as workspace_module

    monkeypatch.setenv("BYTHEWAY_BACKEND", "triton")
    workspace_module.clear_reused_workspaces()
    case = Case(batch=4, height=5, width=7, frames=8, tau=1, guide_size=(3, 2))
    kwargs = dict(alpha=case.alpha, beta=case.beta, tau=case.tau, return_stats=with_stats)
    for seed in (1, 2, 3):
        scores, guide = make_inputs(case, seed=seed)
        result = btw.bytheway_attention_probs(scores, guide, **kwargs)
        ((plan, workspace),) = workspace_module._REUSED.values()
        fresh = triton_kernels.attention_probs_triton(scores, guide, case.params(), with_stats)
        probs, stats = result if with_stats else (result, None)
        assert torch.equal(probs, fresh[0]) and (stats is None or torch.equal(stats, fresh[1]))
        assert_matches_reference(scores, guide, case, probs, stats)
        assert torch.count_nonzero(_counters(workspace, plan)) == 0
        workspace.fill_(float("nan"))  # garbage partials and betas for the next call
        for counters in _counter_views(workspace, plan):
            counters.zero_()  # as the stats pass leaves them
    torch.ops.bytheway.attention_probs(scores, guide, *case.params(), with_stats)
    assert len(workspace_module._REUSED) == 1
    workspace_module.clear_reused_workspaces()


@pytest.mark.parametrize("beta", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("tau", [7, 3])
def test_error_does_not_grow_with_beta(beta, tau):
    """Dividing by rowsum(A2) (exact: the band term sums to 0) instead of rowsum(A3) keeps the
    fp32 error relative to beta at the rounding of one fp32 row (~1e-7); dividing by rowsum(A3)
    gave 1.3e-6 at beta 10 and 7.5e-5 at beta 1000."""
    case = Case(beta=beta, tau=tau, adaptive_beta=False)
    scores, guide = make_inputs(case)
    probs, _ = run_poisoned(attention_probs_triton_out, scores, guide, case, with_stats=False)
    expected = reference.bytheway_attention_probs(scores.double(), guide.double(), **case.kwargs())
    assert (probs.double() - expected).abs().max() / beta < 4e-7


@pytest.mark.parametrize("adaptive", [True, False])
def test_zero_guide_with_alpha_one_uses_the_unguided_map(adaptive):
    """A guided row that sums to 0 falls back to the plain softmax row (no 0/0)."""
    case = Case(alpha=1.0, adaptive_beta=adaptive, guide_size=(2, 2))
    scores, guide = make_inputs(case)
    probs, stats = run_poisoned(attention_probs_triton_out, scores, torch.zeros_like(guide), case)
    assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
    unguided_case = Case(alpha=1.0, adaptive_beta=adaptive, guide_size=None)
    unguided, unguided_stats = run_poisoned(attention_probs_triton_out, scores, None, unguided_case)
    torch.testing.assert_close(probs, unguided, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats, unguided_stats, atol=1e-7, rtol=1e-6)


def test_float64_is_refused_not_computed_in_fp32():
    scores, guide = make_inputs(Case(dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        attention_probs_triton_out(scores, guide, Case().params(), torch.empty_like(scores), None)


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    scores, _ = make_inputs(Case(guide_size=None))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention_probs_triton_out(scores, None, Case().params(), torch.empty_like(scores), None)


# The thread-row form (one row per thread, the band step by the band's frequencies: the default
# where F % 4 == 0 up to 32) with bands of several frequencies, sines and the complement I - P,
# each guide, dtype and scope; the case matrix's thread-row rows all have tau = 0 (one frequency).
# Row counts are not multiples of the 128-row tiles.
THREAD_ROW_CASES = [
    Case(frames=12, tau=3, dtype=torch.float16, energy_scope="sample", height=3, width=5),  # complement
    Case(frames=24, tau=7, dtype=torch.bfloat16, guide_upsample="bilinear", guide_size=(2, 1)),  # complement
    Case(frames=4, tau=0, guide_size=None, height=5, width=7),  # COLUMNS = F = 4
    Case(frames=28, tau=5, batch=6, parts=3, energy_scope="sample", guide_upsample="bilinear",
         guide_size=(3, 2), height=3, width=3),
    Case(frames=20, tau=8, beta=1.5, beta_max=2.0, dtype=torch.float16),  # complement
    Case(frames=32, tau=7, adaptive_beta=False, guide_size=(1, 2)),
]


@pytest.mark.parametrize("with_stats", [False, True])
@pytest.mark.parametrize("case", THREAD_ROW_CASES, ids=str)
def test_thread_rows_match_the_reference(case, with_stats):
    scores, guide = make_inputs(case, seed=17)
    launches = triton_kernels.kernel_launches(scores, guide, case.params(), torch.empty_like(scores),
                                              torch.empty((case.params().stats_rows(case.batch), 6))
                                              if with_stats else None)
    assert all(launch.args["THREAD_ROWS"] for launch in launches)
    probs, stats = run_poisoned(attention_probs_triton_out, scores, guide, case, with_stats)
    assert_matches_reference(scores, guide, case, probs, stats)


@pytest.mark.parametrize("name", list(BAD_GUIDES))
def test_thread_rows_keep_the_unguided_map_for_bad_guided_sums(name):
    """As the contract's test at F = 16 (the full band, tile form), with one row per thread."""
    case = Case(frames=12, tau=3, alpha=1.0, height=2, width=2, guide_size=(2, 2))
    scores, guide = make_inputs(case, seed=11)
    guide = BAD_GUIDES[name](guide)
    probs, stats = run_poisoned(attention_probs_triton_out, scores, guide, case)
    assert torch.isfinite(probs).all() and torch.isfinite(stats).all()
    assert_matches_reference(scores, guide, case, probs, stats,
                             truth_dtype=torch.float32 if name == "row sum beyond float" else torch.float64)


@pytest.mark.parametrize("guide_size", [None, (1, 1)])
@pytest.mark.parametrize("frames,tau", [(24, 7), (20, 8), (12, 3), (32, 7)])
def test_thread_rows_give_uniform_rows_no_band_energy(frames, tau, guide_size):
    """Uniform rows hold no energy but at k = 0: E2_high stays far below the energies' floor
    (1e-6 of E2) with the complement too (F = 24, 20, 12 here), so beta stays beta0 (the band
    energy of the centred row, `triton_rules.thread_row_band_energy`)."""
    case = Case(frames=frames, tau=tau, guide_size=guide_size, beta=1.5)
    scores = torch.zeros((2, 2, 2, 1, frames, frames))
    guide = None if guide_size is None else torch.full((2, 1, 1, 1, frames, frames), 1 / frames)
    probs, stats = run_poisoned(attention_probs_triton_out, scores, guide, case)
    assert stats[0, 0] == 1.5 and stats[0, 4].abs() < 1e-9 * stats[0, 2]
    torch.testing.assert_close(probs, torch.full_like(probs, 1 / frames))
