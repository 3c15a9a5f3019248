"""The worker's CPU stages around the forward pass, made faster, give the very same numbers as before.

Preprocessing must stay bit-identical to what the demo model was trained on (``scripts/train_demo_model.py``
calls the same functions), so the resampling, windowing and score-to-label code is compared here against
verbatim copies of the implementations it replaced, on data that exercises shrinking, enlarging, ties and
label borders. The pipelined slab loop (next slab prepared while the current one is predicted, context
slices carried over, scores turned into labels on a thread) is compared against the whole series at once
with a deterministic stand-in for the model, for slab plans that cut the series everywhere.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from appliance.infer.pipeline import SlabPlan, paused_gc, segment_volume
from appliance.infer.postprocess import keep_largest_component
from appliance.infer.preprocess import (
    InputSpec,
    _axis_weights,
    batch_input,
    labels_to_model_grid,
    model_grid,
    prepare_slices,
    resize2d,
    scores_to_labels,
    to_model_grid,
)
from appliance.infer.volume import Volume
from appliance.models.package import bundled_models_dir, load_package

# ----------------------------------------------------------------------- the replaced implementations


def old_resize_axis(arr: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    n_in = arr.shape[axis]
    if n_in == n_out:
        return arr
    factor = n_in / n_out
    if factor > 1.0:
        arr = gaussian_filter1d(arr, sigma=(factor - 1.0) / 2.0, axis=axis, mode="nearest")
    i0, i1, w = _axis_weights(n_in, n_out)
    shape = [1] * arr.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    a = np.take(arr, i0, axis=axis)
    b = np.take(arr, i1, axis=axis)
    return a + (b - a) * w


def old_resize2d(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = old_resize_axis(arr, shape[0], arr.ndim - 2)
    return old_resize_axis(out, shape[1], arr.ndim - 1)


def old_normalise(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = float(window[0]), float(window[1])
    out = np.clip(hu, lo, hi, dtype=np.float32)
    out -= (lo + hi) / 2.0
    out *= 2.0 / (hi - lo)
    return out


def old_to_model_grid(volume_hu: np.ndarray, grid, spec: InputSpec) -> np.ndarray:
    out = np.full((volume_hu.shape[0], *grid.padded), -1.0, dtype=np.float32)
    for s0 in range(0, volume_hu.shape[0], 8):
        chunk = np.asarray(volume_hu[s0:s0 + 8], dtype=np.float32)
        out[s0:s0 + 8, : grid.shape[0], : grid.shape[1]] = old_normalise(old_resize2d(chunk, grid.shape), spec.window)
    return out


def old_labels_to_model_grid(labels: np.ndarray, grid, n_classes: int) -> np.ndarray:
    onehot = np.stack([(labels == k).astype(np.float32) for k in range(n_classes)], axis=1)
    small = old_resize2d(onehot, grid.shape).argmax(axis=1).astype(np.uint8)
    out = np.zeros((labels.shape[0], *grid.padded), dtype=np.uint8)
    out[:, : grid.shape[0], : grid.shape[1]] = small
    return out


def resampled_labels(scores: np.ndarray, grid) -> np.ndarray:
    """The resample-everything definition ``scores_to_labels`` is an exact shortcut of (when enlarging)."""
    crop = scores[:, :, : grid.shape[0], : grid.shape[1]].astype(np.float32, copy=False)
    return old_resize2d(crop, grid.source_shape).argmax(axis=1).astype(np.uint8)


def old_argmax_classes(scores: np.ndarray) -> np.ndarray:
    """``scores.argmax(axis=1)`` as uint8 for (n, classes, H, W) scores: a running comparison over the few
    classes, 4x faster than numpy's argmax along a strided axis; ties go to the first class, as argmax's
    (for finite scores: a NaN is never picked here, where argmax would pick it)."""
    best = scores[:, 0].copy()
    out = np.zeros(best.shape, dtype=np.uint8)
    for k in range(1, scores.shape[1]):
        better = scores[:, k] > best
        out[better] = k
        np.maximum(best, scores[:, k], out=best)
    return out


def old_scores_to_labels(scores: np.ndarray, grid: ModelGrid, out: np.ndarray | None = None) -> np.ndarray:
    """``scores_to_source(scores, grid).argmax(1)`` as uint8, without resampling every class everywhere.

    Where the four model-grid pixels that bilinear interpolation blends for a source pixel share one
    argmax, the blend (a convex combination) has that argmax too, so only pixels whose four neighbours
    disagree (a thin band along label borders) need their scores interpolated. Same labels, a fraction of
    the work: resampling full score maps back to a 512x512 grid dominated the run time. ``out`` (n, rows,
    cols) uint8 receives the labels when given (a slab of the caller's), else a new array does.
    """
    h, w = grid.shape
    rows, cols = grid.source_shape
    crop = np.ascontiguousarray(scores[:, :, :h, :w], dtype=np.float32)
    lab = old_argmax_classes(crop)  # (n, h, w)
    i0, i1, wr = _axis_weights(h, rows)
    j0, j1, wc = _axis_weights(w, cols)
    # A block (i, j) is mixed when the labels at (i, j), (i+1, j), (i, j+1), (i+1, j+1) differ (clamped at the
    # edge, where a neighbour is the pixel itself: on the last row the diagonal is the right neighbour, on the
    # last column the lower one), computed on shifted views rather than gathered copies.
    mixed = np.zeros(lab.shape, dtype=bool)
    mixed[:, :-1, :] = lab[:, :-1, :] != lab[:, 1:, :]
    mixed[:, :, :-1] |= lab[:, :, :-1] != lab[:, :, 1:]
    mixed[:, :-1, :-1] |= lab[:, :-1, :-1] != lab[:, 1:, 1:]
    if out is None:
        out = np.empty((lab.shape[0], rows, cols), dtype=np.uint8)
    # lab[:, i0][:, :, j0], as runs: i0 and j0 are non-decreasing, so repeating each model row and column
    # by how many source rows and columns fall on it is the same gather, 3x faster.
    out[...] = lab.repeat(np.bincount(i0, minlength=h), axis=1).repeat(np.bincount(j0, minlength=w), axis=2)
    # Source pixels whose block is mixed, found on the small grid: i0 is non-decreasing, so the source rows of
    # model row i are one run (start rs0[i], count rn[i]), likewise columns; each mixed block is expanded
    # to its rows x columns. (Same pixels as testing every source pixel's block, without full-size masks.)
    zb, ib, jb = np.nonzero(mixed)
    if zb.size:
        rs0 = np.searchsorted(i0, np.arange(h), side="left")
        rn = np.searchsorted(i0, np.arange(h), side="right") - rs0
        cs0 = np.searchsorted(j0, np.arange(w), side="left")
        cn = np.searchsorted(j0, np.arange(w), side="right") - cs0
        nr, nc = rn[ib], cn[jb]
        per = nr * nc
        block = np.repeat(np.arange(zb.size), per)
        t = np.arange(block.size) - np.repeat(np.cumsum(per) - per, per)
        ncb = nc[block]
        zs = zb[block]
        rs = rs0[ib[block]] + t // ncb
        cs = cs0[jb[block]] + t % ncb
        a0, a1, b0, b1 = i0[rs], i1[rs], j0[cs], j1[cs]
        fr, fc = wr[rs][:, None], wc[cs][:, None]
        s00 = crop[zs, :, a0, b0]
        s01 = crop[zs, :, a0, b1]
        s10 = crop[zs, :, a1, b0]
        s11 = crop[zs, :, a1, b1]
        top = s00 + (s01 - s00) * fc
        bottom = s10 + (s11 - s10) * fc
        out[zs, rs, cs] = (top + (bottom - top) * fr).argmax(axis=1)
    return out


# ------------------------------------------------------------------------------------------ helpers


SPEC = InputSpec(channels=3, spacing_mm=(2.0, 2.0), size_multiple=16, min_size=(64, 64), max_size=(256, 256),
                 window=(-250.0, 350.0))


def _hu(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """CT-like HU: smooth structures from -1000 to 1500 with noise, so the window clips on both sides."""
    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.normal(size=shape), (0.0, 6.0, 6.0))
    base = base / (np.abs(base).max() + 1e-9) * 1200.0 + 100.0
    return (base + rng.normal(scale=20.0, size=shape)).astype(np.float32)


# -------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("rows, cols, spacing", [(512, 512, (400 / 512, 400 / 512)), (96, 80, (2.5, 3.0)),
                                                  (100, 100, (2.0, 2.0)), (61, 257, (0.7, 1.3))])
def test_preprocessing_is_bit_identical_to_the_replaced_code(rows: int, cols: int, spacing) -> None:
    hu = _hu(rows + cols, (11, rows, cols))
    grid = model_grid(rows, cols, spacing, SPEC)
    ref = old_to_model_grid(hu, grid, SPEC)
    assert ref.tobytes() == to_model_grid(hu, grid, SPEC).tobytes()
    # Into a caller's buffer (the pipelined slabs do this), whatever was in it before.
    out = np.full((7, *grid.padded), np.nan, dtype=np.float32)
    got, _, _ = prepare_slices(lambda a, b: hu[a:b], 2, 9, grid, SPEC, out=out)
    assert got is out and out.tobytes() == ref[2:9].tobytes()
    with pytest.raises(ValueError):
        prepare_slices(lambda a, b: hu[a:b], 0, 3, grid, SPEC, out=np.empty((2, *grid.padded), np.float32))


def test_resize_keeps_each_input_dtypes_arithmetic() -> None:
    rng = np.random.default_rng(5)
    for arr in (rng.normal(size=(3, 40, 52)), rng.normal(size=(3, 40, 52)).astype(np.float32),
                rng.integers(0, 255, size=(3, 40, 52)).astype(np.uint8)):
        for shape in ((17, 23), (40, 52), (81, 100)):
            ref, got = old_resize2d(arr, shape), resize2d(arr, shape)
            assert ref.dtype == got.dtype and ref.tobytes() == got.tobytes(), (arr.dtype, shape)
    labels = rng.integers(0, 3, size=(4, 90, 70)).astype(np.uint8)
    grid = model_grid(90, 70, (2.7, 3.1), SPEC)
    assert labels_to_model_grid(labels, grid, 3).tobytes() == old_labels_to_model_grid(labels, grid, 3).tobytes()


@pytest.mark.parametrize("rows, cols, spacing", [(512, 512, (400 / 512, 400 / 512)), (96, 80, (2.5, 3.0)),
                                                  (61, 257, (0.7, 1.3))])
def test_scores_to_labels_is_identical_to_the_replaced_code(rows: int, cols: int, spacing) -> None:
    grid = model_grid(rows, cols, spacing, SPEC)
    rng = np.random.default_rng(rows)
    smooth = gaussian_filter(rng.normal(size=(5, 3, *grid.padded)), (0, 0, 3, 3)).astype(np.float32)
    ties = np.round(smooth * 4) / 4  # many exact ties: the first class must win, as argmax's
    for scores in (smooth, ties, np.ascontiguousarray(smooth[:, :, ::-1, :])):
        ref = old_scores_to_labels(scores, grid)
        assert 0 < np.count_nonzero(ref) < ref.size
        out = np.full((scores.shape[0], rows, cols), 9, np.uint8)
        scores_to_labels(scores, grid, out=out)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(scores_to_labels(scores, grid), ref)
        if grid.shape[0] <= rows and grid.shape[1] <= cols:  # enlarging back: exactly the resampled argmax
            np.testing.assert_array_equal(out, resampled_labels(scores, grid))


class _FakeModel:
    """A deterministic stand-in for a 3-class model: scores from the input channels, per pixel."""

    name, device, precision = "fake", "cpu", "fp32"

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.calls, self.fail_at, self.delay = 0, fail_at, delay

    def run(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("model failed")
        if self.delay:
            time.sleep(self.delay)
        mid = x[:, 1]
        return np.stack([0.2 - mid, mid + 0.1 * (x[:, 0] - x[:, 2]), mid - 0.35 + 0.2 * x[:, 0]], axis=1)


@pytest.fixture(scope="module")
def package():
    return load_package(bundled_models_dir() / "liver-ct-demo")


def _volume(hu: np.ndarray) -> Volume:
    n = hu.shape[0]
    return Volume(hu=hu, sop_instance_uids=[f"1.2.{i}" for i in range(n)], pixel_spacing=(3.0, 3.0),
                  slice_spacing=2.0, positions=np.zeros((n, 3)), orientation=(1.0, 0, 0, 0, 1.0, 0),
                  series_uid="1.2.3", study_uid="1.2", reference=None, grid=hu.shape[1:])


@pytest.mark.parametrize("n", [1, 7, 37, 150])
@pytest.mark.parametrize("plan", [SlabPlan(infer=8, post=1), SlabPlan(infer=16, post=5), SlabPlan(infer=256, post=64)])
def test_pipelined_slabs_equal_the_whole_series(package, n: int, plan: SlabPlan) -> None:
    hu = _hu(n, (n, 72, 72))
    volume = _volume(hu)
    spec = package.input_spec
    grid = model_grid(72, 72, volume.pixel_spacing, spec)
    batch = package.manifest.input.opt_batch
    prepared = old_to_model_grid(hu, grid, spec)
    model = _FakeModel()
    ref = np.empty(hu.shape, np.uint8)
    for s in range(0, n, batch):
        e = min(n, s + batch)
        ref[s:e] = old_scores_to_labels(model.run(batch_input(prepared, s, e, spec.channels)), grid)
    ref = keep_largest_component(ref, package.manifest.postprocess.largest_component)
    assert 0 < np.count_nonzero(ref) < ref.size
    labels, timings = segment_volume(volume, package, _FakeModel(delay=0.001), plan=plan)
    np.testing.assert_array_equal(labels.to_array(), ref)
    assert set(timings) == {"decode", "preprocess", "infer", "postprocess"} and min(timings.values()) >= 0.0


def test_a_model_failure_mid_series_propagates_and_leaves_no_thread(package) -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="model failed"):
        segment_volume(_volume(_hu(3, (150, 64, 64))), package, _FakeModel(fail_at=5), plan=SlabPlan(256, 64))
    assert {t.name for t in threading.enumerate()} <= before


def test_paused_gc_nests_and_restores() -> None:
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with paused_gc():
            raise KeyError("x")
    assert gc.isenabled()


@pytest.mark.parametrize("full", [False, True])
def test_kept_part_ids_equal_relabelling(full: bool) -> None:
    from appliance.infer.components import find_components
    from appliance.infer.labelmap import LabelMap

    rng = np.random.default_rng(2)
    noise = gaussian_filter(rng.normal(size=(40, 48, 48)), 1.2)
    lab = np.zeros(noise.shape, np.uint8)
    lab[noise > 0.05] = 1
    lab[noise > 0.15] = 2
    lm = LabelMap.from_array(lab)
    relabelled = find_components(lm, [1, 2], 6, full, keep_bytes=0)
    assert not relabelled.kept and len(relabelled.slabs) > 3
    some = find_components(lm, [1, 2], 6, full, keep_bytes=120_000)
    every = find_components(lm, [1, 2], 6, full)
    assert 0 < len(some.kept) < len(some.slabs) and len(every.kept) == len(every.slabs)
    ref = [(s.start, c.copy()) for s, c in relabelled.labelled(lm)]
    for comps in (some, every):
        got = [(s.start, c.copy()) for s, c in comps.labelled(lm)]
        assert [g[0] for g in got] == [r[0] for r in ref]
        for (_, a), (_, b) in zip(got, ref):
            np.testing.assert_array_equal(a, b)
        assert not comps.kept  # handed out once
