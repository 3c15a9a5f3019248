"""The views of the real CT that the demo model is reported on (appliance_dev/real_ct.py): a targeted
reconstruction must show what a clinic's targeted liver series shows (a ~180 mm field of view on the full matrix,
centred on the liver, no body outline) with its reference carried along exactly; thick slabs must average, not
pick."""

from __future__ import annotations

import numpy as np

import appliance_dev.real_ct as R


def body_with_liver(n: int = 4, size: int = 256, spacing: float = 1.9):
    """A ~490 mm field of view: air around a body, a liver block right of centre (image left), a lesion-free slab."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    body = ((x - size / 2) / (size * 0.42)) ** 2 + ((y - size / 2) / (size * 0.33)) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)[None].repeat(n, axis=0)
    liver = np.zeros(hu.shape, bool)
    liver[:, 90:170, 50:130] = True
    hu[liver] = 100.0
    hu += np.arange(n, dtype=np.float32)[:, None, None]  # each slice distinguishable
    return R, R.RealView("as acquired", hu, (spacing, spacing), 2.0, liver)


def test_targeted_view_is_a_liver_centred_crop_on_the_full_matrix() -> None:
    R, base = body_with_liver()
    view = R.targeted(base, 180.0)
    assert view.hu.shape == (4, 512, 512) and view.liver.shape == view.hu.shape
    assert abs(view.fov_mm - 180.0) < base.spacing[0]  # whole source pixels: within one of the asked size
    assert view.spacing[0] == view.spacing[1] == view.fov_mm / 512
    # Centred on the liver: the reference's centre of mass sits in the middle of the image.
    rows, cols = np.nonzero(view.liver[0])
    assert abs(rows.mean() - 256) < 10 and abs(cols.mean() - 256) < 10
    # The reference keeps its physical size: 80 source pixels of 1.9 mm = 152 mm.
    assert abs(view.liver[0].any(axis=0).sum() * view.spacing[1] - 80 * base.spacing[1]) < 2 * base.spacing[1]
    # No body outline: the crop lies inside the body, so there is no air in the image.
    assert view.hu.min() > -900
    # Slices are not mixed: each keeps its own offset.
    assert np.allclose(view.hu[:, 256, 256] - view.hu[0, 256, 256], np.arange(4), atol=1e-3)


def test_targeted_view_never_leaves_the_image() -> None:
    R, base = body_with_liver()
    shifted = R.RealView(base.name, base.hu, base.spacing, base.slice_mm, np.roll(base.liver, -45, axis=2))
    view = R.targeted(shifted, 250.0)
    assert view.hu.shape == (4, 512, 512) and view.liver.any()


def test_thick_slabs_average_adjacent_slices() -> None:
    R, base = body_with_liver(n=5)
    slab = R.thick(base, 2)
    assert slab.hu.shape == (2, 256, 256) and slab.slice_mm == 4.0 and slab.spacing == base.spacing
    assert np.allclose(slab.hu[1], (base.hu[2] + base.hu[3]) / 2)
    assert np.array_equal(slab.liver[0], base.liver[0])
