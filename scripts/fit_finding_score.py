#!/usr/bin/env python3
"""Fit a package's finding score: a logistic false-positive filter over each finding's measurements.

Why: the model's mean lesion probability alone separates true from false findings poorly (on the validation
phantoms, the confidence limit that would bring false findings of 10 mm or more to 0.2 per case costs half the
true ones). What fools the model on the real CT has a shape and a contrast of its own: rims along the liver's
edge, vessel segments brighter than the liver, flat specks one slice thick. A finding score weighs those
measurements (``appliance.models.manifest.FINDING_FEATURES``) together, the way candidate detection plus
false-positive reduction works in computer-aided detection.

The data are the findings ``scripts/eval_demo_model.py --cases-out`` pickles, of phantoms no step has seen:

    python scripts/eval_demo_model.py --split fit --variety 3 --phantoms 200 --no-real --cases-out fit.pkl
    python scripts/eval_demo_model.py --split validation --variety 2 --phantoms 40 --cases-out val.pkl
    python scripts/fit_finding_score.py --fit fit.pkl --validation val.pkl --out score.json

(``--fit`` and ``--validation`` may be repeated: batches of other varieties, ``--seed-offset`` apart.)

The score is fitted on the fit phantoms (L2-regularised logistic regression, Newton's method on
standardised features, every finding the package's other rules keep: a true finding is one that overlaps a
reference lesion); its limit ``min_score`` is chosen on the validation phantoms, never on the held-out ones or
the real CT: the lowest limit keeping false findings of 10 mm or more at or under ``--max-fp`` per case
(``--rule fp``), or the highest costing no sensitivity for lesions of 10 mm or more (``--rule free``). The
result is printed as the manifest's ``[reporting.finding_score]`` table and written as JSON for
``eval_demo_model.py --finding-score`` and the package.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

from appliance.infer.measure import finding_features
from appliance.models.manifest import FINDING_FEATURES, FindingScore
from appliance_dev import lesion_eval as le


def load(path: Path, model: str | None) -> tuple[str, dict]:
    data = pickle.loads(path.read_bytes())  # our own file, written by eval_demo_model.py
    models = data["models"]
    name = model or next(iter(models))
    if name not in models:
        raise SystemExit(f"{path}: no model {name!r} (has: {', '.join(models)})")
    return name, models[name]


def pooled(paths: list[Path], model: str | None) -> tuple[str, dict]:
    """The cases of several pickles of one package, as one set (the first pickle's reporting rules)."""
    name, first = load(paths[0], model)
    merged = {"reporting": first["reporting"], "phantoms": list(first["phantoms"])}
    for path in paths[1:]:
        merged["phantoms"] += load(path, name)[1]["phantoms"]
    return name, merged


def design(cases: list[le.Case], features: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature rows, labels (1: the finding overlaps a reference lesion) and the findings' diameters."""
    rows, y, d = [], [], []
    for c in cases:
        for f in c.findings:
            x = finding_features(f.lesion)
            rows.append([x[k] for k in features])
            y.append(1.0 if f.hits else 0.0)
            d.append(f.lesion.longest_axial_diameter_mm)
    return np.asarray(rows, np.float64).reshape(-1, len(features)), np.asarray(y), np.asarray(d)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias minimising the mean log loss plus ``l2`` / 2 |w|^2 / n (bias not penalised), by
    Newton's method: the problem is convex and small (a few hundred findings, under ten features)."""
    n, k = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    beta = np.zeros(k + 1)
    penalty = np.full(k + 1, l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ beta, -60, 60)))
        grad = a.T @ (p - y) + penalty * beta
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty) + 1e-9 * np.eye(k + 1)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta[:-1], float(beta[-1])


def summary(name: str, t: le.Tally) -> str:
    sens = ", ".join(f"{b} {t.found[b]}/{t.reference[b]}" for b in le.BAND_NAMES)
    return (f"{name}: sensitivity {sens} (>= 10 mm {t.sensitivity(le.BAND_NAMES[1:]) or 0:.2f}); false findings "
            f"per case {t.fp_per_case():.2f} (>= 10 mm {t.fp_per_case(le.BAND_NAMES[1:]):.2f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", type=Path, action="append", required=True,
                   help="cases pickled by eval_demo_model.py --split fit (repeat to pool several)")
    p.add_argument("--validation", type=Path, action="append", required=True,
                   help="cases pickled by eval_demo_model.py --split validation, where min_score is chosen "
                        "(repeat to pool several)")
    p.add_argument("--model", default=None, help="which package of the pickles (default: the first)")
    p.add_argument("--features", default=",".join(FINDING_FEATURES),
                   help=f"comma-separated features (default all: {','.join(FINDING_FEATURES)})")
    p.add_argument("--l2", type=float, default=1.0, help="L2 penalty on the standardised weights (default 1)")
    p.add_argument("--rule", choices=["fp", "free"], default="fp",
                   help="how min_score is chosen on the validation phantoms (default fp: the lowest meeting --max-fp)")
    p.add_argument("--max-fp", type=float, default=0.2,
                   help="false findings of 10 mm or more per case the fp rule allows (default 0.2)")
    p.add_argument("--out", type=Path, default=None, help="write the finding score (with min_score) as JSON here")
    a = p.parse_args(argv)
    features = [f.strip() for f in a.features.split(",") if f.strip()]
    unknown = sorted(set(features) - set(FINDING_FEATURES))
    if unknown:
        p.error(f"unknown features: {', '.join(unknown)} (known: {', '.join(FINDING_FEATURES)})")

    name, fit = pooled(a.fit, a.model)
    _, val = pooled(a.validation, name)
    min_conf = float(fit["reporting"].get("min_confidence", 0.0))
    fit_cases = le.rescored(fit["phantoms"], None, min_conf)
    x, y, _ = design(fit_cases, features)
    if len(y) < 20 or y.min() == y.max():
        raise SystemExit(f"{', '.join(map(str, a.fit))}: {len(y)} findings, {int(y.sum())} true: too few, or of one kind only, to fit on")
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-6] = 1.0
    w, b = fit_logistic((x - mean) / scale, y, a.l2)
    print(f"fitted on {len(y)} findings of {len(fit_cases)} fit phantoms ({int(y.sum())} true, "
          f"{int(len(y) - y.sum())} false), min_confidence {min_conf:g}", file=sys.stderr)
    for f, wi in sorted(zip(features, w, strict=True), key=lambda t: -abs(t[1])):
        print(f"  {f:16s} {wi:+.3f}", file=sys.stderr)
    r6 = lambda v: round(float(v), 6)  # noqa: E731
    model = FindingScore(features=features, mean=[r6(v) for v in mean], scale=[r6(v) for v in scale],  # type: ignore[arg-type]
                         weights=[r6(v) for v in w], bias=r6(b), min_score=0.0)
    val_before = le.rescored(val["phantoms"], None, min_conf)
    val_cases = le.rescored(val["phantoms"], model, min_conf)
    curve = le.froc(val_cases)
    chosen = le.choose_threshold(curve, a.max_fp) if a.rule == "fp" else le.free_threshold(curve)
    model = model.model_copy(update={"min_score": chosen.threshold})
    base = float(val["reporting"].get("min_confidence", 0.0))
    print(summary(f"validation, confidence >= {base:g} alone", le.tally(val_before, base)), file=sys.stderr)
    print(summary(f"validation, finding score >= {chosen.threshold:.2f} ({a.rule} rule)", chosen), file=sys.stderr)
    for k in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        print("  " + summary(f"score >= {k:.1f}", le.tally(val_cases, k)), file=sys.stderr)
    block = model.model_dump()
    print("[reporting.finding_score]")
    for k, v in block.items():
        print(f"{k} = {json.dumps(v)}")
    if a.out:
        a.out.write_text(json.dumps(block, indent=1))
        print(f"finding score: {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
