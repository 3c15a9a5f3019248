"""Findings, not components: the package's reporting threshold decides what a lesion component becomes.

On constructed label maps (1 = liver, 2 = liver lesion): a speck at the hilum below the threshold is not
reported, counted or measured and goes back to the liver in the label map (unless the package keeps it);
a lesion split across slices is one finding; a lesion outside the liver is gone after the package's
clean-up; a thin crescent along the liver edge has the short axis of a crescent and faces out of the liver
(its edge contact), so the package's rim rule drops it, while a tumour bulging out of the liver stays. The
slab path and the whole-volume reference agree on all of it, label maps included.
"""

from __future__ import annotations

import numpy as np
import pytest

from appliance.infer.labelmap import LabelMap
from appliance.infer.measure import Measurements, measure, measure_dense
from appliance.infer.postprocess import keep_largest_component
from appliance.models.manifest import FindingScore, Reporting
from tests.test_infer_pipeline import LABELS

SPACING = (0.8, 0.8)
SLICE_MM = 2.0
UIDS = [f"1.2.3.{i}" for i in range(24)]


def _liver() -> np.ndarray:
    labels = np.zeros((24, 96, 96), np.uint8)
    zz, yy, xx = np.mgrid[:24, :96, :96]
    labels[((yy - 48) / 40.0) ** 2 + ((xx - 48) / 40.0) ** 2 + ((zz - 12) / 11.0) ** 2 <= 1.0] = 1
    return labels


def _disc(labels: np.ndarray, z: slice, cy: int, cx: int, r: float, value: int = 2) -> None:
    yy, xx = np.mgrid[: labels.shape[1], : labels.shape[2]]
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    labels[z][:, inside] = value


def _case() -> np.ndarray:
    labels = _liver()
    _disc(labels, slice(10, 14), 40, 40, 9.0)  # a 15 mm lesion over 4 slices: one finding
    labels[12, 60:62, 60:62] = 2  # a 1.6 mm speck at the hilum: below a 5 mm threshold
    return labels


def test_a_speck_below_the_threshold_is_not_a_finding_and_goes_back_to_the_liver() -> None:
    labels = _case()
    before = measure(labels.copy(), LABELS, SPACING, SLICE_MM, UIDS)
    assert before.lesion_count == 2 and before.unreported_lesions == 0  # no threshold: both reported
    lm = LabelMap.from_array(labels)
    m = measure(lm, LABELS, SPACING, SLICE_MM, UIDS, slab_slices=5, reporting=Reporting(min_lesion_diameter_mm=5))
    assert m.lesion_count == 1 and m.unreported_lesions == 1 and m.min_lesion_diameter_mm == 5
    (finding,) = m.lesions
    assert finding.index == 1 and 14.0 <= finding.longest_axial_diameter_mm <= 16.0
    assert 10 <= finding.slice_index <= 13
    out = lm.to_array()
    assert (out[12, 60:62, 60:62] == 1).all()  # the speck is liver again
    assert int((out == 2).sum()) == int((labels == 2).sum()) - 4
    # the liver as a clinician means it (lesions inside included) does not change; its own label gains the speck
    assert m.organs[0].voxels == before.organs[0].voxels
    liver = m.label_volume(1)
    lesion = m.label_volume(2)
    assert liver is not None and lesion is not None
    assert liver.voxels == int((out == 1).sum()) and lesion.voxels == int((out == 2).sum())


def test_a_package_may_keep_unreported_lesions_in_the_label_map() -> None:
    labels = _case()
    lm = LabelMap.from_array(labels)
    keep = Reporting(min_lesion_diameter_mm=5, keep_unreported_in_labelmap=True)
    m = measure(lm, LABELS, SPACING, SLICE_MM, UIDS, slab_slices=7, reporting=keep)
    assert m.lesion_count == 1 and m.unreported_lesions == 1
    assert np.array_equal(lm.to_array(), labels)
    assert m.label_volume(2).voxels == int((labels == 2).sum())  # type: ignore[union-attr]


@pytest.mark.parametrize("slab", [1, 3, 5, 24])
@pytest.mark.parametrize("keep", [False, True])
def test_the_slab_path_agrees_with_the_whole_volume_reference(slab: int, keep: bool) -> None:
    labels = _case()
    _disc(labels, slice(3, 4), 70, 30, 3.5)  # 5.6 mm on one slice: just reported
    _disc(labels, slice(16, 18), 60, 66, 2.0)  # 3.2 mm: not
    reporting = Reporting(min_lesion_diameter_mm=5, keep_unreported_in_labelmap=keep)
    dense = labels.copy()
    ref = measure_dense(dense, LABELS, SPACING, SLICE_MM, UIDS, reporting=reporting)
    lm = LabelMap.from_array(labels)
    got = measure(lm, LABELS, SPACING, SLICE_MM, UIDS, slab_slices=slab, reporting=reporting)
    assert got == ref
    assert np.array_equal(lm.to_array(), dense)
    assert ref.lesion_count == 2 and ref.unreported_lesions == 2


def test_a_lesion_outside_the_liver_is_removed_by_the_packages_clean_up() -> None:
    labels = _liver()
    _disc(labels, slice(10, 12), 40, 40, 6.0)
    labels[10:12, 90:95, 2:7] = 2  # in the corner, touching no liver voxel
    cleaned = keep_largest_component(labels, classes=[1, 2])
    m = measure(cleaned, LABELS, SPACING, SLICE_MM, UIDS)
    assert m.lesion_count == 1


def test_short_axes_tell_a_round_lesion_from_a_crescent_along_the_edge() -> None:
    labels = _liver()
    _disc(labels, slice(14, 15), 48, 48, 10.0)  # round: 16 mm across both ways
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 48, xx - 48)
    crescent = (r >= 36) & (r <= 38.5) & (yy < 40)  # a 2-pixel rim along the upper edge
    labels[11][crescent & (labels[11] == 1)] = 2
    m = measure(labels, LABELS, SPACING, SLICE_MM, UIDS)
    by_slice = {les.slice_index: les for les in m.lesions}
    round_, rim = by_slice[14], by_slice[11]
    assert abs(round_.short_axis_mm - round_.longest_axial_diameter_mm) <= 1.6
    assert rim.longest_axial_diameter_mm > 40 and rim.short_axis_mm < 0.5 * rim.longest_axial_diameter_mm


def test_the_summary_keeps_its_shape_and_reads_older_ones() -> None:
    m = measure(_case(), LABELS, SPACING, SLICE_MM, UIDS, reporting=Reporting(min_lesion_diameter_mm=5))
    d = m.to_dict()
    assert d["lesions"]["count"] == 1 and d["lesions"]["unreported_count"] == 1
    assert {"volume_ml", "longest_axial_diameter_mm", "short_axis_mm"} <= set(d["lesions"]["items"][0])
    assert d["lesions"]["reporting"] == {"min_lesion_diameter_mm": 5.0, "min_confidence": 0.0,
                                         "max_edge_contact": 1.0, "rim_max_width_mm": 6.0, "min_finding_score": 0.0}
    assert Measurements.from_dict(d) == m
    old = dict(d, lesions={k: v for k, v in d["lesions"].items() if k not in ("unreported_count", "reporting")})
    old["lesions"]["items"] = [{k: v for k, v in it.items() if k != "short_axis_mm"} for it in d["lesions"]["items"]]
    back = Measurements.from_dict(old)
    assert back.unreported_lesions == 0 and back.lesions[0].short_axis_mm == 0.0


def test_the_manifest_bounds_the_threshold() -> None:
    assert Reporting().min_lesion_diameter_mm == 0.0  # packages without [reporting] report every component
    with pytest.raises(ValueError):
        Reporting(min_lesion_diameter_mm=-1)
    with pytest.raises(ValueError):
        Reporting.model_validate({"min_lesion_diameter_mm": 5, "typo": 1})


# ------------------------------------------------------------------ confidence, attenuation, location

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # head-first supine: columns to the patient's left, rows posterior


def _two_lesions() -> np.ndarray:
    labels = _liver()
    _disc(labels, slice(4, 8), 30, 30, 7.0)  # inferior (low slice index), anterior (low row), right (low column)
    _disc(labels, slice(16, 20), 66, 66, 7.0)  # superior posterior left
    return labels


def _hu(labels: np.ndarray) -> np.ndarray:
    hu = np.where(labels > 0, 60.0, -100.0).astype(np.float32)
    hu[:12][labels[:12] == 2] = 20.0  # the inferior lesion is darker than the liver: hypo-attenuating
    hu[12:][labels[12:] == 2] = 130.0  # the superior one brighter: hyper-attenuating (arterial HCC)
    return hu


def _confidence(labels: np.ndarray, low: int, high: int) -> LabelMap:
    conf = np.zeros(labels.shape, np.uint8)
    conf[:12][labels[:12] == 2] = low
    conf[12:][labels[12:] == 2] = high
    return LabelMap.from_array(conf)


def test_each_finding_has_its_confidence_attenuation_and_octant() -> None:
    labels = _two_lesions()
    hu = _hu(labels)
    m = measure(
        LabelMap.from_array(labels), LABELS, SPACING, SLICE_MM, UIDS, slab_slices=5,
        confidence=_confidence(labels, 128, 242), read_hu=lambda a, b: hu[a:b], orientation=AXIAL,
    )
    assert m.lesion_count == 2
    by_slice = sorted(m.lesions, key=lambda les: les.slice_index)
    low, high = by_slice
    assert low.confidence == pytest.approx(128 / 255, abs=1e-3) and high.confidence == pytest.approx(242 / 255, abs=1e-3)
    assert low.mean_hu == 20.0 and low.surrounding_hu == 60.0 and low.attenuation == "hypo"
    assert high.mean_hu == 130.0 and high.surrounding_hu == 60.0 and high.attenuation == "hyper"
    assert low.octant == "inferior anterior right" and high.octant == "superior posterior left"
    d = m.to_dict()["lesions"]["items"]
    assert {i["attenuation"] for i in d} == {"hypo", "hyper"}
    assert Measurements.from_dict(m.to_dict()) == m  # the new fields survive summary.json


def test_the_shell_is_the_liver_around_the_lesion_not_the_background_outside_it() -> None:
    labels = _liver()
    _disc(labels, slice(10, 14), 48, 12, 6.0)  # at the liver's edge: half its neighbourhood is outside
    hu = np.where(labels > 0, 60.0, -900.0).astype(np.float32)
    hu[labels == 2] = 30.0
    m = measure(labels, LABELS, SPACING, SLICE_MM, UIDS, read_hu=lambda a, b: hu[a:b])
    (finding,) = m.lesions
    assert finding.surrounding_hu == 60.0 and finding.attenuation == "hypo"
    assert finding.octant is None and finding.confidence is None  # no orientation, no confidence given


def test_a_finding_below_the_confidence_threshold_is_not_reported_and_goes_back_to_the_liver() -> None:
    labels = _two_lesions()
    lm = LabelMap.from_array(labels)
    reporting = Reporting(min_lesion_diameter_mm=5, min_confidence=0.6)
    m = measure(lm, LABELS, SPACING, SLICE_MM, UIDS, slab_slices=7, confidence=_confidence(labels, 120, 230),
                reporting=reporting)
    assert m.lesion_count == 1 and m.unreported_lesions == 1 and m.min_confidence == 0.6
    assert m.lesions[0].slice_index >= 16  # the confident one stays
    out = lm.to_array()
    assert not (out[:12] == 2).any() and (out[12:] == 2).any()
    assert m.to_dict()["lesions"]["reporting"] == {"min_lesion_diameter_mm": 5.0, "min_confidence": 0.6,
                                                   "max_edge_contact": 1.0, "rim_max_width_mm": 6.0,
                                                   "min_finding_score": 0.0}


def test_confidence_is_the_models_probability_of_the_label_each_pixel_got() -> None:
    from appliance.infer.preprocess import class_confidence, model_grid, scores_to_labels
    from appliance.models.manifest import InputSpec

    spec = InputSpec(channels=3, spacing_mm=(2.0, 2.0), size_multiple=16, min_size=(64, 64), max_size=(256, 256),
                     window=(-250.0, 350.0))
    grid = model_grid(128, 128, (1.0, 1.0), spec)  # the model grid is half the source in each axis
    h, w = grid.shape
    scores = np.zeros((2, 3, *grid.padded), np.float32)
    scores[:, 1] = 2.0  # liver everywhere ...
    scores[:, 2, 20:40, 20:40] = 2.0 + np.log(3.0)  # ... but a lesion block: p(lesion) = 3 / (e^-(2 + ln 3) + 1/3... ) there
    labels = scores_to_labels(scores, grid)
    conf = class_confidence(scores, grid, labels, [2])
    assert conf.shape == labels.shape and conf.dtype == np.uint8
    assert not conf[labels != 2].any()
    inside = labels == 2
    assert inside.any()
    e = np.exp([0.0 - (2.0 + np.log(3.0)), 2.0 - (2.0 + np.log(3.0)), 0.0])
    want = round(255 * e[2] / e.sum())
    assert abs(int(np.median(conf[inside])) - want) <= 1
    assert h == w == 64


def _edge_case() -> np.ndarray:
    """A round lesion deep in the liver, one against its edge (clipped by it) and a rim along the edge."""
    labels = _liver()
    _disc(labels, slice(10, 14), 48, 48, 8.0)
    sub = np.zeros_like(labels)
    _disc(sub, slice(10, 14), 48, 14, 7.0)  # its centre 6 pixels inside the liver's edge (x = 8)
    labels[(sub == 2) & (labels == 1)] = 2
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 48, xx - 48)
    rim = (r >= 37.5) & (yy < 40)  # the liver's outer two pixels along the upper edge
    labels[11][rim & (labels[11] == 1)] = 2
    return labels


def test_edge_contact_tells_a_rim_along_the_liver_edge_from_a_lesion_inside_or_against_it() -> None:
    m = measure(_edge_case(), LABELS, SPACING, SLICE_MM, UIDS)
    inside = next(les for les in m.lesions if abs(les.centroid_voxel[2] - 48) < 2 and les.centroid_voxel[1] > 44)
    against = next(les for les in m.lesions if les.centroid_voxel[2] < 20)
    rim = next(les for les in m.lesions if les.slice_index == 11 and les.centroid_voxel[1] < 30)
    assert len(m.lesions) == 3
    assert inside.edge_contact == 0.0
    assert 0.1 <= (against.edge_contact or 0) <= 0.35  # a subcapsular lesion: a side of it faces out
    assert (rim.edge_contact or 0) >= 0.4


@pytest.mark.parametrize("slab", [1, 4, 24])
def test_a_rim_over_the_edge_contact_limit_is_not_reported_and_goes_back_to_the_liver(slab: int) -> None:
    labels = _edge_case()
    _disc(labels, slice(16, 19), 48, 12, 12.0)  # a 19 mm tumour bulging out of the liver: faces out, not thin
    reporting = Reporting(min_lesion_diameter_mm=5, max_edge_contact=0.4)
    dense = labels.copy()
    ref = measure_dense(dense, LABELS, SPACING, SLICE_MM, UIDS, reporting=reporting)
    lm = LabelMap.from_array(labels)
    got = measure(lm, LABELS, SPACING, SLICE_MM, UIDS, slab_slices=slab, reporting=reporting)
    assert got == ref and np.array_equal(lm.to_array(), dense)
    assert got.lesion_count == 3 and got.unreported_lesions == 1 and got.max_edge_contact == 0.4
    bulge = next(les for les in got.lesions if les.slice_index >= 16)
    assert (bulge.edge_contact or 0) > 0.4 and (bulge.width_mm or 0) >= 6.0  # reported all the same
    out = lm.to_array()
    assert not (out[11, :30] == 2).any()  # the rim is liver again
    assert Measurements.from_dict(got.to_dict()) == got


def _contrast_score(min_score: float) -> FindingScore:
    """A finding score that trusts dark findings and distrusts bright ones (the real CT's vessel segment)."""
    return FindingScore(features=["contrast"], mean=[0.0], scale=[1.0], weights=[-5.0], bias=0.0, min_score=min_score)


@pytest.mark.parametrize("slab", [3, 24])
def test_a_finding_scoring_under_the_packages_limit_is_not_reported_and_goes_back_to_the_liver(slab: int) -> None:
    labels = _two_lesions()
    hu = _hu(labels)  # the inferior lesion 40 HU darker than the liver, the superior one 70 HU brighter
    lm = LabelMap.from_array(labels)
    reporting = Reporting(min_lesion_diameter_mm=5, finding_score=_contrast_score(0.5))
    m = measure(lm, LABELS, SPACING, SLICE_MM, UIDS, slab_slices=slab, confidence=_confidence(labels, 230, 230),
                read_hu=lambda a, b: hu[a:b], reporting=reporting)
    assert m.lesion_count == 1 and m.unreported_lesions == 1 and m.min_finding_score == 0.5
    (kept,) = m.lesions
    assert kept.attenuation == "hypo" and kept.score == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-3)
    assert kept.peak_confidence == pytest.approx(230 / 255, abs=1e-3) and kept.z_extent_mm == 8.0
    out = lm.to_array()
    assert not (out[12:] == 2).any() and (out[:12] == 2).any()  # the bright one is liver again
    assert m.to_dict()["lesions"]["reporting"]["min_finding_score"] == 0.5
    assert Measurements.from_dict(m.to_dict()) == m  # score, peak and extent survive summary.json


def test_without_the_lesion_probability_a_finding_is_not_scored_or_dropped_by_the_score() -> None:
    labels = _two_lesions()
    hu = _hu(labels)
    reporting = Reporting(min_lesion_diameter_mm=5, finding_score=_contrast_score(0.99))
    m = measure(labels.copy(), LABELS, SPACING, SLICE_MM, UIDS, read_hu=lambda a, b: hu[a:b], reporting=reporting)
    assert m.lesion_count == 2 and all(les.score is None for les in m.lesions)


def test_finding_features_tell_a_round_lesion_from_a_band() -> None:
    from appliance.infer.measure import finding_features

    m = measure(_edge_case(), LABELS, SPACING, SLICE_MM, UIDS)
    inside = next(les for les in m.lesions if abs(les.centroid_voxel[2] - 48) < 2 and les.centroid_voxel[1] > 44)
    rim = next(les for les in m.lesions if les.slice_index == 11 and les.centroid_voxel[1] < 30)
    fi, fr = finding_features(inside), finding_features(rim)
    assert fi["elongation"] > 0.9 and fi["roundness"] > 0.8 and 1.2 < fi["fill"] < 1.7  # a cylinder of 4 slices
    assert fr["elongation"] < 0.6 and fr["roundness"] < 0.3 and fr["edge_contact"] >= 0.4
    assert fi["contrast"] == 0.0 and fi["confidence"] == 0.0  # not measured: neutral


@pytest.mark.parametrize(
    "bad",
    [
        {"features": ["contrast", "contrast"], "mean": [0, 0], "scale": [1, 1], "weights": [1, 1]},
        {"features": ["contrast"], "mean": [0, 0], "scale": [1], "weights": [1]},
        {"features": ["contrast"], "mean": [0], "scale": [0], "weights": [1]},
        {"features": ["contrast"], "mean": [float("nan")], "scale": [1], "weights": [1]},
        {"features": ["hounsfield"], "mean": [0], "scale": [1], "weights": [1]},
        {"features": [], "mean": [], "scale": [], "weights": []},
    ],
)
def test_the_manifest_refuses_a_malformed_finding_score(bad: dict) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="finding_score"):
        Reporting.model_validate({"finding_score": {**bad, "bias": 0.0, "min_score": 0.5}})


@pytest.mark.parametrize("slab", [2, 64])
def test_a_lesion_reaching_the_series_first_or_last_slice_is_marked_so(slab: int) -> None:
    """What a score may weigh: a finding cut by the end of the scan (its neighbour slice repeated for the
    model's context) against one wholly inside the series; both measurement paths and the summary agree."""
    labels = np.zeros((24, 96, 96), np.uint8)
    labels[:, 8:88, 8:88] = 1  # a liver through the whole series
    _disc(labels, slice(0, 2), 30, 30, 8.0)  # on the first two slices
    _disc(labels, slice(23, 24), 30, 66, 8.0)  # on the last slice only
    _disc(labels, slice(10, 13), 66, 48, 8.0)  # inside
    m = measure(labels.copy(), LABELS, SPACING, SLICE_MM, UIDS, slab_slices=slab)
    by_z = {int(les.centroid_voxel[0]): les for les in m.lesions}
    assert set(by_z) == {0, 23, 11}
    assert by_z[0].series_end and by_z[23].series_end and by_z[11].series_end is False
    dense = measure_dense(labels.copy(), LABELS, SPACING, SLICE_MM, UIDS)
    assert [les.series_end for les in dense.lesions] == [les.series_end for les in m.lesions]
    assert Measurements.from_dict(m.to_dict()) == m
    from appliance.infer.measure import finding_features

    assert finding_features(by_z[23])["series_end"] == 1.0 and finding_features(by_z[11])["series_end"] == 0.0
