"""Per-lesion evaluation of a segmentation model's findings against a reference: what a reader counts.

Voxel Dice is dominated by the few largest lesions; a radiologist reads the finding list. Here a *finding* is
what the appliance reports (``appliance.infer.measure.measure`` with the package's diameter threshold, every
confidence kept so the confidence threshold can be swept), and a *reference lesion* is one 26-connected
component of the reference lesion label, sized by its longest axial diameter measured the same way. A
reference lesion is found when a finding at or above the confidence threshold overlaps it; a finding that
overlaps no reference lesion is a false positive. Size bands are the issue's: < 10, 10-20 and >= 20 mm.

A package with a finding score (``[reporting.finding_score]``) is swept over that score instead, its
confidence limit then applied as serving applies it: the score is the threshold that decides.

Used by ``scripts/eval_demo_model.py`` (the figures of the model card), ``scripts/fit_finding_score.py`` and
their tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.infer.labelmap import LabelMap
from appliance.infer.measure import Lesion, _axes_in_plane, finding_score, is_rim, measure
from appliance.models.manifest import FindingScore, Label, Reporting

BANDS_MM: tuple[tuple[float, float], ...] = ((0.0, 10.0), (10.0, 20.0), (20.0, float("inf")))
BAND_NAMES = ("<10", "10-20", ">=20")
#: Confidence thresholds the FROC curve is drawn over.
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.0, 1.0001, 0.02))
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_FULL = np.ones((3, 3, 3), bool)


def band_of(d_mm: float) -> str:
    for name, (lo, hi) in zip(BAND_NAMES, BANDS_MM, strict=True):
        if lo <= d_mm < hi:
            return name
    return BAND_NAMES[-1]


@dataclass(frozen=True)
class Finding:
    """One reported lesion and the reference lesions it overlaps (0-based indices into ``Case.reference``)."""

    lesion: Lesion
    hits: tuple[int, ...]

    @property
    def rank(self) -> float:
        """What the threshold is swept over: the finding score where the package has one, else the confidence."""
        v = self.lesion.score if self.lesion.score is not None else self.lesion.confidence
        return v or 0.0


@dataclass(frozen=True)
class Case:
    """One series: its findings (every confidence) and its reference lesions' longest axial diameters."""

    name: str
    findings: tuple[Finding, ...]
    reference_mm: tuple[float, ...]
    tags: tuple[str, ...] = ()


def reference_diameters(truth: np.ndarray, spacing: tuple[float, float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """The reference lesions (26-connected components of ``truth``) and each one's longest axial diameter."""
    comp, n = ndimage.label(truth, structure=_FULL)
    out = []
    for i, sl in enumerate(ndimage.find_objects(comp), start=1):
        sub = comp[sl] == i
        out.append(max(_axes_in_plane(sub[z], spacing)[0] for z in range(sub.shape[0]) if sub[z].any()))
    return comp, tuple(round(float(d), 1) for d in out)


def case_findings(
    name: str,
    labels: np.ndarray,
    confidence: np.ndarray,
    hu: np.ndarray,
    truth_lesions: np.ndarray | None,
    label_defs: list[Label],
    spacing: tuple[float, float],
    slice_mm: float,
    reporting: float | Reporting,
    tags: Sequence[str] = (),
) -> Case:
    """The findings of one predicted label map (after the package's clean-up), matched to the reference.

    ``labels`` is not changed. ``truth_lesions`` None means the series has no lesion reference (the real CT:
    its liver shows no focal lesion, so every finding is a false positive). ``reporting`` is the package's
    (a number: its diameter threshold alone); its confidence threshold (with a finding score: the score's limit) is not applied
    here but swept."""
    work = labels.copy()
    uids = [str(i) for i in range(labels.shape[0])]
    m = measure(
        work,
        label_defs,
        spacing,
        slice_mm,
        uids,
        reporting=(
            Reporting(min_lesion_diameter_mm=reporting)
            if isinstance(reporting, int | float)
            else _swept(reporting)
        ),
        confidence=LabelMap.from_array(confidence),
        read_hu=lambda a, b: hu[a:b],
        orientation=AXIAL,
    )
    lesion_values = sorted({les.label for les in m.lesions})
    if truth_lesions is None:
        ref_comp, ref_mm = np.zeros(labels.shape, np.int32), ()
    else:
        ref_comp, ref_mm = reference_diameters(truth_lesions, spacing)
    findings = []
    for value in lesion_values:
        comp, k = ndimage.label(work == value, structure=_FULL)
        centres = np.array(ndimage.center_of_mass(np.ones_like(comp), comp, range(1, k + 1))).reshape(-1, 3)
        for les in (x for x in m.lesions if x.label == value):
            j = int(np.argmin(((centres - np.asarray(les.centroid_voxel)) ** 2).sum(1))) + 1
            hits = np.unique(ref_comp[comp == j])
            findings.append(Finding(les, tuple(int(h) - 1 for h in hits if h > 0)))
    return Case(name, tuple(findings), ref_mm, tuple(tags))


def _swept(reporting: Reporting) -> Reporting:
    """``reporting`` without the limit the FROC sweeps: the finding score's where there is one (the confidence
    limit then stays, as serving applies it), else the confidence limit."""
    fs = reporting.finding_score
    if fs is None:
        return reporting.model_copy(update={"min_confidence": 0.0})
    return reporting.model_copy(update={"finding_score": fs.model_copy(update={"min_score": 0.0})})


def threshold_of(reporting: Reporting) -> float:
    """The package's operating point on the swept axis (see :func:`_swept`)."""
    fs = reporting.finding_score
    return reporting.min_confidence if fs is None else fs.min_score


def rescored(cases: Sequence[Case], model: FindingScore | None, min_confidence: float = 0.0) -> list[Case]:
    """``cases`` with each finding scored by ``model`` (None: the score removed, the sweep back on the
    confidence), findings under ``min_confidence`` dropped as serving drops them. Scores depend on the
    finding's reported measurements only, so this is what serving would report with that model."""
    import dataclasses

    out = []
    for c in cases:
        kept = []
        for f in c.findings:
            if (f.lesion.confidence or 0.0) < min_confidence - 1e-9:
                continue
            kept.append(Finding(dataclasses.replace(f.lesion, score=finding_score(f.lesion, model)), f.hits))
        out.append(Case(c.name, tuple(kept), c.reference_mm, c.tags))
    return out


@dataclass
class Tally:
    """Per-lesion figures of a set of cases at one threshold of the findings' :attr:`Finding.rank` (the
    confidence, or the finding score where the package has one)."""

    threshold: float
    cases: int = 0
    reference: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAND_NAMES, 0))
    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAND_NAMES, 0))
    false_positive: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAND_NAMES, 0))
    reported: int = 0
    #: (reference mm, reported mm) of each found reference lesion: its largest overlapping finding.
    sizes: list[tuple[float, float]] = field(default_factory=list)

    def add(self, case: Case) -> None:
        self.cases += 1
        kept = [f for f in case.findings if f.rank >= self.threshold - 1e-9]
        self.reported += len(kept)
        best: dict[int, float] = {}
        for f in kept:
            if not f.hits:
                self.false_positive[band_of(f.lesion.longest_axial_diameter_mm)] += 1
            for h in f.hits:
                best[h] = max(best.get(h, 0.0), f.lesion.longest_axial_diameter_mm)
        for i, d in enumerate(case.reference_mm):
            b = band_of(d)
            self.reference[b] += 1
            if i in best:
                self.found[b] += 1
                self.sizes.append((d, best[i]))

    def sensitivity(self, bands: Sequence[str] = BAND_NAMES) -> float | None:
        n = sum(self.reference[b] for b in bands)
        return None if n == 0 else sum(self.found[b] for b in bands) / n

    def fp_per_case(self, bands: Sequence[str] = BAND_NAMES) -> float:
        return sum(self.false_positive[b] for b in bands) / max(self.cases, 1)

    def size_error(self) -> dict[str, Any]:
        """Reported minus reference longest axial diameter (mm) of the found lesions, by reference band."""
        out: dict[str, Any] = {}
        for name in BAND_NAMES:
            err = [r - t for t, r in self.sizes if band_of(t) == name]
            out[name] = (
                None
                if not err
                else {
                    "n": len(err),
                    "mean_mm": round(float(np.mean(err)), 2),
                    "median_abs_mm": round(float(np.median(np.abs(err))), 2),
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        return {
            "threshold": self.threshold,
            "cases": self.cases,
            "reference": dict(self.reference),
            "found": dict(self.found),
            "sensitivity": {b: r(self.sensitivity([b])) for b in BAND_NAMES}
            | {"all": r(self.sensitivity()), ">=10": r(self.sensitivity(BAND_NAMES[1:]))},
            "false_positive": dict(self.false_positive),
            "fp_per_case": {b: r(self.fp_per_case([b])) for b in BAND_NAMES}
            | {"all": r(self.fp_per_case()), ">=10": r(self.fp_per_case(BAND_NAMES[1:]))},
            "reported_per_case": r(self.reported / max(self.cases, 1)),
            "size_error": self.size_error(),
        }


def tally(cases: Sequence[Case], threshold: float, keep: Callable[[Case], bool] = lambda c: True) -> Tally:
    t = Tally(threshold)
    for c in cases:
        if keep(c):
            t.add(c)
    return t


def froc(cases: Sequence[Case], thresholds: Sequence[float] = THRESHOLDS) -> list[Tally]:
    return [tally(cases, t) for t in thresholds]


def choose_threshold(curve: Sequence[Tally], max_fp_ge10: float = 0.2) -> Tally:
    """The lowest confidence threshold at which false-positive findings of 10 mm or more stay within
    ``max_fp_ge10`` per case (lowest: the most sensitive such); the one with the fewest where none does."""
    ok = [t for t in curve if t.fp_per_case(BAND_NAMES[1:]) <= max_fp_ge10]
    if ok:
        return min(ok, key=lambda t: t.threshold)
    return min(curve, key=lambda t: (t.fp_per_case(BAND_NAMES[1:]), t.threshold))


def free_threshold(curve: Sequence[Tally], tolerance: float = 0.02) -> Tally:
    """The highest confidence threshold whose sensitivity for lesions of 10 mm or more stays within
    ``tolerance`` of the curve's best: the false findings it removes cost (almost) no true ones."""
    best = max((t.sensitivity(BAND_NAMES[1:]) or 0.0) for t in curve)
    ok = [t for t in curve if (t.sensitivity(BAND_NAMES[1:]) or 0.0) >= best - tolerance - 1e-9]
    return max(ok, key=lambda t: t.threshold)


def without_rims(cases: Sequence[Case], max_edge_contact: float, max_width_mm: float) -> list[Case]:
    """``cases`` as serving would report them under a rim rule (the rule judges each finding on its own, so
    findings measured without it and filtered here are exactly what serving reports with it: the same
    ``is_rim``)."""
    rule = Reporting(max_edge_contact=max_edge_contact, rim_max_width_mm=max_width_mm)
    return [
        Case(
            c.name,
            tuple(f for f in c.findings if not is_rim(f.lesion, rule)),
            c.reference_mm,
            c.tags,
        )
        for c in cases
    ]


def free_rim_limit(cases: Sequence[Case], max_width_mm: float, step: float = 0.05) -> float:
    """The lowest edge-contact limit (a multiple of ``step``) that drops no true finding of ``cases``: above
    the edge contact of every finding that overlaps a reference lesion and is thinner than ``max_width_mm``."""
    worst = max(
        (
            f.lesion.edge_contact or 0.0
            for c in cases
            for f in c.findings
            if f.hits and (f.lesion.width_mm or 0.0) < max_width_mm
        ),
        default=0.0,
    )
    return min(1.0, round((np.floor(worst / step + 1e-9) + 1) * step, 2))


def froc_png(curves: dict[str, list[Tally]], path: Any, marks: dict[str, float] | None = None) -> None:
    """The FROC curves (sensitivity against false positives per case) as a PNG, drawn with Pillow (no
    plotting library on the appliance's dependency list). One line per curve; ``marks`` rings the point at
    each curve's chosen threshold."""
    from PIL import Image, ImageDraw

    w, h, left, bottom, top, right = 780, 480, 70, 60, 30, 250
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xmax = max([t.fp_per_case() for c in curves.values() for t in c] + [1.0])
    xmax = float(np.ceil(xmax))

    def xy(fp: float, s: float) -> tuple[float, float]:
        return left + fp / xmax * (w - left - right), h - bottom - s * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(6):
        s = k / 5
        d.text((left - 35, xy(0, s)[1] - 6), f"{s:.1f}", fill="black")
        d.line([xy(0, s), (left + 4, xy(0, s)[1])], fill="black")
    for k in range(6):
        fp = xmax * k / 5
        d.text((xy(fp, 0)[0] - 8, h - bottom + 6), f"{fp:.1f}", fill="black")
    d.text((left + 120, h - 25), "false-positive findings per case", fill="black")
    d.text((5, top - 22), "lesion sensitivity (thick: all lesions; thin: lesions and findings >= 10 mm)",
           fill="black")
    colours = ["#1f5fbf", "#c0392b", "#27ae60", "#8e44ad", "#d35400", "#2c3e50"]
    row = 0
    for (name, curve), colour in zip(curves.items(), colours, strict=False):
        # Solid: every reference lesion against every false finding; thin: lesions and findings >= 10 mm.
        for big, width in ((False, 3), (True, 1)):
            bands = BAND_NAMES[1:] if big else BAND_NAMES
            pts = [xy(t.fp_per_case(bands), t.sensitivity(bands) or 0.0) for t in curve]
            d.line(pts, fill=colour, width=width)
            y = top + 10 + 18 * row
            row += 1
            d.line([(w - right + 10, y + 6), (w - right + 30, y + 6)], fill=colour, width=width)
            d.text((w - right + 35, y), (name[:28] + (" >=10 mm" if big else " all")), fill="black")
            if marks and name in marks:
                t = min(curve, key=lambda t: abs(t.threshold - marks[name]))
                x0, y0 = xy(t.fp_per_case(bands), t.sensitivity(bands) or 0.0)
                d.ellipse([x0 - 5, y0 - 5, x0 + 5, y0 + 5], outline=colour, width=2)
    img.save(path)
