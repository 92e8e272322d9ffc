"""Which backend an op runs on, when its public function may skip the custom op, and that the ops
have no gradient: one rule each for every op in `bytheway_kernels.ops`.

`BYTHEWAY_BACKEND=reference|triton|cpp` forces one; otherwise CUDA tensors use Triton and CPU
tensors use the compiled C++ kernel when it is built, else the pure-torch reference.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .._environ import choice_setting, flag_setting

BACKENDS = ("reference", "triton", "cpp")
BACKEND_ENV = "BYTHEWAY_BACKEND"


def select_backend(device: torch.device) -> str:
    """The backend the ops use for tensors on `device` (honours BYTHEWAY_BACKEND).

    Called on every eager op call, so the common case (no override) is one environment lookup
    and one dict lookup (`torch.device.type` costs ~0.2 us: it builds a new string).
    Meta tensors (shapes only) get "meta" whatever the override: no kernel runs for them, the
    ops only allocate their outputs, as their fake implementations do.
    """
    device_type = _DEVICE_TYPES.get(device)
    if device_type is None:
        device_type = _DEVICE_TYPES[device] = device.type
    if device_type == "meta":
        return "meta"
    forced = choice_setting(BACKEND_ENV, BACKENDS)  # one lookup when unset, the common case
    if forced is not None:
        return forced
    if device_type == "cuda":
        return "triton"
    if device_type == "cpu" and _cpp_available():
        return "cpp"
    return "reference"


_DEVICE_TYPES: dict = {}  # torch.device -> its type string


def environment_problem() -> Optional[str]:
    """Why this package's environment settings cannot be used (one line naming the variable), or
    None. The ops would raise at their first call (BYTHEWAY_BAND_PRODUCT: when the Triton rules
    are first imported); the commands and scripts check first."""
    from .launch import DIRECT_LAUNCH_ENV

    try:
        choice_setting(BACKEND_ENV, BACKENDS)
        flag_setting(DIRECT_LAUNCH_ENV, True)
        try:
            from . import triton_rules
        except ImportError:  # no Triton: the band product is never read
            return None
        choice_setting(triton_rules.BAND_PRODUCT_ENV, triton_rules.BAND_PRODUCTS)
    except ValueError as error:
        return str(error)
    return None


@functools.lru_cache(maxsize=None)
def _cpp_module():
    from .attention_probs import cpp  # imported once, on first use (not for CUDA-only callers)

    return cpp


def _cpp_available() -> bool:
    return _cpp_module().cpp_status().available  # builds the C++ kernel on first use (cached)


def direct_call_is_equivalent(*tensors) -> bool:
    """Whether an op's public function may call its implementation directly instead of through
    its custom op and get the same result: plain eager tensors (or None: no subclass such as fake
    or functional tensors, no functorch wrapper), no tracing or compiling, no Python modes and
    nothing for autograd to record. Skipping the custom op's Python dispatch saves most of an
    eager call's host time."""
    if _is_compiling() or _dispatch_stack_length() or _function_mode_enabled():
        return False
    grad_enabled = _grad_enabled()
    for tensor in tensors:
        if tensor is not None and (type(tensor) is not _Tensor or _functorch_wrapped(tensor)
                                   or (grad_enabled and tensor.requires_grad)):
            return False
    return True


def refuse_gradients(op, name: str) -> None:
    """Register a backward for custom op `op` that says why there is none: the ops are for
    inference (diffusers pipelines run under no_grad). Without one, torch's own error asks the
    user to register an autograd formula."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name} has no gradient: ByTheWay's ops are for inference; call them under "
            f"torch.no_grad() or torch.inference_mode(), as diffusers pipelines do"
        )

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


# Bound once: each attribute chain (torch._C._functorch...) costs ~0.1 us per eager call.
_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_length = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_grad_enabled = torch.is_grad_enabled
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
