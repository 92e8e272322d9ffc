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
from typing import NamedTuple

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
    if index < 0 or index == _current_device():
        _run_launches(launches)
        return
    with torch.cuda.device(index):
        _run_launches(launches)


def _run_launches(launches) -> None:
    """Run `launches` in order on the current device: directly where `direct_launch_enabled` and
    no launch hook is set (checked once per call), else through Triton."""
    if direct_launch_enabled() and _hooks_are_empty(_runtime_knobs()):
        device, stream = _device_and_stream()
        for launch in launches:
            _launch_direct(launch, device, stream)
    else:
        for launch in launches:
            launch.run_through_triton()


def _current_device() -> int:
    """`torch.cuda.current_device()` without its wrapper (~0.4 us less per call on an H200's host);
    only called with CUDA tensors at hand, so CUDA is initialised."""
    return torch._C._cuda_getDevice()


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
    # The C launch function under the compiled kernel's launcher and the arguments that launcher
    # adds (Triton 3.6, no scratch memory: `_c_launch`), else None: call the launcher
    c_launch: object
    c_launch_options: tuple


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
    device = _current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


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
    compiled = entry.compiled
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    if entry.c_launch is not None:
        entry.c_launch(grid[0], grid_y, grid_z, stream, compiled.function, *entry.c_launch_options,
                       *arguments)
        return
    # The call JITFunction.run makes, with no launch metadata and no hooks (both are empty).
    compiled.run(grid[0], grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                 None, None, None, *arguments)


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
                                      *_c_launch(compiled))
