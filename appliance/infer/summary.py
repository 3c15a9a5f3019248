"""``summary.json``: what one inference run produced, typed, written from and read back into :class:`Summary`.

The file's layout is unchanged from the dict it used to be (the measurement fields at the top level), so
earlier results stay readable; the SR builder, the key image, the CLI and the coming panel read attributes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.infer.measure import Measurements, SummaryFormatError

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    onnx_sha256: str


@dataclass(frozen=True)
class BackendInfo:
    name: str
    device: str
    precision: str


@dataclass(frozen=True)
class SeriesInfo:
    study_instance_uid: str
    series_instance_uid: str
    slices: int
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Summary:
    model: ModelInfo
    backend: BackendInfo
    series: SeriesInfo
    measurements: Measurements
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        s = self.series
        return {
            "model": {"name": self.model.name, "version": self.model.version, "onnx_sha256": self.model.onnx_sha256},
            "backend": {"name": self.backend.name, "device": self.backend.device, "precision": self.backend.precision},
            "series": {
                "study_instance_uid": s.study_instance_uid,
                "series_instance_uid": s.series_instance_uid,
                "slices": s.slices,
                "rows": s.rows,
                "columns": s.columns,
                "pixel_spacing_mm": list(s.pixel_spacing_mm),
                "slice_spacing_mm": s.slice_spacing_mm,
                "warnings": list(s.warnings),
            },
            **self.measurements.to_dict(),
            "timings_s": dict(self.timings_s),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> Summary:
        try:
            m, b, s = d["model"], d["backend"], d["series"]
            spacing = tuple(float(v) for v in s["pixel_spacing_mm"])
            if len(spacing) != 2:
                raise ValueError(f"pixel_spacing_mm has {len(spacing)} values, not 2")
            return cls(
                model=ModelInfo(str(m["name"]), str(m["version"]), str(m["onnx_sha256"])),
                backend=BackendInfo(str(b["name"]), str(b["device"]), str(b["precision"])),
                series=SeriesInfo(
                    str(s["study_instance_uid"]),
                    str(s["series_instance_uid"]),
                    int(s["slices"]),
                    int(s["rows"]),
                    int(s["columns"]),
                    (spacing[0], spacing[1]),
                    float(s["slice_spacing_mm"]),
                    tuple(str(w) for w in s.get("warnings", [])),
                ),
                measurements=Measurements.from_dict(d),
                timings_s={str(k): float(v) for k, v in d.get("timings_s", {}).items()},
            )
        except SummaryFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SummaryFormatError(f"the summary is incomplete or malformed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def read(cls, path: Path) -> Summary:
        """A job's ``summary.json``; :class:`SummaryFormatError` if it is not one this software wrote."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SummaryFormatError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(data)
