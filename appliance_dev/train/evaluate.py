"""Inference exactly as serving does it, and the scores the model card reports: held-out phantoms (global
Dice on the source grid, overall and by field of view and phase) and the real CT's views.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from appliance.infer.postprocess import keep_largest_component
from appliance.infer.preprocess import batch_input, model_grid, scores_to_source, to_model_grid
from appliance_dev.real_ct import dice, real_views
from appliance_dev.train.config import MAX_BATCH, SPEC
from appliance_dev.train.data import eta_progress


def predict_volume(run_batch, hu: np.ndarray, spacing: tuple[float, float], batch: int = MAX_BATCH) -> np.ndarray:
    """Source-grid label map for a HU volume (slices in ascending z): model grid, scores back, argmax, clean-up."""
    grid = model_grid(hu.shape[1], hu.shape[2], spacing, SPEC)
    prep = to_model_grid(hu, grid, SPEC)
    labels = np.zeros(hu.shape, np.uint8)
    for s in range(0, prep.shape[0], batch):
        e = min(s + batch, prep.shape[0])
        scores = run_batch(batch_input(prep, s, e, SPEC.channels))
        labels[s:e] = scores_to_source(scores, grid).argmax(axis=1).astype(np.uint8)
    return keep_largest_component(labels, classes=[1, 2])


def torch_runner(model, device: str):
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return run


def onnx_runner(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"image": x})[0]

    return run


def dice_stats(pred: np.ndarray, truth: np.ndarray) -> dict[str, tuple[int, int]]:
    """(intersection, sum of sizes) for liver (labels 1 and 2: the whole organ) and lesion (label 2)."""
    out = {}
    for name, p, t in (("liver", pred > 0, truth > 0), ("lesion", pred == 2, truth == 2)):
        out[name] = (int((p & t).sum()), int(p.sum() + t.sum()))
    return out


def evaluate_phantoms(run_batch, cases: list[dict]) -> dict[str, dict[str, float]]:
    """Global Dice over held-out phantoms, overall and by field-of-view kind, on the source grid."""
    acc: dict[str, dict[str, list[int]]] = {}
    t0 = time.time()
    for i, case in enumerate(cases):
        pred = predict_volume(run_batch, case["hu"], case["spacing"])
        st = dice_stats(pred, case["lab"])
        for group in ("all", case["fov_kind"], case["phase"]):
            g = acc.setdefault(group, {"liver": [0, 0], "lesion": [0, 0]})
            for k, (a, b) in st.items():
                g[k][0] += a
                g[k][1] += b
        eta_progress("held-out evaluation", i + 1, len(cases), t0)
    res = {}
    for group, g in acc.items():
        res[group] = {k: (2.0 * a / b if b else float("nan")) for k, (a, b) in g.items()}
        res[group]["cases"] = sum(1 for c in cases if group in ("all", c["fov_kind"], c["phase"]))
    return res


def evaluate_real(run_batch) -> list[dict] | None:
    """Liver Dice on the real CT as acquired and on its targeted and thick-slab views; None if absent."""
    out = []
    for view in real_views():
        pred = predict_volume(run_batch, view.hu, view.spacing)
        voxel_ml = view.spacing[0] * view.spacing[1] * view.slice_mm / 1000.0
        out.append({"view": view.name, "fov_mm": view.fov_mm, "pixel_mm": view.spacing[0], "slice_mm": view.slice_mm,
                    "slices": int(view.hu.shape[0]), "liver_dice": dice(pred > 0, view.liver),
                    "liver_label1_dice": dice(pred == 1, view.liver), "lesion_ml": float((pred == 2).sum() * voxel_ml)})
    return out or None
