"""From a series' instance files to one HU volume in geometric order.

Slices are ordered by ImagePositionPatient projected on the normal of ImageOrientationPatient, never by
file name or InstanceNumber (both are unreliable across vendors and after PACS round trips). Pixel data is
decoded with pydicom and its pylibjpeg/pyjpegls plugins for every compressed syntax the receiver accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from appliance.errors import DecodeError, GeometryError, InferenceError

log = logging.getLogger("appliance.infer")

#: Orientation cosines of two slices may differ by this much and still count as one stack.
_ORIENTATION_TOL = 1e-3
#: Relative spread of slice gaps tolerated before the series is called irregular (logged, not refused).
_GAP_TOL = 0.1


@dataclass
class Volume:
    """One series as a stack of slices on a common grid."""

    hu: np.ndarray  # (slices, rows, cols) float32, Hounsfield units for CT
    sop_instance_uids: list[str]
    pixel_spacing: tuple[float, float]  # (row, column) spacing in mm
    slice_spacing: float  # mm between slice centres along the normal
    positions: np.ndarray  # (slices, 3) ImagePositionPatient in z order
    orientation: tuple[float, ...]
    series_uid: str
    study_uid: str
    #: Header of the first slice (no pixels): what results copy patient/study attributes from.
    reference: Dataset
    warnings: list[str] = field(default_factory=list)
    #: Every slice's header (pixel data dropped), in the same order as ``hu``: results reference them.
    headers: list[Dataset] = field(default_factory=list)

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0


def _floats(ds: Dataset, keyword: str, n: int, where: str) -> tuple[float, ...]:
    value = ds.get(keyword)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise GeometryError(f"{where}: {keyword} is missing or not numeric") from None
    if len(out) != n:
        raise GeometryError(f"{where}: {keyword} has {len(out)} values, expected {n}")
    return out


def decode_hu(ds: Dataset, where: str) -> np.ndarray:
    """Pixel data of a single-frame image as float32 after the modality LUT (HU for CT)."""
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DecodeError(f"{where}: multi-frame images are not supported by 2D slice models yet")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DecodeError(f"{where}: colour images ({ds.get('PhotometricInterpretation')}) cannot be CT input")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing plugins or damaged streams
        tsuid = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        name = getattr(tsuid, "name", str(tsuid))
        raise DecodeError(f"{where}: cannot decode pixel data ({name}): {exc}") from None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= slope
    if intercept != 0.0:
        out += intercept
    return out


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:
        raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from None


def load_volume(paths: Sequence[Path], progress: Callable[[int, int], None] | None = None) -> Volume:
    """Read, decode and stack ``paths`` (one series) in geometric order."""
    if not paths:
        raise InferenceError("the series has no instances")
    headers: list[tuple[float, tuple[float, ...], Dataset]] = []  # (position along the normal, IPP, header)
    normal = orientation = None
    shape = None
    series_uid = None
    warnings: list[str] = []
    for p in paths:
        p = Path(p)
        ds = _read(p)
        where = f"instance {ds.get('SOPInstanceUID', p.name)}"
        if series_uid is None:
            series_uid = str(ds.get("SeriesInstanceUID", ""))
        elif str(ds.get("SeriesInstanceUID", "")) != series_uid:
            raise GeometryError(f"{where} belongs to another series ({ds.get('SeriesInstanceUID')})")
        if "PixelData" not in ds:
            raise DecodeError(f"{where}: has no pixel data")
        iop = _floats(ds, "ImageOrientationPatient", 6, where)
        ipp = _floats(ds, "ImagePositionPatient", 3, where)
        if orientation is None:
            orientation = iop
            row, col = np.array(iop[:3]), np.array(iop[3:])
            normal = np.cross(row, col)
            if not 0.99 < np.linalg.norm(normal) < 1.01:
                raise GeometryError(f"{where}: ImageOrientationPatient {iop} is not two orthonormal directions")
            shape = (int(ds.Rows), int(ds.Columns))
        elif max(abs(a - b) for a, b in zip(iop, orientation)) > _ORIENTATION_TOL:
            raise GeometryError(f"{where}: orientation {iop} differs from the series' {orientation} "
                                "(localizers or reformats mixed in?)")
        elif (int(ds.Rows), int(ds.Columns)) != shape:
            raise GeometryError(f"{where}: {ds.Rows}x{ds.Columns} pixels differs from the series' {shape[0]}x{shape[1]}")
        headers.append((float(np.dot(normal, ipp)), ipp, ds))

    headers.sort(key=lambda h: h[0])
    z = np.array([h[0] for h in headers])
    if len(z) > 1:
        gaps = np.diff(z)
        if (gaps < 1e-3).any():
            dup = int(np.argmin(gaps))
            raise GeometryError(f"two instances at the same position ({z[dup]:.2f} mm along the normal): "
                                f"{headers[dup][2].SOPInstanceUID} and {headers[dup + 1][2].SOPInstanceUID}")
        slice_spacing = float(np.median(gaps))
        if (np.abs(gaps - slice_spacing) > _GAP_TOL * slice_spacing).any():
            msg = f"irregular slice spacing: gaps from {gaps.min():.2f} to {gaps.max():.2f} mm (median {slice_spacing:.2f})"
            warnings.append(msg)
            log.warning("series %s: %s", series_uid, msg)
    else:
        slice_spacing = float(headers[0][2].get("SliceThickness", 1.0) or 1.0)

    first = headers[0][2]
    pixel_spacing = _floats(first, "PixelSpacing", 2, f"instance {first.get('SOPInstanceUID')}")
    hu = np.empty((len(headers), *shape), dtype=np.float32)
    for i, (_, _, ds) in enumerate(headers):
        hu[i] = decode_hu(ds, f"instance {ds.SOPInstanceUID}")
        del ds.PixelData  # the decoded copy is all we keep
        if progress:
            progress(i + 1, len(headers))
    reference = headers[0][2]
    return Volume(
        hu=hu,
        sop_instance_uids=[str(h[2].SOPInstanceUID) for h in headers],
        pixel_spacing=(pixel_spacing[0], pixel_spacing[1]),
        slice_spacing=slice_spacing,
        positions=np.array([h[1] for h in headers]),
        orientation=tuple(orientation),
        series_uid=series_uid or "",
        study_uid=str(reference.get("StudyInstanceUID", "")),
        reference=reference,
        warnings=warnings,
        headers=[h[2] for h in headers],
    )
