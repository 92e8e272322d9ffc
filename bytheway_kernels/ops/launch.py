"""A Triton kernel launch as data, shared by the ops' Triton backends and their compile tests."""

from __future__ import annotations

from typing import NamedTuple


class KernelLaunch(NamedTuple):
    """One kernel launch: `kernel[grid](**args)`; `args` holds every argument, constexprs and
    launch options (num_warps, num_stages) included, so tests can derive the compiled signature
    from it."""

    kernel: object
    grid: tuple
    args: dict

    def run(self) -> None:
        self.kernel[self.grid](**self.args)
