"""The one writer of model-package manifests (``manifest.toml``) in development code.

The training script's demo model and the tests' small models both get their manifest from here. The
fields go through the runtime's own schema (``appliance.models.manifest.Manifest``, the class
``appliance.models.package.load_package`` validates with) before anything is written, so a package made
here is one the appliance accepts, and the TOML is serialised from the validated model instead of being
written by hand in two places that drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from appliance.models.manifest import Manifest
from appliance.models.package import MANIFEST, sha256_file
from appliance_dev.toml_writer import dumps

#: The liver and liver-lesion labels of the demo model and of the tests' threshold model, with the
#: SNOMED CT codes that go into their DICOM SEG and SR results.
LIVER_LABELS: tuple[dict[str, Any], ...] = (
    {"value": 1, "name": "Liver",
     "category": {"scheme": "SCT", "code": "91723000", "meaning": "Anatomical Structure"},
     "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}},
    {"value": 2, "name": "Liver lesion",
     "category": {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"},
     "type": {"scheme": "SCT", "code": "52988006", "meaning": "Lesion"},
     "region": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"}},
)


def build_manifest(fields: Mapping[str, Any] | Manifest) -> Manifest:
    """``fields`` (the manifest's keys as in the file, ``schema`` included) validated by the runtime schema.

    Raises pydantic's ``ValidationError`` for anything the appliance would refuse to load.
    """
    if isinstance(fields, Manifest):
        return fields
    return Manifest.model_validate(dict(fields))


def manifest_toml(fields: Mapping[str, Any] | Manifest) -> str:
    """The manifest as TOML text, serialised from the validated ``Manifest``.

    Dumped in Python mode, not JSON mode: JSON mode would turn a ``nan`` in ``[training]`` (a measurement
    that was not made) into null, which TOML cannot hold. Unset optional values (a label's ``region``) are
    left out; the file keeps the schema's field order.
    """
    manifest = build_manifest(fields)
    return dumps(manifest.model_dump(mode="python", by_alias=True, exclude_none=True))


def write_manifest(package: Path, fields: Mapping[str, Any] | Manifest) -> Manifest:
    """Validate ``fields`` and write them as ``package/manifest.toml``; returns the validated manifest."""
    manifest = build_manifest(fields)
    (Path(package) / MANIFEST).write_text(manifest_toml(manifest), encoding="utf-8")
    return manifest


def file_digests(package: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: SHA-256}`` of the package's files, in the given order: a manifest's ``files`` table."""
    return {name: sha256_file(Path(package) / name) for name in names}
