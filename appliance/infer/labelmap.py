"""A compact label map on the source grid: what the worker keeps of a series between slabs.

A dense uint8 map of a 3,000-slice 512x512 series is 786 MB, most of it zeros: an organ covers a part of
each slice and none of many. So each slice is kept as the bounding box of its non-zero pixels (nothing for
an empty slice), and every consumer (clean-up, measurements, SEG, key image, ``labelmap.npz``) reads it back
densely one slab of slices at a time. Memory then follows what was segmented, not the series length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class LabelMap:
    """(slices, rows, cols) uint8 labels, stored per slice as the crop of its non-zero bounding box."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        #: Per slice: None (all zero) or (row0, col0, crop) with crop a C-contiguous uint8 array.
        self._crops: list[tuple[int, int, np.ndarray] | None] = [None] * self.shape[0]

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_array(cls, labels: np.ndarray) -> LabelMap:
        """A compact copy of a dense (slices, rows, cols) uint8 map."""
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise ValueError(f"a label map has 3 dimensions, not {labels.ndim}")
        out = cls(labels.shape)
        out.set_slab(0, labels)
        return out

    def set_slab(self, start: int, labels: np.ndarray, offset: tuple[int, int] = (0, 0)) -> None:
        """Store dense ``labels`` (k, h, w) as slices ``start .. start + k``: the window at row, column
        ``offset`` of those slices, everything outside it zero (h, w = rows, cols for whole slices)."""
        k = labels.shape[0]
        ro, co = int(offset[0]), int(offset[1])
        if (
            not 0 <= start <= self.shape[0] - k
            or ro < 0
            or co < 0
            or ro + labels.shape[1] > self.shape[1]
            or co + labels.shape[2] > self.shape[2]
        ):
            raise ValueError(f"slab {labels.shape} at {start}, {offset} does not fit a label map of {self.shape}")
        if labels.dtype != np.uint8:
            labels = labels.astype(np.uint8)
        rows_any = np.asarray(labels.any(axis=2))  # (k, rows)
        cols_any = np.asarray(labels.any(axis=1))  # (k, cols)
        for i in range(k):
            r = np.flatnonzero(rows_any[i])
            if r.size == 0:
                self._crops[start + i] = None
                continue
            c = np.flatnonzero(cols_any[i])
            r0, r1, c0, c1 = int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1
            self._crops[start + i] = (ro + r0, co + c0, np.ascontiguousarray(labels[i, r0:r1, c0:c1]))

    # ------------------------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the crops (what the compact form costs, against ``prod(shape)`` dense)."""
        return sum(c[2].nbytes for c in self._crops if c is not None)

    def nonempty(self) -> np.ndarray:
        """Indices of the slices with at least one non-zero label."""
        return np.array([i for i, c in enumerate(self._crops) if c is not None], dtype=np.intp)

    def bbox(self, start: int = 0, stop: int | None = None) -> tuple[int, int, int, int] | None:
        """(row0, row1, col0, col1) enclosing every non-zero label of slices ``start:stop``, None if none."""
        crops = [c for c in self._crops[start:stop] if c is not None]
        if not crops:
            return None
        return (
            min(c[0] for c in crops),
            max(c[0] + c[2].shape[0] for c in crops),
            min(c[1] for c in crops),
            max(c[1] + c[2].shape[1] for c in crops),
        )

    def slab(self, start: int, stop: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Dense uint8 (stop - start, rows, cols) copy of slices ``start:stop``; with ``box`` only that
        (row0, row1, col0, col1) window of them."""
        r0, r1, c0, c1 = box if box is not None else (0, self.shape[1], 0, self.shape[2])
        out = np.zeros((stop - start, r1 - r0, c1 - c0), dtype=np.uint8)
        for i, crop in enumerate(self._crops[start:stop]):
            if crop is None:
                continue
            cr, cc, a = crop
            # The part of the crop inside the window.
            ar0, ar1 = max(cr, r0), min(cr + a.shape[0], r1)
            ac0, ac1 = max(cc, c0), min(cc + a.shape[1], c1)
            if ar0 < ar1 and ac0 < ac1:
                out[i, ar0 - r0 : ar1 - r0, ac0 - c0 : ac1 - c0] = a[ar0 - cr : ar1 - cr, ac0 - cc : ac1 - cc]
        return out

    def slice(self, index: int) -> np.ndarray:
        """Dense (rows, cols) copy of one slice."""
        return self.slab(index, index + 1)[0]

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dense (len(indices), rows, cols) stack of the slices ``indices``."""
        out = np.zeros((len(indices), *self.shape[1:]), dtype=np.uint8)
        for j, i in enumerate(indices):
            crop = self._crops[int(i)]
            if crop is not None:
                cr, cc, a = crop
                out[j, cr : cr + a.shape[0], cc : cc + a.shape[1]] = a
        return out

    def slabs(self, size: int) -> Iterator[tuple[int, int]]:
        """(start, stop) of consecutive slabs of at most ``size`` slices covering the map."""
        size = max(1, int(size))
        for start in range(0, self.shape[0], size):
            yield start, min(self.shape[0], start + size)

    def counts(self, minlength: int = 256) -> np.ndarray:
        """Voxels per label value (index = value), as ``np.bincount(dense.ravel(), minlength=...)``."""
        out = np.zeros(minlength, dtype=np.int64)
        for crop in self._crops:
            if crop is not None:
                b = np.bincount(crop[2].ravel(), minlength=minlength)
                if b.size > out.size:
                    out = np.concatenate([out, np.zeros(b.size - out.size, np.int64)])
                out[: b.size] += b
        out[0] = int(np.prod(self.shape, dtype=np.int64)) - int(out[1:].sum())
        return out

    def area_per_slice(self, values: Sequence[int]) -> np.ndarray:
        """Pixels per slice whose label is one of ``values``."""
        area = np.zeros(self.shape[0], dtype=np.int64)
        lut = np.zeros(256, dtype=bool)
        lut[[v for v in values if 0 <= v < 256]] = True
        lut[0] = False
        for i, crop in enumerate(self._crops):
            if crop is not None:
                area[i] = int(np.count_nonzero(lut[crop[2]]))
        return area

    def centroid(self, values: Sequence[int]) -> tuple[float, float, float] | None:
        """Mean (slice, row, column) of the voxels whose label is one of ``values``; None when there are none."""
        lut = np.zeros(256, dtype=bool)
        lut[[v for v in values if 0 < v < 256]] = True
        n, sums = 0, np.zeros(3, dtype=np.float64)
        for i, crop in enumerate(self._crops):
            if crop is None:
                continue
            r, c = np.nonzero(lut[crop[2]])
            if r.size:
                n += r.size
                sums += (i * r.size, float(r.sum()) + crop[0] * r.size, float(c.sum()) + crop[1] * r.size)
        return None if n == 0 else (sums[0] / n, sums[1] / n, sums[2] / n)

    def max(self) -> int:
        return max((int(c[2].max()) for c in self._crops if c is not None), default=0)

    def to_array(self) -> np.ndarray:
        """The whole map dense: for tests and small series only (this is what the compact form avoids)."""
        return self.slab(0, self.shape[0])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self.to_array()
        return out if dtype is None else out.astype(dtype)

    # ------------------------------------------------------------------------------------------ editing

    def zero_where(self, start: int, keep: np.ndarray, box: tuple[int, int, int, int]) -> None:
        """Set to 0 the labels of slices ``start:start + len(keep)`` inside ``box`` where ``keep`` (a dense
        bool array over that window) is False; labels outside the window stay; crops shrink to what is left."""
        r0, r1, c0, c1 = box
        stop = start + keep.shape[0]
        whole = self.bbox(start, stop)
        if whole is None:
            return
        R0, R1, C0, C1 = min(whole[0], r0), max(whole[1], r1), min(whole[2], c0), max(whole[3], c1)
        dense = self.slab(start, stop, (R0, R1, C0, C1))
        window = dense[:, r0 - R0 : r1 - R0, c0 - C0 : c1 - C0]
        window[~keep] = 0
        self.set_slab(start, dense, (R0, C0))


def as_labelmap(labels: np.ndarray | LabelMap) -> LabelMap:
    """``labels`` as a :class:`LabelMap` (a dense array is compacted; a LabelMap is returned as it is)."""
    return labels if isinstance(labels, LabelMap) else LabelMap.from_array(np.asarray(labels, dtype=np.uint8))
