"""The benchmarks' CT series: a crude noise volume (ingest speed), a phantom patient (end to end, memory),
and the DICOM instances a real scanner would send for them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

FOV_MM = 400.0  # ct_slice writes PixelSpacing = 0.78125 * 512 / size, i.e. a 400 mm field of view


def make_volume(slices: int, size: int, seed: int = 0) -> np.ndarray:
    """Stored values (HU + 1024, int16) of a crude abdomen: air, body, liver, spine, scanner-like noise.
    The content does not matter for speed (nothing is compressed); it only keeps the files plausible.
    Made once: rounds differ in their UIDs, not their pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    base = np.full((size, size), -1000.0, np.float32)
    body = (x / 0.45) ** 2 + (y / 0.33) ** 2 <= 1
    base[body] = 40.0
    base[((x + 0.15) / 0.2) ** 2 + ((y + 0.03) / 0.16) ** 2 <= 1] = 105.0  # liver
    base[(x ** 2 + (y - 0.22) ** 2) <= 0.04 ** 2] = 450.0  # vertebral body
    vol = np.empty((slices, size, size), np.int16)
    for i in range(slices):
        noisy = base + rng.normal(0.0, 12.0, base.shape).astype(np.float32) * body
        vol[i] = np.clip(noisy + 1024.0, -32768, 32767).astype(np.int16)
    return vol


def ct_slice(vol: np.ndarray, i: int, study: str, series: str, frame: str, label: str) -> Dataset:
    """One CT Image Storage instance with the modules a real scanner fills (patient, study, series,
    frame of reference, equipment, image plane, CT image, VOI LUT, SOP common)."""
    now = dt.datetime.now()
    date, tm = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    spacing, thickness = 0.78125 * 512 / vol.shape[2], 1.0
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, tm
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = tm
    ds.AccessionNumber = f"BENCH{label}"[:16]
    ds.Modality = "CT"
    ds.Manufacturer, ds.ManufacturerModelName = "Benchmark", "Synthetic CT"
    ds.InstitutionName, ds.StationName = "Edge Bench Clinic", "BENCHCT01"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT ABDOMEN WITH CONTRAST"
    ds.SeriesDescription = "Abdomen 1.0 portal venous"
    ds.PatientName, ds.PatientID = "Bench^Synthetic", "BENCH0001"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600101", "O", "066Y"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = f"{thickness:.1f}"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{spacing * vol.shape[2]:.1f}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = "500", "250", "125"
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", 3, 1, i + 1
    z = -float(i) * thickness
    ds.ImagePositionPatient = [f"{-spacing * vol.shape[2] / 2:.3f}", f"{-spacing * vol.shape[1] / 2:.3f}", f"{z:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.3f}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[2])
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.PixelData = vol[i].tobytes()
    return ds


def write_series(vol: np.ndarray, root: Path, parts: int, label: str) -> list[Path]:
    """Write the volume as a new series (fresh Study/Series/SOP UIDs) into ``parts`` folders of
    consecutive slices, one folder per association; returns the folders."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    bounds = np.linspace(0, vol.shape[0], parts + 1).round().astype(int)
    folders = [root / f"part{k}" if parts > 1 else root for k in range(parts)]
    for k, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(bounds[k], bounds[k + 1]):
            ct_slice(vol, i, study, series, frame, label).save_as(folder / f"CT{i:04d}.dcm", enforce_file_format=True)
    return folders


def slab_spacing(slices: int) -> float:
    """1 mm slices for a long series (300 slices: a 300 mm abdomen); a ~200 mm slab for short ones, so a
    smoke run still crosses the whole liver."""
    return 1.0 if slices >= 200 else round(200.0 / slices, 3)


def render_volume(slices: int, size: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored values (HU + 1024, int16), superior slice first (:func:`ct_slice` puts slice i at
    z = -i * spacing), of one phantom patient, centred on the liver."""
    from appliance_dev.synthetic import make_phantom, sample_spec

    spacing = slab_spacing(slices)
    spec = dataclasses.replace(sample_spec(seed, n_slices=slices, fov_kind="full"), fov_mm=FOV_MM, rows=size,
                               cols=size, slice_thickness=spacing, slice_spacing=spacing, z_center=None)
    hu, labels, meta = make_phantom(spec)
    vol = (hu[::-1].astype(np.int32) + 1024).astype(np.int16)
    info = {
        "seed": seed, "fov_mm": FOV_MM, "slice_spacing_mm": spacing, "phase": spec.phase,
        "noise_hu": round(spec.noise_hu, 1), "liver_height_mm": round(float(meta["liver_height_mm"]), 1),
        "lesions_in_patient": int(meta["n_lesions"]),
        "liver_voxels": int((labels == 1).sum()), "lesion_voxels": int((labels == 2).sum()),
        "liver_ml_truth": round(float((labels >= 1).sum()) * (FOV_MM / size) ** 2 * spacing / 1000.0, 1),
    }
    return np.ascontiguousarray(vol), info
