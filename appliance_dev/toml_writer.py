"""A small TOML writer for the nested dicts development code writes (model-package manifests).

Why here and not a library: the runtime reads TOML with ``tomllib`` (``tomli`` before 3.11), which cannot
write, and a writer dependency for a few dozen lines is not worth it. The layout is fixed and simple:

- top-level scalars and arrays first, as ``key = value``;
- then, in their order, each top-level dict as a ``[table]`` and each top-level non-empty list of dicts as
  an array of tables (``[[name]]`` per item);
- everything deeper is written inline on one line: ``{ k = v, ... }`` and ``[a, b]``.

Values: bool, int, float (``nan``, ``inf`` included), str, dicts, lists and tuples. ``None`` has no TOML
form and is refused (drop such keys before writing), as is any other type.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def dumps(data: Mapping[str, Any]) -> str:
    """``data`` as a TOML document; ``tomllib.loads`` of the result gives ``data`` back (tuples as lists)."""
    lines: list[str] = []
    sections: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            sections.append("\n".join([f"[{_key(key)}]", *_pairs(value)]))
        elif _is_table_array(value):
            sections.extend("\n".join([f"[[{_key(key)}]]", *_pairs(item)]) for item in value)
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    parts = (["\n".join(lines)] if lines else []) + sections
    return "\n\n".join(parts) + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _pairs(table: Mapping[str, Any]) -> list[str]:
    return [f"{_key(k)} = {_value(v)}" for k, v in table.items()]


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"TOML keys are strings, not {type(key).__name__} ({key!r})")
    return key if _BARE_KEY.match(key) else _string(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # the shortest text that reads back as the same float; valid TOML
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(_pairs(value)) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if value is None:
        raise TypeError("TOML has no null: leave the key out instead of writing None")
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, everything else as is."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{text!r}: a lone surrogate (U+{code:04X}) cannot be written as TOML")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
