"""Environment settings read on hot paths (the backend override, the launcher switch).

`os.environ.get` of an unset name costs about 0.7 us in CPython: `Mapping.get` raises and catches
a KeyError inside. The ops read their override variables on every eager call, where that is a
tenth of a tiny call. On POSIX, `os.environ` keeps its contents in a dict keyed by the encoded
names (`os.environ._data`), which every assignment or deletion through `os.environ` updates
(pytest's monkeypatch included); one lookup there gives the same answer in about 50 ns. Where that
dict is not there to use, `getenv` is `os.environ.get`.
"""

from __future__ import annotations

import os
from typing import Optional

_environ = os.environ
_data = getattr(_environ, "_data", None)
_encodekey = getattr(_environ, "encodekey", None)
_decodevalue = getattr(_environ, "decodevalue", None)
_FAST = isinstance(_data, dict) and callable(_encodekey) and callable(_decodevalue)
_encoded_names: dict = {}


def getenv(name: str) -> Optional[str]:
    """`os.environ.get(name)`: the value, or None when `name` is unset.

    Examples:
        >>> import os
        >>> os.environ["BYTHEWAY_EXAMPLE"] = "1"
        >>> getenv("BYTHEWAY_EXAMPLE"), getenv("BYTHEWAY_UNSET_EXAMPLE")
        ('1', None)
        >>> del os.environ["BYTHEWAY_EXAMPLE"]
    """
    if not _FAST:
        return _environ.get(name)
    encoded = _encoded_names.get(name)
    if encoded is None:
        encoded = _encoded_names[name] = _encodekey(name)
    value = _data.get(encoded)
    return None if value is None else _decodevalue(value)


_FLAG_WORDS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False,
               "no": False}
# Triton's own reading of TRITON_INTERPRET (3.6 and 3.9: these words in any case, no spaces).
_TRITON_TRUE_WORDS = frozenset({"1", "true", "on", "yes", "y"})


def choice_setting(name: str, choices, default: Optional[str] = None) -> Optional[str]:
    """A variable naming one of `choices`: case and surrounding spaces ignored, unset or empty
    for `default`; any other value is a ValueError naming the variable.

    Examples:
        >>> import os
        >>> os.environ["BYTHEWAY_EXAMPLE"] = " FMA "
        >>> choice_setting("BYTHEWAY_EXAMPLE", ("auto", "fma"), "auto")
        'fma'
        >>> del os.environ["BYTHEWAY_EXAMPLE"]
    """
    value = getenv(name)
    word = "" if value is None else value.strip().lower()
    if not word:
        return default
    if word not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)} (or unset)")
    return word


def flag_setting(name: str, default: bool) -> bool:
    """A boolean variable: 1/0, true/false, on/off or yes/no in any case (spaces ignored), unset
    or empty for `default`; any other value is a ValueError naming the variable.

    Examples:
        >>> import os
        >>> os.environ["BYTHEWAY_EXAMPLE"] = "Off"
        >>> flag_setting("BYTHEWAY_EXAMPLE", True)
        False
        >>> del os.environ["BYTHEWAY_EXAMPLE"]
    """
    value = getenv(name)
    word = "" if value is None else value.strip().lower()
    if not word:
        return default
    flag = _FLAG_WORDS.get(word)
    if flag is None:
        raise ValueError(f"{name}={value!r}: expected 1/0, true/false, on/off or yes/no (or unset)")
    return flag


def triton_interpreter() -> bool:
    """Whether TRITON_INTERPRET turns Triton's interpreter on, read as Triton reads it."""
    value = getenv("TRITON_INTERPRET")
    return value is not None and value.lower() in _TRITON_TRUE_WORDS
