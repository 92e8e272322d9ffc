"""CUDA-only: the compiled Triton kernels vs the reference, torch.compile and CUDA graphs."""

import pytest
import torch

import bytheway_kernels as btw
from attention_probs_cases import Case, case_matrix, check_backend_case, make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("case", case_matrix(), ids=str)
def test_compiled_triton_matches_reference(case):
    from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out

    check_backend_case(attention_probs_triton_out, case, device="cuda")


@pytest.mark.parametrize("setting", ["auto", "fma", "tensor-cores", "rank-one", "frequencies"])
@pytest.mark.parametrize("frames,tau,dtype", [(24, 7, torch.float16), (32, 7, torch.bfloat16),
                                              (20, 3, torch.float32), (15, 3, torch.float16)], ids=str)
def test_each_band_product_inside_the_band(frames, tau, dtype, setting):
    """Circulant bands with many terms (the case matrix has tau at its bounds only), with each
    band product: at F = 15 "auto" is the fp32 dot, elsewhere the band's frequencies (one row
    per thread)."""
    from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out
    from bytheway_kernels.testing import band_product

    case = Case(frames=frames, tau=tau, dtype=dtype, height=8, width=8, heads=4, guide_size=(4, 4),
                guide_upsample="bilinear")
    with band_product(setting):
        check_backend_case(attention_probs_triton_out, case, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", [16, 32, 64])
def test_animatediff_shapes(size, dtype):
    from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out

    case = Case(dtype=dtype, height=size, width=size, heads=8, guide_size=(16, 16))
    check_backend_case(attention_probs_triton_out, case, device="cuda")


def test_cuda_graph_capture_and_compile():
    scores, guide = make_inputs(Case(height=32, width=32, heads=8, dtype=torch.float16,
                                     guide_size=(16, 16)), device="cuda")
    kwargs = dict(alpha=0.6, beta=1.5, tau=7, return_stats=True)
    expected, expected_stats = btw.bytheway_attention_probs(scores, guide, **kwargs)  # warm-up
    static_scores = scores.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        probs, stats = btw.bytheway_attention_probs(static_scores, guide, **kwargs)
    static_scores.copy_(scores * 0.5)
    graph.replay()
    again, again_stats = btw.bytheway_attention_probs(scores * 0.5, guide, **kwargs)
    torch.testing.assert_close(probs, again, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stats, again_stats, atol=1e-5, rtol=1e-4)

    compiled = torch.compile(lambda s, g: btw.bytheway_attention_probs(s, g, **kwargs), fullgraph=True,
                             mode="reduce-overhead")
    for _ in range(3):
        out, out_stats = compiled(scores, guide)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out_stats, expected_stats, atol=1e-5, rtol=1e-4)


def test_adaptive_stats_are_bit_identical_run_to_run():
    """The stats pass writes per-program partials, summed in a fixed order by the last program
    (the ticket atomic picks who sums, not what): the same bits run to run."""
    scores, guide = make_inputs(Case(height=64, width=64, heads=8, dtype=torch.float16,
                                     guide_size=(16, 16)), device="cuda")
    first = btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7, return_stats=True)
    for _ in range(3):
        again = btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=7, return_stats=True)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


def test_zero_guide_and_float64_on_cuda():
    case = Case(alpha=1.0, guide_size=(2, 2))
    scores, guide = make_inputs(case, device="cuda")
    probs = btw.bytheway_attention_probs(scores, torch.zeros_like(guide), alpha=1.0, beta=1.5, tau=7)
    unguided = btw.bytheway_attention_probs(scores, None, alpha=1.0, beta=1.5, tau=7)
    torch.testing.assert_close(probs, unguided, atol=1e-6, rtol=1e-6)
    logits = 1e4 + 3 * torch.randn((2, 2, 2, 2, 16, 16), dtype=torch.float64, device="cuda")
    probs64 = btw.bytheway_attention_probs(logits, None, alpha=0.6, beta=1.5, tau=7)
    expected = btw.reference.bytheway_attention_probs((logits - 1e4).cpu(), None, alpha=0.6, beta=1.5, tau=7)
    assert probs64.dtype == torch.float64 and (probs64.cpu() - expected).abs().max() < 1e-12


def test_adaptive_call_replays_in_a_cuda_graph():
    """A call captured in a CUDA graph zeroes its own stats workspace (partials, betas, ticket
    counter; eager calls reuse their stream's), so the graph zeroes it at every replay and gives
    the eager result bit for bit."""
    scores, guide = make_inputs(Case(height=32, width=32, heads=8, dtype=torch.float16,
                                     guide_size=(16, 16)), device="cuda")
    kwargs = dict(alpha=0.6, beta=1.5, tau=7, return_stats=True)
    expected, expected_stats = btw.bytheway_attention_probs(scores, guide, **kwargs)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        probs, stats = btw.bytheway_attention_probs(scores, guide, **kwargs)
    for _ in range(2):
        probs.zero_()
        stats.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(probs, expected) and torch.equal(stats, expected_stats)


def test_eager_calls_between_graph_replays_reuse_only_their_own_workspace():
    """Eager calls reuse their stream's workspace (its counters reset by the stats pass); a call
    captured in a CUDA graph zeroes its own, so replays on a side stream, overlapping eager calls
    on other inputs, all give their eager results bit for bit."""
    from bytheway_kernels.ops import workspace as workspace_module

    case = Case(height=32, width=32, heads=8, dtype=torch.float16, guide_size=(16, 16))
    (scores, guide), (other_scores, other_guide) = (make_inputs(case, seed=s, device="cuda") for s in (1, 2))
    kwargs = dict(alpha=0.6, beta=1.5, tau=7, return_stats=True)
    workspace_module.clear_reused_workspaces()
    expected = btw.bytheway_attention_probs(scores, guide, **kwargs)
    other_expected = btw.bytheway_attention_probs(other_scores, other_guide, **kwargs)
    assert len(workspace_module._REUSED) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        probs, stats = btw.bytheway_attention_probs(scores, guide, **kwargs)
    assert len(workspace_module._REUSED) == 1  # nothing remembered from the capture
    side = torch.cuda.Stream()
    for _ in range(3):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # unordered with the eager call below
            graph.replay()
        eager = btw.bytheway_attention_probs(other_scores, other_guide, **kwargs)
        torch.cuda.synchronize()
        assert torch.equal(probs, expected[0]) and torch.equal(stats, expected[1])
        assert torch.equal(eager[0], other_expected[0]) and torch.equal(eager[1], other_expected[1])


@pytest.mark.parametrize("mode", ["fixed", "adaptive", "adaptive with stats"])
def test_repeated_eager_calls_launch_their_prepared_kernels(mode, monkeypatch):
    """From its second call on, an eager call signature launches its prepared kernels directly
    (bytheway_kernels/ops/attention_probs/triton.py, `attention_probs_triton_eager`): each call,
    on new inputs, gives the general path's result bit for bit."""
    from bytheway_kernels.ops import launch as launch_module
    from bytheway_kernels.ops.attention_probs import triton as map_kernels

    case = Case(height=16, width=16, heads=8, dtype=torch.float16, guide_size=(8, 8),
                adaptive_beta=mode != "fixed")
    kwargs = dict(case.kwargs(), return_stats="stats" in mode)
    map_kernels._EAGER_CALLS.clear()
    prepared_runs = []
    run_prepared = launch_module.run_prepared
    monkeypatch.setattr(launch_module, "run_prepared",
                        lambda *args: prepared_runs.append(1) or run_prepared(*args))
    for seed in range(4):
        scores, guide = make_inputs(case, seed=seed, device="cuda")
        result = btw.bytheway_attention_probs(scores, guide, **kwargs)
        assert len(map_kernels._EAGER_CALLS) == 1
        probs, stats = result if kwargs["return_stats"] else (result, None)
        expected = map_kernels.attention_probs_triton(scores, guide, case.params(), stats is not None)
        assert torch.equal(probs, expected[0]) and (stats is None or torch.equal(stats, expected[1]))
        assert len(prepared_runs) == seed  # the first call prepares, every later one repeats


def test_stats_passes_on_two_streams_at_once():
    """Each stream has its own ticket counter: overlapping adaptive calls on two streams both
    give the single-stream result."""
    case = Case(height=64, width=64, heads=8, dtype=torch.float16, guide_size=(16, 16))
    inputs = [make_inputs(case, seed=seed, device="cuda") for seed in (1, 2)]
    kwargs = dict(alpha=0.6, beta=1.5, tau=7, return_stats=True)
    expected = [btw.bytheway_attention_probs(s, g, **kwargs) for s, g in inputs]
    streams = [torch.cuda.Stream() for _ in inputs]
    torch.cuda.synchronize()
    results = []
    for _ in range(5):
        for stream, (scores, guide) in zip(streams, inputs):
            with torch.cuda.stream(stream):
                results.append((stream, btw.bytheway_attention_probs(scores, guide, **kwargs)))
    torch.cuda.synchronize()
    for index, (_, (probs, stats)) in enumerate(results):
        assert torch.equal(probs, expected[index % 2][0]) and torch.equal(stats, expected[index % 2][1])


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_tiered_slot_sum_at_one_tile_per_program(scope, monkeypatch):
    """One tile per stats program at up_blocks.3's size (as benchmarks/map_op_kernel_times.py
    sweeps it): 8192 slots, summed in tiers. Matches the reference, the same bits run to run and
    in a CUDA graph replay."""
    from bytheway_kernels.ops.attention_probs import triton as kernels

    monkeypatch.setattr(kernels, "MAX_STATS_TILES", 1)
    monkeypatch.setattr(kernels, "TARGET_STATS_PROGRAMS", 1)
    kernels.clear_launch_plans()
    try:
        case = Case(batch=4, height=64, width=64, heads=8, dtype=torch.float16, guide_size=(16, 16),
                    energy_scope=scope)
        from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out

        check_backend_case(attention_probs_triton_out, case, device="cuda")
        scores, guide = make_inputs(case, device="cuda")
        kwargs = dict(alpha=0.6, beta=1.5, tau=7, return_stats=True, energy_scope=scope)
        first = btw.bytheway_attention_probs(scores, guide, **kwargs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            probs, stats = btw.bytheway_attention_probs(scores, guide, **kwargs)
        for _ in range(2):
            again = btw.bytheway_attention_probs(scores, guide, **kwargs)
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(probs, first[0]) and torch.equal(stats, first[1])
    finally:
        kernels.clear_launch_plans()


@pytest.fixture
def programmatic_launch(monkeypatch):
    """The map op's adaptive calls as a programmatic dependent pair (`PROGRAMMATIC_LAUNCH`) inside
    the test, where the device allows it (sm_90 and later); launch plans rebuilt on both sides.
    Yields whether the pair is programmatic on this device."""
    from bytheway_kernels.ops.attention_probs import triton as kernels

    monkeypatch.setattr(kernels, "PROGRAMMATIC_LAUNCH", True)
    kernels.clear_launch_plans()
    try:
        yield kernels._programmatic(torch.device("cuda", torch.cuda.current_device()))
    finally:
        monkeypatch.undo()
        kernels.clear_launch_plans()


PROGRAMMATIC_CASES = [
    Case(height=16, width=16, heads=8, dtype=torch.float16, guide_size=(16, 16)),  # up_blocks.1
    Case(height=32, width=32, heads=8, dtype=torch.bfloat16, guide_size=(16, 16), energy_scope="sample",
         guide_upsample="bilinear"),
    Case(frames=24, height=8, width=8, heads=4, dtype=torch.float16, guide_size=(4, 4)),  # frequencies
    Case(height=8, width=8, heads=4, dtype=torch.float32, adaptive_beta=False, guide_size=(4, 4)),
]


@pytest.mark.parametrize("case", PROGRAMMATIC_CASES, ids=str)
def test_programmatic_dependent_pair(case, programmatic_launch):
    """With the apply kernel launched while the stats pass runs (it waits for the pass before it
    reads beta or stores): the reference's result, and, calls on two inputs alternating on one
    stream (each reusing the stream's workspace, where a beta read too early would be the other
    input's), each input's first result bit for bit, in eager calls and in a CUDA graph replay."""
    from bytheway_kernels.ops import launch
    from bytheway_kernels.ops.attention_probs import triton as kernels
    from bytheway_kernels.ops.attention_probs.triton import attention_probs_triton_out

    check_backend_case(attention_probs_triton_out, case, device="cuda")
    inputs = [make_inputs(case, seed=seed, device="cuda") for seed in (3, 4)]
    inputs[1] = (inputs[1][0] * 2.5, inputs[1][1])  # sharper maps: another beta
    kwargs = dict(case.kwargs(), return_stats=True)
    first = [btw.bytheway_attention_probs(scores, guide, **kwargs) for scores, guide in inputs]
    assert case.adaptive_beta is False or not torch.equal(first[0][1][:, 0], first[1][1][:, 0])
    plan = kernels._launch_plan(tuple(inputs[0][0].shape), tuple(inputs[0][1].shape[1:3]), case.params(),
                                True, kernels.triton_rules.BAND_PRODUCT, programmatic_launch)
    assert plan.apply_args.get("launch_pdl", False) is programmatic_launch
    results = [btw.bytheway_attention_probs(*inputs[index % 2], **kwargs) for index in range(20)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        probs, stats = btw.bytheway_attention_probs(*inputs[0], **kwargs)
    graph.replay()
    results.append((probs, stats))
    torch.cuda.synchronize()
    for index, (probs, stats) in enumerate(results):
        assert torch.equal(probs, first[index % 2][0]) and torch.equal(stats, first[index % 2][1]), index
    if launch.direct_launch_enabled():  # the kernels the calls launched were compiled for the pair
        compiled = [entry.compiled for entry in launch._DIRECT_CACHE.values()
                    if entry.kernel is kernels._apply_kernel and entry.constants.get("PDL")]
        assert bool(compiled) is programmatic_launch
        assert all(kernel.metadata.launch_pdl for kernel in compiled)
