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
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.dicomio import HeaderError, check_decodable, is_deflated, read_header
from appliance.errors import DecodeError, GeometryError, InferenceError

log = logging.getLogger("appliance.infer")

#: Orientation cosines of two slices may differ by this much and still count as one stack.
_ORIENTATION_TOL = 1e-3
#: Relative spread of slice gaps tolerated before the series is called irregular (logged, not refused).
_GAP_TOL = 0.1


@dataclass
class Volume:
    """One series as a stack of slices on a common grid.

    ``hu`` holds every slice decoded (``load_volume``) or is None (``scan_series``): then slices are
    decoded from ``paths`` when asked for (``read_hu``), a slab at a time, so that memory does not follow
    the series length.
    """

    hu: np.ndarray | None  # (slices, rows, cols) float32, Hounsfield units for CT; None: decode on demand
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
    #: Every slice's file, in geometric order: where ``read_hu`` decodes them from.
    paths: list[Path] = field(default_factory=list)
    #: (rows, columns) of every slice.
    grid: tuple[int, int] = (0, 0)
    #: Per slice (same order): where its uncompressed 16-bit pixel data element starts in its file, for
    #: ``read_hu`` to read it directly; None: decoded with pydicom (compressed, other bit depths).
    native_offsets: list[int | None] = field(default_factory=list)

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_spacing / 1000.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, cols), decoded or not."""
        if self.hu is not None:
            return (int(self.hu.shape[0]), int(self.hu.shape[1]), int(self.hu.shape[2]))
        return (len(self.sop_instance_uids), int(self.grid[0]), int(self.grid[1]))

    def read_hu(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start:stop`` in HU, float32: from ``hu`` when decoded, else read and decoded from their files."""
        if self.hu is not None:
            return self.hu[start:stop]
        out = np.empty((stop - start, *self.shape[1:]), dtype=np.float32)
        for i in range(start, stop):
            offset = self.native_offsets[i] if self.native_offsets else None
            if offset is not None:
                out[i - start] = read_native(self.paths[i], offset, self.headers[i], self.shape[1:])
            else:
                out[i - start] = decode_file(self.paths[i], self.sop_instance_uids[i], self.shape[1:])
        return out

    def slice_hu(self, index: int) -> np.ndarray:
        """One slice in HU (rows, cols) float32."""
        return self.read_hu(index, index + 1)[0]


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
        check_decodable(read_header(path), path.name)  # before pydicom inflates or decodes anything
        return pydicom.dcmread(path)
    except HeaderError as exc:
        raise DecodeError(str(exc)) from None
    except Exception as exc:
        raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from None


#: Transfer syntaxes whose pixel data is the plain little-endian array after an element header.
_NATIVE_LE = {ExplicitVRLittleEndian: 12, ImplicitVRLittleEndian: 8}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _read_header(path: Path) -> tuple[Dataset, int | None]:
    """The header (no pixel data) and, for uncompressed 16-bit single-frame grey images, the offset of the
    pixel data element: re-parsing a whole file per slice to decode it cost 3-4 ms of its ~5 ms."""
    try:
        if is_deflated(path):  # pydicom would inflate it whole, pixel data included
            ds, offset = read_header(path), 0
        else:
            with open(path, "rb") as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                offset = f.tell()
        check_decodable(ds, path.name)
    except HeaderError as exc:
        raise DecodeError(str(exc)) from None
    except Exception as exc:
        raise DecodeError(f"{path.name}: not a readable DICOM file: {exc}") from None
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        native = (
            tsuid in _NATIVE_LE
            and int(ds.get("BitsAllocated", 0)) == 16
            and int(ds.get("BitsStored", 0)) == 16
            and int(ds.get("SamplesPerPixel", 1)) == 1
            and int(ds.get("NumberOfFrames", 1) or 1) == 1
            and int(ds.get("PixelRepresentation", -1)) in (0, 1)
        )
    except (TypeError, ValueError):
        native = False
    return ds, (offset if native else None)


def read_native(path: Path, offset: int, header: Dataset, shape: tuple[int, int]) -> np.ndarray:
    """HU of an uncompressed 16-bit slice read straight from its file: the same numbers as pydicom's
    ``pixel_array`` and ``decode_hu`` give (a plain little-endian array, then the modality LUT)."""
    where = f"instance {header.get('SOPInstanceUID', Path(path).name)}"
    tsuid = header.file_meta.TransferSyntaxUID
    n = shape[0] * shape[1] * 2
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            head = f.read(_NATIVE_LE[tsuid])
            length = int.from_bytes(head[-4:], "little")
            data = f.read(n) if head[:4] == _PIXEL_DATA_TAG and length == n else b""
    except OSError as exc:
        raise DecodeError(f"{where}: cannot read {Path(path).name}: {exc}") from None
    if len(data) != n:
        # Not the layout the header scan saw (the file changed or its pixel data is odd): decode it properly.
        return decode_file(path, str(header.get("SOPInstanceUID", "")), shape)
    arr = np.frombuffer(data, dtype="<i2" if int(header.PixelRepresentation) == 1 else "<u2").reshape(shape)
    slope = float(header.get("RescaleSlope", 1) or 1)
    intercept = float(header.get("RescaleIntercept", 0) or 0)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= slope
    if intercept != 0.0:
        out += intercept
    return out


def decode_file(path: Path, sop_instance_uid: str, shape: tuple[int, int]) -> np.ndarray:
    """One slice's HU from its file, checked against what the header scan saw."""
    ds = _read(Path(path))
    where = f"instance {ds.get('SOPInstanceUID', Path(path).name)}"
    if str(ds.get("SOPInstanceUID", "")) != sop_instance_uid:
        raise DecodeError(f"{where}: the file {Path(path).name} changed while the series was processed")
    if "PixelData" not in ds:
        raise DecodeError(f"{where}: has no pixel data")
    hu = decode_hu(ds, where)
    if hu.shape != tuple(shape):
        raise GeometryError(
            f"{where}: {hu.shape[0]}x{hu.shape[1]} pixels differs from the series' {shape[0]}x{shape[1]}"
        )
    return hu


def load_volume(paths: Sequence[Path], progress: Callable[[int, int], None] | None = None) -> Volume:
    """Read, decode and stack ``paths`` (one series) in geometric order, every slice in memory."""
    volume = scan_series(paths)
    n = volume.shape[0]
    hu = np.empty(volume.shape, dtype=np.float32)
    for i in range(n):
        hu[i] = volume.read_hu(i, i + 1)[0]
        if progress:
            progress(i + 1, n)
    volume.hu = hu
    return volume


def scan_series(paths: Sequence[Path]) -> Volume:
    """The geometry of ``paths`` (one series) from their headers alone, slices in geometric order.

    No pixel data is read (``stop_before_pixels``): the returned volume decodes slices on demand
    (``Volume.read_hu``), so a 3,000-slice series costs its headers here, not 3 GB of HU.
    """
    if not paths:
        raise InferenceError("the series has no instances")
    # (position along the normal, IPP, header, file, native pixel data offset)
    headers: list[tuple[float, tuple[float, ...], Dataset, Path, int | None]] = []
    orientation: tuple[float, ...] | None = None  # the first slice's; normal and shape are set with it
    normal = np.zeros(3)
    shape = (0, 0)
    series_uid = None
    warnings: list[str] = []
    for p in paths:
        p = Path(p)
        ds, native = _read_header(p)
        where = f"instance {ds.get('SOPInstanceUID', p.name)}"
        if series_uid is None:
            series_uid = str(ds.get("SeriesInstanceUID", ""))
        elif str(ds.get("SeriesInstanceUID", "")) != series_uid:
            raise GeometryError(f"{where} belongs to another series ({ds.get('SeriesInstanceUID')})")
        iop = _floats(ds, "ImageOrientationPatient", 6, where)
        ipp = _floats(ds, "ImagePositionPatient", 3, where)
        if orientation is None:
            orientation = iop
            row, col = np.array(iop[:3]), np.array(iop[3:])
            normal = np.cross(row, col)
            if not 0.99 < np.linalg.norm(normal) < 1.01:
                raise GeometryError(f"{where}: ImageOrientationPatient {iop} is not two orthonormal directions")
            shape = (int(ds.Rows), int(ds.Columns))
        elif max(abs(a - b) for a, b in zip(iop, orientation, strict=True)) > _ORIENTATION_TOL:
            raise GeometryError(
                f"{where}: orientation {iop} differs from the series' {orientation} (localizers or reformats mixed in?)"
            )
        elif (int(ds.Rows), int(ds.Columns)) != shape:
            raise GeometryError(
                f"{where}: {ds.Rows}x{ds.Columns} pixels differs from the series' {shape[0]}x{shape[1]}"
            )
        headers.append((float(np.dot(normal, ipp)), ipp, ds, p, native))

    assert orientation is not None  # paths is not empty
    headers.sort(key=lambda h: h[0])
    z = np.array([h[0] for h in headers])
    if len(z) > 1:
        gaps = np.diff(z)
        if (gaps < 1e-3).any():
            dup = int(np.argmin(gaps))
            raise GeometryError(
                f"two instances at the same position ({z[dup]:.2f} mm along the normal): "
                f"{headers[dup][2].SOPInstanceUID} and {headers[dup + 1][2].SOPInstanceUID}"
            )
        slice_spacing = float(np.median(gaps))
        if (np.abs(gaps - slice_spacing) > _GAP_TOL * slice_spacing).any():
            msg = f"irregular slice spacing: gaps from {gaps.min():.2f} to {gaps.max():.2f} mm (median {slice_spacing:.2f})"
            warnings.append(msg)
            log.warning("series %s: %s", series_uid, msg)
    else:
        slice_spacing = float(headers[0][2].get("SliceThickness", 1.0) or 1.0)

    first = headers[0][2]
    pixel_spacing = _floats(first, "PixelSpacing", 2, f"instance {first.get('SOPInstanceUID')}")
    reference = headers[0][2]
    return Volume(
        hu=None,
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
        paths=[h[3] for h in headers],
        native_offsets=[h[4] for h in headers],
        grid=(int(shape[0]), int(shape[1])),
    )
