"""The one manifest writer of development code (appliance_dev.manifest, on appliance_dev.toml_writer).

What a package made by the training script or the tests says must be what the appliance reads: the
manifest is built from the runtime schema, serialised as TOML, and loaded back through the appliance's own
package loader (``load_package``) to the same content. The shipped demo model's manifest must survive the
same round trip, and the training script's fields must reproduce it.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from appliance.models.manifest import Manifest
from appliance.models.package import MANIFEST, bundled_models_dir, load_package
from appliance_dev.manifest import LIVER_LABELS, build_manifest, file_digests, manifest_toml, write_manifest
from appliance_dev.toml_writer import dumps

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEMO = "liver-ct-demo"


def _lists(value: Any) -> Any:
    """Tuples as lists, as TOML gives them back."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _fields(name: str, files: dict[str, str]) -> dict[str, Any]:
    """A manifest using every kind of value the writer must get right."""
    return {
        "schema": 1,
        "name": name,
        "version": "2.0.0-rc.1",
        "task": "segmentation",
        "modality": "CT",
        "intended_use": 'Tests only: "quoted", back\\slash, tab\tand newline\nin one string; ünïcode Ω µm ✓',
        "licence": "Test fixture \x7f\x01 (control characters)",
        "description": "",
        "input": {"dims": 2, "tensor": "image", "channels": 5, "spacing_mm": (0.7, 1.25),
                  "size_multiple": 32, "min_size": (32, 64), "opt_size": (128, 128), "max_size": (512, 512),
                  "opt_batch": 2, "max_batch": 16},
        "normalisation": {"kind": "hu_window", "window": (-1024.0, 3071.5)},
        "output": {"tensor": "logits", "kind": "scores", "classes": 4},
        "postprocess": {"largest_component": [1, 2]},
        "labels": [*LIVER_LABELS, {"value": 3, "name": "Spleen",
                                   "category": {"scheme": "SCT", "code": "91723000", "meaning": "Anatomical Structure"},
                                   "type": {"scheme": "SCT", "code": "78961009", "meaning": "Spleen"}}],
        "files": files,
        "training": {"script": "scripts/train_demo_model.py", "seed": 3, "steps": 4000, "lr": 1e-05,
                     "tiny": 5e-324, "large": 1.5e16,
                     "minutes": 36.5, "huge": 2**62, "negative": -0.0, "deterministic": True,
                     "stages": ["a", "b"], "nested": {"x": 1, "y": [1.5, 2.5], "key with spaces": "v"},
                     "command": 'python scripts/train_demo_model.py --init "M/model.onnx"'},
    }


def _package(root: Path, name: str) -> tuple[Path, dict[str, str]]:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "model.onnx").write_bytes(b"not parsed by load_package, only hashed")
    (pkg / "MODEL_CARD.md").write_text("# A card\n")
    return pkg, file_digests(pkg, ("model.onnx", "MODEL_CARD.md"))


def test_written_manifest_loads_back_through_the_package_loader_unchanged(tmp_path: Path) -> None:
    pkg, files = _package(tmp_path, "round-trip")
    fields = _fields("round-trip", files)
    written = write_manifest(pkg, fields)
    loaded = load_package(pkg)
    assert loaded.manifest == written == Manifest.model_validate(fields)
    # The file itself holds exactly the validated content: nothing added, nothing lost.
    data = tomllib.loads((pkg / MANIFEST).read_text(encoding="utf-8"))
    assert data == _lists(written.model_dump(by_alias=True, exclude_none=True))
    assert "region" not in data["labels"][2]  # unset optional values are left out, not written as empty


def test_nan_and_infinity_in_training_survive(tmp_path: Path) -> None:
    """A measurement that was not made is nan in [training] (the training script without the real CT)."""
    pkg, files = _package(tmp_path, "not-measured")
    fields = {**_fields("not-measured", files), "training": {"real_ct_liver_dice": math.nan, "big": math.inf,
                                                             "small": -math.inf}}
    write_manifest(pkg, fields)
    training = load_package(pkg).manifest.training
    assert math.isnan(training["real_ct_liver_dice"])  # type: ignore[arg-type]
    assert training["big"] == math.inf and training["small"] == -math.inf


def test_invalid_fields_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    pkg, files = _package(tmp_path, "bad")
    fields = _fields("bad", files)
    with pytest.raises(ValidationError, match="channels"):
        write_manifest(pkg, {**fields, "input": {**fields["input"], "channels": 4}})
    with pytest.raises(ValidationError, match="(?i)extra"):
        write_manifest(pkg, {**fields, "unknown_key": 1})
    assert not (pkg / MANIFEST).exists()


def test_the_shipped_demo_manifest_round_trips(tmp_path: Path) -> None:
    shipped = load_package(bundled_models_dir() / DEMO)
    copy = tmp_path / DEMO
    copy.mkdir()
    for name in shipped.manifest.files:
        shutil.copyfile(shipped.path / name, copy / name)
    (copy / MANIFEST).write_text(manifest_toml(shipped.manifest), encoding="utf-8")
    assert load_package(copy).manifest == shipped.manifest


def test_the_training_script_fields_reproduce_the_shipped_manifest() -> None:
    """appliance_dev.train.package.manifest_fields, given the shipped model's recorded results, writes the
    shipped manifest's content: the one writer replaced the hand-written TOML without changing a value."""
    from appliance_dev.train.package import manifest_fields

    shipped = load_package(bundled_models_dir() / DEMO)
    t = shipped.manifest.training
    info = {
        "heldout": {"all": {"liver": t["heldout_liver_dice"], "lesion": t["heldout_lesion_dice"]}},
        "real": [{"liver_dice": t["real_ct_liver_dice"]}],
        "onnx": {"ort_300_slices_176_s": t["ort_cpu_300_slices_176px_s"]},
        "seed": t["seed"], "command": t["command"], "n_train": t["phantoms_train"],
        "train_seed0": t["train_seed_start"], "train_slices": t["slices_per_phantom"],
        "n_heldout": t["phantoms_heldout"], "steps": t["steps"], "batch": t["batch"], "crop": t["crop"],
        "train_minutes": t["minutes"], "init_sha": t["init_sha256"],
        "variety": t.get("phantom_variety", 1), "shading": t.get("shading_hu", 0.0),
        "edge_shading": t.get("edge_shading_hu", 0.0), "clefts": t.get("clefts", 0.0),
    }
    assert build_manifest(manifest_fields(shipped.path, info)) == shipped.manifest


def test_threshold_test_package_uses_the_same_writer(tmp_path: Path) -> None:
    from appliance_dev.model_factory import manifest_text, write_package

    pkg = load_package(write_package(tmp_path / "models"))
    assert (pkg.path / MANIFEST).read_text(encoding="utf-8") == manifest_text(pkg.name, pkg.manifest.files)
    assert [lab.model_dump(exclude_none=True) for lab in pkg.manifest.labels] == list(LIVER_LABELS)


def test_toml_writer_layout_and_refusals() -> None:
    # Top-level scalars must precede every table, whatever the dict order.
    text = dumps({"table": {"x": 1}, "scalar": "s", "items": [{"a": 1}, {"a": 2}], "empty": [], "t2": {}})
    assert text.index('scalar = "s"') < text.index("[table]")
    assert tomllib.loads(text) == {"table": {"x": 1}, "scalar": "s", "items": [{"a": 1}, {"a": 2}], "empty": [],
                                   "t2": {}}
    assert '"a.b" = 1' in dumps({"a.b": 1})  # keys that are not bare are quoted
    with pytest.raises(TypeError, match="null"):
        dumps({"a": None})
    with pytest.raises(TypeError, match="Path"):
        dumps({"a": Path("/x")})
    with pytest.raises(ValueError, match="surrogate"):
        dumps({"a": "\ud800"})
