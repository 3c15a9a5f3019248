"""The evaluation script's per-lesion detection count, and that every script with a command line answers --help."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from script_loader import SCRIPTS, load_script


def test_lesion_detection_counts_found_missed_and_false_positive_components() -> None:
    truth = np.zeros((10, 40, 40), bool)
    truth[2:5, 2:6, 2:6] = True          # 48 voxels: missed
    truth[5:9, 20:35, 20:35] = True      # 900 voxels: touched by one predicted voxel, so found
    pred = np.zeros_like(truth)
    pred[6, 25, 25] = True
    pred[0, 38, 38] = True               # two separate components touching no lesion
    pred[1, 38, 30] = True
    lesions, false_pos = load_script("eval_demo_model").lesion_detection(pred, truth, voxel_ml=0.001)
    assert [found for _, found in lesions] == [False, True]
    # Equivalent-sphere diameters: 48 and 900 mm^3.
    assert lesions[0][0] == pytest.approx((6 * 48 / np.pi) ** (1 / 3))
    assert lesions[1][0] == pytest.approx((6 * 900 / np.pi) ** (1 / 3))
    assert false_pos == 2


def test_lesion_detection_with_nothing_predicted() -> None:
    truth = np.zeros((4, 8, 8), bool)
    truth[1:3, 2:4, 2:4] = True
    lesions, false_pos = load_script("eval_demo_model").lesion_detection(np.zeros_like(truth), truth, voxel_ml=0.001)
    assert [found for _, found in lesions] == [False] and false_pos == 0


def test_lesion_error_terms_split_the_dice_denominator() -> None:
    truth = np.zeros((10, 40, 40), bool)
    truth[2:5, 2:6, 2:6] = True          # 48 voxels, nothing predicted: missed
    truth[5:9, 20:30, 20:30] = True      # 400 voxels, 300 predicted: 100 under-segmented
    pred = np.zeros_like(truth)
    pred[5:8, 20:30, 20:30] = True
    pred[5:9, 30:32, 20:30] = True       # 80 voxels outside the lesion, attached to it: over-segmentation
    pred[0, 35:38, 35:38] = True         # 9 voxels touching no lesion: a false-positive component
    t = load_script("eval_demo_model").lesion_error_terms(pred, truth)
    assert t == {"tp": 300, "missed lesions": 48, "under-segmented found lesions": 100,
                 "false-positive components": 9, "over-segmentation": 80}
    assert 2 * t["tp"] + sum(v for k, v in t.items() if k != "tp") == int(pred.sum() + truth.sum())


#: Every script with a command line (gpu_tensorrt_timing.py has none: it runs on the GPU machine when started).
CLI_SCRIPTS = ["eval_demo_model.py", "train_demo_model.py", "bench_inference.py", "bench_cpu_variants.py",
               "bench_ingest.py", "bench_e2e.py", "bench_memory.py", "bench_pdu_size.py", "bench_metrics.py",
               "bench_panel.py", "fleet_sim.py", "fit_finding_score.py"]


def test_every_script_with_a_command_line_is_checked() -> None:
    assert sorted(p.name for p in SCRIPTS.glob("*.py")) == sorted([*CLI_SCRIPTS, "gpu_tensorrt_timing.py"])


@pytest.mark.parametrize("script", CLI_SCRIPTS)
def test_scripts_answer_help(script: str, tmp_path) -> None:
    """Run as an operator runs them, from anywhere: appliance_dev comes from the venv's path, not from the
    working directory or any sys.path code in the script."""
    r = subprocess.run([sys.executable, str(SCRIPTS / script), "--help"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
