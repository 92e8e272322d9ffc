"""Test setup: choose the Triton interpreter on CPU-only machines, before any kernel is defined,
and have it patch `triton.language` once per grid (`interpreter_lang_patch`)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))  # shared helpers such as attention_probs_cases

if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_lang_patch

    interpreter_lang_patch.install()
