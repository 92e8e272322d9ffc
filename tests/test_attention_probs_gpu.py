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
