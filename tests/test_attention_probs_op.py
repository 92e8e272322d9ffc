"""The public function and the torch custom op: validation, dispatch, opcheck, torch.compile."""

import numpy as np
import pytest
import torch

import bytheway_kernels as btw
from bytheway_kernels.ops.attention_probs import reference
from attention_probs_cases import Case, make_inputs, needs_triton_interpreter

GOOD = dict(alpha=0.6, beta=1.5, tau=7)


def _inputs(batch=2, frames=16, guide=(2, 2)):
    return make_inputs(Case(batch=batch, frames=frames, guide_size=guide))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(tau=8), r"tau=8 is invalid for F=16"),
        (dict(tau=-1), r"tau=-1 is invalid for F=16"),
        (dict(tau=2.0), r"tau must be an integer"),
        (dict(alpha=1.5), r"alpha must be <= 1"),
        (dict(alpha=-0.1), r"alpha must be >= 0"),
        (dict(alpha=float("nan")), r"alpha must be a finite"),
        (dict(beta=-1.0), r"beta must be >= 0"),
        (dict(beta_max=1.0), r"beta_max must be >= 1.5"),
        (dict(energy_scope="video"), r"energy_scope must be one of"),
        (dict(guide_upsample="bicubic"), r"guide_upsample must be one of"),
        (dict(adaptive_beta=1), r"adaptive_beta must be a bool"),
        (dict(batch_split=(3, 3)), r"batch_split"),
        (dict(batch_split=(3, 1)), r"not divisible by 3"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(change, match):
    scores, guide = _inputs()
    with pytest.raises(ValueError, match=match):
        btw.bytheway_attention_probs(scores, guide, **{**GOOD, **change})


def test_fixed_beta_takes_an_odd_batch_with_the_default_cfg():
    """cfg=True's halves matter only to the energies: fixed beta without stats takes any batch
    and equals the one-part result; adaptive beta and stats still refuse an odd batch."""
    odd, guide = _inputs(batch=3)
    fixed = dict(GOOD, adaptive_beta=False)
    probs = btw.bytheway_attention_probs(odd, guide, **fixed)
    torch.testing.assert_close(probs, btw.bytheway_attention_probs(odd, guide, cfg=False, **fixed),
                               atol=0, rtol=0)
    expected = reference.bytheway_attention_probs(odd.double(), guide.double(), cfg=False, **fixed)
    torch.testing.assert_close(probs.double(), expected, atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="cfg=True needs an even batch"):
        btw.bytheway_attention_probs(odd, guide, **fixed, return_stats=True)
    with pytest.raises(ValueError, match=r"batch_split=\(3, 1\)"):
        btw.bytheway_attention_probs(odd[:2], guide[:2], **fixed, batch_split=(3, 1))


def test_bad_tensors_raise_value_error():
    scores, guide = _inputs()
    with pytest.raises(ValueError, match="6-D"):
        btw.bytheway_attention_probs(scores[0], **GOOD)
    with pytest.raises(ValueError, match="equal last two dims"):
        btw.bytheway_attention_probs(scores[..., :8], **GOOD)
    with pytest.raises(ValueError, match="floating-point"):
        btw.bytheway_attention_probs(scores.to(torch.int32), **GOOD)
    with pytest.raises(ValueError, match="guide must be a floating-point"):
        btw.bytheway_attention_probs(scores, guide.to(torch.int64), **GOOD)
    with pytest.raises(ValueError, match="match scores"):
        btw.bytheway_attention_probs(scores, guide[:, :, :, :1], **GOOD)
    with pytest.raises(ValueError, match="must not exceed"):
        big_guide = torch.softmax(torch.randn(2, 8, 8, 2, 16, 16), -1)
        btw.bytheway_attention_probs(scores, big_guide, **GOOD)
    with pytest.raises(ValueError, match="cfg=True needs an even batch"):
        odd, _ = _inputs(batch=3, guide=None)
        btw.bytheway_attention_probs(odd, **GOOD)
    with pytest.raises(ValueError, match=r"F=1"):
        btw.bytheway_attention_probs(torch.zeros(2, 1, 1, 1, 1, 1), alpha=0.5, beta=1.0, tau=0)


def test_config_and_presets():
    assert btw.PRESETS["animatediff"].op_kwargs()["alpha"] == 0.6
    assert btw.PRESETS["videocrafter2"].beta == 10.0
    assert btw.PRESETS["videocrafter2"].step_fraction == 0.2
    assert btw.PRESETS["animatediff"].replace(beta=2.0).beta == 2.0
    with pytest.raises(ValueError, match="alpha"):
        btw.ByTheWayConfig(alpha=2.0, beta=1.5, tau=7)
    with pytest.raises(ValueError, match="unknown ByTheWayConfig field"):
        btw.PRESETS["animatediff"].replace(gamma=1)
    with pytest.raises(TypeError):  # read-only: apply_bytheway's and the scripts' defaults
        btw.PRESETS["animatediff"] = btw.PRESETS["videocrafter2"]
    # numpy strings become str (torch.compile cannot trace a numpy.str_ into the op)
    config = btw.PRESETS["animatediff"].replace(energy_scope=np.str_("sample"), guide_upsample=np.str_("bilinear"))
    assert type(config.energy_scope) is str and type(config.guide_upsample) is str


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton_interpreter)])
def test_dispatch_env_and_outputs(backend, monkeypatch):
    monkeypatch.setenv("BYTHEWAY_BACKEND", backend)
    assert btw.select_backend(torch.device("cpu")) == backend
    scores, guide = _inputs(batch=4)
    probs, stats = btw.bytheway_attention_probs(scores, guide, **GOOD, energy_scope="sample",
                                                return_stats=True)
    assert probs.shape == scores.shape and probs.dtype == scores.dtype
    assert stats.shape == (2, 6) and stats.dtype == torch.float32
    ref = btw.reference.bytheway_attention_probs(scores, guide, **GOOD, energy_scope="sample")
    torch.testing.assert_close(probs, ref, rtol=2e-5, atol=2e-5)
    assert btw.bytheway_attention_probs(scores, guide, **GOOD).shape == scores.shape


def test_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("BYTHEWAY_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="BYTHEWAY_BACKEND"):
        btw.select_backend(torch.device("cpu"))


@pytest.mark.parametrize("with_guide,with_stats,adaptive", [(True, True, True), (False, False, False)])
def test_opcheck_reference_backend(with_guide, with_stats, adaptive, monkeypatch):
    """The fused backends run the same opcheck in attention_probs_cases.BackendContract."""
    monkeypatch.setenv("BYTHEWAY_BACKEND", "reference")
    scores, guide = _inputs(frames=8)
    args = (scores, guide if with_guide else None, 0.6, 1.5, 3, adaptive, 2, 1, "batch", "bilinear",
            None, with_stats)
    torch.library.opcheck(torch.ops.bytheway.attention_probs.default, args)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton_interpreter), "cpp"])
def test_torch_compile_fullgraph(backend, monkeypatch):
    monkeypatch.setenv("BYTHEWAY_BACKEND", backend)
    torch._dynamo.reset()
    scores, guide = _inputs()
    value = torch.randn(scores.shape[:-1] + (4,))

    def temporal_attention(scores, guide, value):
        probs = btw.bytheway_attention_probs(scores * 1.0, guide, **GOOD)
        return probs @ value

    compiled = torch.compile(temporal_attention, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(scores, guide, value), temporal_attention(scores, guide, value),
                               rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_with_changing_float_arguments(monkeypatch):
    """alpha and beta as inputs of the compiled function become symbolic floats once they change
    (at once with dynamic=True); their validation traces (comparisons, no math.isfinite)."""
    monkeypatch.setenv("BYTHEWAY_BACKEND", "cpp")
    scores, guide = _inputs(frames=8)

    def guided(scores, alpha, beta):
        return btw.bytheway_attention_probs(scores, guide, alpha=alpha, beta=beta, tau=2)

    for dynamic in (None, True):
        torch._dynamo.reset()
        compiled = torch.compile(guided, fullgraph=True, backend="eager", dynamic=dynamic)
        for alpha, beta in ((0.1, 1.31), (0.2, 1.47), (0.3, 2.0)):
            torch.testing.assert_close(compiled(scores, alpha, beta), guided(scores, alpha, beta),
                                       rtol=0, atol=0)


def test_torch_compile_compiles_once_whatever_eager_calls_do(monkeypatch):
    """A compiled call's trace leaves the eager calls' validation cache alone and does not read it,
    so neither its own first call nor eager calls with new arguments make it recompile (a cache
    the trace read was guarded on, and the entry the trace added failed that guard)."""
    from torch._dynamo.testing import CompileCounter

    from bytheway_kernels.ops.attention_probs import op

    monkeypatch.setenv("BYTHEWAY_BACKEND", "cpp")
    monkeypatch.setattr(op, "_VALIDATED", {})
    torch._dynamo.reset()
    scores, guide = _inputs(frames=8)
    counter = CompileCounter()
    compiled = torch.compile(lambda scores: btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=2),
                             fullgraph=True, backend=counter)
    want = btw.bytheway_attention_probs(scores, guide, alpha=0.6, beta=1.5, tau=2)
    assert len(op._VALIDATED) == 1
    for alpha in (None, 0.5, 0.4):
        if alpha is not None:  # an eager call with other arguments: a new cache entry
            btw.bytheway_attention_probs(scores, guide, alpha=alpha, beta=1.5, tau=2)
        torch.testing.assert_close(compiled(scores), want, rtol=0, atol=0)
    assert counter.frame_count == 1 and len(op._VALIDATED) == 3


def test_meta_scores_give_shapes_only():
    """Eager calls on meta tensors allocate the outputs as the fake implementation does (no
    backend runs: the reference's masked indexing has no meta kernel)."""
    scores = torch.empty(4, 2, 2, 1, 8, 8, device="meta")
    guide = torch.empty(4, 1, 1, 1, 8, 8, device="meta")
    probs, stats = btw.bytheway_attention_probs(scores, guide, alpha=0.5, beta=1.5, tau=2,
                                                energy_scope="sample", return_stats=True)
    assert probs.device.type == "meta" and probs.shape == scores.shape
    assert stats.shape == (2, 6) and stats.dtype == torch.float32


@pytest.fixture
def op_calls(monkeypatch):
    """How often the public function went through the custom op (instead of the direct call)."""
    from bytheway_kernels.ops.attention_probs import op

    calls = []
    custom_op = op.attention_probs

    def counting(*args):
        calls.append(args)
        return custom_op(*args)

    monkeypatch.setattr(op, "attention_probs", counting)
    return calls


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton_interpreter), "cpp"])
def test_eager_calls_skip_the_op_and_equal_compiled_calls(backend, op_calls, monkeypatch):
    monkeypatch.setenv("BYTHEWAY_BACKEND", backend)
    torch._dynamo.reset()
    scores, guide = _inputs()
    eager, eager_stats = btw.bytheway_attention_probs(scores, guide, **GOOD, return_stats=True)
    assert op_calls == []  # plain eager: the backend is called directly
    compiled = torch.compile(lambda s, g: btw.bytheway_attention_probs(s, g, **GOOD, return_stats=True),
                             fullgraph=True)
    probs, stats = compiled(scores, guide)
    assert len(op_calls) == 1  # traced once, through the op
    assert torch.equal(probs, eager) and torch.equal(stats, eager_stats)


def test_autograd_and_modes_go_through_the_op(op_calls, monkeypatch):
    monkeypatch.setenv("BYTHEWAY_BACKEND", "reference")
    scores, guide = _inputs()
    btw.bytheway_attention_probs(scores.requires_grad_(), guide, **GOOD)
    assert len(op_calls) == 1
    with torch.no_grad():  # no autograd needed: direct again
        btw.bytheway_attention_probs(scores, guide, **GOOD)
    assert len(op_calls) == 1
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fake_scores, fake_guide = mode.from_tensor(scores.detach()), mode.from_tensor(guide)
    with mode:
        fake = btw.bytheway_attention_probs(fake_scores, fake_guide, **GOOD)
    assert len(op_calls) == 2 and fake.shape == scores.shape


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton_interpreter), "reference"])
def test_float64_is_computed_in_float64(backend, monkeypatch):
    """Logits 1e4 + 3*randn: an fp32 softmax loses ~1e-4; float64 must stay near 1e-15.
    With Triton selected, float64 goes to the C++ kernel (CPU) or the reference."""
    monkeypatch.setenv("BYTHEWAY_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    scores = 1e4 + 3 * torch.randn((2, 2, 2, 2, 16, 16), generator=gen, dtype=torch.float64)
    guide = torch.softmax(torch.randn((2, 1, 1, 2, 16, 16), generator=gen, dtype=torch.float64), -1)
    probs, stats = btw.bytheway_attention_probs(scores, guide, **GOOD, return_stats=True)
    expected = btw.reference.bytheway_attention_probs(scores - 1e4, guide, **GOOD)
    assert probs.dtype == torch.float64 and (probs - expected).abs().max() < 1e-12


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(beta=True), r"beta must be a finite real number"),  # True == 1 == 1.0, but no number
        (dict(tau=7.0), r"tau must be an integer"),  # 7.0 == 7
        (dict(adaptive_beta=1), r"adaptive_beta must be a bool"),  # 1 == True
        (dict(batch_split=(2.0, 1)), r"batch_split"),  # (2.0, 1) == (2, 1)
    ],
)
def test_validation_cache_keeps_types_apart(change, match):
    """A call that passed validation is remembered by its arguments and their types: an equal
    argument of a refused type still gets its ValueError after the good call was cached."""
    scores, guide = _inputs()
    good = dict(GOOD, beta=1.0, adaptive_beta=True, batch_split=(2, 1))
    expected = btw.bytheway_attention_probs(scores, guide, **good)
    torch.testing.assert_close(btw.bytheway_attention_probs(scores, guide, **good), expected)
    with pytest.raises(ValueError, match=match):
        btw.bytheway_attention_probs(scores, guide, **{**good, **change})
    with pytest.raises(ValueError, match="guide shape"):  # shapes are part of what is remembered
        btw.bytheway_attention_probs(scores, guide[:, :, :, :1], **good)


def test_backward_says_the_ops_are_for_inference():
    """No gradient: backpropagating names the op and says to run it under no_grad (torch's own
    error would ask for an autograd formula)."""
    scores, guide = _inputs()
    probs = btw.bytheway_attention_probs(scores.clone().requires_grad_(), guide, **GOOD)
    with pytest.raises(RuntimeError, match=r"bytheway.attention_probs has no gradient: .* for inference"):
        probs.sum().backward()
    q = torch.randn(8, 8, 16, requires_grad=True)
    out = btw.temporal_attention(q, q, q, heads=2, height=2, width=2)
    with pytest.raises(RuntimeError, match=r"bytheway.temporal_attention has no gradient"):
        out.sum().backward()
