"""The shared real abdominal CT (``../shared/data/real-ct-abdomen``) and the views of it a clinic would send.

Why views: the demo model is judged on real contrast CT it never saw, sent as full-body fields of view and as
targeted liver reconstructions down to ~180 mm (the liver fills the image, no body outline shows), with slice
spacings from under 1 mm to 5 mm. The one real series we have is a 500 mm field of view at 2 mm spacing, so the
other views are derived from it: an in-plane crop centred on the liver, resampled to the full 512 matrix (what a
targeted reconstruction of the same raw data shows, a little softer), and thick slabs averaged from adjacent
slices (what a 4 mm reconstruction shows). Every view keeps its liver reference on its own grid. None of this
is ever used for training: it stays an honest measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-ct-abdomen"


@dataclass(frozen=True)
class RealView:
    """One way of looking at the real series: HU (slices in ascending z), pixel spacing, liver reference."""

    name: str
    hu: np.ndarray
    spacing: tuple[float, float]
    slice_mm: float
    liver: np.ndarray

    @property
    def fov_mm(self) -> float:
        return float(self.hu.shape[2] * self.spacing[1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (nan when both are empty): the figure every evaluation script reports."""
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / s if s else float("nan")


def load_real_ct(folder: Path = REAL_CT) -> RealView | None:
    """The series as acquired (HU, ascending z) with its liver reference; None where it is not present."""
    import pydicom

    ref_path = folder / "liver_reference.npz"
    files = sorted((folder / "dicom").glob("*")) if (folder / "dicom").is_dir() else []
    if not files or not ref_path.exists():
        return None
    ds = [pydicom.dcmread(f) for f in files]
    ds.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in ds])
    ref = np.load(ref_path)
    if [str(u) for u in ref["sop_instance_uids"]] != [str(d.SOPInstanceUID) for d in ds]:
        raise ValueError("real CT reference order does not match the series' z order")
    sp = tuple(float(v) for v in ds[0].PixelSpacing)
    dz = abs(float(ds[1].ImagePositionPatient[2]) - float(ds[0].ImagePositionPatient[2])) if len(ds) > 1 else 1.0
    return RealView("as acquired", hu, (sp[0], sp[1]), dz, ref["liver"].astype(bool))


def targeted(view: RealView, fov_mm: float, matrix: int = 512) -> RealView:
    """A square ``fov_mm`` field of view centred (in-plane) on the liver, resampled to ``matrix`` pixels."""
    from scipy.ndimage import zoom

    rows, cols = np.nonzero(view.liver.any(axis=0))
    centre = ((rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0)
    side = int(round(fov_mm / view.spacing[0]))
    side = min(side, view.hu.shape[1], view.hu.shape[2])
    r0 = int(np.clip(round(centre[0] - side / 2.0), 0, view.hu.shape[1] - side))
    c0 = int(np.clip(round(centre[1] - side / 2.0), 0, view.hu.shape[2] - side))
    crop = (slice(None), slice(r0, r0 + side), slice(c0, c0 + side))
    f = matrix / side
    hu = zoom(view.hu[crop], (1.0, f, f), order=3, prefilter=True).astype(np.float32)
    liver = zoom(view.liver[crop].astype(np.float32), (1.0, f, f), order=1) >= 0.5
    sp = side * view.spacing[0] / matrix
    return RealView(f"targeted {side * view.spacing[0]:.0f} mm", hu, (sp, sp), view.slice_mm, liver)


def thick(view: RealView, factor: int) -> RealView:
    """Slabs averaging ``factor`` adjacent slices (a thicker reconstruction at ``factor`` times the spacing)."""
    n = view.hu.shape[0] // factor * factor
    hu = view.hu[:n].reshape(-1, factor, *view.hu.shape[1:]).mean(axis=1)
    liver = view.liver[:n].reshape(-1, factor, *view.liver.shape[1:]).mean(axis=1) >= 0.5
    return RealView(f"{view.slice_mm * factor:g} mm slabs", hu.astype(np.float32), view.spacing,
                    view.slice_mm * factor, liver)


def real_views(folder: Path = REAL_CT) -> list[RealView]:
    """The views the demo model is reported on: as acquired, targeted 250 and 180 mm, and 4 mm slabs."""
    base = load_real_ct(folder)
    if base is None:
        return []
    return [base, targeted(base, 250.0), targeted(base, 180.0), thick(base, 2)]
