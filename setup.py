"""Shim for tools that still call setup.py; all metadata lives in pyproject.toml.

The C++ extension in csrc/ is compiled just in time on first use (see
bytheway_kernels/ops/attention_probs/cpp.py), so installing never needs a compiler or a CUDA toolkit.
"""

from setuptools import setup

setup()
