"""The interpreter patches `triton.language` once per grid (tests/interpreter_lang_patch.py), under
the current Triton and, through tests/test_triton36_interpreter.py, under Triton 3.6.0."""

import inspect

import pytest
import torch

from attention_probs_cases import needs_triton_interpreter

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = needs_triton_interpreter


@triton.jit
def _twice(values):
    return values * 2


@triton.jit
def _doubling_kernel(out_ptr, CALLS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    values = tl.load(out_ptr + offsets)
    for _ in tl.static_range(CALLS):
        values = _twice(values)
    tl.store(out_ptr + offsets, values)


def test_a_grid_patches_the_language_once_whatever_its_helper_calls(monkeypatch):
    """The language modules are walked (inspect.getmembers) as often for a grid whose program
    calls a helper 9 times as for one that calls it once, and the helper still computes."""
    import interpreter_lang_patch
    from triton.runtime import interpreter

    assert interpreter_lang_patch.install(), "this Triton's interpreter no longer has _patch_lang/GridExecutor"
    walks = []
    getmembers = inspect.getmembers

    def counting_getmembers(*args, **kwargs):
        walks.append(args[0])
        return getmembers(*args, **kwargs)

    monkeypatch.setattr(interpreter.inspect, "getmembers", counting_getmembers)
    counts = {}
    for calls in (1, 9):
        walks.clear()
        values = torch.arange(8, dtype=torch.float32)
        _doubling_kernel[(1,)](values, CALLS=calls, BLOCK=8)
        counts[calls] = len(walks)
        torch.testing.assert_close(values, torch.arange(8, dtype=torch.float32) * 2 ** calls, rtol=0, atol=0)
    assert counts[1] == counts[9] > 0, counts


def test_numpy_dtypes_are_the_interpreters_own():
    """The interpreter's tl-to-numpy dtype map, memoised by scalar type, gives what Triton's own
    gives for scalars, pointers and blocks of each, at the first call and from the cache."""
    import interpreter_lang_patch
    from triton.runtime import interpreter

    assert interpreter_lang_patch.install()
    memoised = interpreter._get_np_dtype
    own = memoised.__wrapped__
    assert memoised is not own, "install() left Triton's _get_np_dtype in place"
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.int32, tl.uint32, tl.int64, tl.float16, tl.bfloat16,
               tl.float32, tl.float64, tl.pointer_type(tl.float16), tl.pointer_type(tl.int32)]
    types = scalars + [tl.block_type(scalar, [4, 2]) for scalar in scalars]
    for _ in range(2):
        assert [memoised(t) for t in types] == [own(t) for t in types]
