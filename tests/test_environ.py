"""`bytheway_kernels._environ.getenv`, the hot paths' environment lookup, agrees with
`os.environ.get` through every way the tests and users change the environment."""

import os

from bytheway_kernels._environ import getenv

NAME = "BYTHEWAY_TEST_ENVIRON_NAME"


def test_getenv_follows_os_environ(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert getenv(NAME) is None
    monkeypatch.setenv(NAME, "triton")
    assert getenv(NAME) == os.environ.get(NAME) == "triton"
    os.environ[NAME] = "ünïcode"
    assert getenv(NAME) == "ünïcode"
    os.environ.pop(NAME)
    assert getenv(NAME) is None
    os.environ.update({NAME: ""})
    assert getenv(NAME) == ""
    monkeypatch.delenv(NAME)
    assert getenv(NAME) is None


def test_backend_override_is_read_on_every_call(monkeypatch):
    import torch

    from bytheway_kernels.ops.dispatch import BACKEND_ENV, select_backend

    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert select_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert select_backend(torch.device("cpu")) == "triton"
