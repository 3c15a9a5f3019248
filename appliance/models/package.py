"""Loading and checking model packages.

A package is refused as a whole, with the reason, when its manifest is invalid or any listed file is
missing or differs from its SHA-256: a half-copied or tampered model must never run on patient data.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from appliance.errors import ModelPackageError
from appliance.models.manifest import InputSpec, Label, Manifest
from appliance.validation import TOMLDecodeError, loads_toml, problems

MANIFEST = "manifest.toml"
MODEL_FILE = "model.onnx"

Shape = tuple[int, int, int, int]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Where a wheel installs the bundled models (``[tool.setuptools.data-files]`` in pyproject.toml), under the
#: environment's prefix.
WHEEL_MODELS = Path("share") / "edge-appliance" / "models"


def bundled_models_dir() -> Path:
    """The bundled models (the demo model): ``models/`` of a source checkout (editable install), else the
    wheel's copy under ``<prefix>/share/edge-appliance/models``; ``[inference] models_dir`` overrides both."""
    source = Path(__file__).resolve().parents[2] / "models"
    if source.is_dir():
        return source
    return Path(sys.prefix) / WHEEL_MODELS


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    manifest: Manifest
    #: SHA-256 of model.onnx: part of engine cache keys, so a changed model never reuses an old engine.
    onnx_sha256: str

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def input_name(self) -> str:
        return self.manifest.input.tensor

    @property
    def output_name(self) -> str:
        return self.manifest.output.tensor

    @property
    def labels(self) -> list[Label]:
        return list(self.manifest.labels)

    @property
    def input_spec(self) -> InputSpec:
        i, n = self.manifest.input, self.manifest.normalisation
        return InputSpec(
            channels=i.channels,
            spacing_mm=i.spacing_mm,
            size_multiple=i.size_multiple,
            min_size=i.min_size,
            max_size=i.max_size,
            window=n.window,
        )

    @property
    def profile(self) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) input shapes (N, C, H, W): TensorRT's optimisation profile."""
        i = self.manifest.input
        return (
            (1, i.channels, *i.min_size),
            (i.opt_batch, i.channels, *i.opt_size),
            (i.max_batch, i.channels, *i.max_size),
        )


def _describe(err: ValidationError) -> str:
    return "; ".join(problems(err))


def load_package(path: Path, *, verify: bool = True) -> ModelPackage:
    """Read ``path/manifest.toml`` and (by default) check every listed file against its SHA-256."""
    path = Path(path)
    mpath = path / MANIFEST
    where = f"model package {path}"
    try:
        data = loads_toml(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelPackageError(f"{where}: no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelPackageError(f"{where}: cannot read {MANIFEST}: {exc}") from None
    except TOMLDecodeError as exc:
        raise ModelPackageError(f"{where}: {MANIFEST} is not valid TOML: {exc}") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise ModelPackageError(f"{where}: invalid {MANIFEST}: {_describe(err)}") from None
    if manifest.name != path.name:
        raise ModelPackageError(f"{where}: manifest name {manifest.name!r} differs from the folder name")
    digests = {}
    for fname, want in manifest.files.items():
        f = path / fname
        if not f.is_file():
            raise ModelPackageError(f"{where}: {fname} is listed in {MANIFEST} but missing")
        if verify or fname == MODEL_FILE:
            got = sha256_file(f)
            digests[fname] = got
            if verify and got != want:
                raise ModelPackageError(
                    f"{where}: {fname} does not match its checksum (SHA-256 {got[:12]}..., "
                    f"manifest says {want[:12]}...): the file is damaged or was changed"
                )
    return ModelPackage(path=path, manifest=manifest, onnx_sha256=digests[MODEL_FILE])


def installed_package(models_dir: Path, name: str) -> ModelPackage:
    """The package ``name`` from ``models_dir``, checked; a clear error when it is not installed."""
    path = Path(models_dir) / name
    if not path.is_dir():
        raise ModelPackageError(
            f"no model package {name!r} in {Path(models_dir)}: not installed (see `appliance models list`)"
        )
    return load_package(path)


def find_packages(models_dir: Path) -> tuple[list[ModelPackage], dict[str, str]]:
    """Every valid package under ``models_dir``, and for each refused folder the reason."""
    good: list[ModelPackage] = []
    bad: dict[str, str] = {}
    if not Path(models_dir).is_dir():
        return good, bad
    for child in sorted(Path(models_dir).iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        try:
            good.append(load_package(child))
        except ModelPackageError as exc:
            bad[child.name] = str(exc)
    return good, bad
