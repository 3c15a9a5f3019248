"""The finding score, fitted and swept: ``scripts/fit_finding_score.py`` and ``appliance_dev.lesion_eval``.

On constructed findings where true ones are round and false ones are flat bands: the fit weighs shape, the
limit it chooses on the validation cases keeps false findings of 10 mm or more within the asked rate, and the
per-lesion evaluation sweeps the score (not the confidence) once a package has one.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from appliance.infer.measure import Lesion, finding_score
from appliance.models.manifest import FindingScore, Reporting
from appliance_dev import lesion_eval as le

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("fit_finding_score", ROOT / "scripts" / "fit_finding_score.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _lesion(d: float, short: float, z: float, conf: float, width: float) -> Lesion:
    volume = np.pi / 6 * d * short * z / 1000.0
    return Lesion(index=1, label=2, volume_ml=round(volume, 3), longest_axial_diameter_mm=d, slice_index=0,
                  slice_sop_instance_uid="1", centroid_voxel=(0.0, 0.0, 0.0), short_axis_mm=short,
                  confidence=conf, mean_hu=40.0, surrounding_hu=100.0, edge_contact=0.0, width_mm=width,
                  z_extent_mm=z, peak_confidence=min(1.0, conf + 0.1))


def _cases(n: int, seed: int) -> list[le.Case]:
    """Each case: a round true lesion and a flat band (thin, elongated) of about the same confidence."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        d = float(rng.uniform(10, 30))
        true = _lesion(d, d * rng.uniform(0.8, 1.0), d * rng.uniform(0.8, 1.0), rng.uniform(0.5, 0.9), d / 2 * 0.9)
        b = float(rng.uniform(10, 30))
        band = _lesion(b, b * rng.uniform(0.15, 0.35), 2.0, rng.uniform(0.5, 0.9), b * 0.08)
        cases.append(le.Case(f"c{i}", (le.Finding(true, (0,)), le.Finding(band, ())), (round(d, 1),)))
    return cases


def _pickle(path: Path, cases: list[le.Case]) -> Path:
    rules = Reporting(min_lesion_diameter_mm=5.0, min_confidence=0.24).model_dump()
    path.write_bytes(pickle.dumps({"split": "x", "seed0": 0, "variety": 1,
                                   "models": {"demo 1": {"reporting": rules, "phantoms": cases, "real": []}}}))
    return path


def test_logistic_fit_separates_what_is_separable() -> None:
    mod = _script()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).astype(float)
    w, b = mod.fit_logistic(x, y, l2=0.1)
    assert w[0] > 0 and w[1] < 0 and abs(w[0] / w[1] + 2.0) < 0.5  # the direction of the true boundary
    p = 1 / (1 + np.exp(-(x @ w + b)))
    assert ((p > 0.5) == (y > 0)).mean() > 0.97


def test_the_fitted_score_weighs_shape_and_its_limit_meets_the_false_finding_rate(tmp_path: Path,
                                                                                   capsys: pytest.CaptureFixture
                                                                                   ) -> None:
    mod = _script()
    fit = _pickle(tmp_path / "fit.pkl", _cases(60, 1))
    val = _pickle(tmp_path / "val.pkl", _cases(40, 2))
    out = tmp_path / "score.json"
    assert mod.main(["--fit", str(fit), "--validation", str(val), "--out", str(out), "--max-fp", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("[reporting.finding_score]") and "min_score = " in printed
    model = FindingScore.model_validate(json.loads(out.read_text()))
    w = dict(zip(model.features, model.weights, strict=True))
    assert w["roundness"] > 0 and w["elongation"] > 0  # round and compact means true
    scored = le.rescored(_cases(40, 2), model, 0.24)
    at = le.tally(scored, model.min_score)
    assert at.fp_per_case(le.BAND_NAMES[1:]) <= 0.1 and (at.sensitivity() or 0) >= 0.9
    # what serving computes for a finding is what the fit's evaluation computed
    f = scored[0].findings[0]
    assert f.lesion.score == finding_score(f.lesion, model) and f.rank == f.lesion.score


def test_the_fit_refuses_findings_of_one_kind_only(tmp_path: Path) -> None:
    mod = _script()
    only_true = [le.Case(c.name, c.findings[:1], c.reference_mm) for c in _cases(30, 3)]
    fit = _pickle(tmp_path / "fit.pkl", only_true)
    with pytest.raises(SystemExit, match="of one kind only"):
        mod.main(["--fit", str(fit), "--validation", str(fit)])
    with pytest.raises(SystemExit):
        mod.main(["--fit", str(fit), "--validation", str(fit), "--features", "colour"])


def test_the_sweep_follows_the_score_where_a_package_has_one_and_keeps_its_confidence_limit() -> None:
    case = _cases(1, 4)[0]
    low = le.Finding(_lesion(12.0, 11.0, 11.0, 0.1, 5.4), ())  # round but under the confidence limit
    case = le.Case(case.name, (*case.findings, low), case.reference_mm)
    model = FindingScore(features=["roundness"], mean=[0.5], scale=[0.2], weights=[3.0], bias=0.0, min_score=0.5)
    (scored,) = le.rescored([case], model, 0.24)
    assert len(scored.findings) == 2  # the confidence limit still applies before the score
    true, band = scored.findings
    assert true.rank > 0.5 > band.rank
    rules = Reporting(min_confidence=0.24, finding_score=model)
    assert le.threshold_of(rules) == 0.5 and le.threshold_of(Reporting(min_confidence=0.3)) == 0.3
    assert le.tally([scored], 0.5).false_positive == {"<10": 0, "10-20": 0, ">=20": 0}
    (plain,) = le.rescored([scored], None)
    assert plain.findings[0].rank == plain.findings[0].lesion.confidence  # no score: the confidence again

