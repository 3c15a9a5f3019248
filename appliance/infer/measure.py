"""Measurements from a label map: what a radiologist reads in the summary and the SR.

Volumes are voxel counts times the voxel volume (pixel spacing x distance between slice centres).
Lesions are the 3D connected parts of each lesion-type label; each gets its volume and its longest axial
diameter, measured edge to edge on the slice where it is longest (as RECIST measures on axial images).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.infer.components import Components, find_components
from appliance.infer.labelmap import LabelMap, as_labelmap
from appliance.models.manifest import FindingScore, Label, Reporting

#: SNOMED CT "Morphologically Altered Structure": labels of this category are counted as lesions.
LESION_CATEGORY = "49755003"
#: A lesion within this many HU of the organ around it is called iso-attenuating.
ISO_HU = 10.0
#: Thickness of the organ shell around a lesion whose mean HU the lesion is compared with.
SHELL_MM = 5.0


def lesion_values(label_defs: Sequence[Label]) -> list[int]:
    """The label values a package counts as lesions (category SCT 49755003), in manifest order."""
    return [lab.value for lab in label_defs if lab.category.code == LESION_CATEGORY]


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
    #: Mean model probability of the lesion class over the lesion's voxels (0..1); None when not known.
    confidence: float | None = None
    #: Mean HU of the lesion, and of the organ in a ~5 mm shell around it (same slices).
    mean_hu: float | None = None
    surrounding_hu: float | None = None
    #: Where it lies in the organ: its centroid against the organ's, e.g. "superior anterior right".
    octant: str | None = None
    #: The fraction (0..1) of its in-plane border that faces tissue outside the organ (and outside any lesion):
    #: about 0 for a lesion inside the liver, up to 0.5 or more for a thin rim along the liver's edge, which is
    #: what beam hardening and partial volume with the ribs, lung and bowel make the model mark.
    edge_contact: float | None = None
    #: Its mean in-plane width, twice its area over its perimeter (the perimeter counted in pixel edges and
    #: scaled by pi/4, their mean excess over a smooth outline): a band's width, a round lesion's radius.
    width_mm: float | None = None
    #: Its cranio-caudal extent: the slices it spans times the slice spacing.
    z_extent_mm: float | None = None
    #: The highest model probability of the lesion class of any of its voxels (0..1); None when not known.
    peak_confidence: float | None = None
    #: The package's finding score (``[reporting.finding_score]``, 0..1); None when the package has none.
    score: float | None = None
    #: Whether it reaches the series' first or last slice: cut by the end of the scan, its extent beyond is
    #: unknown, and the model saw that slice with its one neighbour repeated for context. None: not known.
    series_end: bool | None = None

    @property
    def attenuation(self) -> str | None:
        """``hypo``, ``iso`` or ``hyper``-attenuating against the surrounding organ (within 10 HU: iso)."""
        if self.mean_hu is None or self.surrounding_hu is None:
            return None
        d = self.mean_hu - self.surrounding_hu
        return "hypo" if d < -ISO_HU else "hyper" if d > ISO_HU else "iso"


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
    #: The package's confidence threshold (``[reporting] min_confidence``) these were measured with.
    min_confidence: float = 0.0
    #: The package's rim rule (``[reporting] max_edge_contact``, 1.0: none; ``rim_max_width_mm``).
    max_edge_contact: float = 1.0
    rim_max_width_mm: float = 6.0
    #: The package's finding-score limit (``[reporting.finding_score] min_score``; 0: no finding score).
    min_finding_score: float = 0.0

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
                        "confidence": les.confidence,
                        "mean_hu": les.mean_hu,
                        "surrounding_hu": les.surrounding_hu,
                        "attenuation": les.attenuation,
                        "octant": les.octant,
                        "edge_contact": les.edge_contact,
                        "width_mm": les.width_mm,
                        "z_extent_mm": les.z_extent_mm,
                        "peak_confidence": les.peak_confidence,
                        "score": les.score,
                        "series_end": les.series_end,
                    }
                    for les in self.lesions
                ],
                "unreported_count": self.unreported_lesions,
                "reporting": {
                    "min_lesion_diameter_mm": self.min_lesion_diameter_mm,
                    "min_confidence": self.min_confidence,
                    "max_edge_contact": self.max_edge_contact,
                    "rim_max_width_mm": self.rim_max_width_mm,
                    "min_finding_score": self.min_finding_score,
                },
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
                        confidence=_opt_float(x.get("confidence")),
                        mean_hu=_opt_float(x.get("mean_hu")),
                        surrounding_hu=_opt_float(x.get("surrounding_hu")),
                        octant=None if x.get("octant") is None else str(x["octant"]),
                        edge_contact=_opt_float(x.get("edge_contact")),
                        width_mm=_opt_float(x.get("width_mm")),
                        z_extent_mm=_opt_float(x.get("z_extent_mm")),
                        peak_confidence=_opt_float(x.get("peak_confidence")),
                        score=_opt_float(x.get("score")),
                        series_end=None if x.get("series_end") is None else bool(x.get("series_end")),
                    )
                    for x in d["lesions"]["items"]
                ),
                unreported_lesions=int(d["lesions"].get("unreported_count", 0)),
                min_lesion_diameter_mm=_rule(d, "min_lesion_diameter_mm", 0.0),
                min_confidence=_rule(d, "min_confidence", 0.0),
                max_edge_contact=_rule(d, "max_edge_contact", 1.0),
                rim_max_width_mm=_rule(d, "rim_max_width_mm", 6.0),
                min_finding_score=_rule(d, "min_finding_score", 0.0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SummaryFormatError(
                f"the measurement summary is incomplete or malformed ({type(exc).__name__}: {exc})"
            ) from None


def _rule(d: Any, key: str, default: float) -> float:
    """One of the reporting rules a summary was measured with (older summaries lack some: their default)."""
    return float(d["lesions"].get("reporting", {}).get(key, default))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


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


def is_rim(les: Lesion, reporting: Reporting) -> bool:
    """Whether the package's rim rule drops ``les``: more than ``max_edge_contact`` of its border on the
    organ's edge and narrower than ``rim_max_width_mm`` (compared as reported, rounded; not measured: no)."""
    return (
        les.edge_contact is not None
        and les.edge_contact > reporting.max_edge_contact
        and les.width_mm is not None
        and les.width_mm < reporting.rim_max_width_mm
    )


def finding_features(les: Lesion) -> dict[str, float]:
    """The measurements a finding score weighs (see :data:`appliance.models.manifest.FINDING_FEATURES`), from
    the values as reported (rounded), so a summary read back scores exactly as serving scored it. Shape
    ratios are clipped to [0, 2]; a missing measurement counts as its neutral value."""
    d = max(les.longest_axial_diameter_mm, 0.1)
    short = min(les.short_axis_mm, d)
    z = les.z_extent_mm or 0.0
    ellipsoid = math.pi / 6.0 * d * max(short, 0.1) * max(z, 0.1)
    contrast = 0.0
    if les.mean_hu is not None and les.surrounding_hu is not None:
        contrast = (les.mean_hu - les.surrounding_hu) / 100.0
    return {
        "log_diameter": math.log(d),
        "elongation": short / d,
        "fill": min(2.0, les.volume_ml * 1000.0 / ellipsoid) if z > 0 else 0.5,
        "roundness": min(2.0, (les.width_mm or 0.0) / (d / 2.0)),
        "confidence": les.confidence or 0.0,
        "peak_confidence": les.peak_confidence or 0.0,
        "contrast": contrast,
        "abs_contrast": abs(contrast),
        "edge_contact": les.edge_contact or 0.0,
        "series_end": 1.0 if les.series_end else 0.0,
    }


def finding_score(les: Lesion, model: FindingScore | None) -> float | None:
    """The package's logistic finding score of ``les``, rounded as reported; None without a model or
    without the lesion probability (a label map alone cannot be scored)."""
    if model is None or les.confidence is None:
        return None
    x = finding_features(les)
    z = model.bias + sum(
        w * (x[f] - m) / s for f, m, s, w in zip(model.features, model.mean, model.scale, model.weights, strict=True)
    )
    return round(1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z)))), 3)


def _filtered(les: Lesion, reporting: Reporting) -> bool:
    """Whether a lesion the diameter threshold keeps is dropped by the confidence limit, the rim rule or the
    finding score."""
    if les.confidence is not None and les.confidence < reporting.min_confidence:
        return True
    if reporting.finding_score is not None and les.score is not None and les.score < reporting.finding_score.min_score:
        return True
    return is_rim(les, reporting)


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
            edges = _edges_dense(comp, i, labels, sl, pixel_spacing)
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
                    edge_contact=edges[0],
                    width_mm=edges[1],
                    z_extent_mm=round((sl[0].stop - sl[0].start) * slice_spacing, 1),
                    series_end=bool(sl[0].start == 0 or sl[0].stop == labels.shape[0]),
                )
            )
            if not _reported(best, reporting) or _filtered(lesions[-1], reporting):
                lesions.pop()
                unreported += 1
                if not reporting.keep_unreported_in_labelmap:
                    n = int(sizes[i])
                    organ = _organ_of(lab, label_defs)
                    labels[sl][sub] = organ
                    counts[lab.value] -= n
                    counts[organ] += n
    return _report(counts, lesions, label_defs, voxel_ml, unreported, reporting)


def _width_mm(pixels: int, faces_rows: int, faces_cols: int, spacing: tuple[float, float]) -> float:
    """See :attr:`Lesion.width_mm`; a face to the row above or below is a pixel wide (column spacing), one
    to the left or right a pixel high (row spacing)."""
    perimeter = (faces_rows * spacing[1] + faces_cols * spacing[0]) * math.pi / 4.0
    return round(2.0 * pixels * spacing[0] * spacing[1] / max(perimeter, 1e-9), 1)


def _edges_dense(
    comp: np.ndarray, i: int, labels: np.ndarray, sl: tuple[slice, ...], spacing: tuple[float, float]
) -> tuple[float, float]:
    """Component ``i``'s edge contact and width (see :class:`Lesion`), from the whole volume's arrays."""
    rows, cols = labels.shape[1:]
    e = (
        sl[0],
        slice(max(0, sl[1].start - 1), min(rows, sl[1].stop + 1)),
        slice(max(0, sl[2].start - 1), min(cols, sl[2].stop + 1)),
    )
    mask = comp[e] == i
    own = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    lab = np.pad(labels[e], ((0, 0), (1, 1), (1, 1)))
    border, outside = [0, 0], 0
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        near = (slice(None), slice(1 + dr, own.shape[1] - 1 + dr), slice(1 + dc, own.shape[2] - 1 + dc))
        other = mask & ~own[near]
        border[0 if dr else 1] += int(other.sum())
        outside += int((other & (lab[near] == 0)).sum())
    return round(outside / max(sum(border), 1), 3), _width_mm(int(mask.sum()), border[0], border[1], spacing)


def measure(
    labels: np.ndarray | LabelMap,
    label_defs: list[Label],
    pixel_spacing: tuple[float, float],
    slice_spacing: float,
    sop_instance_uids: list[str],
    slab_slices: int = 64,
    reporting: Reporting | None = None,
    confidence: LabelMap | None = None,
    read_hu: Callable[[int, int], np.ndarray] | None = None,
    orientation: Sequence[float] | None = None,
) -> Measurements:
    """Label volumes, organ volumes and the reported lesions of a label map, ``slab_slices`` slices at a time.

    With ``confidence`` (the model's probability of each lesion voxel's label, 0..255, as
    :func:`appliance.infer.preprocess.class_confidence` gives it) each lesion gets its mean as ``confidence``
    and the package's ``min_confidence`` applies; with ``read_hu`` (HU of slices ``start:stop``) its mean HU
    against a ~5 mm shell of the organ around it; with ``orientation`` (ImageOrientationPatient) the octant
    of the organ it lies in, named in patient terms.

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
    lesion_labels = lesion_values(label_defs)
    lesions: list[Lesion] = []
    unreported = 0
    for lab in label_defs:
        if lab.category.code != LESION_CATEGORY or counts[lab.value] == 0:
            continue
        comps = find_components(lm, [lab.value], slab_slices, full=True)
        m = comps.count
        organ = _organ_of(lab, label_defs)
        feats = _Features(m, lm, organ, pixel_spacing, confidence, read_hu)
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
            feats.add(slab, comp, z, r, c, ids)
            # Per slice and component: its longest in-plane diameter; the first slice of the longest wins.
            order = np.lexsort((ids, gz))
            key = gz[order] * m + ids[order]
            cuts = np.flatnonzero(np.diff(key)) + 1
            for part in np.split(order, cuts):
                i, zz = int(ids[part[0]]), int(gz[part[0]])
                d, short = _axes_of_pixels(rel_r[part], rel_c[part], pixel_spacing)
                if d > best[i]:
                    best[i], best_short[i], best_z[i] = d, short, zz
        organ_centre = lm.centroid([organ, *lesion_labels]) if organ and orientation is not None else None
        conf = feats.confidence(comps.sizes)
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
                    confidence=None if conf is None else round(float(conf[i]), 3),
                    mean_hu=feats.mean_hu(i, n),
                    surrounding_hu=feats.shell_hu(i),
                    octant=_octant(
                        (float(zc + z0), float(rc + r0), float(cc + c0)),
                        organ_centre,
                        orientation,
                        pixel_spacing,
                        slice_spacing,
                    ),
                    edge_contact=feats.edge_contact(i),
                    width_mm=feats.width_mm(i),
                    z_extent_mm=round(float(comps.hi[i, 0] - comps.lo[i, 0]) * slice_spacing, 1),
                    peak_confidence=feats.peak(i),
                    series_end=bool(comps.lo[i, 0] == 0 or comps.hi[i, 0] >= lm.shape[0]),
                )
            )
            score = finding_score(lesions[-1], reporting.finding_score)
            if score is not None:
                lesions[-1] = dataclasses.replace(lesions[-1], score=score)
        dropped = [
            i for i in range(m) if not _reported(float(best[i]), reporting) or _filtered(lesions[i - m], reporting)
        ]
        if dropped:
            keep = np.ones(m + 1, dtype=bool)
            keep[np.asarray(dropped) + 1] = False
            first = len(lesions) - m  # this label's lesions are the last m found
            lesions = lesions[:first] + [les for j, les in enumerate(lesions[first:]) if keep[j + 1]]
            unreported += len(dropped)
            if not reporting.keep_unreported_in_labelmap:
                _relabel(lm, comps, ~keep, organ)
                n = int(comps.sizes[np.asarray(dropped)].sum())
                counts[lab.value] -= n
                counts[organ] += n
    return _report(counts, lesions, label_defs, voxel_ml, unreported, reporting)


class _Features:
    """Per-lesion sums gathered while the components are walked slab by slab: confidence, the in-plane border
    (for edge contact and width), the lesion's HU and the HU of the organ shell around it. Each slab's labels
    and HU are read once, for its lesion window and a
    margin of ``SHELL_MM``; the shell is the organ within that distance of a lesion (a square in-plane
    neighbourhood: where two lesions' shells meet, the voxel counts for the higher-numbered one)."""

    def __init__(
        self,
        m: int,
        lm: LabelMap,
        organ: int,
        spacing: tuple[float, float],
        confidence: LabelMap | None,
        read_hu: Callable[[int, int], np.ndarray] | None,
    ) -> None:
        self.lm, self.organ, self.conf_map, self.read_hu = lm, organ, confidence, read_hu
        self.margin = (max(1, math.ceil(SHELL_MM / spacing[0])), max(1, math.ceil(SHELL_MM / spacing[1])))
        self.conf = np.zeros(m, dtype=np.float64)
        self.peak_conf = np.zeros(m, dtype=np.int64)
        self.hu = np.zeros(m, dtype=np.float64)
        self.shell = np.zeros(m, dtype=np.float64)
        self.shell_n = np.zeros(m, dtype=np.int64)
        self.spacing = spacing
        self.border = np.zeros((m, 2), dtype=np.int64)  # faces to the row above/below, to the column left/right
        self.outside = np.zeros(m, dtype=np.int64)
        self.pixels = np.zeros(m, dtype=np.int64)

    def add(self, slab: Any, comp: np.ndarray, z: np.ndarray, r: np.ndarray, c: np.ndarray, ids: np.ndarray) -> None:
        m = self.conf.size
        r0, r1, c0, c1 = slab.box
        if self.conf_map is not None:
            window = self.conf_map.slab(slab.start, slab.stop, slab.box)
            values = window[z, r, c]
            self.conf += np.bincount(ids, weights=values.astype(np.float64), minlength=m)
            np.maximum.at(self.peak_conf, ids, values.astype(np.int64))
        rows, cols = self.lm.shape[1:]
        mr, mc = self.margin
        e = (max(0, r0 - mr), min(rows, r1 + mr), max(0, c0 - mc), min(cols, c1 + mc))
        labels = self.lm.slab(slab.start, slab.stop, e)
        around = np.zeros(labels.shape, dtype=np.int32)
        around[:, r0 - e[0] : r1 - e[0], c0 - e[2] : c1 - e[2]] = comp
        self._edges(around, labels, z, r + r0 - e[0], c + c0 - e[2], ids)
        if self.read_hu is None:
            return
        hu = np.asarray(self.read_hu(slab.start, slab.stop))[:, e[0] : e[1], e[2] : e[3]].astype(np.float64)
        self.hu += np.bincount(ids, weights=hu[z, r + r0 - e[0], c + c0 - e[2]], minlength=m)
        if not self.organ:
            return
        grown = ndimage.maximum_filter(around, size=(1, 2 * mr + 1, 2 * mc + 1))
        shell = (grown > 0) & (around == 0) & (labels == self.organ)
        owner = grown[shell].astype(np.int64) - 1
        self.shell += np.bincount(owner, weights=hu[shell], minlength=m)
        self.shell_n += np.bincount(owner, minlength=m)

    def _edges(
        self, around: np.ndarray, labels: np.ndarray, z: np.ndarray, r: np.ndarray, c: np.ndarray, ids: np.ndarray
    ) -> None:
        """Count each lesion voxel's in-plane 4-neighbours that are not of its lesion (its border) and those of
        them that are background, label 0 (outside the organ): beyond the image counts as background."""
        m = self.outside.size
        self.pixels += np.bincount(ids, minlength=m)
        own = np.pad(around, ((0, 0), (1, 1), (1, 1)))
        lab = np.pad(labels, ((0, 0), (1, 1), (1, 1)))
        rr, cc = r + 1, c + 1
        me = own[z, rr, cc]
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            other = own[z, rr + dr, cc + dc] != me
            out = other & (lab[z, rr + dr, cc + dc] == 0)
            self.border[:, 0 if dr else 1] += np.bincount(ids[other], minlength=m)
            self.outside += np.bincount(ids[out], minlength=m)

    def edge_contact(self, i: int) -> float:
        return round(float(self.outside[i]) / max(int(self.border[i].sum()), 1), 3)

    def width_mm(self, i: int) -> float:
        return _width_mm(int(self.pixels[i]), int(self.border[i, 0]), int(self.border[i, 1]), self.spacing)

    def confidence(self, sizes: np.ndarray) -> np.ndarray | None:
        if self.conf_map is None:
            return None
        return self.conf / np.maximum(sizes, 1) / 255.0

    def peak(self, i: int) -> float | None:
        return None if self.conf_map is None else round(int(self.peak_conf[i]) / 255.0, 3)

    def mean_hu(self, i: int, n: int) -> float | None:
        return None if self.read_hu is None else round(float(self.hu[i]) / max(n, 1), 1)

    def shell_hu(self, i: int) -> float | None:
        if self.read_hu is None or self.shell_n[i] == 0:
            return None
        return round(float(self.shell[i]) / int(self.shell_n[i]), 1)


def _octant(
    centre: tuple[float, float, float],
    organ_centre: tuple[float, float, float] | None,
    orientation: Sequence[float] | None,
    spacing: tuple[float, float],
    slice_spacing: float,
) -> str | None:
    """ "superior|inferior anterior|posterior right|left": a lesion's centroid against its organ's, in the
    patient's axes (DICOM LPS: +x left, +y posterior, +z superior), from the image orientation. Slices are
    in ascending order along the normal (row direction x column direction), as the volume is sorted."""
    if organ_centre is None or orientation is None or len(orientation) != 6:
        return None
    row_dir = np.asarray(orientation[:3], dtype=np.float64)  # along a row: columns increase
    col_dir = np.asarray(orientation[3:], dtype=np.float64)  # down a column: rows increase
    normal = np.cross(row_dir, col_dir)
    dz, dr, dc = (a - b for a, b in zip(centre, organ_centre, strict=True))
    v = dc * spacing[1] * row_dir + dr * spacing[0] * col_dir + dz * slice_spacing * normal
    return " ".join(
        (
            "superior" if v[2] >= 0 else "inferior",
            "posterior" if v[1] >= 0 else "anterior",
            "left" if v[0] >= 0 else "right",
        )
    )


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
    organ_values = {lab.value for lab in label_defs} - set(lesion_values(label_defs))
    organs = []
    # An organ's volume includes the lesions inside it (a liver volume with its metastases cut out is not
    # what a clinician means by liver volume); the label's own volume stays in ``labels``.
    for lab in label_defs:
        if lab.value in organ_values:
            inside = [d.value for d in label_defs if d.region is not None and d.region.code == lab.type.code]
            n = int(counts[lab.value] + sum(int(counts[v]) for v in inside))
            organs.append(OrganVolume(lab.name, (lab.value, *inside), n, round(n * voxel_ml, 3)))
    rules = reporting or Reporting()
    return Measurements(
        voxel_volume_ml=voxel_ml,
        labels=out_labels,
        organs=tuple(organs),
        lesions=numbered,
        unreported_lesions=unreported,
        min_lesion_diameter_mm=rules.min_lesion_diameter_mm,
        min_confidence=rules.min_confidence,
        max_edge_contact=rules.max_edge_contact,
        rim_max_width_mm=rules.rim_max_width_mm,
        min_finding_score=0.0 if rules.finding_score is None else rules.finding_score.min_score,
    )
