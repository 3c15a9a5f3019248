"""Finding one series among loose DICOM files, for ``appliance infer``."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from appliance.errors import InferenceError


def find_series(folder: Path, series_uid: str | None = None) -> list[Path]:
    """The files of the one image series in ``folder`` (recursively), or of ``series_uid``."""
    if not folder.is_dir():
        raise InferenceError(f"{folder} is not a folder")
    by_series: dict[str, list[Path]] = defaultdict(list)
    skipped = 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == "DICOMDIR":
            continue
        try:
            ds = dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Rows"])
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
            skipped += 1
            continue
        if "Rows" in ds:
            # Anonymisers sometimes blank SeriesInstanceUID: such files still make one series offline.
            by_series[str(ds.get("SeriesInstanceUID", "") or "")].append(p)
    if series_uid is not None:
        if series_uid not in by_series:
            raise InferenceError(f"no image of series {series_uid} in {folder}")
        return by_series[series_uid]
    if not by_series:
        raise InferenceError(
            f"no DICOM images in {folder}" + (f" ({skipped} non-DICOM files skipped)" if skipped else "")
        )
    if len(by_series) > 1:
        listing = ", ".join(f"{uid or '(blank)'} ({len(f)} files)" for uid, f in sorted(by_series.items()))
        raise InferenceError(f"{folder} holds {len(by_series)} series; choose one with --series: {listing}")
    return next(iter(by_series.values()))
