"""Decode, geometry, resampling and measurement: the infer stage's pieces, checked against known answers."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.errors import DecodeError, GeometryError
from appliance.infer.measure import Measurements, measure
from appliance.infer.preprocess import InputSpec, labels_to_model_grid, model_grid, resize2d, scores_to_source
from appliance.infer.volume import decode_hu, load_volume
from appliance.models.manifest import Code, Label
from conftest import appliance_exe, need_tool, write_toml
from appliance_dev.dicom_factory import blob_phantom, write_ct_volume
from appliance_dev.model_factory import hu_threshold_labels, write_package

SPEC = InputSpec(channels=3, spacing_mm=(1.5, 1.5), size_multiple=16, min_size=(64, 64), max_size=(384, 384),
                 window=(-250.0, 350.0))


# -- geometry ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, spacing, shape, padded, used", [
    (512, 0.7, (239, 239), (240, 240), 1.5),      # full field of view
    (512, 0.35, (119, 119), (128, 128), 1.5),     # targeted liver reconstruction, 180 mm
    (512, 1.2, (384, 384), (384, 384), 1.6),      # 614 mm: coarser so it fits max_size
    (32, 1.0, (21, 21), (64, 64), 1.5),           # tiny: padded up to min_size
])
def test_model_grid(rows: int, spacing: float, shape, padded, used) -> None:
    g = model_grid(rows, rows, (spacing, spacing), SPEC)
    assert g.shape == shape and g.padded == padded and g.spacing_mm[0] == pytest.approx(used)


def test_resize_round_trip_keeps_smooth_images() -> None:
    y, x = np.mgrid[0:128, 0:128].astype(np.float32)
    img = np.sin(x / 15) + np.cos(y / 11)
    back = resize2d(resize2d(img[None], (96, 96)), (128, 128))[0]
    assert np.abs(back - img)[8:-8, 8:-8].max() < 0.05


def test_labels_and_scores_share_one_mapping() -> None:
    """Resampling one-hot labels to the model grid and back returns the labels (large structures)."""
    labels = np.zeros((2, 200, 200), np.uint8)
    labels[:, 50:150, 40:160] = 1
    labels[:, 80:110, 70:100] = 2
    g = model_grid(200, 200, (0.9, 0.9), SPEC)
    small = labels_to_model_grid(labels, g, 3)
    onehot = np.stack([(small == k) for k in range(3)], 1).astype(np.float32)
    back = scores_to_source(onehot, g).argmax(1)
    assert (back != labels).mean() < 0.01


@pytest.mark.parametrize("rows, spacing, smooth", [(512, 0.7, True), (512, 0.35, False), (100, 2.0, False),
                                                   (333, 0.9, True), (64, 1.5, False)])
def test_fast_label_resampling_equals_full_score_resampling(rows: int, spacing: float, smooth: bool) -> None:
    """scores_to_labels interpolates only along label borders; it must give exactly the argmax of the
    fully resampled scores, on smooth organ-like maps and on noise full of borders."""
    from appliance.infer.preprocess import scores_to_labels

    g = model_grid(rows, rows, (spacing, spacing), SPEC)
    rng = np.random.default_rng(rows)
    if smooth:
        y, x = np.mgrid[0:g.padded[0], 0:g.padded[1]].astype(np.float32)
        s = np.zeros((4, 3, *g.padded), np.float32)
        s[:, 1] = 1 - ((x - 0.4 * g.shape[1]) ** 2 + (y - 0.5 * g.shape[0]) ** 2) / (0.25 * g.shape[0]) ** 2
        s[:, 2] = 0.5 - ((x - 0.35 * g.shape[1]) ** 2 + (y - 0.45 * g.shape[0]) ** 2) / (0.06 * g.shape[0]) ** 2
        s += rng.normal(0, 0.05, s.shape).astype(np.float32)
    else:
        s = rng.normal(size=(4, 3, *g.padded)).astype(np.float32)
    np.testing.assert_array_equal(scores_to_labels(s, g), scores_to_source(s, g).argmax(1))


def test_volume_is_ordered_by_position_not_by_name_or_number(tmp_path: Path) -> None:
    hu = blob_phantom(12, 48)
    uids = write_ct_volume(tmp_path, hu, spacing=(0.8, 0.8), thickness=2.0)
    files = sorted(tmp_path.iterdir())
    numbers = list(range(1, 13))
    random.Random(3).shuffle(numbers)
    for f, n in zip(files, numbers):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = n
        ds.save_as(f)
        f.rename(tmp_path / f"x{random.Random(str(f)).randrange(10**6):06d}")
    vol = load_volume(list(tmp_path.iterdir()))
    assert vol.sop_instance_uids == uids
    np.testing.assert_array_equal(vol.hu, hu.astype(np.float32))
    assert vol.slice_spacing == pytest.approx(2.0) and vol.pixel_spacing == (0.8, 0.8)
    assert vol.voxel_volume_ml == pytest.approx(0.8 * 0.8 * 2.0 / 1000)


def test_feet_first_and_tilted_normals_sort_along_the_normal(tmp_path: Path) -> None:
    hu = blob_phantom(6, 32)
    write_ct_volume(tmp_path, hu, thickness=3.0, z0=-100.0)
    for f in tmp_path.iterdir():  # coronal-ish orientation: normal is -y
        ds = pydicom.dcmread(f)
        z = float(ds.ImagePositionPatient[2])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [0, -z, 0]
        ds.save_as(f)
    vol = load_volume(list(tmp_path.iterdir()))
    zs = [float(pydicom.dcmread(f).ImagePositionPatient[1]) for f in sorted(tmp_path.iterdir())]
    assert vol.slice_spacing == pytest.approx(3.0)
    assert list(vol.positions[:, 1]) == sorted(zs, reverse=True)[::-1] or list(vol.positions[:, 1]) == sorted(zs)


def test_mixed_series_refused_with_reason(tmp_path: Path) -> None:
    hu = blob_phantom(4, 32)
    write_ct_volume(tmp_path / "a", hu)
    files = sorted((tmp_path / "a").iterdir())
    ds = pydicom.dcmread(files[1])
    ds.ImagePositionPatient = pydicom.dcmread(files[0]).ImagePositionPatient
    ds.save_as(files[1])
    with pytest.raises(GeometryError, match="same position"):
        load_volume(files)
    ds.ImagePositionPatient = [0, 0, 99]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(files[1])
    with pytest.raises(GeometryError, match="orientation"):
        load_volume(files)
    del ds.ImagePositionPatient
    ds.save_as(files[1])
    with pytest.raises(GeometryError, match="ImagePositionPatient is missing"):
        load_volume(files)


# -- transfer syntaxes ---------------------------------------------------------------------------------

#: DCMTK tool and options that compress, and the tool that decompresses the result independently.
DCMTK_CODECS = {
    "JPEG Lossless SV1": (["dcmcjpeg", "+e1"], "dcmdjpeg", True),
    "JPEG Lossless P14": (["dcmcjpeg", "+el"], "dcmdjpeg", True),
    "JPEG Extended 12-bit": (["dcmcjpeg", "+ee"], "dcmdjpeg", False),
    "JPEG Baseline 8-bit": (["dcmcjpeg", "+eb"], "dcmdjpeg", False),
    "JPEG-LS Lossless": (["dcmcjpls"], "dcmdjpls", True),
    "RLE Lossless": (["dcmcrle"], "dcmdrle", True),
    "Deflated Explicit VR LE": (["dcmconv", "+td"], "dcmconv", True),
}


@pytest.mark.parametrize("codec", list(DCMTK_CODECS))
def test_compressed_syntax_decodes_like_dcmtk(tmp_path: Path, codec: str) -> None:
    """Our decode of a compressed file equals DCMTK's own decompression of it (an independent decoder),
    and for lossless syntaxes equals the original pixels."""
    compress, decompress, lossless = DCMTK_CODECS[codec]
    need_tool(compress[0])
    hu = blob_phantom(1, 64, seed=5)
    write_ct_volume(tmp_path, hu)
    src = next(tmp_path.iterdir())
    comp, plain = tmp_path / "comp.dcm", tmp_path / "plain.dcm"
    subprocess.run([*compress, str(src), str(comp)], check=True, capture_output=True)
    subprocess.run([decompress, *(["+te"] if decompress == "dcmconv" else []), str(comp), str(plain)],
                   check=True, capture_output=True)
    ds = pydicom.dcmread(comp)
    assert ds.file_meta.TransferSyntaxUID != pydicom.uid.ExplicitVRLittleEndian
    ours = decode_hu(ds, "test")
    theirs = decode_hu(pydicom.dcmread(plain), "test")
    if lossless:
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(ours, hu[0].astype(np.float32))
    else:
        # Lossy JPEG decoders are not bit-exact across IDCT implementations (libjpeg-turbo vs IJG): +-2 stored
        # values at most; DCMTK re-scales to 8 bits for baseline, so one stored value is RescaleSlope HU.
        step = float(ds.get("RescaleSlope", 1))
        assert np.abs(ours - theirs).max() <= 2 * step and np.abs(ours - theirs).mean() < 0.5 * step


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless", "JPEGLSLossless"])
def test_pydicom_encoded_syntaxes_decode_to_original(tmp_path: Path, syntax: str) -> None:
    """JPEG 2000 (which DCMTK lacks) and two more, encoded by pydicom's plugins, decode to the original."""
    hu = blob_phantom(1, 64, seed=6)
    write_ct_volume(tmp_path, hu)
    src = next(tmp_path.iterdir())
    ds = pydicom.dcmread(src)
    ds.compress(getattr(pydicom.uid, syntax), generate_instance_uid=False)
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    ds2 = pydicom.dcmread(tmp_path / "c.dcm")
    assert ds2.file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    np.testing.assert_array_equal(decode_hu(ds2, "t"), hu[0].astype(np.float32))


def test_real_compressed_ct_decodes() -> None:
    """The shared real CT (JPEG 2000 lossless, Siemens) decodes to plausible HU."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct-abdomen" / "dicom"
    if not folder.is_dir():
        pytest.skip(f"shared real CT not present at {folder}")
    vol = load_volume(sorted(folder.iterdir()))
    assert vol.hu.shape == (20, 512, 512)
    assert -1100 < vol.hu.min() < -900 and 1000 < vol.hu.max() < 4000
    ref = np.load(folder.parent / "liver_reference.npz")
    assert vol.sop_instance_uids == [str(u) for u in ref["sop_instance_uids"]]
    liver_hu = np.median(vol.hu[ref["liver"]])
    assert 60 < liver_hu < 160  # portal venous liver


def test_damaged_pixel_data_is_a_decode_error(tmp_path: Path) -> None:
    hu = blob_phantom(1, 64)
    write_ct_volume(tmp_path, hu)
    src = next(tmp_path.iterdir())
    ds = pydicom.dcmread(src)
    ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
    data = bytearray(ds.PixelData)
    ds.PixelData = bytes(data[: len(data) // 3])
    with pytest.raises(DecodeError, match="cannot decode pixel data"):
        decode_hu(ds, "instance X")


# -- measurements --------------------------------------------------------------------------------------

LABELS = [
    Label(value=1, name="Liver", category=Code(scheme="SCT", code="91723000", meaning="Anatomical Structure"),
          type=Code(scheme="SCT", code="10200004", meaning="Liver")),
    Label(value=2, name="Liver lesion",
          category=Code(scheme="SCT", code="49755003", meaning="Morphologically Altered Structure"),
          type=Code(scheme="SCT", code="52988006", meaning="Lesion"),
          region=Code(scheme="SCT", code="10200004", meaning="Liver")),
]


def test_measure_volumes_and_lesion_diameters() -> None:
    labels = np.zeros((10, 100, 100), np.uint8)
    labels[1:9, 10:90, 10:90] = 1
    z, y, x = np.mgrid[0:10, 0:100, 0:100]
    labels[(y - 30) ** 2 + (x - 30) ** 2 <= 10 ** 2] = 2          # cylinder, diameter 21 px, all slices
    labels[3, 70:75, 60:80] = 2                                    # 5 x 20 px slab on one slice
    m = measure(labels, LABELS, (0.5, 0.5), 2.0, [f"1.2.{i}" for i in range(10)])
    voxel = 0.5 * 0.5 * 2.0 / 1000
    assert m.labels[0].voxels == int((labels == 1).sum())
    assert m.organs[0].volume_ml == pytest.approx(int((labels >= 1).sum()) * voxel, abs=1e-3)
    assert m.lesion_count == 2
    big, small = m.lesions
    assert big.volume_ml == pytest.approx(int(((y - 30) ** 2 + (x - 30) ** 2 <= 100)[0].sum()) * 10 * voxel, abs=1e-3)
    assert big.longest_axial_diameter_mm == pytest.approx(21 * 0.5, abs=0.5)
    assert small.longest_axial_diameter_mm == pytest.approx(np.hypot(20, 5) * 0.5, abs=0.1)
    assert small.slice_sop_instance_uid == "1.2.3"
    assert Measurements.from_dict(m.to_dict()) == m, "summary.json reads back into the same measurements"


def test_measure_empty_label_map() -> None:
    m = measure(np.zeros((3, 20, 20), np.uint8), LABELS, (1.0, 1.0), 1.0, ["1", "2", "3"])
    assert m.lesion_count == 0 and m.organs[0].volume_ml == 0 and m.largest_diameter_mm == 0.0


# -- appliance infer, end to end with a model whose right answer is known --------------------------------

def _infer(tmp_path: Path, folder: Path, out: Path, model: str = "threshold-test") -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "appliance.toml"
    write_toml(cfg, {"inference": {"models_dir": str(tmp_path / "models"), "backend": "onnxruntime"},
                     "storage": {"data_dir": str(tmp_path / "var")}})
    return subprocess.run([appliance_exe(), "infer", "--config", str(cfg), "--model", model, "--out", str(out),
                           str(folder)], capture_output=True, text=True, timeout=300)


def test_infer_cli_matches_known_answer_and_is_invariant(tmp_path: Path) -> None:
    """With model spacing equal to the series' spacing no resampling happens, so the label map must be
    exactly the threshold of the HU volume; renaming, shuffling, renumbering and RLE change nothing."""
    write_package(tmp_path / "models", spacing=1.0)
    hu = blob_phantom(16, 80, seed=1)
    uids = write_ct_volume(tmp_path / "base", hu, spacing=(1.0, 1.0), thickness=2.5)
    r = _infer(tmp_path, tmp_path / "base", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    lm = np.load(tmp_path / "out" / "labelmap.npz")
    assert lm["labels"].dtype == np.uint8 and lm["labels"].shape == hu.shape
    assert [str(u) for u in lm["sop_instance_uids"]] == uids
    np.testing.assert_array_equal(lm["labels"], hu_threshold_labels(hu.astype(np.float32)))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    voxel_ml = 1.0 * 1.0 * 2.5 / 1000
    assert summary["organs"][0]["volume_ml"] == pytest.approx((lm["labels"] >= 1).sum() * voxel_ml, abs=1e-3)
    assert summary["series"]["slices"] == 16 and set(summary["timings_s"]) >= {"decode", "preprocess", "infer", "postprocess"}

    variant = tmp_path / "variant"
    variant.mkdir()
    numbers = list(range(1, 17))
    random.Random(2).shuffle(numbers)
    for f, n in zip(sorted((tmp_path / "base").iterdir()), numbers):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = n
        ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
        ds.save_as(variant / f"IMG{n * 7919 % 1000:03d}", enforce_file_format=True)
    r = _infer(tmp_path, variant, tmp_path / "out2")
    assert r.returncode == 0, r.stderr
    lm2 = np.load(tmp_path / "out2" / "labelmap.npz")
    by_uid = dict(zip([str(u) for u in lm2["sop_instance_uids"]], lm2["labels"]))
    for i, u in enumerate(uids):
        np.testing.assert_array_equal(by_uid[u], lm["labels"][i])


def test_infer_cli_errors_are_clear(tmp_path: Path) -> None:
    write_package(tmp_path / "models")
    (tmp_path / "empty").mkdir()
    r = _infer(tmp_path, tmp_path / "empty", tmp_path / "o")
    assert r.returncode == 2 and "no DICOM images" in r.stderr
    write_ct_volume(tmp_path / "two", blob_phantom(2, 32))
    write_ct_volume(tmp_path / "two", blob_phantom(2, 32), names="other")
    r = _infer(tmp_path, tmp_path / "two", tmp_path / "o")
    assert r.returncode == 2 and "holds 2 series; choose one with --series" in r.stderr
    r = _infer(tmp_path, tmp_path / "empty", tmp_path / "o", model="nope")
    assert r.returncode == 2 and "no model package 'nope'" in r.stderr


def test_summary_file_reads_back_typed_and_a_malformed_one_is_named(tmp_path: Path) -> None:
    from appliance.infer.measure import SummaryFormatError
    from appliance.infer.summary import BackendInfo, ModelInfo, SeriesInfo, Summary

    labels = np.zeros((4, 30, 30), np.uint8)
    labels[1:3, 5:25, 5:25] = 1
    labels[2, 10:14, 10:14] = 2
    s = Summary(ModelInfo("m", "1.0.0", "ab" * 32), BackendInfo("onnxruntime", "cpu", "fp32"),
                SeriesInfo("1.2", "1.2.3", 4, 30, 30, (0.8, 0.8), 2.0, ("a warning",)),
                measure(labels, LABELS, (0.8, 0.8), 2.0, ["1", "2", "3", "4"]), {"infer": 0.5})
    path = tmp_path / "summary.json"
    path.write_text(s.to_json())
    back = Summary.read(path)
    assert back == s and back.measurements.lesions[0].centroid_voxel == (2.0, 11.5, 11.5)
    broken = s.to_dict()
    del broken["lesions"]["items"][0]["slice_sop_instance_uid"]
    path.write_text(json.dumps(broken))
    with pytest.raises(SummaryFormatError, match="slice_sop_instance_uid"):
        Summary.read(path)
