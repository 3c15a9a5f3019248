"""Development code stays out of the runtime: appliance_dev/ is not in the wheel, the appliance never imports
it (or the tests), and the scripts reach it without touching sys.path."""

from __future__ import annotations

import ast
import sys
from fnmatch import fnmatchcase
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEV_ONLY = {"appliance_dev", "tests", "conftest", "dicom_factory", "model_factory", "real_ct", "script_loader"}


def _packages_on_disk() -> list[str]:
    """Dotted names of the regular packages under the project root, as setuptools' package finder sees them."""
    out: list[str] = []

    def walk(folder: Path, prefix: str) -> None:
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
            out.append(prefix + d.name)
            walk(d, prefix + d.name + ".")

    walk(ROOT, "")
    return out


def test_the_wheel_takes_the_runtime_package_only() -> None:
    """``[tool.setuptools.packages.find]`` matched the way setuptools matches it (fnmatch on dotted names)."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [p for p in _packages_on_disk() if any(fnmatchcase(p, pat) for pat in find["include"])
                and not any(fnmatchcase(p, pat) for pat in find.get("exclude", ()))]
    assert "appliance_dev" in _packages_on_disk()
    assert "appliance" in packages and "appliance.models" in packages
    assert not [p for p in packages if not (p == "appliance" or p.startswith("appliance."))], packages
    # Every runtime subpackage is shipped.
    on_disk = {".".join(p.relative_to(ROOT).parts[:-1]) for p in (ROOT / "appliance").rglob("__init__.py")}
    assert on_disk <= set(packages)
    assert not (ROOT / "appliance" / "synthetic").exists()  # moved to appliance_dev/synthetic


def test_the_appliance_never_imports_development_code() -> None:
    wrong = []
    for path in sorted((ROOT / "appliance").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            wrong += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in DEV_ONLY]
    assert wrong == []


def test_scripts_do_not_touch_sys_path() -> None:
    offenders = [p.name for p in sorted((ROOT / "scripts").glob("*.py")) if "sys.path" in p.read_text()]
    assert offenders == []
