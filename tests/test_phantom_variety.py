"""The phantom generator's second variety (issue 21): delayed and unenhanced phases, fatty livers and
lesion-free patients, drawn without changing what variety 1 draws (the card's held-out sets stay the same
patients and scans)."""

from __future__ import annotations

import dataclasses

import numpy as np

from appliance_dev.synthetic import make_phantom, sample_spec
from appliance_dev.synthetic.phantom import PHASES


def test_variety_one_is_unchanged_by_variety_two() -> None:
    for seed in range(30):
        one, two = sample_spec(seed, n_slices=8), sample_spec(seed, n_slices=8, variety=2)
        assert one.phase in ("portal", "arterial") and one.fatty_hu == 0.0 and not one.lesion_free
        same = dataclasses.replace(two, phase=one.phase, fatty_hu=0.0, lesion_free=False, variety=1)
        assert same == one  # grid, dose, slab and kernel are the seed's, whatever the variety


def test_variety_two_draws_every_phase_fatty_livers_and_lesion_free_patients() -> None:
    specs = [sample_spec(seed, variety=2) for seed in range(400)]
    phases = {s.phase for s in specs}
    assert phases == set(PHASES)
    assert 0.15 < np.mean([s.fatty_hu > 0 for s in specs]) < 0.35
    assert 0.15 < np.mean([s.lesion_free for s in specs]) < 0.35
    assert all(15 <= s.fatty_hu <= 50 for s in specs if s.fatty_hu)


def _render(phase: str, fatty: float = 0.0, lesion_free: bool = False) -> tuple[np.ndarray, np.ndarray]:
    spec = dataclasses.replace(sample_spec(21, n_slices=3, fov_kind="full", variety=2), phase=phase,
                               fatty_hu=fatty, lesion_free=lesion_free, z_center=-60.0, rows=192, cols=192)
    hu, lab, _ = make_phantom(spec)
    return hu, lab


def test_unenhanced_blood_is_darker_than_the_liver_and_a_fatty_liver_darker_still() -> None:
    hu, lab = _render("unenhanced")
    liver = float(np.median(hu[lab == 1]))
    assert 45 <= liver <= 75
    fatty_hu, fatty_lab = _render("unenhanced", fatty=35.0)
    assert float(np.median(fatty_hu[fatty_lab == 1])) < liver - 25
    assert np.array_equal(lab, fatty_lab)  # steatosis changes HU, not the anatomy or its labels
    delayed, _ = _render("delayed")
    portal, _ = _render("portal")
    assert float(np.median(delayed[lab == 1])) < float(np.median(portal[lab == 1])) + 5


def test_a_lesion_free_patient_has_no_lesion_label() -> None:
    spec = next(s for s in (sample_spec(k, n_slices=4, variety=2) for k in range(100)) if s.lesion_free)
    spec = dataclasses.replace(spec, rows=128, cols=128, z_center=-60.0)
    _, lab, meta = make_phantom(spec)
    assert meta["n_lesions"] == 0 and not (lab == 2).any() and (lab == 1).any()
