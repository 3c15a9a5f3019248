"""Between the scanner's grid and the model's: in-plane resampling, HU windowing, padding, slice context.

Training (``scripts/train_demo_model.py``) and serving call these same functions, so a model sees at
run time exactly what it saw while learning. Resampling is separable linear interpolation with
half-pixel centres, with a Gaussian pre-filter when shrinking (as scikit-image's ``resize`` with
anti-aliasing does), so that thin-slice, small-pixel series are not aliased into noise.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from appliance.models.manifest import InputSpec

#: Slices resampled per task in :func:`to_model_grid`.
_CHUNK = 8


@dataclass(frozen=True)
class ModelGrid:
    """Where one series' slices land on the model's grid."""

    source_shape: tuple[int, int]
    #: Size of the resampled image, before padding.
    shape: tuple[int, int]
    #: Size after padding at the bottom and right to ``size_multiple``.
    padded: tuple[int, int]
    #: The spacing actually used: the manifest's, coarser when the field of view would exceed max_size.
    spacing_mm: tuple[float, float]


def model_grid(rows: int, cols: int, pixel_spacing: tuple[float, float], spec: InputSpec) -> ModelGrid:
    """Choose the resampled size for a slice of ``rows x cols`` pixels at ``pixel_spacing`` (row, col) mm."""
    fov = (rows * float(pixel_spacing[0]), cols * float(pixel_spacing[1]))
    spacing = [float(spec.spacing_mm[0]), float(spec.spacing_mm[1])]
    # A field of view wider than max_size allows is resampled a little coarser, keeping the aspect ratio.
    scale = max(1.0, max(fov[0] / spacing[0] / spec.max_size[0], fov[1] / spacing[1] / spec.max_size[1]))
    spacing = [s * scale for s in spacing]
    shape = (
        min(spec.max_size[0], max(1, round(fov[0] / spacing[0]))),
        min(spec.max_size[1], max(1, round(fov[1] / spacing[1]))),
    )
    m = spec.size_multiple
    padded = tuple(max(lo, math.ceil(n / m) * m) for n, lo in zip(shape, spec.min_size, strict=True))
    padded = tuple(math.ceil(n / m) * m for n in padded)
    return ModelGrid((rows, cols), shape, (int(padded[0]), int(padded[1])), (spacing[0], spacing[1]))


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights for linear interpolation with half-pixel centres."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)
    return i0, i1, w


def resize_axis(arr: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linear resize of one axis; anti-aliased when shrinking by more than a little."""
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
    # a + (b - a) * w, in place in b (a fresh copy): the same float operations in the same order, so the
    # same bits, without two more temporaries of the output's size.
    if b.dtype != np.result_type(b.dtype, w.dtype):  # integer input: the formula's own promotion
        return a + (b - a) * w
    np.subtract(b, a, out=b)
    b *= w
    b += a
    return b


def resize2d(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of a float array to ``shape``."""
    out = resize_axis(arr, shape[0], arr.ndim - 2)
    return resize_axis(out, shape[1], arr.ndim - 1)


def normalise(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = float(window[0]), float(window[1])
    out = np.clip(hu, lo, hi, dtype=np.float32)
    out -= (lo + hi) / 2.0
    out *= 2.0 / (hi - lo)
    return out


def to_model_grid(volume_hu: np.ndarray, grid: ModelGrid, spec: InputSpec) -> np.ndarray:
    """(slices, rows, cols) HU -> (slices, H, W) float32 on the model's padded grid, normalised.

    Works in chunks of slices on a thread per core: numpy and scipy release the GIL in these loops, and
    chunks keep the temporaries in cache-sized pieces.
    """
    return prepare_slices(lambda a, b: volume_hu[a:b], 0, volume_hu.shape[0], grid, spec)[0]


def prepare_slices(
    read: Callable[[int, int], np.ndarray],
    start: int,
    stop: int,
    grid: ModelGrid,
    spec: InputSpec,
    out: np.ndarray | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, float, float]:
    """:func:`to_model_grid` of slices ``start:stop``, each chunk read by ``read(a, b)`` (HU, float32) on the
    thread that resamples it: a series can be decoded and prepared a few slices at a time, never held in
    HU. Returns the prepared slices (in ``out``, (stop - start, H, W) float32, when given) and the threads'
    seconds spent reading and resampling (for timings). ``workers``: threads (default one per core).

    Every slice is resampled on its own, so the result does not depend on how slices are grouped.
    """
    n = stop - start
    if out is None:
        out = np.empty((n, *grid.padded), dtype=np.float32)
    elif out.shape != (n, *grid.padded) or out.dtype != np.float32:
        raise ValueError(f"out has shape {out.shape} ({out.dtype}), not {(n, *grid.padded)} float32")
    # Padding reads as air: only the margins right and below the image (the image part is overwritten).
    out[:, grid.shape[0] :, :] = -1.0
    out[:, : grid.shape[0], grid.shape[1] :] = -1.0
    spent = [0.0, 0.0]

    def work(s0: int) -> None:
        t = time.perf_counter()
        chunk = np.asarray(read(start + s0, min(stop, start + s0 + _CHUNK)), dtype=np.float32)
        t1 = time.perf_counter()
        out[s0 : s0 + _CHUNK, : grid.shape[0], : grid.shape[1]] = normalise(resize2d(chunk, grid.shape), spec.window)
        t2 = time.perf_counter()
        spent[0] += t1 - t  # float += under the GIL: good enough for a timing split
        spent[1] += t2 - t1

    starts = range(0, n, _CHUNK)
    workers = int(workers or os.cpu_count() or 1)
    if n <= _CHUNK or workers == 1:
        for s0 in starts:
            work(s0)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, starts))
    return out, spent[0], spent[1]


def labels_to_model_grid(labels: np.ndarray, grid: ModelGrid, n_classes: int) -> np.ndarray:
    """Resample a label volume the way scores are resampled back (one-hot, linear, argmax); padding is 0."""
    onehot = np.stack([(labels == k).astype(np.float32) for k in range(n_classes)], axis=1)
    small = resize2d(onehot, grid.shape).argmax(axis=1).astype(np.uint8)
    out = np.zeros((labels.shape[0], *grid.padded), dtype=np.uint8)
    out[:, : grid.shape[0], : grid.shape[1]] = small
    return out


def context_indices(n_slices: int, channels: int) -> np.ndarray:
    """(slices, channels) indices of each slice's neighbours, clamped at the ends of the series."""
    half = channels // 2
    idx = np.arange(n_slices)[:, None] + np.arange(-half, half + 1)[None, :]
    return np.clip(idx, 0, n_slices - 1)


def batch_input(prepared: np.ndarray, start: int, stop: int, channels: int) -> np.ndarray:
    """(n, channels, H, W) network input for slices ``start:stop`` of a prepared (slices, H, W) volume."""
    idx = context_indices(prepared.shape[0], channels)[start:stop]
    return np.ascontiguousarray(prepared[idx])


def scores_to_source(scores: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """(n, classes, H, W) model scores -> (n, classes, rows, cols) on the source slices' grid."""
    crop = scores[:, :, : grid.shape[0], : grid.shape[1]].astype(np.float32, copy=False)
    return resize2d(crop, grid.source_shape)


def _argmax_classes(scores: np.ndarray) -> np.ndarray:
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


def scores_to_labels(scores: np.ndarray, grid: ModelGrid, out: np.ndarray | None = None) -> np.ndarray:
    """``scores_to_source(scores, grid).argmax(1)`` as uint8, without resampling every class everywhere.

    Where the four model-grid pixels that bilinear interpolation blends for a source pixel share one
    argmax, the blend (a convex combination) has that argmax too, so only pixels whose four neighbours
    disagree (a thin band along label borders) need their scores interpolated. Same labels, a fraction of
    the work: resampling full score maps back to a 512x512 grid dominated the run time. ``out`` (n, rows,
    cols) uint8 receives the labels when given (a slab of the caller's), else a new array does.
    """
    h, w = grid.shape
    rows, cols = grid.source_shape
    # A view, not a copy: only the argmax reads every score, and the few mixed pixels are gathered from it.
    crop = scores[:, :, :h, :w].astype(np.float32, copy=False)
    lab = _argmax_classes(crop)  # (n, h, w)
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
    # lab[:, i0][:, :, j0]: columns first, on the small grid, then whole rows straight into ``out`` (row
    # copies), 3x faster than repeating rows first and copying the result.
    np.take(np.take(lab, j0, axis=2), i0, axis=1, out=out, mode="clip")  # "clip": unbuffered; i0 is in range
    # Source pixels whose block is mixed, found on the small grid: i0 is non-decreasing, so the source rows of
    # model row i are one run (start rs0[i], count rn[i]), likewise columns; each mixed block is expanded
    # to its rows x columns. (Same pixels as testing every source pixel's block, without full-size masks.)
    # flatnonzero + unravel: 10x faster than np.nonzero on a 3D mask this sparse (same indices, same order).
    zb, ib, jb = np.unravel_index(np.flatnonzero(mixed), mixed.shape)
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


def class_confidence(
    scores: np.ndarray, grid: ModelGrid, labels: np.ndarray, values: Sequence[int], out: np.ndarray | None = None
) -> np.ndarray:
    """The model's probability (softmax of its scores, 0..255 for 0..1) of the label each source pixel got,
    where that label is one of ``values``; 0 elsewhere. (n, rows, cols) uint8, into ``out`` when given.

    Why: a finding's confidence is the mean of this over its voxels. Taken on the model grid (where the
    network predicted) and carried to the source grid pixel by pixel like the labels' unmixed blocks, which
    is what a mean over a region needs; only batches with such labels pay for the softmax.
    """
    if out is None:
        out = np.zeros(labels.shape, dtype=np.uint8)
    else:
        out[...] = 0
    present = [v for v in sorted({int(v) for v in values}) if 0 < v < scores.shape[1] and (labels == v).any()]
    if not present:
        return out
    h, w = grid.shape
    rows, cols = grid.source_shape
    crop = scores[:, :, :h, :w].astype(np.float32, copy=False)
    e = np.exp(crop - crop.max(axis=1, keepdims=True))
    total = e.sum(axis=1)
    i0, _, _ = _axis_weights(h, rows)
    j0, _, _ = _axis_weights(w, cols)
    for v in present:
        prob = np.rint(e[:, v] / total * 255.0).astype(np.uint8)  # (n, h, w)
        up = np.take(np.take(prob, j0, axis=2), i0, axis=1)
        mask = labels == v
        out[mask] = up[mask]
    return out
