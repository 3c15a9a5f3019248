"""Per-lesion evaluation (``appliance_dev.lesion_eval``) on constructed label maps: what counts as found,
what as a false finding, and how the confidence threshold moves both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance_dev import lesion_eval as le
from tests.test_infer_pipeline import LABELS

SPACING = (0.8, 0.8)
ROOT = Path(__file__).resolve().parents[1]


def _liver() -> np.ndarray:
    labels = np.zeros((20, 100, 100), np.uint8)
    zz, yy, xx = np.mgrid[:20, :100, :100]
    labels[((yy - 50) / 42.0) ** 2 + ((xx - 50) / 42.0) ** 2 + ((zz - 10) / 9.0) ** 2 <= 1.0] = 1
    return labels


def _disc(a: np.ndarray, z: slice, cy: int, cx: int, r: float, value: int) -> None:
    yy, xx = np.mgrid[: a.shape[1], : a.shape[2]]
    a[z][:, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def _case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    truth = _liver()
    _disc(truth, slice(6, 12), 40, 40, 15.0, 2)  # a 24 mm lesion
    _disc(truth, slice(8, 10), 65, 65, 5.0, 2)  # an 8 mm one the model misses
    pred = _liver()
    _disc(pred, slice(6, 12), 41, 40, 13.0, 2)  # found, a little small
    pred[9, 12:16, 30:70] = 2  # a crescent-like strip at the edge: a false finding of 32 mm
    conf = np.zeros(pred.shape, np.uint8)
    conf[pred == 2] = 230
    conf[9, 12:16, 30:70] = 100  # the strip is less confident
    hu = np.where(pred > 0, 60.0, -100.0).astype(np.float32)
    return truth, pred, conf, hu


def test_found_missed_and_false_findings_by_size_and_confidence() -> None:
    truth, pred, conf, hu = _case()
    case = le.case_findings("c", pred, conf, hu, truth == 2, LABELS, SPACING, 2.0, 5.0)
    assert sorted(le.band_of(d) for d in case.reference_mm) == ["<10", ">=20"]
    everything = le.tally([case], 0.0)
    assert everything.found == {"<10": 0, "10-20": 0, ">=20": 1} and everything.reference["<10"] == 1
    assert everything.false_positive == {"<10": 0, "10-20": 0, ">=20": 1}
    assert everything.sensitivity() == 0.5 and everything.fp_per_case(le.BAND_NAMES[1:]) == 1.0
    (err,) = [e for e in everything.size_error().values() if e]
    assert -5.0 < err["mean_mm"] < 0.0  # reported smaller than the reference, as constructed
    confident = le.tally([case], 0.6)  # the strip (confidence 0.39) is no longer reported
    assert confident.false_positive[">=20"] == 0 and confident.found[">=20"] == 1
    curve = le.froc([case])
    assert [t.threshold for t in curve] == list(le.THRESHOLDS)
    fps = [t.fp_per_case() for t in curve]
    assert fps == sorted(fps, reverse=True)  # never more false findings at a higher threshold
    assert le.choose_threshold(curve, 0.0).threshold == pytest.approx(0.4)


def test_a_lesion_split_across_slices_is_one_reference_and_one_finding() -> None:
    truth = _liver()
    _disc(truth, slice(8, 12), 50, 50, 8.0, 2)
    case = le.case_findings("c", truth, (truth == 2).astype(np.uint8) * 200, np.zeros(truth.shape, np.float32),
                            truth == 2, LABELS, SPACING, 2.0, 5.0)
    assert len(case.reference_mm) == 1 and len(case.findings) == 1 and case.findings[0].hits == (0,)


def test_the_froc_plot_is_a_png(tmp_path: Path) -> None:
    truth, pred, conf, hu = _case()
    case = le.case_findings("c", pred, conf, hu, truth == 2, LABELS, SPACING, 2.0, 5.0)
    le.froc_png({"a": le.froc([case])}, tmp_path / "froc.png", {"a": 0.5})
    assert (tmp_path / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_eval_script_writes_per_lesion_figures_and_the_froc_curve(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_demo_model.py"), "--phantoms", "2",
                        "--slices", "16", "--json", str(tmp_path / "e.json"), "--froc-png", str(tmp_path / "f.png")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "false-positive findings per case" in r.stdout and "size error" in r.stdout
    out = json.loads((tmp_path / "e.json").read_text())
    (entry,) = out["models"].values()
    ph = entry["phantoms"]
    assert len(ph["froc"]) == len(le.THRESHOLDS) and ph["at_threshold"]["cases"] == 2
    assert sum(ph["at_threshold"]["reference"].values()) == sum(len(c["reference_mm"]) for c in ph["cases"])
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_the_free_threshold_removes_false_findings_that_cost_no_true_one() -> None:
    truth, pred, conf, hu = _case()
    case = le.case_findings("c", pred, conf, hu, truth == 2, LABELS, SPACING, 2.0, 5.0)
    free = le.free_threshold(le.froc([case]))
    # the strip (0.39) goes, the true lesion (0.90) stays: the highest threshold still finding it
    assert free.threshold == pytest.approx(0.9) and free.found[">=20"] == 1 and free.false_positive[">=20"] == 0


def test_the_rim_rule_drops_a_rim_along_the_liver_edge_and_its_limit_spares_every_true_finding() -> None:
    from scipy import ndimage

    truth, _, _, _ = _case()
    pred = _liver()
    _disc(pred, slice(6, 12), 41, 40, 13.0, 2)
    yy = np.mgrid[:100, :100][0]
    rim = (pred[9] == 1) & ~ndimage.binary_erosion(pred[9] > 0, iterations=2) & (yy < 30)
    pred[9][rim] = 2  # the liver's outer two pixels along its upper edge
    conf = np.where(pred == 2, 230, 0).astype(np.uint8)
    hu = np.where(pred > 0, 60.0, -100.0).astype(np.float32)
    case = le.case_findings("c", pred, conf, hu, truth == 2, LABELS, SPACING, 2.0, 5.0)
    edge = {bool(f.hits): f.lesion for f in case.findings}
    assert edge[True].edge_contact == 0.0 and (edge[False].edge_contact or 0) > 0.4
    assert (edge[False].width_mm or 99) < 2.0 < (edge[True].width_mm or 0)
    limit = le.free_rim_limit([case], 6.0)
    assert limit == 0.05  # the lowest multiple of 0.05 above the true finding's edge contact (0)
    (kept,) = le.without_rims([case], limit, 6.0)
    assert [bool(f.hits) for f in kept.findings] == [True]
    assert le.tally([kept], 0.0).found == le.tally([case], 0.0).found
    (wide,) = le.without_rims([case], limit, 1.0)  # a rim rule for rims under 1 mm wide: nothing is one
    assert len(wide.findings) == 2
