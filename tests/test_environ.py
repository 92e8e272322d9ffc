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


def test_settings_are_read_one_way_and_bad_values_name_the_variable(monkeypatch):
    """Every variable of the package: case and spaces ignored, empty means unset, anything else
    a ValueError naming the variable (they were exact-match only, or silently ignored)."""
    import pytest
    import torch

    from bytheway_kernels._environ import choice_setting, flag_setting
    from bytheway_kernels.ops.dispatch import BACKEND_ENV, environment_problem, select_backend
    from bytheway_kernels.ops.launch import DIRECT_LAUNCH_ENV
    from bytheway_kernels.ops.triton_rules import BAND_PRODUCT_ENV, BAND_PRODUCTS

    for value, expected in ((" FMA ", "fma"), ("", "auto"), ("rank-one", "rank-one")):
        monkeypatch.setenv(BAND_PRODUCT_ENV, value)
        assert choice_setting(BAND_PRODUCT_ENV, BAND_PRODUCTS, "auto") == expected
    monkeypatch.setenv(BAND_PRODUCT_ENV, "tensor cores")
    with pytest.raises(ValueError, match=r"BYTHEWAY_BAND_PRODUCT='tensor cores' is not one of"):
        choice_setting(BAND_PRODUCT_ENV, BAND_PRODUCTS, "auto")
    monkeypatch.delenv(BAND_PRODUCT_ENV)
    for value, expected in (("off", False), (" No", False), ("0", False), ("TRUE", True), ("on ", True),
                            ("", True)):
        monkeypatch.setenv(DIRECT_LAUNCH_ENV, value)
        assert flag_setting(DIRECT_LAUNCH_ENV, True) is expected
    monkeypatch.setenv(DIRECT_LAUNCH_ENV, "maybe")
    with pytest.raises(ValueError, match=r"BYTHEWAY_DIRECT_LAUNCH='maybe': expected 1/0"):
        flag_setting(DIRECT_LAUNCH_ENV, True)
    assert "BYTHEWAY_DIRECT_LAUNCH='maybe'" in environment_problem()
    monkeypatch.delenv(DIRECT_LAUNCH_ENV)
    assert environment_problem() is None
    monkeypatch.setenv(BAND_PRODUCT_ENV, "bogus")
    assert environment_problem().startswith("BYTHEWAY_BAND_PRODUCT='bogus' is not one of")
    monkeypatch.delenv(BAND_PRODUCT_ENV)
    monkeypatch.setenv(BACKEND_ENV, " Reference ")
    assert select_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv(BACKEND_ENV, "foo")
    assert environment_problem() == "BYTHEWAY_BACKEND='foo' is not one of ('reference', 'triton', 'cpp') (or unset)"


def test_the_interpreter_switch_is_read_as_triton_reads_it(monkeypatch):
    from triton import knobs

    from bytheway_kernels._environ import triton_interpreter

    for value in ("1", "true", "On", "YES", "y", "0", "false", "", " 1", "2"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpreter() is bool(knobs.runtime.interpret), value
