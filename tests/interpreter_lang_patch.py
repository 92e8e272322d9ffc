"""Test-harness speed-up for Triton's interpreter: patch `triton.language` once per grid, not once
per device-function call, and map dtypes to numpy once per dtype.

Triton's interpreter (3.6 and 3.9 alike) swaps `triton.language`'s builtins for numpy versions
when a grid starts (`GridExecutor.__call__` -> `_patch_lang`) and restores them when it ends. It
also calls `_patch_lang` on every call of a `@triton.jit` helper inside the grid, where the
modules are already patched: each such call walks `tl`, `tl.tensor` and `tl.math` with
`inspect.getmembers` (~0.4 ms). The thread-row kernels call small helpers per column and per
frequency, so this redundant walk was ~40% of their interpreter tests' time.

`install()` wraps both: inside a grid, a helper whose language modules (`tl` and/or `tl.core` in
its globals) the grid has already patched gets an empty patch scope; anything else patches as
before. It also memoises the interpreter's `_get_np_dtype`, which builds a dict of every dtype at
each of its calls (several per interpreted operation; with each helper's globals scanned once,
not at every call, another ~18% off these tests). The kernel code the tests run is unchanged,
and so is the numpy each builtin executes.
"""

from __future__ import annotations

import functools

_installed = False


def install() -> bool:
    """Wrap the interpreter's `_patch_lang` and `GridExecutor.__call__`, and memoise its
    `_get_np_dtype` where it has one (once); False where this Triton's interpreter lacks the first
    two (then nothing changes: the tests only run slower)."""
    global _installed
    if _installed:
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    grid_executor = getattr(interpreter, "GridExecutor", None)
    empty_scope = getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or grid_executor is None or empty_scope is None:
        return False
    language_modules = (interpreter.tl, interpreter.tl.core)
    grids = []  # per running grid: the ids of the language modules it has patched
    # helper -> the ids of the language modules in its globals, scanned at its first call: a
    # scan at every call cost ~10% of the tests' time, and a module's imports do not change
    modules_by_helper = {}

    def modules_of(fn) -> frozenset:
        if fn not in modules_by_helper:
            modules_by_helper[fn] = frozenset(id(value) for value in fn.__globals__.values()
                                              if any(value is module for module in language_modules))
        return modules_by_helper[fn]

    @functools.wraps(patch_lang)
    def patch_lang_once(fn):
        modules = modules_of(fn)
        if grids and modules <= grids[-1]:
            return empty_scope()
        scope = patch_lang(fn)
        if grids:
            grids[-1] |= modules
        return scope

    run_grid = grid_executor.__call__

    @functools.wraps(run_grid)
    def run_grid_patching_once(self, *args, **kwargs):
        grids.append(frozenset())
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            grids.pop()

    get_np_dtype = getattr(interpreter, "_get_np_dtype", None)
    if get_np_dtype is not None:  # it builds a dict of every dtype at each of its many calls
        # scalar type's name -> numpy dtype: a block's is its elements' (blocks and pointer types
        # are unhashable; a scalar type's name says which it is)
        np_dtypes = {}

        @functools.wraps(get_np_dtype)
        def get_np_dtype_once(tt_dtype):
            scalar = tt_dtype.scalar
            if scalar.name not in np_dtypes:
                np_dtypes[scalar.name] = get_np_dtype(scalar)
            return np_dtypes[scalar.name]

        interpreter._get_np_dtype = get_np_dtype_once
    interpreter._patch_lang = patch_lang_once
    grid_executor.__call__ = run_grid_patching_once
    _installed = True
    return True
