#!/usr/bin/env python3
"""Evaluate a packaged 2D segmentation model (default ``models/liver-ct-demo``) the way serving runs it.

Why: the package's manifest is the contract; this script reads the input spec from it (not from the
training script), runs ``model.onnx`` with onnxruntime on the CPU, resamples scores to the source grid,
takes the argmax and the largest 3D component, and reports

(a) global liver and lesion Dice on held-out synthetic phantoms (seeds disjoint from training), and
(b) liver Dice on the real portal-venous CT in ``../shared/data/real-ct-abdomen`` (never trained on: it is
    the honest measure of how the synthetic training transfers to real anatomy), as acquired and as the
    targeted (250 and 180 mm) and thick-slab views derived from it (``appliance_dev.real_ct``).

Liver Dice counts labels 1 and 2 together as the organ (a lesion is part of the liver).

Global lesion Dice is dominated by the few largest lesions of a set, so the script also reports detection per
lesion (a reference lesion, one 3D connected component, is found when any predicted lesion voxel overlaps
it), by equivalent-sphere diameter, and predicted lesion components that touch no reference lesion (false
positives). ``--package`` may be given more than once: every package sees the same rendered phantoms.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from appliance.infer.postprocess import keep_largest_component
from appliance.infer.preprocess import InputSpec, batch_input, model_grid, scores_to_source, to_model_grid
from appliance_dev.real_ct import REAL_CT, dice, real_views

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_SEED0 = 1_000_000


def load_package(folder: Path, threads: int):
    import onnxruntime as ort

    man = tomllib.loads((folder / "manifest.toml").read_text())
    inp, norm = man["input"], man["normalisation"]
    spec = InputSpec(channels=int(inp["channels"]), spacing_mm=tuple(inp["spacing_mm"]),
                     size_multiple=int(inp["size_multiple"]), min_size=tuple(inp["min_size"]),
                     max_size=tuple(inp["max_size"]), window=tuple(norm["window"]))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return man, spec, sess


def predict(sess, spec: InputSpec, man: dict, hu: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    grid = model_grid(hu.shape[1], hu.shape[2], spacing, spec)
    prep = to_model_grid(hu, grid, spec)
    batch = int(man["input"].get("max_batch", 16))
    out = np.zeros(hu.shape, np.uint8)
    for s in range(0, prep.shape[0], batch):
        e = min(s + batch, prep.shape[0])
        scores = sess.run([man["output"]["tensor"]], {man["input"]["tensor"]: batch_input(prep, s, e, spec.channels)})[0]
        out[s:e] = scores_to_source(scores, grid).argmax(axis=1)
    return keep_largest_component(out, classes=man["postprocess"]["largest_component"])


SIZE_BANDS_MM = ((0.0, 10.0), (10.0, 20.0), (20.0, float("inf")))


def lesion_detection(pred: np.ndarray, truth: np.ndarray, voxel_ml: float) -> tuple[list[tuple[float, bool]], int]:
    """(equivalent diameter in mm, found) for each reference lesion, and the count of false-positive components."""
    from scipy import ndimage

    ref, n_ref = ndimage.label(truth)
    out, n_out = ndimage.label(pred)
    hit = set(np.unique(ref[pred]).tolist())  # reference lesions with a predicted voxel inside
    sizes = np.bincount(ref.ravel(), minlength=n_ref + 1)
    lesions = [(float((6.0 * sizes[j] * voxel_ml * 1000.0 / np.pi) ** (1.0 / 3.0)), j in hit)
               for j in range(1, n_ref + 1)]
    touching = set(np.unique(out[truth]).tolist()) - {0}
    return lesions, n_out - len(touching)


ERROR_TERMS = ("missed lesions", "under-segmented found lesions", "false-positive components", "over-segmentation")


def lesion_error_terms(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Where lesion Dice is lost, in voxels: true positives, and the four kinds of error.

    Global Dice is 2TP / (2TP + FN + FP). FN splits into voxels of reference lesions nothing touched (missed
    lesions) and the rest (under-segmented found lesions); FP into voxels of predicted components that touch
    no lesion (false-positive components) and the rest (over-segmentation). Which term dominates says whether
    detection or delineation is the thing to improve.
    """
    from scipy import ndimage

    ref, _ = ndimage.label(truth)
    out, _ = ndimage.label(pred)
    hit = np.unique(ref[pred])
    touching = np.unique(out[truth])
    fn, fp = truth & ~pred, pred & ~truth
    missed = fn & ~np.isin(ref, hit[hit > 0])
    isolated = fp & ~np.isin(out, touching[touching > 0])
    return {"tp": int((pred & truth).sum()), "missed lesions": int(missed.sum()),
            "under-segmented found lesions": int(fn.sum() - missed.sum()),
            "false-positive components": int(isolated.sum()), "over-segmentation": int(fp.sum() - isolated.sum())}


def eval_phantoms(models: list[tuple[str, tuple]], n: int, slices: int) -> None:
    from appliance_dev.synthetic import sample_case

    acc: dict[str, dict[str, list[int]]] = {name: {} for name, _ in models}
    found: dict[str, list[tuple[float, bool]]] = {name: [] for name, _ in models}
    false_pos = {name: 0 for name, _ in models}
    terms = {name: dict.fromkeys(("tp",) + ERROR_TERMS, 0) for name, _ in models}
    t0 = time.time()
    for i in range(n):
        kind = "full" if i % 2 == 0 else "targeted"
        hu, lab, meta = sample_case(HELDOUT_SEED0 + i, n_slices=slices, fov_kind=kind)
        zs = meta["z_positions"]
        dz = abs(zs[1] - zs[0]) if len(zs) > 1 else 1.0
        voxel_ml = meta["pixel_spacing"][0] * meta["pixel_spacing"][1] * dz / 1000.0
        line = []
        for name, (man, spec, sess) in models:
            pred = predict(sess, spec, man, hu, meta["pixel_spacing"])
            for group in ("all", kind, meta["phase"]):
                g = acc[name].setdefault(group, [0, 0, 0, 0])
                for j, (p, t) in enumerate(((pred > 0, lab > 0), (pred == 2, lab == 2))):
                    g[2 * j] += int((p & t).sum())
                    g[2 * j + 1] += int(p.sum() + t.sum())
            lesions, fp = lesion_detection(pred == 2, lab == 2, voxel_ml)
            found[name] += lesions
            false_pos[name] += fp
            for k, v in lesion_error_terms(pred == 2, lab == 2).items():
                terms[name][k] += v
            line.append(f"{name}: liver {dice(pred > 0, lab > 0):.3f} lesion {dice(pred == 2, lab == 2):.3f} "
                        f"found {sum(f for _, f in lesions)}/{len(lesions)} fp {fp}")
        print(f"phantom {i + 1}/{n} ({kind}, {meta['phase']}, fov {meta['fov_mm']:.0f} mm): " + "; ".join(line)
              + f"  [{time.time() - t0:.0f}s]", file=sys.stderr)
    for name, _ in models:
        for group, g in acc[name].items():
            ld = 2 * g[0] / g[1] if g[1] else float("nan")
            sd = 2 * g[2] / g[3] if g[3] else float("nan")
            print(f"{name}: held-out phantoms {group:9s}: liver Dice {ld:.4f}  lesion Dice {sd:.4f}")
        bands = []
        for lo, hi in SIZE_BANDS_MM:
            hits = [f for d, f in found[name] if lo <= d < hi]
            label = f"<{hi:.0f}" if lo == 0 else (f">={lo:.0f}" if hi == float("inf") else f"{lo:.0f}-{hi:.0f}")
            bands.append(f"{label} mm {sum(hits)}/{len(hits)}")
        total = sum(f for _, f in found[name])
        print(f"{name}: lesions found {total}/{len(found[name])} ({', '.join(bands)}); "
              f"false-positive components {false_pos[name]} ({false_pos[name] / max(n, 1):.2f} per case)")
        t = terms[name]
        denom = 2 * t["tp"] + sum(t[k] for k in ERROR_TERMS)
        print(f"{name}: lesion Dice lost to (Dice if that term were zero): " + ", ".join(
            f"{k} {t[k]} voxels ({2 * t['tp'] / max(denom - t[k], 1):.3f})" for k in ERROR_TERMS))


def eval_real(models: list[tuple[str, tuple]], folder: Path) -> None:
    """Liver Dice on the real series as acquired and on the views derived from it (see appliance_dev/real_ct.py)."""
    for view in real_views(folder):
        for name, (man, spec, sess) in models:
            t0 = time.time()
            pred = predict(sess, spec, man, view.hu, view.spacing)
            print(f"{name}: real CT {view.name} ({view.hu.shape[0]}x{view.hu.shape[1]}x{view.hu.shape[2]}, "
                  f"{view.fov_mm:.0f} mm field of view, {view.spacing[0]:.2f} mm pixels, {view.slice_mm:g} mm slices, "
                  f"{time.time() - t0:.1f}s): liver Dice {dice(pred > 0, view.liver):.4f} "
                  f"(label 1 only {dice(pred == 1, view.liver):.4f}); lesion voxels predicted {int((pred == 2).sum())} "
                  f"({(pred == 2).sum() * view.spacing[0] * view.spacing[1] * view.slice_mm / 1000:.1f} mL)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", type=Path, action="append",
                   help="model package folder; repeat to compare on the same phantoms (default models/liver-ct-demo)")
    p.add_argument("--phantoms", type=int, default=12, help="held-out phantoms (0 to skip; default 12)")
    p.add_argument("--slices", type=int, default=32, help="slices per phantom (default 32)")
    p.add_argument("--real", type=Path, default=REAL_CT, help="real CT folder (dicom/ and liver_reference.npz)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    a = p.parse_args(argv)
    folders = a.package or [ROOT / "models" / "liver-ct-demo"]
    models = []
    for f in folders:
        loaded = load_package(f, a.threads)
        models.append((f"{f.name} {loaded[0]['version']}" if len(folders) == 1 else str(f), loaded))
    if a.phantoms:
        eval_phantoms(models, a.phantoms, a.slices)
    if (a.real / "liver_reference.npz").exists():
        eval_real(models, a.real)
    else:
        print(f"real CT not found at {a.real}; skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
