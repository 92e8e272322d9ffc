"""The `Examples:` sections of the public docstrings run and print what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "bytheway_kernels._validation",
    "bytheway_kernels.band",
    "bytheway_kernels.energy",
    "bytheway_kernels.guide",
    "bytheway_kernels.testing",
    "bytheway_kernels.ops.params",
    "bytheway_kernels.ops.attention_probs.reference",
    "bytheway_kernels.ops.attention_probs.cpp",
    "bytheway_kernels.ops.attention_probs.op",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
