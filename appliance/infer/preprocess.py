"""Between the scanner's grid and the model's: in-plane resampling, HU windowing, padding, slice context.

Training (``scripts/train_demo_model.py``) and serving call these same functions, so a model sees at
run time exactly what it saw while learning. Resampling is separable linear interpolation with
half-pixel centres, with a Gaussian pre-filter when shrinking (as scikit-image's ``resize`` with
anti-aliasing does), so that thin-slice, small-pixel series are not aliased into noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d


@dataclass(frozen=True)
class InputSpec:
    """What a 2D model expects, from its manifest's ``[input]`` and ``[normalisation]`` tables."""

    #: Adjacent slices stacked as channels, centred on the slice predicted (1, 3, 5, ...).
    channels: int
    #: In-plane pixel spacing (row, column) in mm that slices are resampled to.
    spacing_mm: tuple[float, float]
    #: Padded height and width are multiples of this (the network's total down-sampling).
    size_multiple: int
    min_size: tuple[int, int]
    max_size: tuple[int, int]
    #: HU window mapped linearly onto [-1, 1]; values outside are clipped.
    window: tuple[float, float]


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
    padded = tuple(max(lo, math.ceil(n / m) * m) for n, lo in zip(shape, spec.min_size))
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
    return a + (b - a) * w


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
    """(slices, rows, cols) HU -> (slices, H, W) float32 on the model's padded grid, normalised."""
    vol = np.asarray(volume_hu, dtype=np.float32)
    small = normalise(resize2d(vol, grid.shape), spec.window)
    out = np.full((vol.shape[0], *grid.padded), -1.0, dtype=np.float32)  # padding reads as air
    out[:, : grid.shape[0], : grid.shape[1]] = small
    return out


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
