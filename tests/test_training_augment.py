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
