"""CUDA-only: the compiled fused temporal attention kernels vs the float64 formula, plus
torch.compile and CUDA-graph capture of the public op."""

import pytest
import torch

import bytheway_kernels as btw
from temporal_attention_cases import AttentionCase, assert_matches, make_inputs
from test_temporal_attention_triton import case_matrix

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run_poisoned_cuda(case: AttentionCase, inputs, with_map=True, with_stats=True):
    from bytheway_kernels.ops.temporal_attention.triton import temporal_attention_triton_out

    q, k, v, guide = inputs
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")
    plain_map = stats = None
    if with_map:
        plain_map = torch.full((case.batch, case.height, case.width, case.heads, case.frames,
                                case.frames), float("nan"), dtype=q.dtype, device="cuda")
    if with_stats:
        stats = torch.full((case.params().stats_rows(case.batch), 6), float("nan"), device="cuda")
    temporal_attention_triton_out(q, k, v, guide, case.heads, case.height, case.width,
                                  case.head_dim ** -0.5, case.params(), out, plain_map, stats)
    return out, plain_map, stats


@pytest.mark.parametrize("case", case_matrix(), ids=str)
def test_compiled_kernels_match_float64_formula(case):
    inputs = make_inputs(case, seed=7, device="cuda")
    out, plain_map, stats = run_poisoned_cuda(case, inputs)
    assert_matches(case, inputs, out, plain_map, stats)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("size,head_dim", [(16, 160), (32, 80), (64, 40)])
def test_animatediff_shapes_fp16(size, head_dim, adaptive):
    case = AttentionCase(height=size, width=size, heads=8, head_dim=head_dim, dtype=torch.float16,
                         guide_size=(16, 16), adaptive_beta=adaptive)
    inputs = make_inputs(case, seed=1, device="cuda")
    out, plain_map, stats = run_poisoned_cuda(case, inputs)
    assert_matches(case, inputs, out, plain_map, stats)


def test_cuda_graph_capture_and_compile():
    case = AttentionCase(height=16, width=16, heads=8, head_dim=40, dtype=torch.float16,
                         guide_size=(8, 8))
    q, k, v, guide = make_inputs(case, device="cuda")
    kwargs = dict(heads=8, height=16, width=16, guide=guide, alpha=0.6, beta=1.5, tau=7,
                  adaptive_beta=True, return_stats=True)
    expected, expected_stats = btw.temporal_attention(q, k, v, **kwargs)  # warm-up
    static_q = q.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, stats = btw.temporal_attention(static_q, k, v, **kwargs)
    static_q.copy_(q * 0.5)
    graph.replay()
    again, again_stats = btw.temporal_attention(q * 0.5, k, v, **kwargs)
    torch.testing.assert_close(out, again, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(stats, again_stats, atol=1e-5, rtol=1e-4)

    compiled = torch.compile(lambda q_, k_, v_: btw.temporal_attention(q_, k_, v_, **kwargs),
                             fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        got, got_stats = compiled(q, k, v)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_stats, expected_stats, atol=1e-5, rtol=1e-4)
