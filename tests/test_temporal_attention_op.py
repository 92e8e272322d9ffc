"""Fused temporal attention's public function and custom op on CPU: validation, the composed path
against the float64 formula and SDPA, opcheck, torch.compile."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F_nn

import bytheway_kernels as btw
from bytheway_kernels.ops.temporal_attention import fused_available, temporal_attention_op
from temporal_attention_cases import (OUT_TOLERANCE, AttentionCase, assert_matches, expected,
                                      make_inputs)

BYTHEWAY = dict(alpha=0.6, beta=1.5, tau=7)


def _call(case: AttentionCase, inputs, **extra):
    q, k, v, guide = inputs
    return btw.temporal_attention(q, k, v, heads=case.heads, height=case.height, width=case.width,
                                  guide=guide, **{**case.kwargs(), **extra})


def _sdpa(q, k, v, heads, scale=None):
    def split(values):
        return values.view(values.shape[0], values.shape[1], heads, -1).transpose(1, 2)

    out = F_nn.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("frames,head_dim", [(16, 40), (2, 8), (24, 80)])
def test_plain_attention_matches_sdpa(dtype, frames, head_dim):
    case = AttentionCase(frames=frames, head_dim=head_dim, dtype=dtype, guide_size=None)
    q, k, v, _ = make_inputs(case, seed=1)
    out = btw.temporal_attention(q, k, v, heads=case.heads, height=2, width=2)
    ref = _sdpa(q.double(), k.double(), v.double(), case.heads)
    assert out.dtype == dtype and out.is_contiguous()
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    # SDPA in the input dtype differs from the exact result by its own rounding too
    torch.testing.assert_close(out, _sdpa(q, k, v, case.heads), atol=2 * atol, rtol=2 * atol)


@pytest.mark.parametrize("batch", [1, 3])
def test_plain_attention_takes_an_odd_batch_with_the_default_cfg(batch):
    """Fixed beta without stats never reads the energies, so cfg=True's halves are not required;
    ByTheWay with adaptive beta still needs them."""
    case = AttentionCase(batch=batch, guide_size=None)
    q, k, v, _ = make_inputs(case, seed=2)
    out = btw.temporal_attention(q, k, v, heads=case.heads, height=2, width=2)
    torch.testing.assert_close(out, _sdpa(q, k, v, case.heads), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cfg=True needs an even batch"):
        btw.temporal_attention(q, k, v, heads=case.heads, height=2, width=2, adaptive_beta=True)
    with pytest.raises(ValueError, match="cfg=True needs an even batch"):
        btw.temporal_attention(q, k, v, heads=case.heads, height=2, width=2, return_stats=True)
    with pytest.raises(ValueError, match=r"batch_split=\(2, 1\)"):
        btw.temporal_attention(q, k, v, heads=case.heads, height=2, width=2, batch_split=(2, 1))


def test_custom_scale_matches_sdpa():
    case = AttentionCase(guide_size=None)
    q, k, v, _ = make_inputs(case)
    out = btw.temporal_attention(q, k, v, heads=2, height=2, width=2, scale=0.3)
    torch.testing.assert_close(out, _sdpa(q, k, v, 2, scale=0.3), atol=1e-5, rtol=1e-5)


COMPOSED_CASES = [
    AttentionCase(),
    AttentionCase(dtype=torch.float16, head_dim=40, adaptive_beta=True, guide_upsample="bilinear",
                  height=3, width=4, guide_size=(2, 3)),
    AttentionCase(dtype=torch.bfloat16, beta=10.0, alpha=0.1, adaptive_beta=True,
                  energy_scope="sample", batch=4),
    AttentionCase(frames=8, tau=0, guide_size=None, parts=1, energy_part=0, adaptive_beta=True,
                  beta_max=2.0, fused_qkv=False),
    AttentionCase(frames=9, tau=2, parts=3, energy_part=1, batch=3, adaptive_beta=True),
    AttentionCase(frames=2, tau=0, beta=3.0, guide_upsample="bilinear", guide_size=(1, 2)),
    AttentionCase(dtype=torch.float64, frames=33, tau=15, head_dim=24, adaptive_beta=True),
]


@pytest.mark.parametrize("case", COMPOSED_CASES, ids=str)
def test_composed_path_matches_float64_formula(case):
    inputs = make_inputs(case, seed=2)
    out, plain_map, stats = _call(case, inputs, return_map=True, return_stats=True)
    assert stats.shape == (case.params().stats_rows(case.batch), 6)
    assert_matches(case, inputs, out, plain_map, stats)
    assert_matches(case, inputs, _call(case, inputs))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_reference_backend_float64_is_the_formula(backend, monkeypatch):
    monkeypatch.setenv("BYTHEWAY_BACKEND", backend)
    case = AttentionCase(dtype=torch.float64, adaptive_beta=True, beta=4.0)
    inputs = make_inputs(case, seed=5)
    out, stats = _call(case, inputs, return_stats=True)
    assert_matches(case, inputs, out, stats=stats)


def test_return_flags_shapes_and_dtypes():
    case = AttentionCase(dtype=torch.bfloat16, batch=4, energy_scope="sample")
    inputs = make_inputs(case)
    out = _call(case, inputs)
    assert isinstance(out, torch.Tensor) and out.shape == inputs[0].shape
    out, plain_map = _call(case, inputs, return_map=True)
    assert plain_map.shape == (4, 2, 2, 2, 16, 16) and plain_map.dtype == torch.bfloat16
    out, stats = _call(case, inputs, return_stats=True)
    assert stats.shape == (2, 6) and stats.dtype == torch.float32
    out, plain_map, stats = _call(case, inputs, return_map=True, return_stats=True)
    assert plain_map.shape == (4, 2, 2, 2, 16, 16) and stats.shape == (2, 6)


def test_strided_qkv_slices_equal_contiguous_copies():
    case = AttentionCase(head_dim=40, adaptive_beta=True)
    q, k, v, guide = make_inputs(case)
    assert not q.is_contiguous() and q.stride(-1) == 1
    strided = _call(case, (q, k, v, guide))
    copies = _call(case, (q.contiguous(), k.contiguous(), v.contiguous(), guide))
    torch.testing.assert_close(strided, copies, atol=1e-6, rtol=1e-6)
    # any other stride of the first two dims as well
    q2 = q.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(_call(case, (q2, k, v, guide)), copies, atol=1e-6, rtol=1e-6)


def test_empty_batch():
    case = AttentionCase(batch=0)
    q, k, v, guide = make_inputs(case)
    out, stats = _call(case, (q, k, v, guide), return_stats=True)
    assert out.shape == q.shape
    assert stats.tolist() == [[1.5, 0.0, 0.0, 0.0, 0.0, 0.0]]


def _good():
    case = AttentionCase()
    q, k, v, guide = make_inputs(case)
    return dict(q=q, k=k, v=v, heads=2, height=2, width=2, guide=guide, **BYTHEWAY)


@pytest.mark.parametrize("change,match", [
    (dict(q="q"), r"q must be a torch.Tensor"),
    (lambda a: a.update(q=a["q"].to(torch.int32)), r"q must be a floating-point"),
    (lambda a: a.update(**{name: a[name].to(torch.float8_e5m2) for name in "qkv"}),
     r"q must be a floating-point .* got dtype torch.float8_e5m2"),
    (lambda a: a.update(k=a["k"][0]), r"k must be 3-D"),
    (lambda a: a.update(v=a["v"][:, :8]), r"v shape .* must equal q's"),
    (lambda a: a.update(k=a["k"].double()), r"k dtype torch.float64 must equal q's"),
    (lambda a: a.update(v=a["v"].to("meta")), r"v is on meta but q is on cpu"),
    (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
     r"q must have a contiguous last dim"),
    (dict(heads=3), r"C=16 of q is not divisible by heads=3"),
    (dict(heads=0), r"heads must be a positive int"),
    (dict(heads=2.0), r"heads must be a positive int"),
    (dict(height=3), r"B\*H\*W=8 is not a multiple of height\*width=3\*2"),
    (dict(width=-1), r"width must be a positive int"),
    (dict(scale=0.0), r"scale must be > 0"),
    (dict(scale=float("inf")), r"scale must be a finite"),
    (dict(scale="1"), r"scale must be a finite"),
    (dict(scale=1e39), r"scale must be <= 2.3586[56]e\+38"),  # inf in the float32 scores
    (dict(scale=3e38), r"scale must be <= 2.3586[56]e\+38"),  # inf once the kernel folds in log2(e)
    (dict(heads=True), r"heads must be a positive int"),
    (dict(return_map=np.int64(1)), r"return_map must be a bool"),
    (lambda a: a.update(guide=a["guide"][:, :, :, :1]), r"guide shape .* must match"),
    (lambda a: a.update(guide=a["guide"].expand(2, 3, 1, 2, 16, 16)), r"guide spatial size \(3, 1\)"),
    (lambda a: a.update(guide=a["guide"][0]), r"guide must be 6-D"),
    (dict(guide="x"), r"guide must be a torch.Tensor or None"),
    (dict(tau=8), r"tau=8 is invalid for F=16"),
    (dict(tau=1.0), r"tau must be an integer"),
    (dict(alpha=2.0), r"alpha must be <= 1"),
    (dict(beta=-1.0), r"beta must be >= 0"),
    (dict(beta_max=1.0), r"beta_max must be >= 1.5"),
    (dict(energy_scope="video"), r"energy_scope must be one of"),
    (dict(guide_upsample="bicubic"), r"guide_upsample must be one of"),
    (dict(adaptive_beta=1), r"adaptive_beta must be a bool"),
    (dict(cfg=1), r"cfg must be a bool"),
    (dict(batch_split=(2, 2)), r"batch_split"),
    (dict(batch_split=(4, 1)), r"not divisible by 4"),
    (dict(return_map=1), r"return_map must be a bool"),
    (dict(return_stats=None), r"return_stats must be a bool"),
])
def test_bad_arguments_raise_value_error_naming_them(change, match):
    args = _good()
    if callable(change):
        change(args)
    else:
        args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        btw.temporal_attention(q, k, v, **args)


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_tau_default_is_validated_against_frames(frames):
    case = AttentionCase(frames=frames, guide_size=None)
    q, k, v, _ = make_inputs(case)
    if frames < 2:
        with pytest.raises(ValueError, match="at least F=2"):
            btw.temporal_attention(q, k, v, heads=2, height=2, width=2)
    else:
        assert btw.temporal_attention(q, k, v, heads=2, height=2, width=2).shape == q.shape


def test_numpy_scalars_are_accepted_as_python_ones():
    """heads, height, width as numpy ints and the flags as numpy bools, as the numbers may be."""
    case = AttentionCase(frames=8, guide_size=None)
    q, k, v, _ = make_inputs(case)
    want = btw.temporal_attention(q, k, v, heads=2, height=2, width=2, return_map=True)
    got = btw.temporal_attention(q, k, v, heads=np.int64(2), height=np.int32(2), width=np.uint8(2),
                                 return_map=np.bool_(True), return_stats=np.bool_(False))
    assert len(got) == 2
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_meta_tensors_give_shapes_only():
    q = torch.empty(8, 8, 16, device="meta")
    out, plain_map, stats = btw.temporal_attention(q, q, q, heads=2, height=2, width=2, alpha=0.6,
                                                   beta=1.5, tau=3, return_map=True, return_stats=True)
    assert out.device.type == "meta" and out.shape == q.shape
    assert plain_map.shape == (2, 2, 2, 2, 8, 8) and stats.shape == (1, 6)


def test_fused_available_follows_the_backend(monkeypatch):
    monkeypatch.delenv("BYTHEWAY_BACKEND", raising=False)
    assert not fused_available("cpu")
    assert fused_available(torch.device("cuda"))
    monkeypatch.setenv("BYTHEWAY_BACKEND", "reference")
    assert not fused_available("cuda")


@pytest.mark.parametrize("with_guide,with_map,with_stats,adaptive", [
    (True, True, True, True), (False, False, False, False), (True, False, True, False),
])
def test_opcheck(with_guide, with_map, with_stats, adaptive):
    case = AttentionCase(frames=8, head_dim=8)
    q, k, v, guide = make_inputs(case)
    args = (q, k, v, guide if with_guide else None, 2, 2, 2, 0.35, 0.6, 1.5, 3, adaptive, 2, 1,
            "batch", "bilinear", None, with_map, with_stats)
    torch.library.opcheck(temporal_attention_op, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    case = AttentionCase(adaptive_beta=True)
    q, k, v, guide = make_inputs(case)

    def layer(qkv, guide):
        q, k, v = qkv.split(16, dim=-1)
        out, stats = btw.temporal_attention(q, k, v, heads=2, height=2, width=2, guide=guide,
                                            adaptive_beta=True, return_stats=True, **BYTHEWAY)
        return out * 2.0, stats

    qkv = torch.cat([q, k, v], dim=-1)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(qkv, guide), layer(qkv, guide)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_compile_compiles_once_whatever_eager_calls_do(monkeypatch):
    """Eager calls' validation cache is neither read nor filled by a compiled call's trace, so
    eager calls with new arguments do not make a compiled function recompile."""
    from torch._dynamo.testing import CompileCounter

    from bytheway_kernels.ops.temporal_attention import op

    monkeypatch.setattr(op, "_VALIDATED", {})
    torch._dynamo.reset()
    case = AttentionCase(frames=8)
    q, k, v, guide = make_inputs(case)

    def layer(q, alpha=0.6):
        return btw.temporal_attention(q, k, v, heads=2, height=2, width=2, guide=guide, alpha=alpha,
                                      beta=1.5, tau=2, adaptive_beta=True)

    counter = CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    want = layer(q)
    assert len(op._VALIDATED) == 1
    for alpha in (None, 0.5, 0.4):
        if alpha is not None:
            layer(q, alpha)
        torch.testing.assert_close(compiled(q), want, rtol=0, atol=0)
    assert counter.frame_count == 1 and len(op._VALIDATED) == 3


def test_torch_compile_fullgraph_with_changing_float_arguments():
    """alpha, beta and scale as inputs of the compiled function: a new value makes them symbolic
    floats (dynamic=None, the default, after the first change; dynamic=True at once), which the
    validation checks by comparisons that torch.compile traces."""
    case = AttentionCase(frames=8)
    q, k, v, guide = make_inputs(case)

    def layer(q, alpha, beta, scale):
        return btw.temporal_attention(q, k, v, heads=2, height=2, width=2, guide=guide, alpha=alpha,
                                      beta=beta, scale=scale, tau=2, adaptive_beta=True)

    for dynamic in (None, True):
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=dynamic)
        for alpha, beta, scale in ((0.1, 1.31, 0.3), (0.2, 1.47, 0.4), (0.3, 2.0, 0.5)):
            torch.testing.assert_close(compiled(q, alpha, beta, scale), layer(q, alpha, beta, scale),
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_composed_zero_guide_with_alpha_one_is_the_unguided_result(adaptive, backend, monkeypatch):
    """Every guided row sums to 0: each keeps the unguided map (energies too), as in the map op
    (to rounding: the C++ kernel orders its fp32 sums differently with and without a guide)."""
    monkeypatch.setenv("BYTHEWAY_BACKEND", backend)
    case = AttentionCase(adaptive_beta=adaptive, alpha=1.0, head_dim=40, dtype=torch.float16)
    q, k, v, guide = make_inputs(case)
    zero_guide = torch.zeros_like(guide)
    got = _call(case, (q, k, v, zero_guide), return_map=True, return_stats=True)
    unguided = dataclasses.replace(case, guide_size=None, alpha=0.0)
    want = _call(unguided, (q, k, v, None), return_map=True, return_stats=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)  # float16: rtol 1e-3, one ulp of the rounded output
    assert_matches(case, (q, k, v, zero_guide), *got)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_composed_beta_at_its_limit_stays_finite(dtype, adaptive):
    """beta = BETA_LIMIT (1e6): out of the float32 composition exceeds float16's range, so
    float16 saturates at +-65504 (and matches the clamped formula); the others match the formula."""
    case = AttentionCase(dtype=dtype, beta=1e6, adaptive_beta=adaptive, head_dim=40,
                         beta_max=1e6 if adaptive else None)
    inputs = make_inputs(case)
    out, stats = _call(case, inputs, return_stats=True)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()
    if dtype != torch.float16:
        assert_matches(case, inputs, out, stats=stats)
        return
    assert (out.abs() == 65504).any()
    want, _, _, bound = expected(case, *inputs)
    error = (out.double() - want.clamp(-65504, 65504)).abs()
    assert (error <= OUT_TOLERANCE[torch.float16] * bound + 1e-6).all()


def test_eager_calls_skip_the_custom_op_and_cache_only_valid_signatures(monkeypatch):
    """Plain eager calls run the implementation directly (the op is not called); a cached valid
    signature never hides a bad argument of the same shapes."""
    from bytheway_kernels.ops.temporal_attention import op as op_module

    def refuse(*args):
        raise AssertionError("the custom op was called")

    case = AttentionCase(adaptive_beta=True)
    inputs = make_inputs(case)
    want = _call(case, inputs)
    monkeypatch.setattr(op_module, "temporal_attention_op", refuse)
    torch.testing.assert_close(_call(case, inputs), want, atol=0, rtol=0)
    for bad, match in ((dict(alpha=True), "alpha must be a finite"),
                       (dict(adaptive_beta=1), "adaptive_beta must be a bool"),
                       (dict(beta=-1.0), "beta must be >= 0")):
        with pytest.raises(ValueError, match=match):
            _call(case, inputs, **bad)
    class PassThrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with pytest.raises(AssertionError, match="custom op was called"), PassThrough():
        _call(case, inputs)  # a Python mode: through the op
