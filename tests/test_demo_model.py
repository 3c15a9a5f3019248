"""The shipped demo model through the real pipeline: real CT headers from pydicom's test data, held-out
synthetic phantoms with known truth, the real abdominal CT in ../shared, and the training script itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import appliance_exe
from appliance_dev.dicom_factory import write_ct_volume

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "real-ct-abdomen"
#: Seeds far from the training script's (0..) and its held-out set (1_000_000..): never seen in training.
TEST_SEEDS = (2_000_001, 2_000_002)


def infer(folder: Path, out: Path) -> dict:
    r = subprocess.run([appliance_exe(), "infer", "--model", "liver-ct-demo", "--backend", "onnxruntime",
                        "--out", str(out), "--quiet", str(folder)], capture_output=True, text=True, timeout=600,
                       cwd=out.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / s if s else 1.0


def test_real_multislice_ct_from_pydicom(tmp_path: Path) -> None:
    """Real scanner headers (pydicom's 98892001/CT5N): the series runs and slices come out in z order."""
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    assert folder.is_dir(), f"pydicom's test data is missing: {folder}"
    summary = infer(folder, tmp_path / "out")
    lm = np.load(tmp_path / "out" / "labelmap.npz")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in folder.iterdir()]
    normal = np.cross(*np.array(headers[0].ImageOrientationPatient, float).reshape(2, 3))
    by_z = sorted(headers, key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
    assert [str(u) for u in lm["sop_instance_uids"]] == [str(d.SOPInstanceUID) for d in by_z]
    assert lm["labels"].shape == (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    assert summary["series"]["slices"] == len(headers)
    # The DICOM results a PACS would get, referencing this real series.
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"seg.dcm", "sr.dcm", "sc-1.dcm", "key.png", "thumb.png", "objects.json"}
    seg = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID


def test_real_ct_with_blank_uids_still_gives_the_label_map(tmp_path: Path) -> None:
    """The shared real CT was anonymised with its UIDs blanked: no SEG can reference it, so `infer` says so
    and still writes the label map and summary."""
    if not REAL_CT.is_dir():
        pytest.skip(f"the shared real CT is not at {REAL_CT}")
    r = subprocess.run([appliance_exe(), "infer", "--model", "liver-ct-demo", "--backend", "onnxruntime",
                        "--out", str(tmp_path / "out"), "--quiet", str(REAL_CT / "dicom")], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DICOM results not written" in r.stderr and "StudyInstanceUID" in r.stderr
    assert (tmp_path / "out" / "labelmap.npz").exists() and not (tmp_path / "out" / "seg.dcm").exists()


@pytest.mark.slow
def test_held_out_phantoms(tmp_path: Path) -> None:
    """Phantoms the model never saw, one full field of view and one targeted reconstruction."""
    from appliance_dev.synthetic import make_phantom, sample_spec

    liver = lesion = 0.0
    for seed, kind in zip(TEST_SEEDS, ("full", "targeted")):
        spec = sample_spec(seed, n_slices=24, fov_kind=kind)
        hu, truth, meta = make_phantom(spec)
        folder = tmp_path / f"case{seed}"
        ps = meta["pixel_spacing"]
        uids = write_ct_volume(folder, hu, spacing=(ps[0], ps[1]), thickness=spec.slice_spacing)
        summary = infer(folder, tmp_path / f"out{seed}")
        lm = np.load(tmp_path / f"out{seed}" / "labelmap.npz")
        assert [str(u) for u in lm["sop_instance_uids"]] == uids
        pred = lm["labels"]
        liver = dice(pred >= 1, truth >= 1)
        assert liver >= 0.9, f"{kind} phantom {seed}: liver Dice {liver:.3f}"
        if (truth == 2).sum() > 500:
            lesion = dice(pred == 2, truth == 2)
            assert lesion >= 0.5, f"{kind} phantom {seed}: lesion Dice {lesion:.3f}"
        voxel_ml = ps[0] * ps[1] * spec.slice_spacing / 1000
        assert summary["organs"][0]["volume_ml"] == pytest.approx(float((pred >= 1).sum()) * voxel_ml, rel=1e-3)


#: Per-lesion floors on the CI phantoms (a few points worse than the shipped model measures there, so a model
#: that finds fewer lesions or reports more false ones fails): see MODEL_CARD.md for the 60-case figures.
CI_PHANTOMS = tuple(range(2_000_101, 2_000_109))
CI_MIN_SENSITIVITY_GE10 = 0.5
CI_MAX_FALSE_GE10_PER_CASE = 0.5


@pytest.mark.slow
def test_held_out_phantoms_per_lesion(tmp_path: Path) -> None:
    """Findings as a reader counts them, through `appliance infer`: the reference lesions of 10 mm or more the
    reported findings overlap, and the reported findings of 10 mm or more that overlap none, on 8 phantoms of
    every phase (variety 2: delayed and unenhanced phases, fatty livers, lesion-free patients)."""
    from appliance.models.manifest import Reporting
    from appliance_dev import lesion_eval as le
    from appliance_dev.synthetic import sample_case
    from tests.test_infer_pipeline import LABELS

    cases = []
    for seed in CI_PHANTOMS:
        hu, truth, meta = sample_case(seed, n_slices=24, fov_kind="full" if seed % 2 else "targeted", variety=2)
        zs = meta["z_positions"]
        dz = abs(zs[1] - zs[0])
        folder = tmp_path / f"case{seed}"
        ps = (float(meta["pixel_spacing"][0]), float(meta["pixel_spacing"][1]))
        write_ct_volume(folder, np.clip(np.rint(hu), -1024, 3071), spacing=ps, thickness=dz)
        summary = infer(folder, tmp_path / f"out{seed}")
        pred = np.load(tmp_path / f"out{seed}" / "labelmap.npz")["labels"]
        # The label map holds the reported findings only; measured again without thresholds, they are the same.
        case = le.case_findings(f"phantom {seed}", pred, np.where(pred == 2, 255, 0).astype(np.uint8), hu,
                                truth == 2, LABELS, ps, dz, Reporting())
        assert len(case.findings) == summary["lesions"]["count"], f"phantom {seed}"
        cases.append(case)
    t = le.tally(cases, 0.0)
    sens, fp = t.sensitivity(le.BAND_NAMES[1:]), t.fp_per_case(le.BAND_NAMES[1:])
    print(f"CI phantoms: sensitivity >= 10 mm {sens}, false findings >= 10 mm {fp:.2f} per case; {t.to_dict()}")
    assert sum(t.reference[b] for b in le.BAND_NAMES[1:]) >= 5, "too few lesions of 10 mm or more to judge"
    assert sens is not None and sens >= CI_MIN_SENSITIVITY_GE10, t.to_dict()
    assert fp <= CI_MAX_FALSE_GE10_PER_CASE, t.to_dict()


#: The shared real CT (no focal lesion) as acquired: findings of 10 mm or more, and of any size, that the
#: shipped model reports there at most (the goal is none: MODEL_CARD.md); a model reporting more fails.
REAL_CT_MAX_FINDINGS_GE10 = 2
REAL_CT_MAX_FINDINGS = 2


@pytest.mark.slow
def test_real_abdominal_ct_liver(tmp_path: Path) -> None:
    """The honest figure: a real portal-venous CT (never trained on) against its liver reference."""
    if not REAL_CT.is_dir():
        pytest.skip(f"the shared real CT is not at {REAL_CT}")
    infer(REAL_CT / "dicom", tmp_path / "out")
    lm = np.load(tmp_path / "out" / "labelmap.npz")
    ref = np.load(REAL_CT / "liver_reference.npz")
    assert [str(u) for u in lm["sop_instance_uids"]] == [str(u) for u in ref["sop_instance_uids"]]
    d = dice(lm["labels"] >= 1, ref["liver"].astype(bool))
    print(f"real CT liver Dice {d:.3f}")
    assert d >= REAL_CT_LIVER_DICE_FLOOR, f"liver Dice on the real CT fell to {d:.3f}"
    items = json.loads((tmp_path / "out" / "summary.json").read_text())["lesions"]["items"]
    big = [i for i in items if i["longest_axial_diameter_mm"] >= 10.0]
    assert len(big) <= REAL_CT_MAX_FINDINGS_GE10 and len(items) <= REAL_CT_MAX_FINDINGS, items


#: Set a little below what the shipped model measures (see MODEL_CARD.md), so a worse model fails here.
REAL_CT_LIVER_DICE_FLOOR = 0.90


@pytest.mark.slow
def test_real_ct_targeted_and_thick_views_liver(tmp_path: Path) -> None:
    """The real CT as a clinic also sends it: a targeted 180 mm reconstruction (the liver fills the image, no body
    outline) and 4 mm slabs, derived from the real series (appliance_dev/real_ct.py), through `appliance infer`."""
    if not REAL_CT.is_dir():
        pytest.skip(f"the shared real CT is not at {REAL_CT}")
    from appliance_dev.real_ct import real_views

    views = {v.name: v for v in real_views(REAL_CT)}
    for name in ("targeted 180 mm", "4 mm slabs"):
        view = views[name]
        folder = tmp_path / name.replace(" ", "-")
        hu = np.clip(np.rint(view.hu), -1024, 3071)
        uids = write_ct_volume(folder, hu, spacing=view.spacing, thickness=view.slice_mm)
        infer(folder, tmp_path / f"out-{folder.name}")
        lm = np.load(tmp_path / f"out-{folder.name}" / "labelmap.npz")
        assert [str(u) for u in lm["sop_instance_uids"]] == uids
        d = dice(lm["labels"] >= 1, view.liver)
        print(f"real CT {name}: liver Dice {d:.3f}")
        assert d >= REAL_CT_LIVER_DICE_FLOOR, f"liver Dice on the real CT's {name} view fell to {d:.3f}"
        items = json.loads((tmp_path / f"out-{folder.name}" / "summary.json").read_text())["lesions"]["items"]
        assert len(items) <= REAL_CT_VIEW_MAX_FINDINGS, (name, items)


#: Findings of any size the shipped model reports in each derived view at most (1.6.0: 1; the goal: MODEL_CARD.md).
REAL_CT_VIEW_MAX_FINDINGS = 1


@pytest.mark.slow
def test_training_script_quick_run(tmp_path: Path) -> None:
    """The training script runs end to end (tiny data) and writes a package the appliance accepts."""
    pytest.importorskip("torch", reason="torch is a test extra")
    out = tmp_path / "pkg" / "liver-ct-demo"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo_model.py"), "--quick", "--no-real",
                        "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    from appliance.models.package import load_package

    pkg = load_package(out)
    assert pkg.onnx_path.stat().st_size > 10_000
    assert "not a medical device" in (out / "MODEL_CARD.md").read_text().lower()
    # The shipped package was not touched.
    shipped = load_package(ROOT / "models" / "liver-ct-demo")
    assert shipped.onnx_sha256 != pkg.onnx_sha256


def test_exported_model_turns_back_into_the_same_pytorch_network() -> None:
    """`model_from_onnx` (used by --init and the benchmark's PyTorch reference) reproduces the shipped ONNX."""
    torch = pytest.importorskip("torch", reason="torch is a test extra")
    import onnxruntime as ort

    from appliance_dev.train.model import model_from_onnx

    onnx_path = ROOT / "models" / "liver-ct-demo" / "model.onnx"
    model = model_from_onnx(onnx_path).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 96, 128)).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(ours - ref).max() < 1e-3


@pytest.mark.slow
def test_training_continues_from_an_exported_model(tmp_path: Path) -> None:
    """--init trains on from a shipped model.onnx and says so in the card and the manifest."""
    pytest.importorskip("torch", reason="torch is a test extra")
    import hashlib

    shipped = ROOT / "models" / "liver-ct-demo" / "model.onnx"
    out = tmp_path / "pkg" / "liver-ct-demo"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo_model.py"), "--quick", "--no-real",
                        "--init", str(shipped), "--lr", "1e-3", "--train-seed0", "480", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    from appliance.models.package import load_package

    pkg = load_package(out)
    sha = hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert pkg.onnx_sha256 != sha  # it trained
    assert f'init_sha256 = "{sha}"' in (out / "manifest.toml").read_text()
    assert sha in (out / "MODEL_CARD.md").read_text()
    # New patients for the continuation: the seeds are recorded where a reader looks for them.
    assert "train_seed_start = 480" in (out / "manifest.toml").read_text()
    assert "seeds 480..483" in (out / "MODEL_CARD.md").read_text()
    # 30 steps at a low rate from a trained model keep the liver (a fresh 30-step run does not).
    assert "held-out all" in r.stderr
    liver = float(r.stderr.split("held-out all")[1].split("liver Dice")[1].split()[0])
    assert liver >= 0.9, r.stderr[-2000:]


def test_training_seeds_never_reach_the_held_out_seeds() -> None:
    """--train-seed0 moves the training phantoms to new patients but never onto the held-out ones."""
    from script_loader import load_script

    train = load_script("train_demo_model")
    a = train.parse_args(["--train-seed0", "480", "--train-phantoms", "480"])
    assert (a.train_seed0, a.train_phantoms) == (480, 480)
    with pytest.raises(SystemExit):
        train.parse_args(["--train-seed0", str(train.HELDOUT_SEED0 - 10), "--train-phantoms", "480"])
    with pytest.raises(SystemExit):
        train.parse_args(["--train-seed0", "-1"])
