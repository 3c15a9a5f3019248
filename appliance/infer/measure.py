"""Measurements from a label map: what a radiologist reads in the summary and the SR.

Volumes are voxel counts times the voxel volume (pixel spacing x distance between slice centres).
Lesions are the 3D connected parts of each lesion-type label; each gets its volume and its longest axial
diameter, measured edge to edge on the slice where it is longest (as RECIST measures on axial images).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.infer.components import Components, find_components
from appliance.infer.labelmap import LabelMap, as_labelmap
from appliance.models.manifest import Label, Reporting

#: SNOMED CT "Morphologically Altered Structure": labels of this category are counted as lesions.
LESION_CATEGORY = "49755003"


class SummaryFormatError(ValueError):
    """A measurement summary (``summary.json``) lacks a field or has one of the wrong type."""


@dataclass(frozen=True)
class LabelVolume:
    """One model label's own voxels (an organ label without the lesions inside it)."""

    value: int
    name: str
    voxels: int
    volume_ml: float


@dataclass(frozen=True)
class OrganVolume:
    """An organ as a clinician means it: its label and the lesion labels inside it (``labels[0]`` is the organ)."""

    name: str
    labels: tuple[int, ...]
    voxels: int
    volume_ml: float


@dataclass(frozen=True)
class Lesion:
    """One 3D connected part of a lesion label; ``index`` 1 is the largest by volume."""

    index: int
    label: int
    volume_ml: float
    longest_axial_diameter_mm: float
    slice_index: int  # in geometric order, where the longest axial diameter was measured
    slice_sop_instance_uid: str
    centroid_voxel: tuple[float, float, float]  # (slice, row, column)
    #: The widest extent perpendicular to the longest diameter, on the same slice (RECIST's short axis).
    short_axis_mm: float = 0.0


@dataclass(frozen=True)
class Measurements:
    """What a radiologist reads: volumes per label and organ, and each lesion. The SR, the key image's
    caption and the panel read these attributes; ``summary.json`` holds them as :meth:`to_dict`."""

    voxel_volume_ml: float
    labels: tuple[LabelVolume, ...]
    organs: tuple[OrganVolume, ...]
    lesions: tuple[Lesion, ...]
    #: Lesion components the model found below the package's reporting threshold: not findings, not counted.
    unreported_lesions: int = 0
    #: The package's reporting threshold (``[reporting] min_lesion_diameter_mm``) these were measured with.
    min_lesion_diameter_mm: float = 0.0

    @property
    def lesion_count(self) -> int:
        return len(self.lesions)

    @property
    def total_lesion_volume_ml(self) -> float:
        return round(sum(les.volume_ml for les in self.lesions), 3)

    @property
    def largest_diameter_mm(self) -> float:
        return max((les.longest_axial_diameter_mm for les in self.lesions), default=0.0)

    def label_volume(self, value: int) -> LabelVolume | None:
        return next((lv for lv in self.labels if lv.value == value), None)

    def to_dict(self) -> dict[str, Any]:
        """The summary's measurement part, as ``summary.json`` has always held it."""
        return {
            "voxel_volume_ml": self.voxel_volume_ml,
            "labels": [
                {"value": lv.value, "name": lv.name, "voxels": lv.voxels, "volume_ml": lv.volume_ml}
                for lv in self.labels
            ],
            "organs": [
                {"name": o.name, "labels": list(o.labels), "voxels": o.voxels, "volume_ml": o.volume_ml}
                for o in self.organs
            ],
            "lesions": {
                "count": self.lesion_count,
                "total_volume_ml": self.total_lesion_volume_ml,
                "largest_diameter_mm": self.largest_diameter_mm,
                "items": [
                    {
                        "label": les.label,
                        "volume_ml": les.volume_ml,
                        "longest_axial_diameter_mm": les.longest_axial_diameter_mm,
                        "slice_index": les.slice_index,
                        "slice_sop_instance_uid": les.slice_sop_instance_uid,
                        "centroid_voxel": list(les.centroid_voxel),
                        "index": les.index,
                        "short_axis_mm": les.short_axis_mm,
                    }
                    for les in self.lesions
                ],
                "unreported_count": self.unreported_lesions,
                "reporting": {"min_lesion_diameter_mm": self.min_lesion_diameter_mm},
            },
        }

    @classmethod
    def from_dict(cls, d: Any) -> Measurements:
        """Read back what :meth:`to_dict` wrote; :class:`SummaryFormatError` names the first bad field."""
        try:
            return cls(
                voxel_volume_ml=float(d["voxel_volume_ml"]),
                labels=tuple(
                    LabelVolume(int(x["value"]), str(x["name"]), int(x["voxels"]), float(x["volume_ml"]))
                    for x in d["labels"]
                ),
                organs=tuple(
                    OrganVolume(
                        str(x["name"]), tuple(int(v) for v in x["labels"]), int(x["voxels"]), float(x["volume_ml"])
                    )
                    for x in d["organs"]
                ),
                lesions=tuple(
                    Lesion(
                        index=int(x["index"]),
                        label=int(x["label"]),
                        volume_ml=float(x["volume_ml"]),
                        longest_axial_diameter_mm=float(x["longest_axial_diameter_mm"]),
                        slice_index=int(x["slice_index"]),
                        slice_sop_instance_uid=str(x["slice_sop_instance_uid"]),
                        centroid_voxel=_triple(x["centroid_voxel"]),
                        short_axis_mm=float(x.get("short_axis_mm", 0.0)),
                    )
                    for x in d["lesions"]["items"]
                ),
                unreported_lesions=int(d["lesions"].get("unreported_count", 0)),
                min_lesion_diameter_mm=float(d["lesions"].get("reporting", {}).get("min_lesion_diameter_mm", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SummaryFormatError(
                f"the measurement summary is incomplete or malformed ({type(exc).__name__}: {exc})"
            ) from None


def _triple(v: Any) -> tuple[float, float, float]:
    a, b, c = (float(x) for x in v)
    return (a, b, c)


def _axes_in_plane(mask2d: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float]:
    """(longest edge-to-edge distance, widest extent perpendicular to it), mm, of a 2D mask."""
    rows, cols = np.nonzero(mask2d)
    return _axes_of_pixels(rows, cols, spacing)


def _axes_of_pixels(rows: np.ndarray, cols: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float]:
    """:func:`_axes_in_plane` of the pixels at ``rows``, ``cols`` (in any order). Coordinates are taken
    as given (relative to the component's bounding box), so every path does the very same arithmetic.

    The short axis is the caliper width of the pixel corners across the longest diameter's direction: what
    a reader measures with the perpendicular caliper on the same slice."""
    if rows.size == 0:
        return 0.0, 0.0
    # The convex hull's extreme points suffice: for each row keep the leftmost and rightmost pixel.
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
    ends = np.r_[starts[1:] - 1, rows.size - 1]
    er = np.concatenate([rows[starts], rows[ends]])
    ec = np.concatenate([cols[starts], cols[ends]])
    # Pixel corners: (r, c), (r+1, c), (r, c+1), (r+1, c+1), in mm.
    cr = np.concatenate([er, er + 1, er, er + 1]) * spacing[0]
    cc = np.concatenate([ec, ec, ec + 1, ec + 1]) * spacing[1]
    pts = np.stack([cr, cc], axis=1).astype(np.float64)
    if len(pts) > 400:  # only hull vertices can be the farthest pair
        from scipy.spatial import ConvexHull

        pts = pts[ConvexHull(pts).vertices]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    i, j = np.unravel_index(int(d.argmax()), d.shape)
    longest = float(d[i, j])
    if longest == 0.0:
        return 0.0, 0.0
    u = (pts[j] - pts[i]) / longest
    across = pts @ np.array([-u[1], u[0]])
    return longest, float(across.max() - across.min())


def _reported(longest_mm: float, reporting: Reporting) -> bool:
    """Whether a lesion is a finding: compared as reported (rounded to 0.1 mm), so a 4.96 mm lesion shown as
    5.0 mm is not dropped by a 5 mm threshold."""
    return round(longest_mm, 1) >= reporting.min_lesion_diameter_mm


def _organ_of(lesion: Label, label_defs: list[Label]) -> int:
    """The label value of the organ a lesion label lies in (its ``region``), 0 when the package has none."""
    if lesion.region is not None:
        for lab in label_defs:
            if lab.category.code != LESION_CATEGORY and lab.type.code == lesion.region.code:
                return lab.value
    return 0


def measure_dense(
    labels: np.ndarray,
    label_defs: list[Label],
    pixel_spacing: tuple[float, float],
    slice_spacing: float,
    sop_instance_uids: list[str],
    reporting: Reporting | None = None,
) -> Measurements:
    """The whole-volume measurement :func:`measure` replaced, kept as the reference the slab path is
    tested against (it labels the whole volume at once: 4 bytes a voxel). Like it, it relabels unreported
    lesions in ``labels`` (in place) unless the package keeps them."""
    reporting = reporting or Reporting()
    voxel_ml = pixel_spacing[0] * pixel_spacing[1] * slice_spacing / 1000.0
    counts = np.bincount(labels.ravel(), minlength=256)
    lesions: list[Lesion] = []
    unreported = 0
    for lab in label_defs:
        n = int(counts[lab.value])
        if lab.category.code != LESION_CATEGORY or n == 0:
            continue
        comp, k = ndimage.label(labels == lab.value, structure=np.ones((3, 3, 3), bool))
        objects = ndimage.find_objects(comp)
        sizes = np.bincount(comp.ravel(), minlength=k + 1)
        for i, sl in enumerate(objects, start=1):
            sub = comp[sl] == i
            best, best_short, best_z = 0.0, 0.0, sl[0].start
            for dz in range(sub.shape[0]):
                if sub[dz].any():
                    d, short = _axes_in_plane(sub[dz], pixel_spacing)
                    if d > best:
                        best, best_short, best_z = d, short, sl[0].start + dz
            zc, rc, cc = ndimage.center_of_mass(sub)
            lesions.append(
                Lesion(
                    index=0,
                    label=lab.value,
                    volume_ml=round(int(sizes[i]) * voxel_ml, 3),
                    longest_axial_diameter_mm=round(best, 1),
                    slice_index=int(best_z),
                    slice_sop_instance_uid=sop_instance_uids[best_z],
                    centroid_voxel=(
                        float(round(zc + sl[0].start, 1)),
                        float(round(rc + sl[1].start, 1)),
                        float(round(cc + sl[2].start, 1)),
                    ),
                    short_axis_mm=round(best_short, 1),
                )
            )
            if not _reported(best, reporting):
                lesions.pop()
                unreported += 1
                if not reporting.keep_unreported_in_labelmap:
                    n = int(sizes[i])
                    organ = _organ_of(lab, label_defs)
                    labels[sl][sub] = organ
                    counts[lab.value] -= n
                    counts[organ] += n
    return _report(counts, lesions, label_defs, voxel_ml, unreported, reporting)


def measure(
    labels: np.ndarray | LabelMap,
    label_defs: list[Label],
    pixel_spacing: tuple[float, float],
    slice_spacing: float,
    sop_instance_uids: list[str],
    slab_slices: int = 64,
    reporting: Reporting | None = None,
) -> Measurements:
    """Label volumes, organ volumes and the reported lesions of a label map, ``slab_slices`` slices at a time.

    The same numbers as :func:`measure_dense` (lesions numbered, ordered and measured identically), with
    memory bounded by a slab's window of the lesion labels instead of the whole volume. Lesions below the
    package's reporting threshold are left out (counted as ``unreported_lesions``) and, unless the package
    keeps them, their voxels are given back to the organ they lie in, in ``labels`` itself (a LabelMap is
    changed in place), so the SEG, the key image and ``labelmap.npz`` show the reported findings only.
    """
    reporting = reporting or Reporting()
    lm = as_labelmap(labels)
    voxel_ml = pixel_spacing[0] * pixel_spacing[1] * slice_spacing / 1000.0
    counts = lm.counts(256)
    lesions: list[Lesion] = []
    unreported = 0
    for lab in label_defs:
        if lab.category.code != LESION_CATEGORY or counts[lab.value] == 0:
            continue
        comps = find_components(lm, [lab.value], slab_slices, full=True)
        m = comps.count
        best = np.zeros(m, dtype=np.float64)
        best_short = np.zeros(m, dtype=np.float64)
        best_z = comps.lo[:, 0].copy()
        # Coordinate sums relative to each component's bounding box, exact in integers: the centroid is then
        # computed as ndimage.center_of_mass computes it on the component's crop.
        sums = np.zeros((m, 3), dtype=np.int64)
        for slab, comp in comps.labelled(lm):
            z, r, c = np.nonzero(comp)
            ids = comp[z, r, c].astype(np.int64) - 1
            gz, gr, gc = z + slab.start, r + slab.box[0], c + slab.box[2]
            rel_r, rel_c = gr - comps.lo[ids, 1], gc - comps.lo[ids, 2]
            np.add.at(sums, ids, np.stack([gz - comps.lo[ids, 0], rel_r, rel_c], axis=1))
            # Per slice and component: its longest in-plane diameter; the first slice of the longest wins.
            order = np.lexsort((ids, gz))
            key = gz[order] * m + ids[order]
            cuts = np.flatnonzero(np.diff(key)) + 1
            for part in np.split(order, cuts):
                i, zz = int(ids[part[0]]), int(gz[part[0]])
                d, short = _axes_of_pixels(rel_r[part], rel_c[part], pixel_spacing)
                if d > best[i]:
                    best[i], best_short[i], best_z[i] = d, short, zz
        for i in range(m):
            n = int(comps.sizes[i])
            # np.float64 as ndimage.center_of_mass returns, so round() rounds as the whole-volume code did
            # (numpy rounds 26.95 to 27.0 where Python's float gives 26.9).
            zc, rc, cc = (np.float64(sums[i, k]) / np.float64(n) for k in range(3))
            z0, r0, c0 = (int(v) for v in comps.lo[i])
            lesions.append(
                Lesion(
                    index=0,
                    label=lab.value,
                    volume_ml=round(n * voxel_ml, 3),
                    longest_axial_diameter_mm=round(float(best[i]), 1),
                    slice_index=int(best_z[i]),
                    slice_sop_instance_uid=sop_instance_uids[int(best_z[i])],
                    centroid_voxel=(float(round(zc + z0, 1)), float(round(rc + r0, 1)), float(round(cc + c0, 1))),
                    short_axis_mm=round(float(best_short[i]), 1),
                )
            )
        dropped = [i for i in range(m) if not _reported(float(best[i]), reporting)]
        if dropped:
            keep = np.ones(m + 1, dtype=bool)
            keep[np.asarray(dropped) + 1] = False
            first = len(lesions) - m  # this label's lesions are the last m found
            lesions = lesions[:first] + [les for j, les in enumerate(lesions[first:]) if keep[j + 1]]
            unreported += len(dropped)
            if not reporting.keep_unreported_in_labelmap:
                organ = _organ_of(lab, label_defs)
                _relabel(lm, comps, ~keep, organ)
                n = int(comps.sizes[np.asarray(dropped)].sum())
                counts[lab.value] -= n
                counts[organ] += n
    return _report(counts, lesions, label_defs, voxel_ml, unreported, reporting)


def _relabel(lm: LabelMap, comps: Components, drop: np.ndarray, value: int) -> None:
    """Set the voxels of the components marked in ``drop`` (indexed by component number) to ``value``,
    slab by slab (whole slices: the organ around a lesion reaches past the lesion label's window)."""
    drop = drop.copy()
    drop[0] = False
    for slab, comp in comps.labelled(lm):
        hit = drop[comp]
        if not hit.any():
            continue
        full = lm.slab(slab.start, slab.stop)
        r0, r1, c0, c1 = slab.box
        window = full[:, r0:r1, c0:c1]
        window[hit] = value
        lm.set_slab(slab.start, full)


def _report(
    counts: np.ndarray,
    lesions: list[Lesion],
    label_defs: list[Label],
    voxel_ml: float,
    unreported: int = 0,
    reporting: Reporting | None = None,
) -> Measurements:
    """The measurements from voxel counts per label value and the lesions found (numbered here, largest first)."""
    out_labels = tuple(
        LabelVolume(lab.value, lab.name, int(counts[lab.value]), round(int(counts[lab.value]) * voxel_ml, 3))
        for lab in label_defs
    )
    lesions = sorted(lesions, key=lambda d: -d.volume_ml)  # stable: ties keep the order they were found in
    numbered = tuple(dataclasses.replace(les, index=i) for i, les in enumerate(lesions, start=1))
    lesion_values = {lab.value for lab in label_defs if lab.category.code == LESION_CATEGORY}
    organ_values = {lab.value for lab in label_defs} - lesion_values
    organs = []
    # An organ's volume includes the lesions inside it (a liver volume with its metastases cut out is not
    # what a clinician means by liver volume); the label's own volume stays in ``labels``.
    for lab in label_defs:
        if lab.value in organ_values:
            inside = [d.value for d in label_defs if d.region is not None and d.region.code == lab.type.code]
            n = int(counts[lab.value] + sum(int(counts[v]) for v in inside))
            organs.append(OrganVolume(lab.name, (lab.value, *inside), n, round(n * voxel_ml, 3)))
    return Measurements(
        voxel_volume_ml=voxel_ml,
        labels=out_labels,
        organs=tuple(organs),
        lesions=numbered,
        unreported_lesions=unreported,
        min_lesion_diameter_mm=(reporting or Reporting()).min_lesion_diameter_mm,
    )
