"""The phantom generator's second and third varieties (issue 21): delayed and unenhanced phases, fatty livers,
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


def test_variety_three_adds_cirrhosis_and_ascites_without_changing_what_two_draws() -> None:
    specs = []
    for seed in range(300):
        two, three = sample_spec(seed, n_slices=8, variety=2), sample_spec(seed, n_slices=8, variety=3)
        assert dataclasses.replace(three, cirrhosis=0.0, ascites_mm=0.0, variety=2) == two
        assert two.cirrhosis == 0.0 and two.ascites_mm == 0.0
        specs.append(three)
    assert 0.2 < np.mean([s.cirrhosis > 0 for s in specs]) < 0.4
    assert all(0.4 <= s.cirrhosis <= 1.0 for s in specs if s.cirrhosis)
    assert all(s.cirrhosis > 0 for s in specs if s.ascites_mm)  # ascites comes with cirrhosis here
    assert 0.3 < np.mean([s.ascites_mm > 0 for s in specs if s.cirrhosis]) < 0.7


def test_a_cirrhotic_liver_is_nodular_and_ascites_is_fluid_around_it_labelled_background() -> None:
    from scipy import ndimage

    base = dataclasses.replace(sample_spec(21, n_slices=3, fov_kind="full", variety=3), phase="portal",
                               z_center=-70.0, rows=512, cols=512, cirrhosis=0.0, ascites_mm=0.0, noise_hu=1.0)
    hu0, lab0, _ = make_phantom(base)
    hu1, lab1, meta = make_phantom(dataclasses.replace(base, cirrhosis=0.9))
    assert meta["cirrhosis"] == 0.9
    def roughness(lab: np.ndarray) -> float:
        """Pixels a 3-pixel opening and closing change, per boundary pixel: bumps and notches the outline has."""
        m = lab[1] >= 1
        disc = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3
        smooth = ndimage.binary_closing(ndimage.binary_opening(m, disc), disc)
        return float((m ^ smooth).sum()) / float((m & ~ndimage.binary_erosion(m)).sum())

    assert roughness(lab1) > 1.5 * roughness(lab0)  # a nodular outline, against the same patient's smooth one
    hu2, lab2, _ = make_phantom(dataclasses.replace(base, cirrhosis=0.9, ascites_mm=15.0))
    liver = lab2[1] >= 1
    ring = ndimage.binary_dilation(liver, iterations=4) & ~liver & (lab2[1] == 0)
    fluid = (hu2[1][ring] > -30) & (hu2[1][ring] < 40)
    assert fluid.mean() > 0.5, "a fluid band around the liver"
    assert not (lab2[1][ring] >= 1).any()  # the fluid is background
    assert float(np.median(hu2[1][ring])) < float(np.median(hu2[1][liver])) - 50


def test_variety_four_adds_periportal_cuffs_without_changing_what_two_draws() -> None:
    specs = []
    for seed in range(300):
        two, four = sample_spec(seed, n_slices=8, variety=2), sample_spec(seed, n_slices=8, variety=4)
        assert dataclasses.replace(four, periportal_mm=0.0, periportal_hu=0.0, variety=2) == two
        assert four.cirrhosis == 0.0 and four.ascites_mm == 0.0  # variety 4 draws no cirrhosis
        specs.append(four)
    assert 0.6 < np.mean([s.periportal_mm > 0 for s in specs]) < 0.8
    assert all(1.5 <= s.periportal_mm <= 6.0 for s in specs if s.periportal_mm)
    fat = [s.periportal_hu < 0 for s in specs]
    assert 0.4 < np.mean(fat) < 0.6 and all(-110 <= s.periportal_hu <= 25 for s in specs)


def test_a_periportal_cuff_is_dark_pockets_beside_the_portal_vein_labelled_background() -> None:
    base = dataclasses.replace(sample_spec(5000001, n_slices=24, fov_kind="full", variety=4), phase="portal",
                               z_center=None, slice_spacing=2.0, slice_thickness=2.0, noise_hu=1.0,
                               periportal_mm=0.0, periportal_hu=0.0)
    hu0, lab0, _ = make_phantom(base)
    hu1, lab1, _ = make_phantom(dataclasses.replace(base, periportal_mm=5.0, periportal_hu=-80.0))
    changed = lab0 != lab1
    assert changed.any() and (lab0[changed] == 1).all() and (lab1[changed] == 0).all()  # liver -> background only
    liver = lab0 == 1
    darker = liver & (hu1.astype(np.int32) < hu0.astype(np.int32) - 60)
    assert darker.sum() > 200, "fat pockets inside the liver"
    assert (lab1[darker] == 0).mean() > 0.8  # (partial volume aside) the fat is background, as the clefts' wedges are
    # Pockets, not a continuous sheath: on the slices the cuff shows, it is several separate pieces.
    from scipy import ndimage

    pieces = [ndimage.label(darker[k])[1] for k in range(darker.shape[0]) if darker[k].sum() > 20]
    assert pieces and max(pieces) >= 3
