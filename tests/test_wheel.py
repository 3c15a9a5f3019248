"""A wheel is what the update bundles ship: it must carry the bundled models where the appliance looks for them,
and nothing of the development package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from appliance.models import package as package_mod

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("edge_appliance-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_carries_the_bundled_models_under_the_path_the_appliance_reads(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    want = {(package_mod.WHEEL_MODELS / "liver-ct-demo" / f).as_posix()
            for f in ("manifest.toml", "model.onnx", "MODEL_CARD.md")}
    assert want <= set(data), data
    assert not [n for n in names if n.startswith(("appliance_dev/", "tests/", "scripts/"))]
    assert "appliance/store/states.py" in names


def test_without_a_source_tree_the_models_come_from_the_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(package_mod, "__file__", str(tmp_path / "site-packages" / "appliance" / "models" / "package.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert package_mod.bundled_models_dir() == tmp_path / "prefix" / "share" / "edge-appliance" / "models"


def test_in_a_source_checkout_the_models_are_read_in_place() -> None:
    assert package_mod.bundled_models_dir() == ROOT / "models"
