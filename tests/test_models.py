"""Model packages: valid ones load; damaged, tampered or malformed ones are refused with the reason."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from appliance.errors import ModelPackageError
from appliance.models.package import find_packages, load_package
from conftest import appliance_exe, write_toml
from appliance_dev.model_factory import write_package


def test_valid_package_loads(tmp_path: Path) -> None:
    pkg = load_package(write_package(tmp_path))
    assert pkg.name == "threshold-test"
    assert pkg.profile[0] == (1, 3, 32, 32) and pkg.profile[2] == (8, 3, 384, 384)
    assert len(pkg.onnx_sha256) == 64


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "model.onnx").write_bytes((p / "model.onnx").read_bytes() + b"x"), "model.onnx does not match its checksum"),
    (lambda p: (p / "MODEL_CARD.md").unlink(), "MODEL_CARD.md is listed in manifest.toml but missing"),
    (lambda p: (p / "manifest.toml").unlink(), "no manifest.toml"),
    (lambda p: (p / "manifest.toml").write_text("name = [unclosed"), "not valid TOML"),
    (lambda p: (p / "manifest.toml").write_text((p / "manifest.toml").read_text().replace("channels = 3", "chanels = 3")),
     "input.chanels: unknown key"),
    (lambda p: (p / "manifest.toml").write_text((p / "manifest.toml").read_text().replace("channels = 3", "channels = 2")),
     "input.channels"),
    (lambda p: (p / "manifest.toml").write_text((p / "manifest.toml").read_text().replace('name = "threshold-test"', 'name = "other"')),
     "differs from the folder name"),
    (lambda p: (p / "manifest.toml").write_text((p / "manifest.toml").read_text().replace("classes = 3", "classes = 2")),
     "needs output.classes > 2"),
])
def test_damaged_package_refused(tmp_path: Path, damage, message: str) -> None:
    path = write_package(tmp_path)
    damage(path)
    with pytest.raises(ModelPackageError, match=message.replace(".", r"\.")):
        load_package(path)


def test_find_packages_separates_good_and_refused(tmp_path: Path) -> None:
    write_package(tmp_path, "good-one")
    bad = write_package(tmp_path, "bad-one")
    (bad / "model.onnx").write_bytes(b"not onnx")
    good, refused = find_packages(tmp_path)
    assert [p.name for p in good] == ["good-one"]
    assert "checksum" in refused["bad-one"]


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "appliance.toml"
    write_toml(cfg, {"inference": {"models_dir": str(tmp_path / "models")},
                     "storage": {"data_dir": str(tmp_path / "var")}})
    return subprocess.run([appliance_exe(), *args, "--config", str(cfg)], capture_output=True, text=True, timeout=120)


def test_models_list_and_verify_cli(tmp_path: Path) -> None:
    write_package(tmp_path / "models", "good-one")
    bad = write_package(tmp_path / "models", "bad-one")
    (bad / "model.onnx").write_bytes(b"tampered")
    r = _cli(tmp_path, "models", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert [m["name"] for m in listed["models"]] == ["good-one"]
    assert listed["models"][0]["backends"]["onnxruntime"] is True
    assert "checksum" in listed["refused"]["bad-one"]

    assert _cli(tmp_path, "models", "verify", "good-one").returncode == 0
    r = _cli(tmp_path, "models", "verify", "bad-one")
    assert r.returncode == 2 and "does not match its checksum" in r.stderr
    r = _cli(tmp_path, "models", "verify", "missing-one")
    assert r.returncode == 2 and "no model package 'missing-one'" in r.stderr


def test_unloadable_onnx_with_matching_checksum_is_refused_by_verify(tmp_path: Path) -> None:
    """A package whose checksums match but whose ONNX is garbage (a vendor's packaging mistake)."""
    import hashlib

    from appliance_dev.model_factory import manifest_text

    pkg = tmp_path / "models" / "garbage"
    pkg.mkdir(parents=True)
    (pkg / "model.onnx").write_bytes(b"\x00garbage")
    digest = hashlib.sha256(b"\x00garbage").hexdigest()
    (pkg / "manifest.toml").write_text(manifest_text("garbage", {"model.onnx": digest}))
    r = _cli(tmp_path, "models", "verify", "garbage")
    assert r.returncode == 2 and "ONNX Runtime cannot load model.onnx" in r.stderr


def test_bundled_demo_model_verifies() -> None:
    from appliance.models.package import bundled_models_dir

    if not (bundled_models_dir() / "liver-ct-demo" / "manifest.toml").exists():
        pytest.fail("the bundled liver-ct-demo package is missing")
    pkg = load_package(bundled_models_dir() / "liver-ct-demo")
    assert pkg.onnx_path.stat().st_size <= 20 * 1024 * 1024
    card = (pkg.path / "MODEL_CARD.md").read_text()
    assert "not a medical device" in card.lower()


def test_build_engines_cli_builds_then_hits_cache(tmp_path: Path) -> None:
    """`appliance models build-engines` builds a real TensorRT-RTX plan here (no GPU needed to build)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is a test extra; not installed here")
    write_package(tmp_path / "models", "good-one")
    r = _cli(tmp_path, "models", "build-engines")
    assert r.returncode == 0, r.stderr
    assert "good-one: built" in r.stdout
    plans = list((tmp_path / "var" / "engines").glob("good-one-*.plan"))
    assert len(plans) == 1 and plans[0].stat().st_size > 1000
    r = _cli(tmp_path, "models", "build-engines", "good-one")
    assert r.returncode == 0 and "good-one: cached" in r.stdout, r.stdout + r.stderr


def test_build_engines_cli_reports_a_model_tensorrt_rejects(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is a test extra; not installed here")
    import hashlib

    from appliance_dev.model_factory import manifest_text

    pkg = tmp_path / "models" / "broken"
    pkg.mkdir(parents=True)
    data = b"\x08\x07garbage that is not a protobuf model"
    (pkg / "model.onnx").write_bytes(data)
    (pkg / "manifest.toml").write_text(manifest_text("broken", {"model.onnx": hashlib.sha256(data).hexdigest()}))
    r = _cli(tmp_path, "models", "build-engines", "broken")
    assert r.returncode == 2 and "broken: FAILED" in r.stderr, r.stdout + r.stderr
