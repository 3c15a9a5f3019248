"""The panel's slice scroller: display order from headers, PNGs with the label overlay, the caches, and
hostile or broken files answered with a specific error instead of a crash."""

from __future__ import annotations

import io
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

import appliance.panel.slices as slices
from appliance.infer.pipeline import labelmap_npz
from appliance.panel.slices import SliceNotFound, SliceRenderer, SliceUnreadable
from appliance.store import InstanceRecord, Store
from appliance_dev.dicom_factory import ct_dataset, write_file

ROWS = COLS = 32
N = 6


class Series:
    def __init__(self, store: Store, n: int = N, *, shuffle: bool = True, hu: float = 90.0) -> None:
        self.store = store
        self.study, self.uid = generate_uid(), generate_uid()
        self.z_order: list[str] = []  # SOP Instance UIDs by increasing z
        datasets = []
        for i in range(n):
            ds = ct_dataset(study_uid=self.study, series_uid=self.uid, number=i + 1, rows=ROWS, cols=COLS)
            ds.ImagePositionPatient = [0.0, 0.0, -100.0 + 2.5 * i]
            ds.RescaleIntercept = -1024
            ds.PixelData = np.full((ROWS, COLS), hu + 1024, dtype="<i2").tobytes()
            datasets.append(ds)
            self.z_order.append(str(ds.SOPInstanceUID))
        if shuffle:
            random.Random(7).shuffle(datasets)
            # InstanceNumber disagrees with position too, so only the position can give the right order
            for k, ds in enumerate(datasets):
                ds.InstanceNumber = k + 1
        for ds in datasets:
            self.add(ds)

    def add(self, ds: Dataset, transfer_syntax: str | None = None) -> Path:
        rel = self.store.spool.instance_relpath(self.study, self.uid, str(ds.SOPInstanceUID))
        path = self.store.spool.root / rel
        if transfer_syntax is None:
            write_file(ds, path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
        self.store.index.add_instance(
            InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), study_uid=self.study,
                series_uid=self.uid, transfer_syntax=transfer_syntax or "1.2.840.10008.1.2.1", path=rel,
                size=path.stat().st_size, modality="CT",
            ),
            None,
        )
        return path

    def path_of(self, sop_uid: str) -> Path:
        return self.store.spool.root / self.store.spool.instance_relpath(self.study, self.uid, sop_uid)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "data")


def renderer(store: Store, **kw: int) -> SliceRenderer:
    return SliceRenderer(store.data_dir, store.index, store.data_dir / "cache" / "slices", **kw)


def png_rgb(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def write_result(store: Store, series: Series, labels: np.ndarray, *, summary: bool = True) -> str:
    rel = f"results/{series.uid}/liver-ct-demo"
    d = store.data_dir / rel
    d.mkdir(parents=True)
    (d / "labelmap.npz").write_bytes(labelmap_npz(labels, series.z_order))
    if summary:
        (d / "summary.json").write_text(json.dumps({
            "model": {"name": "liver-ct-demo", "version": "1", "onnx_sha256": "0" * 64},
            "backend": {"name": "onnxruntime", "device": "cpu", "precision": "fp32"},
            "series": {"study_instance_uid": series.study, "series_instance_uid": series.uid, "slices": N,
                       "rows": ROWS, "columns": COLS, "pixel_spacing_mm": [0.8, 0.8], "slice_spacing_mm": 2.5},
            "voxel_volume_ml": 0.0016,
            "labels": [{"value": 1, "name": "liver", "voxels": 1, "volume_ml": 0.1},
                       {"value": 2, "name": "lesion", "voxels": 1, "volume_ml": 0.1}],
            "organs": [{"name": "liver", "labels": [1, 2], "voxels": 2, "volume_ml": 0.2}],
            "lesions": {"count": 0, "total_volume_ml": 0.0, "largest_diameter_mm": 0.0, "items": []},
        }))
    return rel


def test_slices_are_ordered_by_position_when_they_arrive_shuffled(store: Store) -> None:
    s = Series(store)
    assert [r["sop_instance_uid"] for r in store.index.series_instances(s.uid)] != s.z_order
    stack = renderer(store).slices(s.uid)
    assert stack.ordered_by == "position"
    assert list(stack.sop_instance_uids) == s.z_order
    assert [p.name for p in stack.paths] == [f"{u}.dcm" for u in s.z_order]
    assert renderer(store).count(s.uid) == N


def test_without_positions_instance_number_orders(store: Store) -> None:
    s = Series(store, n=0)
    uids = []
    for number in (3, 1, 2):
        ds = ct_dataset(study_uid=s.study, series_uid=s.uid, number=number, rows=ROWS, cols=COLS)
        del ds.ImagePositionPatient
        s.add(ds)
        uids.append((number, str(ds.SOPInstanceUID)))
    stack = renderer(store).slices(s.uid)
    assert stack.ordered_by == "instance_number"
    assert list(stack.sop_instance_uids) == [u for _, u in sorted(uids)]


def test_png_has_the_slice_size_and_is_grey_without_a_job(store: Store) -> None:
    s = Series(store, hu=90.0)
    rgb = png_rgb(renderer(store).render(s.uid, 2, job_result_dir=None))
    assert rgb.shape == (ROWS, COLS, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert abs(int(rgb[0, 0, 0]) - 128) <= 1  # HU 90 is the middle of the liver window (W150/L90)
    bone = png_rgb(renderer(store).render(s.uid, 2, job_result_dir=None, window="bone"))
    assert bone[0, 0, 0] < rgb[0, 0, 0]


def test_overlay_colours_labelled_pixels_and_leaves_the_rest_grey(store: Store) -> None:
    s = Series(store)
    labels = np.zeros((N, ROWS, COLS), np.uint8)
    labels[3, 4:24, 4:24] = 1  # liver
    labels[3, 10:16, 10:16] = 2  # a lesion inside it
    rel = write_result(store, s, labels)
    r = renderer(store)
    rgb = png_rgb(r.render(s.uid, 3, job_result_dir=rel)).astype(int)
    grey = rgb[labels[3] == 0]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    assert tuple(rgb[4, 4]) == slices.ORGAN_COLOURS[0]  # the liver's outline
    assert tuple(rgb[10, 10]) == slices.LESION_COLOURS[0]  # the lesion's outline
    inside_liver = rgb[7, 7]  # filled, not outlined: grey tinted green
    assert inside_liver[1] > inside_liver[0] and inside_liver[1] > inside_liver[2]
    inside_lesion = rgb[13, 13]
    assert inside_lesion[0] > inside_lesion[1] and inside_lesion[0] > inside_lesion[2]
    # the liver's outline runs around the outside of the organ only, not around the lesion it holds
    assert tuple(rgb[9, 12]) != slices.ORGAN_COLOURS[0]
    # another slice of the same job has no labels: all grey
    other = png_rgb(r.render(s.uid, 2, job_result_dir=rel))
    assert (other[..., 0] == other[..., 1]).all()


def test_overlay_without_summary_uses_fixed_colours(store: Store) -> None:
    s = Series(store)
    labels = np.zeros((N, ROWS, COLS), np.uint8)
    labels[1, 2:12, 2:12] = 1
    labels[1, 20:28, 20:28] = 2
    rel = write_result(store, s, labels, summary=False)
    rgb = png_rgb(renderer(store).render(s.uid, 1, job_result_dir=rel))
    assert tuple(rgb[2, 2]) == slices.FALLBACK_COLOURS[1]
    assert tuple(rgb[20, 20]) == slices.FALLBACK_COLOURS[2]


def test_a_cache_hit_returns_the_same_bytes_without_decoding(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Series(store)
    labels = np.zeros((N, ROWS, COLS), np.uint8)
    labels[0, 5:9, 5:9] = 1
    rel = write_result(store, s, labels)
    decodes = []
    real = slices.decode_frame

    def counting(path: Path) -> tuple[np.ndarray, Dataset]:
        decodes.append(path)
        return real(path)

    monkeypatch.setattr(slices, "decode_frame", counting)
    r = renderer(store)
    first = r.render(s.uid, 0, job_result_dir=rel)
    assert r.render(s.uid, 0, job_result_dir=rel) == first
    assert renderer(store).render(s.uid, 0, job_result_dir=rel) == first  # a new process: from the disk cache
    assert len(decodes) == 1
    r.render(s.uid, 0, job_result_dir=None)  # another key: decoded again
    r.render(s.uid, 0, job_result_dir=rel, window="lung")
    assert len(decodes) == 3


def test_a_new_instance_invalidates_the_order(store: Store) -> None:
    s = Series(store)
    r = renderer(store)
    assert r.count(s.uid) == N
    ds = ct_dataset(study_uid=s.study, series_uid=s.uid, number=99, rows=ROWS, cols=COLS)
    ds.ImagePositionPatient = [0.0, 0.0, -200.0]  # below every other slice
    s.add(ds)
    stack = r.slices(s.uid)
    assert len(stack) == N + 1 and stack.sop_instance_uids[0] == str(ds.SOPInstanceUID)


def test_out_of_range_and_unknown_series_are_slice_not_found(store: Store) -> None:
    s = Series(store)
    r = renderer(store)
    for index in (N, -1, 10**9):
        with pytest.raises(SliceNotFound, match=f"has {N} slice"):
            r.render(s.uid, index, job_result_dir=None)
    with pytest.raises(SliceNotFound, match="no series"):
        r.render("1.2.3.4", 0, job_result_dir=None)
    with pytest.raises(SliceNotFound):
        r.count("../../etc/passwd")
    with pytest.raises(LookupError):  # what callers may catch instead
        r.render(s.uid, N, job_result_dir=None)
    with pytest.raises(ValueError, match="unknown window"):
        r.render(s.uid, 0, job_result_dir=None, window="brain")


def test_corrupt_files_are_slice_unreadable(store: Store) -> None:
    s = Series(store)
    # pixel data cut short: the header is fine, the decoder is not
    short = s.path_of(s.z_order[1])
    short.write_bytes(short.read_bytes()[:-100])
    # not DICOM at all
    s.path_of(s.z_order[4]).write_bytes(b"\x00" * 50 + b"garbage")
    r = renderer(store)
    assert r.count(s.uid) == N  # an unreadable slice stays in the scroller
    with pytest.raises(SliceUnreadable, match="cannot decode"):
        r.render(s.uid, 1, job_result_dir=None)
    stack = r.slices(s.uid)
    assert stack.errors[-1] is not None and stack.sop_instance_uids[-1] == s.z_order[4]
    with pytest.raises(SliceUnreadable):
        r.render(s.uid, N - 1, job_result_dir=None)
    png_rgb(r.render(s.uid, 0, job_result_dir=None))  # the others still render


def test_images_over_the_size_bound_are_refused_before_decoding(store: Store) -> None:
    s = Series(store, n=0)
    ds = ct_dataset(study_uid=s.study, series_uid=s.uid, rows=ROWS, cols=COLS)
    ds.Rows = 5000  # a header that lies: only the bound may stop it
    s.add(ds)
    with pytest.raises(SliceUnreadable, match="5000x32"):
        renderer(store).render(s.uid, 0, job_result_dir=None)


def test_a_purged_file_is_slice_not_found(store: Store) -> None:
    s = Series(store)
    r = renderer(store)
    r.count(s.uid)
    s.path_of(s.z_order[2]).unlink()
    with pytest.raises(SliceNotFound, match="gone"):
        r.render(s.uid, 2, job_result_dir=None)


def test_an_rle_compressed_slice_renders_like_the_uncompressed_one(store: Store) -> None:
    s = Series(store, n=0)
    ramp = np.linspace(-300, 300, ROWS * COLS).astype("<i2").reshape(ROWS, COLS)  # HU across the window
    plain = ct_dataset(study_uid=s.study, series_uid=s.uid, number=1, rows=ROWS, cols=COLS)
    plain.PixelData = ramp.tobytes()
    s.add(plain)
    rle = ct_dataset(study_uid=s.study, series_uid=s.uid, number=2, rows=ROWS, cols=COLS)
    rle.compress(RLELossless, ramp)
    path = s.add(rle, transfer_syntax=str(RLELossless))
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    r = renderer(store)
    a = png_rgb(r.render(s.uid, 0, job_result_dir=None, window="abdomen"))
    b = png_rgb(r.render(s.uid, 1, job_result_dir=None, window="abdomen"))
    assert (a == b).all() and a.std() > 0


def test_colour_and_multi_frame_images_render_their_first_frame(store: Store) -> None:
    s = Series(store, n=0)
    rgb = ct_dataset(study_uid=s.study, series_uid=s.uid, number=1, rows=ROWS, cols=COLS)
    rgb.Modality = "OT"
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.BitsAllocated = rgb.BitsStored = 8
    rgb.HighBit, rgb.PixelRepresentation = 7, 0
    colour = np.zeros((ROWS, COLS, 3), np.uint8)
    colour[..., 0], colour[..., 2] = 200, 30
    rgb.PixelData = colour.tobytes()
    s.add(rgb)
    multi = ct_dataset(study_uid=s.study, series_uid=s.uid, number=2, rows=ROWS, cols=COLS)
    multi.NumberOfFrames = 3
    frames = np.stack([np.full((ROWS, COLS), v, "<i2") for v in (0, 2000, 4000)])
    multi.PixelData = frames.tobytes()
    multi.RescaleIntercept = -1024  # frame 0 is -1024 HU: black in any window
    s.add(multi)
    r = renderer(store)
    assert (png_rgb(r.render(s.uid, 0, job_result_dir=None)) == colour).all()
    assert (png_rgb(r.render(s.uid, 1, job_result_dir=None)) == 0).all()


def test_the_disk_cache_stays_within_its_bound(store: Store) -> None:
    s = Series(store)
    bound = 3000
    r = renderer(store, max_cache_bytes=bound)
    for _ in range(2):
        for window in slices.WINDOWS:
            for i in range(N):
                r.render(s.uid, i, job_result_dir=None, window=window)
    files = [f for f in r.cache_dir.rglob("*") if f.is_file()]  # one folder per series
    assert files and sum(f.stat().st_size for f in files) <= bound


def test_concurrent_renders_scan_the_series_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Series(store)
    scans = []
    real = slices.order_series

    def counting(*a: object, **kw: object) -> slices.SliceStack:
        scans.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(slices, "order_series", counting)
    r = renderer(store)
    out: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            out.append(r.render(s.uid, 3, job_result_dir=None))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(out) == 8 and len(set(out)) == 1
    assert scans == [1]


def test_a_result_dir_outside_the_data_dir_is_refused(store: Store) -> None:
    s = Series(store)
    with pytest.raises(SliceNotFound, match="not under the data directory"):
        renderer(store).render(s.uid, 0, job_result_dir="../../elsewhere")


def test_a_damaged_label_map_is_slice_unreadable(store: Store) -> None:
    s = Series(store)
    rel = write_result(store, s, np.zeros((N, ROWS, COLS), np.uint8))
    (store.data_dir / rel / "labelmap.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(SliceUnreadable, match="label map"):
        renderer(store).render(s.uid, 0, job_result_dir=rel)


def _crash_on_marked(path: Path) -> Any:
    """Runs in the decoder's child: a file named *crash* dies as a compiled decoder would (no exception)."""
    if "crash" in path.name:
        os._exit(3)
    return slices.decode_frame(path)


def test_a_decoder_that_dies_costs_the_slice_not_the_process(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.dcm", tmp_path / "crash.dcm"
    for p in (good, bad):
        write_file(ct_dataset(study_uid="1.2.3", series_uid="1.2.3.4", rows=32, cols=32), p)
    decoder = slices.IsolatedDecoder(_crash_on_marked, workers=1)
    try:
        with pytest.raises(slices.SliceUnreadable, match="decoder failed"):
            decoder(bad)
        frame, header = decoder(good)  # a fresh child took over
        assert frame.shape == (32, 32) and int(header.Rows) == 32
        with pytest.raises(slices.SliceNotFound):  # the child's own answers come back as they are
            decoder(tmp_path / "gone.dcm")
    finally:
        decoder.close()
