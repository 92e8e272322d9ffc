"""The compiled fused temporal attention kernels on a CUDA GPU (skipped without one): the case
matrix against the float64 formula, a grid of more than 65,535 programs, CUDA graphs,
torch.compile and run-to-run determinism, the stash of guided maps (`TileConfig.stash_guided`)."""

import pytest
import torch

import bytheway_kernels as btw
from bytheway_kernels.ops.temporal_attention.triton import temporal_attention_triton_out
from temporal_attention_cases import (STASH_CASES, AttentionCase, assert_matches, case_matrix,
                                     energy_tiles, make_inputs)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _call(case, inputs, **extra):
    q, k, v, guide = inputs
    return btw.temporal_attention(q, k, v, heads=case.heads, height=case.height, width=case.width,
                                  guide=guide, **{**case.kwargs(), **extra})


@pytest.mark.parametrize("case", case_matrix(), ids=str)
def test_matches_float64_formula(case):
    q, k, v, guide = inputs = make_inputs(case, seed=11, device="cuda")
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    plain_map = torch.full((case.batch, case.height, case.width, case.heads, case.frames,
                            case.frames), float("nan"), dtype=q.dtype, device="cuda")
    stats = torch.full((case.params().stats_rows(case.batch), 6), float("nan"), device="cuda")
    temporal_attention_triton_out(q, k, v, guide, case.heads, case.height, case.width,
                                  case.head_dim ** -0.5, case.params(), out, plain_map, stats)
    assert_matches(case, inputs, out, plain_map, stats)


def test_more_than_65535_programs():
    """2 * 128 * 128 * 8 = 262,144 sequences: 65,536 programs of G = 4 on grid axis 0."""
    case = AttentionCase(batch=2, height=128, width=128, heads=8, head_dim=8,
                         dtype=torch.float16, adaptive_beta=True, guide_size=(16, 16))
    inputs = make_inputs(case, device="cuda")
    out, stats = _call(case, inputs, return_stats=True)
    assert_matches(case, inputs, out, stats=stats)


def test_cuda_graph_and_determinism():
    case = AttentionCase(batch=4, height=8, width=8, heads=8, head_dim=40, dtype=torch.float16,
                         adaptive_beta=True, energy_scope="sample", guide_size=(4, 4))
    inputs = make_inputs(case, device="cuda")
    eager = _call(case, inputs, return_stats=True)
    again = _call(case, inputs, return_stats=True)
    for first, second in zip(eager, again):
        assert torch.equal(first, second)  # fixed-order reduction: bit-identical run to run
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _call(case, inputs, return_stats=True)
    graph.replay()
    torch.cuda.synchronize()
    for first, second in zip(eager, captured):
        assert torch.equal(first, second)


def test_torch_compile_fullgraph():
    case = AttentionCase(heads=8, head_dim=80, dtype=torch.bfloat16, adaptive_beta=True)
    q, k, v, guide = make_inputs(case, device="cuda")
    qkv = torch.cat([q, k, v], dim=-1)

    def layer(qkv, guide):
        q, k, v = qkv.split(640, dim=-1)
        return btw.temporal_attention(q, k, v, heads=8, height=2, width=2, guide=guide,
                                      alpha=0.6, beta=1.5, tau=7, adaptive_beta=True) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(qkv, guide), layer(qkv, guide))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("size,head_dim", [(16, 160), (32, 80), (64, 40)])
def test_animatediff_shapes_fp16(size, head_dim, adaptive):
    """The three AnimateDiff decoder shapes (B = 2 with CFG, 8 heads, F = 16), 16x16 guide."""
    case = AttentionCase(height=size, width=size, heads=8, head_dim=head_dim, dtype=torch.float16,
                         guide_size=(16, 16), adaptive_beta=adaptive)
    inputs = make_inputs(case, seed=1, device="cuda")
    out, plain_map, stats = _call(case, inputs, return_map=True, return_stats=True)
    assert_matches(case, inputs, out, plain_map, stats)


def _poisoned_launch(case, inputs, with_stats, energy_config):
    """The fused kernels into NaN-filled out (and stats); returns them."""
    q, k, v, guide = inputs
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    stats = None
    if with_stats:
        stats = torch.full((case.params().stats_rows(case.batch), 6), float("nan"), device="cuda")
    temporal_attention_triton_out(q, k, v, guide, case.heads, case.height, case.width,
                                  case.head_dim ** -0.5, case.params(), out, None, stats,
                                  energy_config=energy_config)
    return out, stats


@pytest.mark.parametrize("case,with_stats,form", STASH_CASES,
                         ids=[f"{case}-{'stats' if stats else 'nostats'}-{form}"
                              for case, stats, form in STASH_CASES])
def test_stashed_guided_maps_match_float64_formula(case, with_stats, form):
    inputs = make_inputs(case, seed=5, device="cuda")
    tiles = energy_tiles(case, form, stash_guided=True)
    out, stats = _poisoned_launch(case, inputs, with_stats, tiles)
    again = _poisoned_launch(case, inputs, with_stats, tiles)
    assert torch.equal(out, again[0])
    assert_matches(case, inputs, out, stats=stats)


@pytest.mark.parametrize("size,head_dim", [(16, 160), (32, 80), (64, 40)])
def test_stash_at_animatediff_shapes_fp16_and_in_a_cuda_graph(size, head_dim):
    """Adaptive beta with the stash at the AnimateDiff decoder shapes, eager and replayed from a
    CUDA graph (the stash allocated during capture), bit-identical."""
    case = AttentionCase(height=size, width=size, heads=8, head_dim=head_dim, dtype=torch.float16,
                         guide_size=(16, 16), adaptive_beta=True)
    inputs = make_inputs(case, seed=1, device="cuda")
    tiles = energy_tiles(case, stash_guided=True)
    out, stats = _poisoned_launch(case, inputs, True, tiles)
    assert_matches(case, inputs, out, stats=stats)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _poisoned_launch(case, inputs, True, tiles)
    graph.replay()
    torch.cuda.synchronize()
    for first, second in zip((out, stats), captured):
        assert torch.equal(first, second)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_inputs_on_a_device_that_is_not_current():
    """Both ops on cuda:1 while cuda:0 is current (a pipeline moved with .to("cuda:1")): the
    launches run on the inputs' device and stream (`launch.run_on_device_of`)."""
    case = AttentionCase(batch=2, height=4, width=4, heads=2, head_dim=40, dtype=torch.float16,
                         adaptive_beta=True, guide_size=(2, 2))
    q, k, v, guide = make_inputs(case, device="cuda:1")
    with torch.cuda.device(0):
        out, stats = _call(case, (q, k, v, guide), return_stats=True)
        scores = torch.randn(2, 4, 4, 2, 16, 16, device="cuda:1")
        probs = btw.bytheway_attention_probs(scores, alpha=0.6, beta=1.5, tau=7, adaptive_beta=True)
    torch.cuda.synchronize(1)
    assert out.device == probs.device == torch.device("cuda:1")
    assert_matches(case, (q, k, v, guide), out, stats=stats)
    reference = btw.bytheway_attention_probs(scores.cpu(), alpha=0.6, beta=1.5, tau=7, adaptive_beta=True)
    torch.testing.assert_close(probs.cpu(), reference, rtol=1e-4, atol=1e-5)
