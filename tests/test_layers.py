"""Dependencies point one way: foundations and the store/models at the bottom, stages above, service and CLI on top.

Stages talk through the store, so a stage importing another stage is a design error, with two exceptions
that are one stage in two modules: ``results`` builds from ``infer``'s output and the ``worker`` runs both;
the panel reads infer's result type and shares metrics' readiness checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "appliance"

FOUNDATION = {"appliance", "appliance.errors", "appliance.fsio", "appliance.validation", "appliance.logs",
              "appliance.dicomio", "appliance.status"}
LAYERS = [
    FOUNDATION,
    {"appliance.models", "appliance.store"},
    {"appliance.config"},
    {"appliance.ingest", "appliance.assemble", "appliance.route", "appliance.infer", "appliance.results",
     "appliance.export", "appliance.retention", "appliance.worker", "appliance.metrics", "appliance.panel"},
    {"appliance.service", "appliance.cli", "appliance.__main__"},
]
STAGE_USES = {
    "appliance.results": {"appliance.infer"},
    "appliance.worker": {"appliance.infer", "appliance.results"},
    "appliance.metrics": {"appliance.ingest"},  # the DICOM status names its counters carry (ingest/status.py)
    # the panel shows infer's summary.json (typed by infer/summary.py) and answers /readyz with metrics' checks
    "appliance.panel": {"appliance.infer", "appliance.metrics"},
}


def _unit(module: str) -> str:
    """The layer unit a module belongs to: a subpackage, or a top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _layer(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"{unit} is in no layer: add it to tests/test_layers.py")


def _imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "appliance":
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "appliance")
        out[".".join(parts)] = deps
    return out


def test_every_module_imports_only_its_own_layer_or_below() -> None:
    wrong = []
    for module, deps in sorted(_imports().items()):
        unit = _unit(module)
        for dep in sorted(deps):
            dunit = _unit(dep)
            if dunit == unit or dunit == "appliance":
                continue
            if _layer(dunit) > _layer(unit):
                wrong.append(f"{module} imports {dep} (a higher layer)")
            elif _layer(dunit) == _layer(unit) == 3 and dunit not in STAGE_USES.get(unit, set()):
                wrong.append(f"{module} imports the stage {dep}: stages talk through the store")
    assert wrong == []


def test_the_layer_table_knows_every_module() -> None:
    for module in _imports():
        _layer(_unit(module))
