"""The training crops' shading augmentation (``appliance_dev.train.data``, run by scripts/train_demo_model.py):
bounded, smooth, tissue only, labels untouched.

Why it matters: real CT has low-frequency shading (beam hardening, cupping) that the phantoms lack; the
model must not learn that any darker patch of liver is a lesion, and the augmentation must not add edges
that look like one.
"""

from __future__ import annotations

import numpy as np

from appliance_dev.train.config import SPEC
from appliance_dev.train.data import CropSampler


def test_shading_is_bounded_smooth_and_only_on_tissue() -> None:
    prep = np.full((3, 160, 160), -1.0, np.float16)  # air
    prep[:, 20:140, 20:140] = 0.2  # uniform soft tissue (~110 HU)
    lab = np.zeros((3, 160, 160), np.uint8)
    lab[:, 40:120, 40:120] = 1
    lab[:, 70:80, 70:80] = 2
    cases = [dict(prep=prep, lab=lab)]
    x, y = CropSampler(cases, 128, np.random.default_rng(5), 0.3, 0.0).batch(32)
    xs, ys = CropSampler(cases, 128, np.random.default_rng(5), 0.3, 30.0).batch(32)
    assert np.array_equal(y, ys)  # same crops, same labels: only intensities change
    hu_per_unit = (SPEC.window[1] - SPEC.window[0]) / 2.0
    diff = (xs - x) * hu_per_unit
    assert np.abs(diff).max() <= 30.0 + 1e-3
    shaded = [b for b in range(32) if np.abs(diff[b]).max() > 1.0]
    assert 6 <= len(shaded) <= 26, len(shaded)  # about half the crops
    tissue = x > -0.95
    assert np.all(diff[~tissue] == 0.0)  # air and padding untouched
    # Smooth: neighbouring tissue pixels differ by far less than a lesion edge (>= 10 HU).
    for b in shaded:
        d, t = diff[b, 0], tissue[b, 0]
        both = t[:, 1:] & t[:, :-1]
        assert np.abs(np.diff(d, axis=1))[both].max() < 3.0


def _liver_case() -> list[dict]:
    prep = np.full((3, 160, 160), -1.0, np.float16)
    prep[:, 10:150, 10:150] = -0.6  # fat around the organ
    yy, xx = np.mgrid[:160, :160]
    liver = (yy - 80) ** 2 + (xx - 80) ** 2 <= 50**2
    prep[:, liver] = 0.2
    lab = np.zeros((3, 160, 160), np.uint8)
    lab[:, liver] = 1
    lab[:, 75:85, 75:85] = 2
    return [dict(prep=prep, lab=lab)]


def test_edge_shading_is_bounded_on_the_liver_only_and_keeps_the_labels() -> None:
    """The liver-rim band (beam hardening, partial volume): at most the given HU, inside the liver only,
    strongest at the rim, labels untouched."""
    cases = _liver_case()
    x, y = CropSampler(cases, 128, np.random.default_rng(7), 0.3).batch(32)
    xe, ye = CropSampler(cases, 128, np.random.default_rng(7), 0.3, 0.0, 60.0).batch(32)
    assert np.array_equal(y, ye)
    hu = (xe - x) * (SPEC.window[1] - SPEC.window[0]) / 2.0
    assert np.abs(hu).max() <= 60.0 + 1e-3
    shaded = [b for b in range(32) if np.abs(hu[b]).max() > 1.0]
    assert 6 <= len(shaded) <= 26
    for b in range(32):
        outside = y[b] == 0
        assert np.all(hu[b, 1][outside] == 0.0)  # fat, air and padding untouched
    from scipy.ndimage import binary_erosion

    for b in shaded:
        liver = y[b] > 0
        rim = liver & ~binary_erosion(liver, iterations=2)
        core = binary_erosion(liver, iterations=20)
        if rim.any() and core.any():
            assert np.abs(hu[b, 1][rim]).max() > np.abs(hu[b, 1][core]).max()


def test_clefts_cut_fat_or_fluid_into_the_liver_and_label_it_background() -> None:
    """A cleft replaces liver with -100..20 HU and its pixels become background; nothing outside the liver
    changes, and the crops where none is cut stay exactly as they were."""
    cases = _liver_case()
    x, y = CropSampler(cases, 128, np.random.default_rng(9), 0.3).batch(32)
    xc, yc = CropSampler(cases, 128, np.random.default_rng(9), 0.3, 0.0, 0.0, 1.0).batch(32)
    lo, hi = SPEC.window
    changed = y != yc
    assert changed.any()
    assert np.all(y[changed] > 0) and np.all(yc[changed] == 0)  # liver (or lesion) pixels became background
    hu = (xc[:, 1] + 1.0) / 2.0 * (hi - lo) + lo
    assert hu[changed].max() <= 110.0 and hu[changed].min() >= -110.0  # fat to fluid, blended at the rim
    assert np.all(xc[:, 1][y == 0] == x[:, 1][y == 0])
    cut = [b for b in range(32) if changed[b].any()]
    for b in cut:
        assert changed[b].sum() < (y[b] > 0).sum() * 0.2  # a thin cleft, not a lobe
