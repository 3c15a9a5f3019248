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

Per finding (``appliance_dev.lesion_eval``), as a reader counts: the findings the appliance reports (the
package's diameter threshold applied by serving's own ``measure``; every confidence kept), sensitivity by
reference size (< 10, 10-20, >= 20 mm longest axial diameter), false-positive findings per case by size, the
size error of the reported diameters, and an FROC curve over the confidence threshold (``--json`` and
``--froc-png``). ``--split validation`` evaluates phantoms from seed 3,000,000 instead of the held-out ones
and proposes the confidence threshold (the lowest keeping false findings of 10 mm or more at or under
``--max-fp`` per case): thresholds are chosen there, never on the held-out phantoms or the real CT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from appliance.infer.measure import lesion_values
from appliance.infer.postprocess import keep_largest_component
from appliance.infer.preprocess import (
    InputSpec,
    batch_input,
    class_confidence,
    model_grid,
    scores_to_labels,
    to_model_grid,
)
from appliance.models.manifest import FindingScore, Label, Reporting
from appliance_dev import lesion_eval as le
from appliance_dev.real_ct import REAL_CT, dice, real_views

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_SEED0 = 1_000_000
#: Validation phantoms, where thresholds are chosen: disjoint from training (0..), held-out (1,000,000..) and
#: the CI test cases (2,000,001..).
VALIDATION_SEED0 = 3_000_000
#: Phantoms a finding score is fitted on (``scripts/fit_finding_score.py``): disjoint from all of the above.
FIT_SEED0 = 4_000_000


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


def predict_findings(sess, spec: InputSpec, man: dict, hu: np.ndarray, spacing: tuple[float, float]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Labels (argmax, largest component) and the model's probability of each lesion pixel's label (0..255), the way
    serving computes them (``scores_to_labels``, ``class_confidence``)."""
    grid = model_grid(hu.shape[1], hu.shape[2], spacing, spec)
    prep = to_model_grid(hu, grid, spec)
    batch = int(man["input"].get("max_batch", 16))
    lesion_labels = lesion_values(_labels(man))
    out = np.zeros(hu.shape, np.uint8)
    conf = np.zeros(hu.shape, np.uint8)
    for s in range(0, prep.shape[0], batch):
        e = min(s + batch, prep.shape[0])
        scores = sess.run([man["output"]["tensor"]], {man["input"]["tensor"]: batch_input(prep, s, e, spec.channels)})[0]
        scores_to_labels(scores, grid, out=out[s:e])
        class_confidence(scores, grid, out[s:e], lesion_labels, out=conf[s:e])
    return keep_largest_component(out, classes=man["postprocess"]["largest_component"]), conf


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


def eval_phantoms(models: list[tuple[str, tuple]], n: int, slices: int, seed0: int = HELDOUT_SEED0,
                  variety: int = 1, edge: float | None = None) -> dict[str, list[le.Case]]:
    """Voxel Dice and component detection printed as before; the per-finding cases returned."""
    from appliance_dev.synthetic import sample_case

    cases: dict[str, list[le.Case]] = {name: [] for name, _ in models}
    acc: dict[str, dict[str, list[int]]] = {name: {} for name, _ in models}
    found: dict[str, list[tuple[float, bool]]] = {name: [] for name, _ in models}
    false_pos = {name: 0 for name, _ in models}
    terms = {name: dict.fromkeys(("tp",) + ERROR_TERMS, 0) for name, _ in models}
    t0 = time.time()
    for i in range(n):
        kind = "full" if i % 2 == 0 else "targeted"
        hu, lab, meta = sample_case(seed0 + i, n_slices=slices, fov_kind=kind, variety=variety)
        zs = meta["z_positions"]
        dz = abs(zs[1] - zs[0]) if len(zs) > 1 else 1.0
        voxel_ml = meta["pixel_spacing"][0] * meta["pixel_spacing"][1] * dz / 1000.0
        line = []
        for name, (man, spec, sess) in models:
            pred, conf = predict_findings(sess, spec, man, hu, meta["pixel_spacing"])
            cases[name].append(le.case_findings(
                f"phantom {seed0 + i}", pred, conf, hu, lab == 2, _labels(man), tuple(meta["pixel_spacing"]), dz,
                _reporting(man, edge), tags=(kind, meta["phase"])))
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
    return cases


def _labels(man: dict) -> list[Label]:
    return [Label.model_validate(lab) for lab in man["labels"]]


#: ``--finding-score``'s model (a JSON file of ``[reporting.finding_score]``), replacing every package's own.
SCORE_OVERRIDE: dict = {}


def _reporting(man: dict, edge: float | None = None) -> Reporting:
    """The package's reporting rules; ``edge`` replaces its rim rule's edge-contact limit (1: no rim rule), and
    ``--finding-score`` its finding score (``{"none": true}``: none)."""
    r = Reporting.model_validate(man.get("reporting", {}))
    if SCORE_OVERRIDE:
        score = None if SCORE_OVERRIDE.get("none") else FindingScore.model_validate(SCORE_OVERRIDE)
        r = r.model_copy(update={"finding_score": score})
    return r if edge is None else r.model_copy(update={"max_edge_contact": edge})


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _finding_json(f: le.Finding) -> dict:
    """One finding's measurements as the JSON lists them (the real CT's and the phantoms' alike)."""
    les = f.lesion
    return {"diameter_mm": les.longest_axial_diameter_mm, "short_axis_mm": les.short_axis_mm,
            "confidence": les.confidence, "mean_hu": les.mean_hu, "surrounding_hu": les.surrounding_hu,
            "edge_contact": les.edge_contact, "width_mm": les.width_mm, "z_extent_mm": les.z_extent_mm,
            "peak_confidence": les.peak_confidence, "score": les.score}


def report_findings(name: str, cases: list[le.Case], threshold: float, what: str, axis: str = "confidence") -> dict:
    """The per-finding table of ``cases`` at ``threshold`` (of ``axis``: the confidence, or the finding score where
    the package has one), printed, and the JSON of it and of the FROC curve."""
    t = le.tally(cases, threshold)
    sens = ", ".join(f"{b} mm {t.found[b]}/{t.reference[b]}" for b in le.BAND_NAMES)
    fps = ", ".join(f"{b} mm {t.fp_per_case([b]):.2f}" for b in le.BAND_NAMES)
    print(f"{name}: {what} findings at {axis} >= {threshold:.2f} ({t.cases} cases): sensitivity {sens} "
          f"(>= 10 mm {_fmt(t.sensitivity(le.BAND_NAMES[1:]))}); false-positive findings per case {fps} "
          f"(>= 10 mm {t.fp_per_case(le.BAND_NAMES[1:]):.2f}); {t.reported / max(t.cases, 1):.2f} reported per case")
    err = t.size_error()
    print(f"{name}: {what} size error (reported - reference longest axial diameter, by reference size): " + ", ".join(
        f"{b} mm " + ("n/a" if e is None else f"mean {e['mean_mm']:+.1f}, median |err| {e['median_abs_mm']:.1f} (n={e['n']})")
        for b, e in err.items()))
    groups = {}
    for tag in sorted({g for c in cases for g in c.tags}):
        groups[tag] = le.tally(cases, threshold, keep=lambda c, tag=tag: tag in c.tags).to_dict()
    curve = le.froc(cases)
    return {"at_threshold": t.to_dict(), "groups": groups, "froc": [x.to_dict() for x in curve],
            "cases": [{"name": c.name, "tags": list(c.tags), "reference_mm": list(c.reference_mm),
                       "findings": [_finding_json(f) | {"volume_ml": f.lesion.volume_ml, "true": bool(f.hits)}
                                    for f in c.findings]}
                      for c in cases]}


def eval_real(models: list[tuple[str, tuple]], folder: Path, edge: float | None = None) -> dict[str, list[le.Case]]:
    """Liver Dice on the real series as acquired and on the views derived from it (see appliance_dev/real_ct.py),
    and its findings: its liver shows no focal lesion, so every finding is a false one."""
    cases: dict[str, list[le.Case]] = {name: [] for name, _ in models}
    for view in real_views(folder):
        for name, (man, spec, sess) in models:
            t0 = time.time()
            pred, conf = predict_findings(sess, spec, man, view.hu, view.spacing)
            rules = _reporting(man, edge)
            case = le.case_findings(f"real CT {view.name}", pred, conf, view.hu, None, _labels(man), view.spacing,
                                    view.slice_mm, rules, tags=(view.name,))
            cases[name].append(case)
            kept = [f for f in case.findings if f.rank >= le.threshold_of(rules) - 1e-9]
            big = [f for f in kept if f.lesion.longest_axial_diameter_mm >= 10.0]
            print(f"{name}: real CT {view.name} ({view.hu.shape[0]}x{view.hu.shape[1]}x{view.hu.shape[2]}, "
                  f"{view.fov_mm:.0f} mm field of view, {view.spacing[0]:.2f} mm pixels, {view.slice_mm:g} mm slices, "
                  f"{time.time() - t0:.1f}s): liver Dice {dice(pred > 0, view.liver):.4f} "
                  f"(label 1 only {dice(pred == 1, view.liver):.4f}); lesion voxels predicted {int((pred == 2).sum())} "
                  f"({(pred == 2).sum() * view.spacing[0] * view.spacing[1] * view.slice_mm / 1000:.1f} mL); "
                  f"{len(kept)} findings reported ({len(big)} >= 10 mm"
                  + (f", largest {max(f.lesion.longest_axial_diameter_mm for f in big):.1f} mm" if big else "") + ")")
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", type=Path, action="append",
                   help="model package folder; repeat to compare on the same phantoms (default models/liver-ct-demo)")
    p.add_argument("--phantoms", type=int, default=12, help="held-out phantoms (0 to skip; default 12)")
    p.add_argument("--slices", type=int, default=32, help="slices per phantom (default 32)")
    p.add_argument("--real", type=Path, default=REAL_CT, help="real CT folder (dicom/ and liver_reference.npz)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--split", choices=["heldout", "validation", "fit"], default="heldout",
                   help="held-out phantoms (seeds from 1,000,000; the reported figures), validation phantoms "
                        "(from 3,000,000; where thresholds are chosen) or fit phantoms (from 4,000,000; what a "
                        "finding score is fitted on, with --cases-out)")
    p.add_argument("--variety", type=int, choices=[1, 2, 3, 4], default=1,
                   help="phantom generator: 1 portal/arterial (the card's sets), 2 adds delayed and unenhanced "
                        "phases, fatty livers and lesion-free patients, 3 adds cirrhotic livers and ascites, 4 adds "
                        "to 2 periportal fat or oedema cuffs")
    p.add_argument("--no-real", action="store_true", help="skip the real CT")
    p.add_argument("--max-fp", type=float, default=0.2,
                   help="validation: false-positive findings of 10 mm or more per case the chosen threshold allows")
    p.add_argument("--rule", choices=["free", "fp"], default="free",
                   help="validation: propose the highest threshold costing no sensitivity >= 10 mm ('free', "
                        "default) or the lowest meeting --max-fp ('fp')")
    p.add_argument("--max-edge-contact", type=float, default=None,
                   help="replace the package's rim rule limit ([reporting] max_edge_contact; 1: no rim rule); "
                        "--split validation measures without it and proposes one")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="start this many seeds into the split (another batch of fit or validation phantoms)")
    p.add_argument("--finding-score", type=Path, default=None,
                   help="a JSON finding score (as scripts/fit_finding_score.py writes) replacing each package's "
                        "[reporting.finding_score]; '{\"none\": true}' removes it")
    p.add_argument("--cases-out", type=Path, default=None,
                   help="pickle every case's findings here (all scores kept), for scripts/fit_finding_score.py")
    p.add_argument("--json", type=Path, default=None, help="write the per-finding figures and FROC curves here")
    p.add_argument("--froc-png", type=Path, default=None, help="draw the FROC curves into this PNG")
    a = p.parse_args(argv)
    folders = a.package or [ROOT / "models" / "liver-ct-demo"]
    models = []
    for f in folders:
        loaded = load_package(f, a.threads)
        models.append((f"{f.name} {loaded[0]['version']}", loaded))
    if len({name for name, _ in models}) < len(models):  # the same package name and version twice: say where
        models = [(str(f), m) for f, (_, m) in zip(folders, models, strict=True)]
    if not 0 <= a.seed_offset <= 900_000:
        p.error("--seed-offset must be within 0..900000 (the splits are 1,000,000 seeds apart)")
    seed0 = {"validation": VALIDATION_SEED0, "fit": FIT_SEED0}.get(a.split, HELDOUT_SEED0) + a.seed_offset
    if a.finding_score:
        SCORE_OVERRIDE.update(json.loads(a.finding_score.read_text()))
    edge = 1.0 if a.split == "validation" and a.max_edge_contact is None else a.max_edge_contact
    phantom_cases = eval_phantoms(models, a.phantoms, a.slices, seed0, a.variety, edge) if a.phantoms else {}
    real_cases: dict[str, list[le.Case]] = {}
    if a.no_real:
        pass
    elif (a.real / "liver_reference.npz").exists() and a.split == "heldout":
        real_cases = eval_real(models, a.real, edge)
    elif a.split == "heldout":
        print(f"real CT not found at {a.real}; skipped", file=sys.stderr)
    out: dict = {"split": a.split, "seed0": seed0, "variety": a.variety, "phantoms": a.phantoms, "slices": a.slices,
                 "models": {}}
    curves: dict[str, list[le.Tally]] = {}
    marks: dict[str, float] = {}
    for name, (man, _, _) in models:
        rep = _reporting(man, edge)
        threshold = le.threshold_of(rep)
        entry: dict = {"min_lesion_diameter_mm": rep.min_lesion_diameter_mm, "min_confidence": rep.min_confidence,
                       "max_edge_contact": rep.max_edge_contact, "rim_max_width_mm": rep.rim_max_width_mm,
                       "min_finding_score": None if rep.finding_score is None else rep.finding_score.min_score}
        if phantom_cases.get(name):
            axis = "confidence" if rep.finding_score is None else "finding score"
            if a.split == "validation":
                # The rim limit is proposed only when none is given (a given one is applied as serving would).
                limit = (le.free_rim_limit(phantom_cases[name], rep.rim_max_width_mm) if a.max_edge_contact is None
                         else rep.max_edge_contact)
                before = le.tally(phantom_cases[name], 0.0)
                phantom_cases[name] = le.without_rims(phantom_cases[name], limit, rep.rim_max_width_mm)
                after = le.tally(phantom_cases[name], 0.0)
                print(f"{name}: validation: rim rule max_edge_contact {limit:.2f} (narrower than "
                      f"{rep.rim_max_width_mm:g} mm; "
                      + ("the lowest dropping no true finding" if a.max_edge_contact is None else "as given") + ") removes "
                      f"{before.reported - after.reported} of {before.reported} findings; false findings >= 10 mm "
                      f"{before.fp_per_case(le.BAND_NAMES[1:]):.2f} -> {after.fp_per_case(le.BAND_NAMES[1:]):.2f} "
                      f"per case")
                entry["chosen_max_edge_contact"] = limit
                chosen = le.choose_threshold(le.froc(phantom_cases[name]), a.max_fp)
                print(f"{name}: validation: {axis} threshold {chosen.threshold:.2f} keeps false findings of "
                      f">= 10 mm at {chosen.fp_per_case(le.BAND_NAMES[1:]):.2f} per case (want <= {a.max_fp:g}), "
                      f"sensitivity >= 10 mm {_fmt(chosen.sensitivity(le.BAND_NAMES[1:]))}")
                free = le.free_threshold(le.froc(phantom_cases[name]))
                print(f"{name}: validation: {axis} threshold {free.threshold:.2f} is the highest that keeps "
                      f"sensitivity >= 10 mm within 0.02 of its best ({_fmt(free.sensitivity(le.BAND_NAMES[1:]))}), "
                      f"false findings >= 10 mm {free.fp_per_case(le.BAND_NAMES[1:]):.2f} per case")
                entry["fp_bounded_threshold"] = chosen.threshold
                entry["free_threshold"] = free.threshold
                entry["chosen_threshold"] = threshold = free.threshold if a.rule == "free" else chosen.threshold
            entry["phantoms"] = report_findings(name, phantom_cases[name], threshold, f"{a.split} phantoms", axis)
            curves[name] = le.froc(phantom_cases[name])
            marks[name] = threshold
        if real_cases.get(name):
            entry["real_cases"] = [{"name": c.name, "findings": [_finding_json(f) for f in c.findings]}
                                   for c in real_cases[name]]
            at = {c.name: le.tally([c], threshold) for c in real_cases[name]}
            entry["real"] = {c.name: {"findings_at_threshold": at[c.name].reported,
                                      "ge10_at_threshold": sum(at[c.name].false_positive[b] for b in le.BAND_NAMES[1:]),
                                      "froc": [le.tally([c], t).to_dict()["fp_per_case"] for t in le.THRESHOLDS]}
                             for c in real_cases[name]}
        out["models"][name] = entry
    if a.cases_out:
        import pickle

        dump = {name: {"reporting": _reporting(man, edge).model_dump(), "phantoms": phantom_cases.get(name, []),
                       "real": real_cases.get(name, [])} for name, (man, _, _) in models}
        a.cases_out.write_bytes(pickle.dumps({"split": a.split, "seed0": seed0, "variety": a.variety,
                                              "models": dump}))
        print(f"cases: {a.cases_out}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
        print(f"per-finding figures: {a.json}", file=sys.stderr)
    if a.froc_png and curves:
        le.froc_png(curves, a.froc_png, marks)
        print(f"FROC curves: {a.froc_png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
