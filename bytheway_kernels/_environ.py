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
