"""A Triton kernel launch as data, shared by the ops' Triton backends and their compile tests, and
the direct launcher that skips most of Triton's per-launch host work.

`kernel[grid](**args)` costs tens of microseconds of host time per launch under Triton 3.6: the
binder specialises every argument, the cache key is rebuilt and hashed, and the launch builds
metadata for hooks that are empty. The ops' launches split their arguments into `constants`, one
dict object per call signature cached by the op's launch plan, and this call's `values`. The
direct launcher (the default; `BYTHEWAY_DIRECT_LAUNCH=0` turns it off) keeps the kernel Triton
compiled for each (constants object, value signature) and calls its launcher itself with the
arguments Triton would pass, in the same order, tensors as their data pointers (`_call_arguments`).
The value signature is what Triton specialises on or finer: each tensor's dtype and 16-byte
alignment, each scalar's exact type and value. Under Triton 3.6 it calls the C function under
the launcher itself where the launcher would only add constant arguments (`_c_launch`). The
launch switch, the launch hooks, the device and its stream are read once per op call
(`run_on_device_of`), not per launch. On an
H200 (Triton 3.6, benchmarks/RESULTS.md) every CUDA test passed with it, and it cut the host time
per call by 16-36% (map op fixed beta 53 -> 42 us, adaptive 149 -> 97 us; fused attention
adaptive 156 -> 113 us).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .._environ import flag_setting, triton_interpreter

DIRECT_LAUNCH_ENV = "BYTHEWAY_DIRECT_LAUNCH"
# Triton releases whose JITFunction.run was read to match the call in `_launch_direct`.
DIRECT_LAUNCH_TRITON_VERSIONS = ("3.6.", "3.9.")
_DIRECT_CACHE_LIMIT = 1024


class KernelLaunch(NamedTuple):
    """One kernel launch: `kernel[grid](**constants, **values)`.

    `constants` holds what the op's launch plan fixes for a call signature (constexprs, shapes,
    num_warps / num_stages / maxnreg), the same dict object on every such call; `values` holds
    this call's tensors and scalars. The two never share a name."""

    kernel: object
    grid: tuple
    constants: dict
    values: dict

    @property
    def args(self) -> dict:
        """Every argument, launch options included, so tests can derive the compiled signature."""
        return {**self.constants, **self.values}

    def run(self) -> None:
        _run_launches((self,))

    def run_through_triton(self):
        """Triton's own launch path (compiling on first use); returns what it returns."""
        return self.kernel[self.grid](**self.constants, **self.values)


def run_on_device_of(tensor: torch.Tensor, launches) -> None:
    """Run `launches` in order with `tensor`'s CUDA device current.

    Triton launches on the current device, on its current stream, whatever device the arguments
    are on. A pipeline on cuda:1 while cuda:0 is current (`pipe.to("cuda:1")` without
    `torch.cuda.set_device`) would otherwise launch on the wrong device and stream, unordered
    with the work that produced the inputs. Costs ~0.3 us when the device is already current
    (the common case: no guard); CPU tensors (the interpreter) need none.
    """
    index = tensor.get_device()
    if index < 0 or index == current_device():
        _run_launches(launches)
        return
    with torch.cuda.device(index):
        _run_launches(launches)


def _run_launches(launches) -> None:
    """Run `launches` in order on the current device: directly where `direct_launch_enabled` and
    no launch hook is set (checked once per call), else through Triton."""
    if direct_launch_ready():
        device, stream = _device_and_stream()
        for launch in launches:
            _launch_direct(launch, device, stream)
    else:
        for launch in launches:
            launch.run_through_triton()


def current_device() -> int:
    """`torch.cuda.current_device()` without its wrapper (~0.4 us less per call on an H200's host);
    only called with CUDA tensors at hand, so CUDA is initialised."""
    return torch._C._cuda_getDevice()


def current_stream(device: int) -> int:
    """The raw current stream of CUDA device `device`, as Triton's launch path reads it."""
    return torch._C._cuda_getCurrentRawStream(device)


def direct_launch_enabled() -> bool:
    """Not turned off (`BYTHEWAY_DIRECT_LAUNCH=0`), compiled kernels (not the interpreter) and a
    Triton release whose launch path `_launch_direct` follows."""
    return (flag_setting(DIRECT_LAUNCH_ENV, True) and not triton_interpreter()
            and _triton_version().startswith(DIRECT_LAUNCH_TRITON_VERSIONS))


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    import triton

    return triton.__version__


class _DirectEntry(NamedTuple):
    kernel: object  # kept, with constants, so that a recycled id() never matches
    constants: dict
    compiled: object  # triton.compiler.CompiledKernel
    arguments: list  # every kernel parameter in signature order, the constants filled in
    value_positions: tuple  # where each of `values`, in its order, goes in `arguments`
    # What is called, as launcher(grid x, y, z, stream, function, *options, *arguments): the C
    # launch function under the compiled kernel's launcher (`_c_launch`), else the launcher
    launcher: object
    options: tuple


_DIRECT_CACHE: dict = {}
_Tensor = torch.Tensor


def _call_arguments(values: dict) -> tuple:
    """(value signature, this call's arguments in `values`' order, each tensor as its data pointer).

    The signature is everything about `values` that Triton's specialisation can depend on, or
    finer: the names, each tensor's dtype and 16-byte alignment, each scalar's type and value.
    (The exact-type test sends tensor subclasses, which eager calls never pass, to the scalar
    branch: keyed by identity, they take Triton's path; `isinstance` would cost ~40 ns per value.)
    A pointer passed as an int takes the C launcher's fast path: given a tensor, it calls
    `data_ptr()` again and asks the driver whether the pointer is device memory
    (`cuPointerGetAttribute`), once per tensor per launch. Our ops have checked the device
    already (and `run_on_device_of` made it current)."""
    signature, arguments = [], []
    for value in values.values():  # one loop: as fast as a signature comprehension alone
        if type(value) is _Tensor:
            pointer = value.data_ptr()
            signature.append((value.dtype, not pointer & 15))
            arguments.append(pointer)
        else:
            signature.append((type(value), value))
            arguments.append(value)
    return (tuple(values), tuple(signature)), arguments


def _hooks_are_empty(runtime_knobs) -> bool:
    """No launch hooks (profilers such as proton add them): Triton's launch would call nothing."""
    for hook in (runtime_knobs.launch_enter_hook, runtime_knobs.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", None) != []:
            return False
    return True


# Looked up once: an import statement and the driver's lazy proxy cost ~1 us per launch.
@functools.lru_cache(maxsize=None)
def _runtime_knobs():
    from triton import knobs

    return knobs.runtime


def _device_and_stream():
    """The current device and its current stream, as Triton's CUDA driver reads them with torch
    loaded (3.6 and 3.9: `torch.cuda.current_device`, `torch._C._cuda_getCurrentRawStream`)."""
    device = current_device()
    return device, current_stream(device)


def _launch_direct(launch: KernelLaunch, device, stream) -> None:
    kernel = launch.kernel
    if getattr(kernel, "pre_run_hooks", None):
        launch.run_through_triton()
        return
    signature, call_arguments = _call_arguments(launch.values)
    # id(): a JITFunction's own hash is a Python-level property (~0.7 us per launch)
    key = (id(kernel), id(launch.constants), device, signature)
    entry = _DIRECT_CACHE.get(key)
    if entry is None or entry.constants is not launch.constants or entry.kernel is not kernel:
        _remember(key, launch, launch.run_through_triton())  # the kernel Triton launched
        return
    arguments = entry.arguments.copy()
    for position, argument in zip(entry.value_positions, call_arguments):
        arguments[position] = argument
    grid = launch.grid
    entry.launcher(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                   entry.compiled.function, *entry.options, *arguments)


def _launcher_and_options(compiled) -> tuple:
    """(what `_launch_direct` calls, the arguments between the kernel's function and its own):
    the C launch function (`_c_launch`) where it applies, else the call JITFunction.run makes of
    the compiled kernel's launcher, with no launch metadata and no hooks (both are empty)."""
    c_launch, options = _c_launch(compiled)
    if c_launch is not None:
        return c_launch, options
    return compiled.run, (compiled.packed_metadata, None, None, None)


def _c_launch(compiled) -> tuple:
    """(C launch function, the arguments the launcher puts between the function and the kernel's)
    that calling `compiled.run` as `_launch_direct` does comes down to, or (None, ()).

    Triton 3.6's CudaLauncher.__call__ allocates no scratch memory when the kernel needs none,
    then calls `launch(grid, stream, function, cooperative, pdl, None, None, metadata, launch
    metadata, hooks, *arguments)`; skipping that Python frame saves ~1.8 us per launch on an
    H200's host (benchmarks/RESULTS.md). Other releases and kernels keep the launcher.
    """
    runner = compiled.run
    if not (_triton_version().startswith("3.6.") and type(runner).__name__ == "CudaLauncher"
            and getattr(runner, "global_scratch_size", None) == 0
            and getattr(runner, "profile_scratch_size", None) == 0 and callable(getattr(runner, "launch", None))):
        return None, ()
    return runner.launch, (runner.launch_cooperative_grid, runner.launch_pdl, None, None,
                           compiled.packed_metadata, None, None, None)


def _remember(key, launch: KernelLaunch, compiled) -> None:
    if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
        return  # not a compiled kernel (another launcher): every call takes Triton's path
    names = launch.kernel.arg_names
    if any(name not in launch.constants and name not in launch.values for name in names):
        return  # a parameter left to its default: Triton's binder fills it in, so keep its path
    arguments = [launch.constants.get(name) for name in names]
    value_positions = tuple(names.index(name) for name in launch.values)
    if len(_DIRECT_CACHE) >= _DIRECT_CACHE_LIMIT:
        _DIRECT_CACHE.clear()
    _DIRECT_CACHE[key] = _DirectEntry(launch.kernel, launch.constants, compiled, arguments, value_positions,
                                      *_launcher_and_options(compiled))


class PreparedLaunch(NamedTuple):
    """One direct launch of a call signature, ready to repeat with other tensors (`run_prepared`)."""

    kernel: object  # the JITFunction, for its pre-run hooks (`prepared_ready`)
    launcher: object
    grid: tuple  # (x, y, z)
    function: object
    options: tuple
    arguments: list  # every kernel argument, this signature's tensors' pointers left to fill in
    sources: tuple  # (position in `arguments`, index of the tensor in the call's sources)


def prepare_direct(launches, sources: tuple, device) -> Optional[tuple]:
    """`launches` (just run on `device`) as PreparedLaunch objects, or None where a repeat could
    differ from what `run_on_device_of` would do.

    Every value of every launch must be exactly one of `sources` (by identity: a call repeats with
    tensors in the same roles) and 16-byte aligned, and Triton's compiled kernel for its
    signature must be in the direct launcher's cache (the launch went direct, or compiled). A
    repeat with tensors of the same dtypes, aligned, launches the same kernels with the same
    arguments as `_launch_direct` would, without the signature, the cache key or the launch
    objects."""
    if not direct_launch_enabled():
        return None
    prepared = []
    for launch in launches:
        kernel = launch.kernel
        if getattr(kernel, "pre_run_hooks", None):
            return None
        signature, pointers = _call_arguments(launch.values)
        entry = _DIRECT_CACHE.get((id(kernel), id(launch.constants), device, signature))
        if entry is None or entry.constants is not launch.constants or entry.kernel is not kernel:
            return None
        positions = []
        for position, value, pointer in zip(entry.value_positions, launch.values.values(), pointers):
            indices = [index for index, source in enumerate(sources) if source is value]
            if len(indices) != 1 or type(value) is not _Tensor or pointer & 15:
                return None  # not one source (e.g. a caller's guide that is its scores), or unaligned
            positions.append((position, indices[0]))
        grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
        prepared.append(PreparedLaunch(kernel, entry.launcher, grid, entry.compiled.function, entry.options,
                                       entry.arguments.copy(), tuple(positions)))
    return tuple(prepared)


def run_prepared(prepared: tuple, pointers, stream) -> None:
    """Launch `prepare_direct`'s launches on `stream` with `pointers` (the call's sources' data
    pointers, in their order, each 16-byte aligned; the caller checks devices, dtypes and
    `prepared_ready`)."""
    for launch in prepared:
        arguments = launch.arguments.copy()
        for position, index in launch.sources:
            arguments[position] = pointers[index]
        grid = launch.grid
        launch.launcher(grid[0], grid[1], grid[2], stream, launch.function, *launch.options, *arguments)


def direct_launch_ready() -> bool:
    """Whether launches on the current device would go direct now: the switch, compiled kernels,
    a known Triton and no launch hooks (what `_run_launches` checks once per call)."""
    return direct_launch_enabled() and _hooks_are_empty(_runtime_knobs())


def prepared_ready(prepared: tuple) -> bool:
    """Whether `prepared` launches as `_run_launches` would now: `direct_launch_ready`, and no
    kernel has gained pre-run hooks (which `_launch_direct` sends through Triton)."""
    return direct_launch_ready() and not any(getattr(launch.kernel, "pre_run_hooks", None)
                                             for launch in prepared)
