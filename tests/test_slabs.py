"""Slab-wise inference gives exactly what the whole volume at once gives, with bounded memory.

The worker cuts a series into slabs along z (``pipeline.plan_slabs``), decodes each slab's files lazily,
keeps a compact label map (``LabelMap``) and finds connected components slab by slab. Here the same
synthetic series goes through the whole-volume reference (the code the slabs replaced: decode everything,
``to_model_grid`` on the whole volume, ``keep_largest_component`` and ``measure_dense`` with one
``ndimage.label`` over the whole volume) and through tiny slabs that force many boundaries; label maps,
measurements, the SEG and ``labelmap.npz`` must be identical, not close.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from scipy import ndimage

from appliance.infer.backends.onnxruntime import OnnxRuntimeBackend
from appliance.infer.components import find_components
from appliance.infer.labelmap import LabelMap
from appliance.infer.measure import Measurements, measure, measure_dense
from appliance.infer.summary import BackendInfo, ModelInfo, SeriesInfo, Summary
from appliance.infer.pipeline import SeriesResult, SlabPlan, labelmap_npz, plan_slabs, run_series, write_outputs
from appliance.infer.postprocess import keep_largest_component, keep_largest_component_map
from appliance.infer.preprocess import batch_input, class_confidence, model_grid, scores_to_labels, to_model_grid
from appliance.infer.volume import load_volume, scan_series
from appliance.models.package import bundled_models_dir, load_package
from appliance.results import identity
from appliance.results.keyimage import render_key_image
from appliance.results.seg import make_seg, segment_map, source_headers
from appliance_dev.dicom_factory import write_ct_volume
from appliance_dev.synthetic import make_phantom, sample_spec


@pytest.fixture(scope="module")
def package():
    return load_package(bundled_models_dir() / "liver-ct-demo")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small phantom patient (liver with lesions) through the demo model: 44 slices of 160x160."""
    spec = dataclasses.replace(sample_spec(11, n_slices=44, fov_kind="full"), rows=160, cols=160, fov_mm=400.0,
                               slice_thickness=2.5, slice_spacing=2.5)
    hu, _, _ = make_phantom(spec)
    folder = tmp_path_factory.mktemp("phantom")
    write_ct_volume(folder, hu.astype(np.float32), spacing=spec.pixel_spacing, thickness=2.5)
    return sorted(folder.glob("*.dcm"))


def whole_volume_reference(paths: list[Path], package, backend) -> tuple[np.ndarray, dict]:
    """The pre-slab pipeline: everything decoded and labelled at once."""
    vol = load_volume(paths)
    spec = package.input_spec
    n, rows, cols = vol.hu.shape
    grid = model_grid(rows, cols, vol.pixel_spacing, spec)
    prepared = to_model_grid(vol.hu, grid, spec)
    labels = np.empty((n, rows, cols), np.uint8)
    conf = np.empty((n, rows, cols), np.uint8)
    batch = package.manifest.input.opt_batch
    for s in range(0, n, batch):
        e = min(n, s + batch)
        scores = backend.run(batch_input(prepared, s, e, spec.channels))
        labels[s:e] = scores_to_labels(scores, grid)
        class_confidence(scores, grid, labels[s:e], [2], out=conf[s:e])
    labels = keep_largest_component(labels, package.manifest.postprocess.largest_component)
    # The findings' confidence, HU, octant and finding score: measured on the whole volume as one slab, with
    # every rule of the package, as serving applies them (unreported lesions go back to the liver).
    rules = package.manifest.reporting
    reported = LabelMap.from_array(labels.copy())
    features = measure(reported, package.labels, vol.pixel_spacing, vol.slice_spacing, vol.sop_instance_uids,
                       slab_slices=n, reporting=rules, confidence=LabelMap.from_array(conf),
                       read_hu=lambda a, b: vol.hu[a:b], orientation=vol.orientation)
    # The independent whole-volume reference has no probabilities or HU, so no finding score: both without it.
    no_score = rules.model_copy(update={"finding_score": None})
    unscored = measure(labels.copy(), package.labels, vol.pixel_spacing, vol.slice_spacing, vol.sop_instance_uids,
                       slab_slices=n, reporting=no_score, confidence=LabelMap.from_array(conf),
                       read_hu=lambda a, b: vol.hu[a:b], orientation=vol.orientation)
    dense = measure_dense(labels, package.labels, vol.pixel_spacing, vol.slice_spacing, vol.sop_instance_uids,
                          reporting=no_score)
    plain = tuple(dataclasses.replace(les, confidence=None, mean_hu=None, surrounding_hu=None, octant=None,
                                      peak_confidence=None, score=None)
                  for les in unscored.lesions)
    assert dataclasses.replace(unscored, lesions=plain) == dense  # same findings, same numbers
    return reported.to_array(), features


@pytest.mark.parametrize("plan", [SlabPlan(infer=8, post=1), SlabPlan(infer=16, post=3), SlabPlan(infer=256, post=64)])
def test_slabs_equal_the_whole_volume(series: list[Path], package, plan: SlabPlan) -> None:
    backend = OnnxRuntimeBackend(package, threads=1)
    try:
        ref_labels, ref_measure = whole_volume_reference(series, package, backend)
        result = run_series(series, package, backend, plan=plan)
    finally:
        backend.close()
    assert isinstance(result.labels, LabelMap)
    assert result.volume.hu is None  # nothing decoded was kept
    np.testing.assert_array_equal(result.labels.to_array(), ref_labels)
    assert ref_measure.organs[0].voxels > 1000 and ref_measure.lesion_count >= 1, "phantom too easy"
    assert result.summary.measurements == ref_measure


def _blobs(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Noisy blobs: many components of both labels, touching across every slab boundary."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
    lab = np.zeros(shape, np.uint8)
    lab[noise > 0.05] = 1
    lab[noise > 0.15] = 2
    return lab


@pytest.mark.parametrize("seed", range(4))
def test_components_and_measurements_equal_whole_volume_labelling(seed: int, package) -> None:
    lab = _blobs(seed, (23 + seed * 5, 41, 37))
    ref = keep_largest_component(lab, [1, 2])
    uids = [f"1.2.3.{i}" for i in range(lab.shape[0])]
    ref_m = measure_dense(ref, package.labels, (0.7, 0.8), 1.5, uids)  # no threshold: every component is compared
    assert ref_m.lesion_count > 10  # ties, U shapes and joins across boundaries all occur
    for slab in (1, 2, 5, 64):
        lm = LabelMap.from_array(lab)
        keep_largest_component_map(lm, [1, 2], slab)
        np.testing.assert_array_equal(lm.to_array(), ref)
        assert measure(lm, package.labels, (0.7, 0.8), 1.5, uids, slab_slices=slab) == ref_m
        # Component numbering is ndimage.label's on the whole volume.
        comps = find_components(lm, [2], slab, full=True)
        whole, k = ndimage.label(ref == 2, structure=np.ones((3, 3, 3), bool))
        assert comps.count == k
        np.testing.assert_array_equal(comps.sizes, np.bincount(whole.ravel())[1:])


def test_labelmap_round_trip_and_npz_is_savez_compressed(tmp_path: Path) -> None:
    lab = _blobs(9, (12, 30, 20))
    lab[3] = 0
    lm = LabelMap.from_array(lab)
    np.testing.assert_array_equal(np.asarray(lm), lab)
    assert lm.nbytes < lab.nbytes
    np.testing.assert_array_equal(lm.counts(256), np.bincount(lab.ravel(), minlength=256))
    assert 3 not in lm.nonempty().tolist() and lm.nonempty().size == 11
    np.testing.assert_array_equal(lm.slab(2, 7, (4, 20, 3, 15)), lab[2:7, 4:20, 3:15])
    np.testing.assert_array_equal(lm.take([5, 1]), lab[[5, 1]])
    uids = [str(i) for i in range(12)]
    (tmp_path / "a.npz").write_bytes(labelmap_npz(lm, uids, slab_slices=5))
    np.savez_compressed(tmp_path / "b.npz", labels=lab, sop_instance_uids=np.array(uids, dtype=np.str_))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("chunk", [3, 4, 10**6])
@pytest.mark.parametrize("gaps", [True, False])
def test_seg_from_nonempty_slices_equals_seg_from_all(series: list[Path], package, monkeypatch, chunk: int,
                                                      gaps: bool) -> None:
    """highdicom gets only the labelled slices, in chunks; the SEG must be the one made from the whole dense
    map at once (frames, their order and indices, references, spacing)."""
    from appliance.results import seg as seg_module

    monkeypatch.setattr(seg_module, "SEG_CHUNK_FRAMES", chunk)
    vol = scan_series(series)
    lab = np.zeros(vol.shape, np.uint8)
    lab[10:20, 40:90, 50:100] = 1
    lab[14:17, 60:70, 60:75] = 2
    if gaps:
        lab[30, 5:9, 5:9] = 1  # an isolated labelled slice
        lab[33, 5:9, 5:9] = 2  # a lesion-only slice
    sources = source_headers(vol)
    uids = iter(range(1, 10**6))
    monkeypatch.setattr(identity, "new_uid", lambda: f"1.2.826.0.1.3680043.10.999.{next(uids)}")
    new = make_seg(vol, LabelMap.from_array(lab), package, sources)
    uids = iter(range(1, 10**6))
    # The whole-volume call as make_seg made it before: every source, the whole dense map.
    descriptions = [hd.seg.SegmentDescription.from_dataset(d) for d in new.SegmentSequence]
    old = hd.seg.Segmentation(source_images=sources, pixel_array=segment_map(lab, package),
                              segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                              segment_descriptions=descriptions, **identity.new_object(identity.SEG_SERIES_NUMBER),
                              content_label=new.ContentLabel, content_description=new.ContentDescription,
                              series_description=new.SeriesDescription, omit_empty_frames=True)
    assert new.PixelData == old.PixelData and new.NumberOfFrames == old.NumberOfFrames
    assert new.get("DimensionOrganizationType") == old.get("DimensionOrganizationType")
    assert new.PerFrameFunctionalGroupsSequence == old.PerFrameFunctionalGroupsSequence
    assert new.SharedFunctionalGroupsSequence == old.SharedFunctionalGroupsSequence
    assert new.SourceImageSequence == old.SourceImageSequence
    assert new.ReferencedSeriesSequence == old.ReferencedSeriesSequence
    got = new.get_pixels_by_source_instance(source_sop_instance_uids=vol.sop_instance_uids, combine_segments=True,
                                            assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(got, lab)


def test_key_image_and_outputs_same_from_compact_map(series: list[Path], package, tmp_path: Path) -> None:
    vol = load_volume(series)
    lazy = scan_series(series)
    lab = np.zeros(vol.shape, np.uint8)
    lab[10:20, 40:90, 50:100] = 1
    lab[14:17, 60:70, 60:75] = 2
    measured = Measurements(voxel_volume_ml=0.001, labels=(), organs=(), lesions=())
    dense_key = render_key_image(vol, lab, package, measured)
    compact_key = render_key_image(lazy, LabelMap.from_array(lab), package, measured)
    assert dense_key.index == compact_key.index == 14
    np.testing.assert_array_equal(dense_key.rgb, compact_key.rgb)
    summary = Summary(ModelInfo("m", "1", "0" * 64), BackendInfo("onnxruntime", "cpu", "fp32"),
                      SeriesInfo(lazy.study_uid, lazy.series_uid, *lab.shape, (1.0, 1.0), 1.0), measured)
    write_outputs(SeriesResult(labels=LabelMap.from_array(lab), volume=lazy, summary=summary), tmp_path / "o")
    out = np.load(tmp_path / "o" / "labelmap.npz")
    np.testing.assert_array_equal(out["labels"], lab)
    assert Summary.read(tmp_path / "o" / "summary.json") == summary


def test_native_pixel_reads_equal_pydicom_decoding(series: list[Path], tmp_path: Path) -> None:
    """Uncompressed 16-bit slices are read straight from the file; compressed ones go through pydicom."""
    import pydicom

    from appliance.infer.volume import decode_hu

    vol = scan_series(series)
    assert all(o is not None for o in vol.native_offsets)
    for i in (0, 7, len(series) - 1):
        ds = pydicom.dcmread(vol.paths[i])
        np.testing.assert_array_equal(vol.slice_hu(i), decode_hu(ds, "x"))
    # Signed pixels, a rescale slope, Implicit VR, and an RLE file all decode as pydicom decodes them.
    folder = tmp_path / "variants"
    folder.mkdir()
    for k, p in enumerate(series[:3]):
        ds = pydicom.dcmread(p)
        if k == 0:
            arr = ds.pixel_array.astype(np.int32) - 1024
            ds.PixelRepresentation = 1
            ds.PixelData = arr.astype("<i2").tobytes()
            ds.RescaleIntercept, ds.RescaleSlope = 0, 2
        elif k == 1:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        else:
            ds.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
        ds.save_as(folder / p.name, enforce_file_format=True)
    variants = scan_series(sorted(folder.iterdir()))
    assert [o is not None for o in variants.native_offsets] == [True, True, False]
    for i, p in enumerate(sorted(folder.iterdir())):
        np.testing.assert_array_equal(variants.slice_hu(i), decode_hu(pydicom.dcmread(p), "x"))


def test_slab_plan_follows_the_budget_not_the_length() -> None:
    small = plan_slabs((3000, 512, 512), (176, 176), 8, 256, rss=150 << 20)
    big = plan_slabs((3000, 512, 512), (176, 176), 8, 4096, rss=150 << 20)
    assert small.infer % 8 == 0 and 8 <= small.infer < big.infer <= 256
    assert plan_slabs((300, 512, 512), (176, 176), 8, 1024, rss=150 << 20) == plan_slabs(
        (3000, 512, 512), (176, 176), 8, 1024, rss=150 << 20)
    assert plan_slabs((20, 64, 64), (64, 64), 8, 1024, rss=0).infer == 24  # never more than the series needs
    # Over budget already: the smallest slabs (a 64 MB floor for the working set), never none.
    tight = plan_slabs((3000, 512, 512), (176, 176), 8, 256, rss=2 << 30)
    assert 8 <= tight.infer <= small.infer and tight.infer % 8 == 0 and tight.post >= 1
