"""Placeholder until the C++ extension lands (issue 4): reports the backend as unavailable."""

from __future__ import annotations

from typing import NamedTuple


class CppStatus(NamedTuple):
    available: bool
    reason: str


def cpp_status() -> CppStatus:
    return CppStatus(False, "the C++ extension is not part of this build yet")


def attention_probs_cpp(*args):
    raise RuntimeError(f"BYTHEWAY_BACKEND=cpp: {cpp_status().reason}")
