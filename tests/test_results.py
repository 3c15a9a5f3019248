"""The results stage: SEG, TID 1500 SR and key-image SC from a label map, checked against known answers.

A phantom CT series is written and decoded as the pipeline does; label maps with known shapes (a liver
block holding two lesion blobs, a liver without lesions, nothing at all) go through ``build_results``.
The objects must pass dciodvfy, read back to exactly the label map, carry exactly summary.json's numbers,
and belong to the source patient and study while being new instances of ours.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from scipy import ndimage

from appliance import __version__
from appliance.errors import ResultsError
from appliance.infer.measure import measure
from appliance.infer.summary import BackendInfo, ModelInfo, SeriesInfo, Summary
from appliance.infer.pipeline import SeriesResult, write_outputs
from appliance.infer.volume import Volume, load_volume
from appliance.models.package import ModelPackage, bundled_models_dir, load_package
from appliance.results import ResultObject, build_results, identity, keyimage
from appliance.results.build import dicom_bytes
from appliance.results.seg import conformant, make_seg
from appliance_dev.dicom_factory import blob_phantom, write_ct_volume

N, SIZE = 20, 128
LIVER, LESION = 1, 2
#: Slice where lesion A (the bigger one) is widest: the key image must show it.
LESION_A_Z = 8
PATIENT_STUDY = ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
                 "StudyID")


# -- inputs ----------------------------------------------------------------------------------------------

def _ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float],
               radii: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2) <= 1


def label_map(case: str) -> np.ndarray:
    """``lesions``: liver block with two separate lesions inside; ``no_lesions``: the block; ``empty``."""
    labels = np.zeros((N, SIZE, SIZE), np.uint8)
    if case == "empty":
        return labels
    labels[3:17, 30:100, 25:105] = LIVER
    if case == "lesions":
        labels[_ellipsoid(labels.shape, (LESION_A_Z, 55, 50), (3.2, 10, 12))] = LESION
        labels[_ellipsoid(labels.shape, (13, 80, 85), (2.2, 5, 6))] = LESION
    return labels


def summarise(volume: Volume, labels: np.ndarray, package: ModelPackage) -> Summary:
    """The summary as ``pipeline.run_series`` makes it."""
    return Summary(
        model=ModelInfo(package.name, package.version, package.onnx_sha256),
        backend=BackendInfo("onnxruntime", "cpu", "fp32"),
        series=SeriesInfo(volume.study_uid, volume.series_uid, int(labels.shape[0]), int(labels.shape[1]),
                          int(labels.shape[2]), (volume.pixel_spacing[0], volume.pixel_spacing[1]), volume.slice_spacing),
        measurements=measure(labels, package.labels, volume.pixel_spacing, volume.slice_spacing,
                             volume.sop_instance_uids, read_hu=lambda a, b: HU[a:b]),
    )


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return load_package(bundled_models_dir() / "liver-ct-demo")


#: The phantom's HU, as the pipeline reads them for each lesion's mean.
HU = blob_phantom(N, SIZE)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    d = tmp_path_factory.mktemp("ct")
    write_ct_volume(d, HU, spacing=(0.8, 0.8), thickness=2.5)
    return load_volume(sorted(d.glob("*.dcm")))


@dataclasses.dataclass
class Built:
    case: str
    labels: np.ndarray
    volume: Volume
    out: Path
    objects: list[ResultObject]
    summary: dict[str, Any]  # as read back from summary.json

    def read(self, kind: str) -> Dataset:
        return pydicom.dcmread(self.out / next(o.filename for o in self.objects if o.kind == kind))


@pytest.fixture(scope="module", params=["lesions", "no_lesions", "empty"])
def built(request: pytest.FixtureRequest, volume: Volume, package: ModelPackage,
          tmp_path_factory: pytest.TempPathFactory) -> Built:
    labels = label_map(request.param)
    out = tmp_path_factory.mktemp(request.param)
    result = SeriesResult(labels=labels, volume=volume, summary=summarise(volume, labels, package))
    write_outputs(result, out)
    objects = build_results(result, package, out)
    return Built(request.param, labels, volume, out, objects,
                 json.loads((out / "summary.json").read_text(encoding="utf-8")))


def test_label_maps_are_what_the_tests_assume() -> None:
    labels = label_map("lesions")
    _, k = ndimage.label(labels == LESION, structure=np.ones((3, 3, 3), bool))
    assert k == 2
    area = (labels == LESION).sum(axis=(1, 2))
    assert int(area.argmax()) == LESION_A_Z and (area == area.max()).sum() == 1
    # Lesions lie inside the liver without touching its border, so outlines do not overlap.
    liver = labels > 0
    in_plane = ndimage.generate_binary_structure(2, 1)[None]
    assert not (ndimage.binary_dilation(labels == LESION, in_plane, iterations=3) & ~liver).any()


# -- files and validation --------------------------------------------------------------------------------

def test_files_and_objects_json(built: Built) -> None:
    names = {p.name for p in built.out.iterdir()}
    assert {"labelmap.npz", "summary.json", "seg.dcm", "sr.dcm", "sc-1.dcm", "key.png", "thumb.png",
            "objects.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert [o.kind for o in built.objects] == ["SEG", "SR", "SC"]
    listed = json.loads((built.out / "objects.json").read_text(encoding="utf-8"))
    assert listed == [dataclasses.asdict(o) for o in built.objects]
    for o in built.objects:
        ds = pydicom.dcmread(built.out / o.filename)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == o.sop_instance_uid
        assert ds.SOPClassUID == o.sop_class_uid and ds.SeriesInstanceUID == o.series_instance_uid
    assert built.objects[0].sop_class_uid == pydicom.uid.SegmentationStorage
    assert built.objects[1].sop_class_uid == pydicom.uid.Comprehensive3DSRStorage
    assert built.objects[2].sop_class_uid == pydicom.uid.SecondaryCaptureImageStorage


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's complaint lines starting "Error" for ``path`` (the caller skips when it is absent)."""
    proc = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def test_dciodvfy_finds_no_errors(built: Built) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools): DICOM validation not run")
    for o in built.objects:
        errors = dciodvfy_errors(built.out / o.filename)
        assert not errors, f"{o.kind} ({built.case}): " + "\n".join(errors)


# -- SEG -------------------------------------------------------------------------------------------------

def test_seg_reads_back_to_the_label_map(built: Built, package: ModelPackage) -> None:
    path = built.out / "seg.dcm"
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    # Mapped back by hand, from the raw frames and their references, independent of highdicom's readers.
    raw = pydicom.dcmread(path)
    frames = raw.pixel_array.reshape(int(raw.NumberOfFrames), int(raw.Rows), int(raw.Columns))
    index = {uid: i for i, uid in enumerate(built.volume.sop_instance_uids)}
    got = np.zeros((2, *built.labels.shape), np.uint8)
    for frame, item in zip(frames, raw.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        got[number - 1, index[uid]] |= frame
    for number, lab in enumerate(package.labels, start=1):
        np.testing.assert_array_equal(got[number - 1], (built.labels == lab.value).astype(np.uint8),
                                      err_msg=f"segment {number} ({lab.name})")
    # highdicom's own reader agrees.
    for number, lab in enumerate(package.labels, start=1):
        arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=built.volume.sop_instance_uids,
                                                segment_numbers=[number], combine_segments=False)
        np.testing.assert_array_equal(arr[..., 0], built.labels == lab.value)


@pytest.mark.parametrize("built", ["lesions"], indirect=True)
def test_seg_segments_are_coded_from_the_manifest(built: Built, package: ModelPackage) -> None:
    raw = built.read("SEG")
    for item, lab in zip(raw.SegmentSequence, package.labels, strict=True):
        assert item.SegmentLabel == lab.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        cat, typ = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodeValue, cat.CodingSchemeDesignator) == (lab.category.code, "SCT")
        assert (typ.CodeValue, typ.CodingSchemeDesignator, typ.CodeMeaning) == (lab.type.code, "SCT", lab.type.meaning)
        if lab.region is None:
            assert "AnatomicRegionSequence" not in item
        else:
            assert item.AnatomicRegionSequence[0].CodeValue == lab.region.code
        alg = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (alg.AlgorithmName, alg.AlgorithmVersion) == (package.name, package.version)
        assert alg.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # DCM Artificial Intelligence
        assert item.TrackingID == lab.name and item.TrackingUID
    assert raw.FrameOfReferenceUID == built.volume.reference.FrameOfReferenceUID


def test_seg_maps_label_values_that_are_not_segment_numbers(volume: Volume, package: ModelPackage) -> None:
    """Manifest order (lesion first) and values need not be 1..N: the SEG numbers segments 1..N anyway."""
    reordered = dataclasses.replace(package, manifest=package.manifest.model_copy(
        update={"labels": list(reversed(package.manifest.labels))}))
    labels = label_map("lesions")
    seg = make_seg(volume, labels, reordered)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver lesion", "Liver"]
    for number, value in ((1, LESION), (2, LIVER)):
        arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=volume.sop_instance_uids,
                                                segment_numbers=[number], combine_segments=False)
        np.testing.assert_array_equal(arr[..., 0], labels == value)


# -- SR --------------------------------------------------------------------------------------------------

def _code(item: Dataset, attr: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    c = item[attr][0]
    return str(c.CodingSchemeDesignator), str(c.CodeValue)


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def measurement_groups(sr: Dataset) -> dict[str, dict[str, Any]]:
    """Tracking identifier -> {nums: {(scheme, code): (value, unit)}, segment, source_series, ...}."""
    out = {}
    for group in _walk(sr.ContentSequence):
        if group.ValueType != "CONTAINER" or _code(group) != ("DCM", "125007"):
            continue
        g: dict[str, Any] = {"nums": {}, "segment": None, "source_series": None, "images": []}
        for item in group.ContentSequence:
            code = _code(item)
            if code == ("DCM", "112039"):
                g["tracking_id"] = item.TextValue
            elif code == ("DCM", "112040"):
                g["tracking_uid"] = item.UID
            elif code == ("DCM", "121071"):
                g["finding"] = _code(item, "ConceptCodeSequence")
            elif code == ("DCM", "276214006") or code == ("SCT", "276214006"):
                g["category"] = _code(item, "ConceptCodeSequence")
            elif code == ("DCM", "121191"):
                ref = item.ReferencedSOPSequence[0]
                g["segment"] = (ref.ReferencedSOPInstanceUID, int(ref.ReferencedSegmentNumber))
            elif code == ("DCM", "121232"):
                g["source_series"] = item.UID
            elif code == ("SCT", "363698007"):
                g["site"] = _code(item, "ConceptCodeSequence")
            elif item.ValueType == "NUM":
                mv = item.MeasuredValueSequence[0]
                g["nums"][code] = (float(mv.NumericValue), str(mv.MeasurementUnitsCodeSequence[0].CodeValue))
                g["images"] += [r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                                for r in item.get("ContentSequence", []) if r.ValueType == "IMAGE"]
        out[g["tracking_id"]] = g
    return out


VOLUME, LONG_AXIS, QUANTITY = ("SCT", "118565006"), ("SCT", "103339001"), ("SCT", "246205007")
SHORT_AXIS = ("SCT", "103340004")
MEAN_HU = ("DCM", "112031")  # Attenuation Coefficient (derivation: mean)


def test_sr_values_equal_the_summary(built: Built, package: ModelPackage) -> None:
    sr = built.read("SR")
    seg = built.read("SEG")
    assert _code(sr) == ("DCM", "126000")  # Imaging Measurement Report
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    groups = measurement_groups(sr)
    summary = built.summary
    by_value = {d["value"]: d for d in summary["labels"]}
    for number, lab in enumerate(package.labels, start=1):
        g = groups[lab.name]
        assert g["segment"] == (seg.SOPInstanceUID, number)
        assert g["source_series"] == built.volume.series_uid
        assert g["tracking_uid"] == seg.SegmentSequence[number - 1].TrackingUID
        assert g["finding"] == ("SCT", lab.type.code)
        assert g["nums"][VOLUME] == (by_value[lab.value]["volume_ml"], "ml")
        if lab.region is not None:
            assert g["site"] == ("SCT", lab.region.code)
        if lab.value == LESION:
            assert g["nums"][QUANTITY] == (summary["lesions"]["count"], "{lesions}")
    lesions = summary["lesions"]["items"]
    assert len(lesions) == {"lesions": 2, "no_lesions": 0, "empty": 0}[built.case]
    for d in lesions:
        g = groups[f"Lesion {d['index']}"]
        assert g["segment"] == (seg.SOPInstanceUID, 2)
        assert g["source_series"] == built.volume.series_uid
        assert g["nums"][VOLUME] == (d["volume_ml"], "ml")
        assert g["nums"][LONG_AXIS] == (d["longest_axial_diameter_mm"], "mm")
        # the short axis, perpendicular on the same slice (RECIST); both name the slice they were measured on
        assert g["nums"][SHORT_AXIS] == (d["short_axis_mm"], "mm") and 0 < d["short_axis_mm"] <= d["longest_axial_diameter_mm"]
        assert g["images"] == [d["slice_sop_instance_uid"]] * 2
        assert d["mean_hu"] is not None and g["nums"][MEAN_HU] == (d["mean_hu"], "[hnsf'U]")
    assert sorted(k for k in groups if k.startswith("Lesion ")) == sorted(f"Lesion {d['index']}" for d in lesions)
    if built.case == "lesions":
        assert groups["Liver including lesions"]["nums"][VOLUME] == (summary["organs"][0]["volume_ml"], "ml")
        assert summary["lesions"]["items"][0]["volume_ml"] > summary["lesions"]["items"][1]["volume_ml"] > 0
    # Evidence: the SEG and the source slices, all in the source study.
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID, *built.volume.sop_instance_uids}
    # Observer: this device, running this model.
    texts = {(_code(i), i.get("TextValue") or i.get("UID")) for i in _walk(sr.ContentSequence)
             if i.ValueType in ("TEXT", "UIDREF")}
    assert (("DCM", "121014"), identity.MANUFACTURER) in texts  # Device Observer Manufacturer
    assert (("DCM", "121015"), identity.MANUFACTURER_MODEL_NAME) in texts  # Device Observer Model Name
    assert (("DCM", "121016"), identity.device_serial()) in texts  # Device Observer Serial Number
    assert (("DCM", "111001"), package.name) in texts  # Algorithm Name
    assert (("DCM", "111003"), package.version) in texts


# -- SC key image ----------------------------------------------------------------------------------------

def _border(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def test_key_image_shows_the_largest_lesion_slice_with_outlines(built: Built, package: ModelPackage) -> None:
    sc = built.read("SC")
    labels = built.labels
    lesion_area = (labels == LESION).sum(axis=(1, 2))
    organ_area = (labels == LIVER).sum(axis=(1, 2))
    expected = {"lesions": LESION_A_Z, "no_lesions": int(organ_area.argmax()), "empty": N // 2}[built.case]
    if built.case == "lesions":
        assert int(lesion_area.argmax()) == expected
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == built.volume.sop_instance_uids[expected]
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == pydicom.uid.CTImageStorage
    assert sc.PhotometricInterpretation == "RGB" and int(sc.SamplesPerPixel) == 3
    assert sc.BurnedInAnnotation == "YES"
    assert sc.BodyPartExamined == "ABDOMEN"
    assert list(sc.PatientOrientation) == ["L", "P"]
    assert [float(v) for v in sc.PixelSpacing] == [0.8, 0.8]
    assert package.name in sc.ImageComments and package.version in sc.ImageComments
    rgb = sc.pixel_array
    assert rgb.shape[1:] == (SIZE, 3) and rgb.shape[0] > SIZE  # the caption band lies below the anatomy
    anatomy = rgb[:SIZE]
    sl = labels[expected]
    green, red = keyimage.ORGAN_COLOURS[0], keyimage.LESION_COLOURS[0]
    lesion, liver = sl == LESION, sl > 0
    if liver.any():
        assert (anatomy[_border(liver)] == green).all()
    if lesion.any():
        assert (anatomy[_border(lesion)] == red).all()
    # Away from every border the slice is plain grey.
    far = ~ndimage.binary_dilation(_border(liver) | _border(lesion), iterations=3)
    assert (anatomy[far][:, 0] == anatomy[far][:, 1]).all() and (anatomy[far][:, 1] == anatomy[far][:, 2]).all()
    if not liver.any():
        assert (anatomy[..., 0] == anatomy[..., 1]).all()
    # The caption is burnt in: coloured text pixels in the band.
    band = rgb[SIZE:]
    assert (band.max(axis=2) > 128).sum() > 200
    # PNG previews are the same pixels, the thumbnail at most 256 px.
    np.testing.assert_array_equal(np.asarray(Image.open(built.out / "key.png").convert("RGB")), rgb)
    thumb = Image.open(built.out / "thumb.png")
    assert max(thumb.size) <= 256 and thumb.mode == "RGB"


def test_caption_names_model_and_lesions(package: ModelPackage, volume: Volume) -> None:
    labels = label_map("lesions")
    summary = summarise(volume, labels, package)
    m = summary.measurements
    lines = [t for t, _ in keyimage._caption_lines(package, m, keyimage.label_colours(package), 8, N)]
    assert lines[0] == keyimage.CAPTION_WARNING
    assert f"{package.name} {package.version}" in lines[1]
    assert m.lesion_count == 2
    assert any(line.startswith(f"Lesions: {m.lesion_count}") and f"{m.largest_diameter_mm:.1f} mm" in line
               for line in lines)


def without(volume: Volume, keyword: str) -> Volume:
    """``volume`` with ``keyword`` deleted from (copies of) every slice header."""
    headers = [copy.deepcopy(h) for h in volume.headers]
    for h in headers:
        delattr(h, keyword)
    return dataclasses.replace(volume, headers=headers)


def test_key_image_of_a_series_without_body_part_is_valid(volume: Volume, package: ModelPackage,
                                                          tmp_path: Path) -> None:
    """Without BodyPartExamined, dciodvfy asks for Laterality (Type 2C): it is sent empty."""
    bare = without(volume, "BodyPartExamined")
    labels = label_map("lesions")
    key = keyimage.render_key_image(bare, labels, package, summarise(bare, labels, package).measurements)
    sc = keyimage.make_sc(bare, labels, key, package)
    assert "BodyPartExamined" not in sc and sc.Laterality == ""
    path = tmp_path / "sc.dcm"
    path.write_bytes(dicom_bytes(sc))
    if shutil.which("dciodvfy"):
        assert not dciodvfy_errors(path)


@pytest.mark.parametrize("body_part, laterality, expected", [
    ("ABDOMEN", None, None),          # unpaired: Laterality must be absent
    ("LIVER", None, None),
    ("PARTIALBODY", None, ""),        # Siemens' term, unknown to the standard: empty (unknown), not absent
    ("KIDNEY", None, ""),             # paired, side not known
    ("KIDNEY", "R", "R"),             # the source's value is copied
    (None, None, ""),
])
def test_laterality_follows_the_body_part(body_part: str | None, laterality: str | None,
                                          expected: str | None) -> None:
    ref, sc = Dataset(), Dataset()
    if body_part:
        ref.BodyPartExamined = body_part
    if laterality:
        ref.Laterality = laterality
    keyimage.set_laterality(sc, ref)
    assert sc.get("BodyPartExamined") == body_part
    assert sc.get("Laterality") == expected


@pytest.mark.parametrize("iop, expected", [
    ((1, 0, 0, 0, 1, 0), ("L", "P")),            # axial
    ((1, 0, 0, 0, 0, -1), ("L", "F")),           # coronal
    ((0, 1, 0, 0, 0, -1), ("P", "F")),           # sagittal
    ((-1, 0, 0, 0, -1, 0), ("R", "A")),          # axial, patient prone/rotated
    ((0.98, 0.17, 0, -0.17, 0.98, 0), ("L", "P")),  # slightly oblique axial
])
def test_patient_orientation(iop: tuple[float, ...], expected: tuple[str, str]) -> None:
    assert keyimage.patient_orientation(iop) == expected


# -- identity --------------------------------------------------------------------------------------------

def test_objects_belong_to_the_source_study_and_are_new_and_ours(built: Built) -> None:
    src = built.volume.reference
    datasets = [pydicom.dcmread(built.out / o.filename) for o in built.objects]
    for ds in datasets:
        for keyword in PATIENT_STUDY:
            assert ds.get(keyword) == src.get(keyword), f"{ds.Modality} {keyword}"
        assert ds.Manufacturer == identity.MANUFACTURER
        assert ds.ManufacturerModelName == identity.MANUFACTURER_MODEL_NAME
        assert ds.SoftwareVersions == __version__
        assert ds.DeviceSerialNumber == identity.device_serial()
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.SOPInstanceUID not in built.volume.sop_instance_uids
        assert "PatientBirthDate" in ds and "PatientSex" in ds  # Type 2: present even when the source lacks them
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 3
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    assert [int(ds.SeriesNumber) for ds in datasets] == [identity.SEG_SERIES_NUMBER, identity.SR_SERIES_NUMBER,
                                                         identity.SC_SERIES_NUMBER]
    assert [ds.Modality for ds in datasets] == ["SEG", "SR", "OT"]
    # The caller's headers were not modified (the phantom has no PatientBirthDate).
    assert "PatientBirthDate" not in built.volume.headers[0]


def test_results_are_new_every_time(volume: Volume, package: ModelPackage, tmp_path: Path) -> None:
    labels = label_map("no_lesions")
    result = SeriesResult(labels=labels, volume=volume, summary=summarise(volume, labels, package))
    a = build_results(result, package, tmp_path / "a")
    b = build_results(result, package, tmp_path / "b")
    assert not {o.sop_instance_uid for o in a} & {o.sop_instance_uid for o in b}
    assert not {o.series_instance_uid for o in a} & {o.series_instance_uid for o in b}


# -- refusals --------------------------------------------------------------------------------------------

def test_series_without_frame_of_reference_is_refused(volume: Volume, package: ModelPackage,
                                                      tmp_path: Path) -> None:
    bad = without(volume, "FrameOfReferenceUID")
    labels = label_map("lesions")
    result = SeriesResult(labels=labels, volume=bad, summary=summarise(bad, labels, package))
    with pytest.raises(ResultsError, match="FrameOfReferenceUID.*SEG cannot reference it"):
        build_results(result, package, tmp_path)
    assert not list(tmp_path.iterdir())


def test_series_without_uids_is_refused(volume: Volume, package: ModelPackage, tmp_path: Path) -> None:
    """Some anonymisers blank the UIDs (the real CT in ../shared/data has none): nothing could reference it."""
    headers = [copy.deepcopy(h) for h in volume.headers]
    for h in headers:
        h.SOPInstanceUID = ""
    bad = dataclasses.replace(volume, headers=headers)
    labels = label_map("lesions")
    result = SeriesResult(labels=labels, volume=bad, summary=summarise(volume, labels, package))
    with pytest.raises(ResultsError, match="20 of 20 slices .* have no SOPInstanceUID"):
        build_results(result, package, tmp_path)


def test_headers_are_repaired_in_copies_only(volume: Volume) -> None:
    """Missing Type 2 attributes and an empty SOPClassUID are filled in a copy; the source stays untouched."""
    original = copy.deepcopy(volume.headers[0])
    original.SOPClassUID = ""
    fixed = conformant(original)
    assert fixed is not original
    assert fixed.SOPClassUID == pydicom.uid.CTImageStorage  # from the file meta
    assert "PatientBirthDate" in fixed and not fixed.PatientBirthDate and not fixed.PatientSex
    assert original.SOPClassUID == "" and "PatientBirthDate" not in original
    assert fixed.SOPInstanceUID == original.SOPInstanceUID
    complete = copy.deepcopy(volume.headers[0])
    complete.PatientBirthDate, complete.PatientSex, complete.ReferringPhysicianName = "19700101", "O", ""
    assert conformant(complete) is complete
    no_meta = Dataset()
    no_meta.SOPInstanceUID = "1.2.3"
    with pytest.raises(ResultsError, match="no SOPClassUID"):
        conformant(no_meta)


def test_label_map_of_another_shape_is_refused(volume: Volume, package: ModelPackage, tmp_path: Path) -> None:
    labels = label_map("lesions")[:-1]
    result = SeriesResult(labels=labels, volume=volume, summary=summarise(volume, labels[:1], package))
    with pytest.raises(ResultsError, match="label map has shape"):
        build_results(result, package, tmp_path)


# -- end to end and size ---------------------------------------------------------------------------------

def test_run_series_output_builds_valid_results(tmp_path: Path) -> None:
    """The threshold model's real pipeline output goes through unchanged (summary as run_series makes it)."""
    from appliance_dev.model_factory import write_package

    from appliance.infer.backends.onnxruntime import OnnxRuntimeBackend
    from appliance.infer.pipeline import run_series

    pkg = load_package(write_package(tmp_path / "models"))
    write_ct_volume(tmp_path / "ct", blob_phantom(12, 96), spacing=(1.0, 1.0))
    backend = OnnxRuntimeBackend(pkg, threads=1)
    try:
        result = run_series(sorted((tmp_path / "ct").glob("*.dcm")), pkg, backend)
    finally:
        backend.close()
    assert result.summary.measurements.lesion_count == 1
    out = tmp_path / "out"
    write_outputs(result, out)
    objects = build_results(result, pkg, out)
    groups = measurement_groups(pydicom.dcmread(out / "sr.dcm"))
    les = result.summary.measurements.lesions[0]
    assert groups["Lesion 1"]["nums"][LONG_AXIS] == (les.longest_axial_diameter_mm, "mm")
    sc = pydicom.dcmread(out / "sc-1.dcm")
    area = (np.asarray(result.labels) == LESION).sum(axis=(1, 2))  # run_series keeps a compact LabelMap
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == result.volume.sop_instance_uids[int(area.argmax())]
    if shutil.which("dciodvfy"):
        for o in objects:
            assert not dciodvfy_errors(out / o.filename), o.kind
