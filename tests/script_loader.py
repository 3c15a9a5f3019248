"""Load one of ``scripts/*.py`` as a module, so tests can call its functions directly.

The scripts are standalone programs, not part of the installed package, so they are loaded by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``load_script("train_demo_model")`` executes scripts/train_demo_model.py and returns the module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    mod = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import would: dataclasses look their module up while being defined.
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
