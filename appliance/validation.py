"""Reading TOML and explaining validation errors, the same way for the configuration and model manifests.

At the bottom of the package, so ``config`` and ``models`` share one TOML reader and one wording for a bad
key without importing each other.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError


def loads_toml(text: str) -> dict[str, Any]:
    """Parse TOML text; raises :data:`TOMLDecodeError` with the line and column of the fault."""
    return tomllib.loads(text)


def problems(err: ValidationError, *, show_input: bool = False) -> list[str]:
    """One ``key: what is wrong`` line per error; an unknown key says so (the usual cause: a typo)."""
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            out.append(
                f"{key}: unknown key" + (" (check the spelling; see README for the allowed keys)" if show_input else "")
            )
            continue
        got = e.get("input")
        shown = f" (got {got!r})" if show_input and not isinstance(got, (dict, list)) else ""
        out.append(f"{key}: {e['msg']}{shown}")
    return out
