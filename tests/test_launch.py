"""The launch description (`KernelLaunch`) and the direct launcher, on by default (bytheway_kernels/ops/launch.py).

The direct launcher's call into a compiled kernel needs a GPU, so here it meets a stand-in kernel
that records what it is called with: the tests check that it calls the kernel Triton compiled
with the arguments `JITFunction.run` would pass, and that every change Triton could specialise on
sends the call back through Triton. benchmarks/gpu_session.sh runs the CUDA tests with it on.
"""

import pytest
import torch

from bytheway_kernels.ops import launch as launch_module
from bytheway_kernels.ops.launch import DIRECT_LAUNCH_ENV, KernelLaunch, direct_launch_enabled
from bytheway_kernels.ops.attention_probs.op import _validated_params

STREAM = 1234
GRID = (7, 3)


class RecordingCompiledKernel:
    """Stands in for triton.compiler.CompiledKernel: records its launcher's calls."""

    function = "function-handle"
    packed_metadata = ("warps", "ctas", "shared")

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class RecordingKernel:
    """Stands in for a JITFunction: `kernel[grid](**kwargs)` records the call (Triton's path)."""

    def __init__(self, arg_names):
        self.arg_names = list(arg_names)
        self.pre_run_hooks = []
        self.compiled = RecordingCompiledKernel()
        self.triton_calls = []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.triton_calls.append((grid, kwargs))
            return self.compiled

        return launch


@pytest.fixture
def direct(monkeypatch):
    """Direct launches on, as on a GPU with a supported Triton; an empty cache before and after."""
    monkeypatch.setenv(DIRECT_LAUNCH_ENV, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(launch_module, "_triton_version", lambda: "3.6.0")
    monkeypatch.setattr(launch_module, "_device_and_stream", lambda: (0, STREAM))
    launch_module._DIRECT_CACHE.clear()
    yield
    launch_module._DIRECT_CACHE.clear()


def _values(dtype=torch.float16, offset=0, count=5, flag=True):
    storage = torch.zeros(64, dtype=dtype)
    return dict(x_ptr=storage[offset:], out_ptr=torch.zeros(64, dtype=dtype), count=count, alpha=0.5,
                WITH_MAP=flag)


CONSTANTS = dict(F=16, BLOCK=64, num_warps=4)
ARG_NAMES = ("x_ptr", "F", "count", "out_ptr", "alpha", "BLOCK", "WITH_MAP")


def test_direct_launch_calls_the_compiled_kernel_as_triton_does(direct):
    kernel = RecordingKernel(ARG_NAMES)
    KernelLaunch(kernel, GRID, CONSTANTS, _values()).run()
    assert len(kernel.triton_calls) == 1 and kernel.compiled.calls == []  # compiled by Triton

    values = _values()
    KernelLaunch(kernel, GRID, CONSTANTS, values).run()
    assert len(kernel.triton_calls) == 1
    (call,) = kernel.compiled.calls
    # this call's tensors as their data pointers (ints: the C launcher's fast path), in order
    expected_arguments = [values["x_ptr"].data_ptr(), 16, 5, values["out_ptr"].data_ptr(), 0.5, 64, True]
    assert call[:9] == (7, 3, 1, STREAM, "function-handle", ("warps", "ctas", "shared"), None, None, None)
    assert list(call[9:]) == expected_arguments
    assert [type(got) for got in call[9:]] == [int, int, int, int, float, int, bool]
    assert call[9] != kernel.triton_calls[0][1]["x_ptr"].data_ptr()  # not the first call's tensor


@pytest.mark.parametrize("change", ["dtype", "misaligned tensor", "int value", "bool for int",
                                    "constexpr value", "equal constants, another object"])
def test_a_new_signature_goes_through_triton(direct, change):
    kernel = RecordingKernel(ARG_NAMES)
    baseline_count = 1 if change == "bool for int" else 5  # True == 1 and hash(True) == hash(1)
    KernelLaunch(kernel, GRID, CONSTANTS, _values(count=baseline_count)).run()
    constants, values = CONSTANTS, _values(count=baseline_count)
    if change == "dtype":
        values = _values(dtype=torch.bfloat16)
    elif change == "misaligned tensor":
        values = _values(offset=1)  # 2 bytes past a 16-byte boundary
    elif change == "int value":
        values = _values(count=16)
    elif change == "bool for int":
        values = _values(count=True)
    elif change == "constexpr value":
        values = _values(flag=False)
    else:
        constants = dict(CONSTANTS)
    KernelLaunch(kernel, GRID, constants, values).run()
    assert len(kernel.triton_calls) == 2 and kernel.compiled.calls == []
    KernelLaunch(kernel, GRID, constants, values).run()  # now remembered
    assert len(kernel.triton_calls) == 2 and len(kernel.compiled.calls) == 1


def _launcher_without_a_compile():
    """Triton's own CudaLauncher, its attributes set by hand (its __init__ compiles C), with a
    recording C launch function."""
    from triton.backends.nvidia.driver import CudaLauncher

    launcher = CudaLauncher.__new__(CudaLauncher)
    launcher.c_calls = []
    launcher.launch = lambda *args: launcher.c_calls.append(args)
    launcher.global_scratch_size = launcher.profile_scratch_size = 0
    launcher.global_scratch_align = launcher.profile_scratch_align = 1
    launcher.num_ctas = 1
    launcher.launch_cooperative_grid, launcher.launch_pdl = False, True
    return launcher


def test_c_launch_passes_what_tritons_launcher_would(direct, monkeypatch):
    """Under Triton 3.6 the direct launcher calls the C function under the compiled kernel's
    launcher itself, with exactly the arguments that launcher's own __call__ passes it (checked
    against Triton's CudaLauncher when 3.6 is installed: tests/test_triton36_interpreter.py runs
    this file under it). Other releases, kernels that need scratch memory and other launchers
    keep the launcher's call."""
    import triton

    installed = triton.__version__
    monkeypatch.setattr(launch_module, "_triton_version", lambda: installed)
    kernel = RecordingKernel(ARG_NAMES)
    launcher = kernel.compiled.run = _launcher_without_a_compile()
    if not installed.startswith("3.6."):
        assert launch_module._c_launch(kernel.compiled) == (None, ())
        return
    KernelLaunch(kernel, GRID, CONSTANTS, _values()).run()  # compiled (and launched) by Triton
    values = _values()
    KernelLaunch(kernel, GRID, CONSTANTS, values).run()
    arguments = [values["x_ptr"].data_ptr(), 16, 5, values["out_ptr"].data_ptr(), 0.5, 64, True]
    launcher(7, 3, 1, STREAM, "function-handle", ("warps", "ctas", "shared"), None, None, None, *arguments)
    direct_call, triton_call = launcher.c_calls
    assert direct_call == triton_call and direct_call[:5] == (7, 3, 1, STREAM, "function-handle")
    launcher.global_scratch_size = 128  # needs scratch memory: the launcher allocates it
    assert launch_module._c_launch(kernel.compiled) == (None, ())
    launcher.global_scratch_size = 0
    monkeypatch.setattr(launch_module, "_triton_version", lambda: "3.9.0")
    assert launch_module._c_launch(kernel.compiled) == (None, ())


def test_launch_hooks_send_every_launch_through_triton(direct):
    from triton import knobs

    kernel = RecordingKernel(ARG_NAMES)
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(3):
            KernelLaunch(kernel, GRID, CONSTANTS, _values()).run()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.triton_calls) == 3 and kernel.compiled.calls == []


def test_a_parameter_left_to_its_default_keeps_tritons_path(direct):
    kernel = RecordingKernel(ARG_NAMES + ("DEFAULTED",))
    for _ in range(2):
        KernelLaunch(kernel, GRID, CONSTANTS, _values()).run()
    assert len(kernel.triton_calls) == 2 and kernel.compiled.calls == []


def test_direct_launch_needs_the_switch_compiled_kernels_and_a_known_triton(direct, monkeypatch):
    assert direct_launch_enabled()
    monkeypatch.setattr(launch_module, "_triton_version", lambda: "3.4.0")
    assert not direct_launch_enabled()
    monkeypatch.setattr(launch_module, "_triton_version", lambda: "3.9.1")
    assert direct_launch_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not direct_launch_enabled()
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv(DIRECT_LAUNCH_ENV)
    assert direct_launch_enabled()  # on by default
    monkeypatch.setenv(DIRECT_LAUNCH_ENV, "0")
    assert not direct_launch_enabled()
    monkeypatch.setenv(DIRECT_LAUNCH_ENV, "off")  # was read as on: only "0" turned it off
    assert not direct_launch_enabled()
    monkeypatch.setenv(DIRECT_LAUNCH_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "true")  # Triton's interpreter is on: no compiled kernels
    assert not direct_launch_enabled()


def _op_launches():
    """Launches of both ops' Triton backends in their main variants (fixed, adaptive, stats, map)."""
    from bytheway_kernels.ops.attention_probs import triton as map_kernels
    from bytheway_kernels.ops.params import ByTheWayParams
    from bytheway_kernels.ops.temporal_attention import triton as attention_kernels

    launches = []
    frames, heads, head_dim = 16, 2, 40
    for adaptive, tau in ((False, 7), (True, 7), (True, 1)):
        params = ByTheWayParams(0.6, 1.5, tau, adaptive, 2, 1, "batch", "nearest", None)
        scores = torch.zeros((2, 2, 2, heads, frames, frames))
        guide = torch.zeros((2, 1, 1, heads, frames, frames))
        stats = torch.empty((1, 6)) if adaptive else None
        launches += map_kernels.kernel_launches(scores, guide, params, torch.empty_like(scores), stats)
        q, k, v = torch.zeros((8, frames, 3 * heads * head_dim), dtype=torch.float16).split(heads * head_dim, -1)
        out = torch.empty((8, frames, heads * head_dim), dtype=torch.float16)
        plain_map = torch.empty((2, 2, 2, heads, frames, frames), dtype=torch.float16)
        launches += attention_kernels.kernel_launches(q, k, v, guide.half(), heads, 2, 2, head_dim ** -0.5,
                                                      params, out, plain_map, stats)
    return launches


def test_op_launches_give_every_kernel_parameter_once():
    """What the direct launcher relies on: constants and values never share a name and together
    name every kernel parameter; the only other names are launch options."""
    launches = _op_launches()
    kernels = {launch.kernel for launch in launches}
    assert len(kernels) == 5  # map op: stats, apply; fused attention: energy, beta, attention
    for launch in launches:
        assert not set(launch.constants) & set(launch.values)
        names = set(launch.kernel.arg_names)
        assert names <= set(launch.args)
        assert set(launch.args) - names <= {"num_warps", "num_stages", "maxnreg"}


def test_op_launch_constants_are_one_object_per_call_signature():
    """The direct launcher keys its cache on the constants object: a repeated call must hand over
    the same dict, not an equal copy (else every launch would take Triton's path)."""
    first, second = _op_launches(), _op_launches()
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.kernel is b.kernel and a.constants is b.constants


def test_info_says_how_triton_kernels_are_launched(monkeypatch, capsys):
    from bytheway_kernels.check import print_info

    monkeypatch.delenv(DIRECT_LAUNCH_ENV, raising=False)
    print_info()
    assert f"Triton launches: through Triton ({DIRECT_LAUNCH_ENV}=unset)" in capsys.readouterr().out
    monkeypatch.setenv(DIRECT_LAUNCH_ENV, "1")  # the interpreter (or no CUDA) keeps Triton's path
    print_info()
    assert f"Triton launches: through Triton ({DIRECT_LAUNCH_ENV}=1)" in capsys.readouterr().out


class _TensorOnDevice:
    """Stands in for a CUDA tensor on device `index` (this machine has none)."""

    def __init__(self, index: int):
        self.index = index

    def get_device(self) -> int:
        return self.index


def test_launches_run_with_their_inputs_device_current(monkeypatch):
    current, guarded, seen = [0], [], []

    class DeviceGuard:  # torch.cuda.device: makes `index` current inside the block
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            guarded.append(self.index)
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    class Launch:  # the interpreter's path (conftest.py sets TRITON_INTERPRET): through Triton
        def run_through_triton(self):
            seen.append(current[0])

    monkeypatch.setattr(launch_module, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", DeviceGuard)
    launch_module.run_on_device_of(_TensorOnDevice(1), [Launch(), Launch()])
    assert seen == [1, 1] and guarded == [1] and current == [0]  # both on cuda:1, then cuda:0 again
    launch_module.run_on_device_of(_TensorOnDevice(0), [Launch()])  # already current: no guard
    launch_module.run_on_device_of(torch.zeros(1), [Launch()])  # a CPU tensor (the interpreter)
    assert seen == [1, 1, 0, 0] and guarded == [1]


class _NamedCompiledKernel(RecordingCompiledKernel):
    """A compiled stand-in that records its launches, with its kernel's name, into a shared list."""

    def __init__(self, name, calls):
        super().__init__()
        self.name, self.calls = name, calls

    def run(self, *args):
        self.calls.append((self.name, args))


@pytest.fixture
def stubbed_map_op():
    """The map op's Triton backend on CPU tensors with the direct launcher on and compiled kernels
    that record their launches: CPU tensors' device (-1) is the current one, on stream STREAM.
    (Not through the `monkeypatch` fixture: a test's own patches of the stubbed names must be
    undone before the stubs are.)"""
    from bytheway_kernels.testing import direct_launches_stubbed

    calls, compiled = [], {}

    def through_triton(launch):
        name = launch.kernel.__name__
        compiled.setdefault(name, _NamedCompiledKernel(name, calls))
        calls.append((name, "compiled by Triton"))
        return compiled[name]

    with pytest.MonkeyPatch.context() as patch, direct_launches_stubbed(through_triton, STREAM):
        patch.setenv("BYTHEWAY_BACKEND", "triton")
        yield calls


def _symbolic(calls, named_tensors):
    """`calls` with each pointer of `named_tensors` (name -> tensor) replaced by its name."""
    names = {tensor.data_ptr(): name for name, tensor in named_tensors.items()}
    return [(kernel, tuple(names.get(argument, argument) if type(argument) is int else argument
                           for argument in args)) for kernel, args in calls]


@pytest.mark.parametrize("mode", ["fixed", "adaptive", "fixed with stats", "adaptive with stats",
                                  "adaptive, no guide", "fixed, banded"])
def test_map_op_eager_repeats_launch_what_the_general_path_would(stubbed_map_op, mode):
    """A repeated eager call signature launches its prepared kernels directly: the same kernels
    with the same arguments, this call's tensors in their places, as the general path (the
    launch plan, launch objects and `_launch_direct`) launches for the same tensors."""
    import bytheway_kernels as btw
    from bytheway_kernels.ops.attention_probs import triton as map_kernels
    from bytheway_kernels.ops import workspace as workspace_module

    calls = stubbed_map_op
    kwargs = dict(alpha=0.6, beta=1.5, tau=3 if "banded" in mode else 7,
                  adaptive_beta=mode.startswith("adaptive"), return_stats="stats" in mode)
    shape = (2, 4, 4, 2, 16, 16)

    def inputs(seed):
        generator = torch.Generator().manual_seed(seed)
        scores = torch.randn(shape, generator=generator)
        guide = None if "no guide" in mode else torch.rand((2, 2, 2, 2, 16, 16), generator=generator)
        return scores, guide

    first = inputs(0)
    btw.bytheway_attention_probs(*first, **kwargs)  # compiled by "Triton", then prepared
    assert len(map_kernels._EAGER_CALLS) == 1
    calls.clear()
    scores, guide = inputs(1)
    repeated = btw.bytheway_attention_probs(scores, guide, **kwargs)
    probs, stats = repeated if kwargs["return_stats"] else (repeated, None)
    assert calls and all(args != "compiled by Triton" for _, args in calls)
    named = dict(scores=scores, probs=probs)
    if guide is not None:
        named["guide"] = guide
    if stats is not None:
        named["stats"] = stats
    for _, workspace in workspace_module._REUSED.values():
        named["workspace"] = workspace
    repeat_calls = _symbolic(calls, named)
    calls.clear()
    map_kernels._EAGER_CALLS.clear()  # the general path, same tensors, same outputs
    params, _ = _validated_params(scores, guide, 0.6, 1.5, kwargs["tau"], kwargs["adaptive_beta"], True,
                                  "batch", "nearest", None, None, kwargs["return_stats"])
    map_kernels._launch_out(scores, guide, params, probs, stats, reuse_workspace=True)
    assert repeat_calls == _symbolic(calls, named)
    assert len(repeat_calls) == (2 if kwargs["adaptive_beta"] or stats is not None else 1)


@pytest.mark.parametrize("change", ["misaligned scores", "non-contiguous guide", "direct launch off",
                                    "launch hook", "pre-run hook", "band product", "plans cleared",
                                    "guide is the scores"])
def test_map_op_eager_repeat_falls_back_to_the_general_path(stubbed_map_op, monkeypatch, change):
    """What a repeat's key does not fix sends it down the general path: unaligned pointers (another
    compiled specialisation), non-contiguous inputs, the launcher switched off or hooked (a launch
    hook, or a kernel's pre-run hook), another band product (`testing.band_product`), launch plans
    cleared after a tuning change; a call
    whose guide is its scores is never prepared (one tensor in two roles)."""
    import bytheway_kernels as btw
    from bytheway_kernels.ops.attention_probs import triton as map_kernels

    calls = stubbed_map_op
    kwargs = dict(alpha=0.6, beta=1.5, tau=7)
    storage = torch.randn(2 * 4 * 4 * 2 * 16 * 16 + 1)
    scores = storage[:-1].view(2, 4, 4, 2, 16, 16)
    guide = torch.rand((2, 2, 2, 2, 16, 16))
    if change == "guide is the scores":
        btw.bytheway_attention_probs(scores, scores, **kwargs)
        assert not map_kernels._EAGER_CALLS
        return
    btw.bytheway_attention_probs(scores, guide, **kwargs)
    assert len(map_kernels._EAGER_CALLS) == 1
    if change == "misaligned scores":
        scores = storage[1:].view(2, 4, 4, 2, 16, 16)  # 4 bytes past a 16-byte boundary
    elif change == "non-contiguous guide":
        guide = guide.transpose(1, 2)
    elif change == "direct launch off":
        monkeypatch.setattr(launch_module, "direct_launch_enabled", lambda: False)
    elif change == "launch hook":
        monkeypatch.setattr(launch_module, "_hooks_are_empty", lambda knobs: False)
    elif change == "pre-run hook":  # `_launch_direct` sends such a kernel through Triton
        monkeypatch.setattr(map_kernels._apply_kernel, "pre_run_hooks", [lambda *args, **kwargs: None])
    elif change == "band product":
        from bytheway_kernels.ops import triton_rules

        monkeypatch.setattr(triton_rules, "BAND_PRODUCT", "fma")
    else:
        map_kernels.clear_launch_plans()
        assert not map_kernels._EAGER_CALLS
    calls.clear()
    with_general = []
    original = map_kernels._launch_out
    monkeypatch.setattr(map_kernels, "_launch_out", lambda *args, **kw: with_general.append(1) or original(*args, **kw))
    btw.bytheway_attention_probs(scores, guide, **kwargs)
    assert with_general == [1]
