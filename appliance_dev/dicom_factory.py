"""Synthetic DICOM instances and series for the tests: small, quick to write, unique UIDs.

Every instance is a CT Image Storage object with real-looking geometry and int16 pixels whose
values depend on the instance number, so a stored copy can be checked against what was sent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID,
                         UID, generate_uid)

CT_IMAGE_STORAGE = str(CTImageStorage)


@dataclass(frozen=True)
class Instance:
    """One generated instance: where it was written and what it must contain."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    number: int
    pixels: bytes


def pixel_array(number: int, rows: int, cols: int) -> np.ndarray:
    """Deterministic int16 image that differs for every instance number."""
    y, x = np.mgrid[0:rows, 0:cols]
    return ((x * 7 + y * 13 + number * 101) % 4096 - 1024).astype("<i2")


def ct_dataset(
    *,
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str | None = None,
    number: int = 1,
    rows: int = 16,
    cols: int = 16,
    modality: str = "CT",
    description: str = "test series",
    patient_id: str = "TEST-0001",
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = series_uid + ".1" if len(series_uid) < 62 else generate_uid()
    ds.PatientName = "Test^Phantom"
    ds.PatientID = patient_id
    ds.StudyDate = "20250101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A1"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number) * 2.5]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = pixel_array(number, rows, cols).tobytes()
    return ds


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset as a C-STORE carries it: encoded in ``transfer_syntax``, without file meta."""
    ts = UID(transfer_syntax)
    buf = DicomBytesIO()
    buf.is_little_endian = ts.is_little_endian
    buf.is_implicit_VR = ts.is_implicit_VR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deliberately invalid UIDs warn
        write_dataset(buf, ds)
    return buf.getvalue()


def write_file(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> None:
    """Write a DICOM Part 10 file (preamble, file meta, dataset)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, implicit_vr=UID(transfer_syntax) == ImplicitVRLittleEndian,
               little_endian=True)


def make_series(
    directory: Path,
    count: int,
    *,
    rows: int = 16,
    cols: int = 16,
    study_uid: str | None = None,
    series_uid: str | None = None,
    first_number: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Instance]:
    """Write ``count`` instances of one series into ``directory``; returns what was written."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for number in range(first_number, first_number + count):
        ds = ct_dataset(study_uid=study_uid, series_uid=series_uid, number=number, rows=rows, cols=cols)
        path = directory / f"IM{number:05d}.dcm"
        write_file(ds, path, transfer_syntax)
        out.append(Instance(path=path, study_uid=study_uid, series_uid=series_uid,
                            sop_instance_uid=str(ds.SOPInstanceUID), number=number, pixels=bytes(ds.PixelData)))
    return out


def dataset_bytes_of_file(data: bytes) -> bytes:
    """The bytes after a Part 10 file's meta group (preamble, 'DICM' and group 0002 skipped).

    Reads the group's length from (0002,0000) File Meta Information Group Length, as a reader
    of the stored file would, so it does not depend on how the meta was written.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no 'DICM' at offset 128)")
    bio = BytesIO(data)
    bio.seek(132)
    tag = bio.read(4)
    if tag != b"\x02\x00\x00\x00":
        raise ValueError(f"file meta does not start with (0002,0000) group length: {tag!r}")
    vr = bio.read(2)
    if vr != b"UL":
        raise ValueError(f"(0002,0000) has VR {vr!r}, expected UL")
    vl = int.from_bytes(bio.read(2), "little")
    if vl != 4:
        raise ValueError(f"(0002,0000) has length {vl}, expected 4")
    group_length = int.from_bytes(bio.read(4), "little")
    return data[144 + group_length:]


def write_ct_volume(directory: Path, hu: np.ndarray, *, spacing: tuple[float, float] = (1.0, 1.0),
                    thickness: float = 2.0, z0: float = 0.0, body_part: str = "ABDOMEN",
                    series_uid: str | None = None, names: str = "slice") -> list[str]:
    """An axial CT series from an HU volume (slices, rows, cols); returns SOP Instance UIDs in z order."""
    study_uid, series_uid = generate_uid(), series_uid or generate_uid()
    frame = generate_uid()
    uids = []
    for i, sl in enumerate(hu):
        ds = ct_dataset(study_uid=study_uid, series_uid=series_uid, number=i + 1, rows=sl.shape[0], cols=sl.shape[1])
        ds.FrameOfReferenceUID = frame
        ds.BodyPartExamined = body_part
        ds.ImagePositionPatient = [0.0, 0.0, float(z0 + i * thickness)]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(thickness)
        ds.RescaleIntercept = -1024
        ds.PixelData = (np.asarray(sl, dtype=np.int32) + 1024).astype("<i2").tobytes()
        write_file(ds, directory / f"{names}{i:04d}.dcm")
        uids.append(str(ds.SOPInstanceUID))
    return uids


def blob_phantom(n: int = 24, size: int = 96, seed: int = 0) -> np.ndarray:
    """A soft-tissue box with a bright ellipsoid (HU ~150) holding a brighter sphere (HU ~300), plus noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:n, 0:size, 0:size].astype(np.float32)
    hu = np.full((n, size, size), -1000.0, np.float32)
    hu[:, size // 8: -size // 8, size // 8: -size // 8] = 40
    ell = ((x - size * 0.45) / (size * 0.25)) ** 2 + ((y - size * 0.5) / (size * 0.2)) ** 2 + ((z - n / 2) / (n * 0.4)) ** 2 <= 1
    hu[ell] = 150
    sph = (x - size * 0.4) ** 2 + (y - size * 0.5) ** 2 + ((z - n / 2) * 2) ** 2 <= (size * 0.08) ** 2
    hu[sph] = 300
    hu += rng.normal(0, 5, hu.shape)
    return np.round(hu).astype(np.int16)
