"""The schema of ``manifest.toml``: validated in full, unknown keys refused, so a typo is an error."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    """A coded concept (SNOMED CT, DICOM DCM): what results will put into SEG and SR."""

    scheme: Literal["SCT", "DCM", "SRT", "UMLS"]
    code: Annotated[str, Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


class Label(_Strict):
    value: Annotated[int, Field(ge=1, le=255)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    category: Code
    type: Code
    region: Code | None = None


class InputTable(_Strict):
    dims: Literal[2]
    tensor: str = "image"
    channels: Annotated[int, Field(ge=1, le=15)]
    spacing_mm: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    size_multiple: Annotated[int, Field(ge=1, le=256)] = 16
    min_size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    opt_size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    max_size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
    opt_batch: Annotated[int, Field(ge=1, le=256)] = 8
    max_batch: Annotated[int, Field(ge=1, le=256)] = 16

    @field_validator("channels")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 != 1:
            raise ValueError("must be odd: channels are the slice and equally many neighbours on each side")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> InputTable:
        for i in (0, 1):
            if not self.min_size[i] <= self.opt_size[i] <= self.max_size[i]:
                raise ValueError("need min_size <= opt_size <= max_size")
        if self.opt_batch > self.max_batch:
            raise ValueError("need opt_batch <= max_batch")
        return self


class Normalisation(_Strict):
    kind: Literal["hu_window"]
    window: tuple[float, float]

    @model_validator(mode="after")
    def _ordered(self) -> Normalisation:
        if not self.window[0] < self.window[1]:
            raise ValueError("window must be [lower, upper] with lower < upper")
        return self


class OutputTable(_Strict):
    tensor: str = "logits"
    kind: Literal["scores"]
    classes: Annotated[int, Field(ge=2, le=256)]


class PostProcess(_Strict):
    largest_component: list[int] = Field(default_factory=list)


#: What a finding score may weigh, each computed from the finding's measurements by
#: :func:`appliance.infer.measure.finding_features` (the names are the contract between a package and serving):
#: log_diameter (ln of the longest axial diameter in mm), elongation (short axis over longest diameter: 1 round,
#: near 0 a line), fill (volume over the ellipsoid of diameter, short axis and cranio-caudal extent), roundness
#: (mean in-plane width over half the diameter: 1 a disc, near 0 a band), confidence (mean lesion probability),
#: peak_confidence (the highest of any of its voxels), contrast ((mean HU - surrounding organ HU) / 100),
#: abs_contrast (its absolute value), edge_contact (the fraction of its border on the organ's edge), series_end
#: (1 when it reaches the series' first or last slice, else 0).
FindingFeature = Literal[
    "log_diameter",
    "elongation",
    "fill",
    "roundness",
    "confidence",
    "peak_confidence",
    "contrast",
    "abs_contrast",
    "edge_contact",
    "series_end",
]
FINDING_FEATURES: tuple[str, ...] = get_args(FindingFeature)


class FindingScore(_Strict):
    """A false-positive filter over each finding's measurements: a logistic model fitted on phantoms
    (``scripts/fit_finding_score.py``), score = 1 / (1 + exp(-(bias + sum(w * (x - mean) / scale)))). A
    finding scoring under ``min_score`` is not reported. The features are named, not positional, so a
    package built for another serving version fails validation instead of being scored wrongly."""

    features: Annotated[list[FindingFeature], Field(min_length=1, max_length=len(FINDING_FEATURES))]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    min_score: Annotated[float, Field(ge=0, le=1)]

    @model_validator(mode="after")
    def _consistent(self) -> FindingScore:
        n = len(self.features)
        if len(set(self.features)) != n:
            raise ValueError("finding_score.features: each feature may appear once")
        for name in ("mean", "scale", "weights"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"finding_score.{name}: needs one value per feature ({n})")
        values = [*self.mean, *self.scale, *self.weights, self.bias]
        if not all(math.isfinite(v) and abs(v) < 1e6 for v in values):
            raise ValueError("finding_score: every number must be finite and under 1e6 in size")
        if not all(v > 0 for v in self.scale):
            raise ValueError("finding_score.scale: each scale must be positive")
        return self


class Reporting(_Strict):
    """What of the model's lesion output becomes a reported finding (counted in the SR, drawn in the SEG and
    the key image): a lesion whose longest axial diameter is below ``min_lesion_diameter_mm`` is not
    reported, counted or measured. Its voxels go back to the organ it lies in, unless
    ``keep_unreported_in_labelmap`` (then they stay lesion-labelled in ``labelmap.npz`` and the SEG).
    Likewise a lesion whose mean lesion probability (its confidence, 0..1) is below ``min_confidence``, and
    a rim: more than ``max_edge_contact`` of its in-plane border facing tissue outside the organ (1.0 keeps
    every lesion) and a mean width under ``rim_max_width_mm`` (a rim along the liver's edge is thin; a round
    tumour of about 14 mm or more bulging out of the liver is not, and stays reported). With a
    ``finding_score``, a lesion those rules keep must also score at least its ``min_score``."""

    min_lesion_diameter_mm: Annotated[float, Field(ge=0, le=200)] = 0.0
    min_confidence: Annotated[float, Field(ge=0, le=1)] = 0.0
    max_edge_contact: Annotated[float, Field(ge=0, le=1)] = 1.0
    rim_max_width_mm: Annotated[float, Field(ge=0, le=200)] = 6.0
    finding_score: FindingScore | None = None
    keep_unreported_in_labelmap: bool = False


class Manifest(_Strict):
    schema_: Literal[1] = Field(alias="schema")
    name: str
    version: Annotated[str, Field(min_length=1, max_length=32)]
    task: Literal["segmentation"]
    modality: Annotated[str, Field(min_length=2, max_length=16)]
    intended_use: Annotated[str, Field(min_length=1)]
    licence: Annotated[str, Field(min_length=1)]
    description: str = ""
    input: InputTable
    normalisation: Normalisation
    output: OutputTable
    postprocess: PostProcess = Field(default_factory=PostProcess)
    reporting: Reporting = Field(default_factory=Reporting)
    labels: Annotated[list[Label], Field(min_length=1)]
    files: dict[str, str]
    #: Free-form provenance (training script, seed, measured accuracy); not interpreted.
    training: dict[str, object] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be lower-case letters, digits, '.', '_' or '-' (at most 64)")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        if "model.onnx" not in v:
            raise ValueError("must list model.onnx with its SHA-256")
        for name, digest in v.items():
            if "/" in name or "\\" in name or name.startswith(".") or name == "manifest.toml":
                raise ValueError(f"{name!r}: only plain file names of the package may be listed")
            if not _SHA256.match(digest):
                raise ValueError(f"{name!r}: {digest!r} is not a lower-case hex SHA-256")
        return v

    @model_validator(mode="after")
    def _labels(self) -> Manifest:
        values = [lab.value for lab in self.labels]
        if len(set(values)) != len(values):
            raise ValueError("labels: each value may appear once")
        if max(values) >= self.output.classes:
            raise ValueError(f"labels: value {max(values)} needs output.classes > {max(values)}")
        for v in self.postprocess.largest_component:
            if v not in values:
                raise ValueError(f"postprocess.largest_component: {v} is not a label value")
        return self


@dataclass(frozen=True)
class InputSpec:
    """What a 2D model expects, from its manifest's ``[input]`` and ``[normalisation]`` tables."""

    #: Adjacent slices stacked as channels, centred on the slice predicted (1, 3, 5, ...).
    channels: int
    #: In-plane pixel spacing (row, column) in mm that slices are resampled to.
    spacing_mm: tuple[float, float]
    #: Padded height and width are multiples of this (the network's total down-sampling).
    size_multiple: int
    min_size: tuple[int, int]
    max_size: tuple[int, int]
    #: HU window mapped linearly onto [-1, 1]; values outside are clipped.
    window: tuple[float, float]
