"""3D connected components of a compact label map, one slab of slices at a time.

``scipy.ndimage.label`` on a whole 3,000 x 512 x 512 series needs its int32 output (3.1 GB) plus the mask.
Here each slab (a window of consecutive slices cropped to its labels' bounding box) is labelled on its
own; parts that touch across a slab boundary are joined by comparing the last plane of one slab with the
first plane of the next (a union over the graph of touching parts). Memory is one slab's window, whatever
the series length.

The result is what labelling the whole volume at once gives, component for component: components are
numbered in the order of their first voxel in C (slice, row, column) order, as ``ndimage.label`` numbers
them, so "the largest, the first of equal ones" and the order of lesions in a report do not depend on the
slab size. ``tests/test_slabs.py`` checks this against the whole-volume code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from appliance.infer.labelmap import LabelMap

#: In-plane neighbour offsets that connect two adjacent planes: 6-connectivity (faces) and 26 (all).
_OFFSETS_FACE = ((0, 0),)
_OFFSETS_FULL = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1))


@dataclass
class _Slab:
    start: int
    stop: int
    #: (row0, row1, col0, col1) window the slab was labelled in (the bounding box of its mask).
    box: tuple[int, int, int, int]
    #: Global id of this slab's local component 1 minus one (local ids 1..count -> offset+1..offset+count).
    offset: int
    count: int


@dataclass
class Components:
    """Connected components of one set of label values, numbered 1..count as on the whole volume."""

    structure: np.ndarray
    values: tuple[int, ...]
    #: Voxels per component (index 0 is component 1).
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: (count, 3) first (slice, row, column) of each component's bounding box, and one past its last.
    lo: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    hi: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    #: Component (1-based) of every slab-local part, by global part id (index 0 unused).
    part_component: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    slabs: list[_Slab] = field(default_factory=list)
    #: Slab-local part ids kept from finding the components (by slab start), up to ``find_components``'s
    #: ``keep_bytes``: ``labelled`` hands them out once instead of labelling those windows again.
    kept: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.sizes.size)

    def labelled(self, labels: LabelMap, only: Sequence[_Slab] | None = None) -> Iterator[tuple[_Slab, np.ndarray]]:
        """Per slab (all, or ``only``): its window of component numbers (int32, 0 = background), relabelled
        exactly as when the components were found (labelling is deterministic)."""
        for slab in self.slabs if only is None else only:
            local = self.kept.pop(slab.start, None)  # once: memory goes as the slabs are consumed
            if local is None:
                local, k = _label_window(labels, slab.start, slab.stop, slab.box, self.values, self.structure)
                if k != slab.count:  # the label map changed between the passes: a bug, never silently wrong numbers
                    raise RuntimeError(
                        f"slices {slab.start}-{slab.stop}: {k} parts on relabelling, {slab.count} before"
                    )
            k = slab.count
            lut = np.zeros(k + 1, dtype=np.int32)
            lut[1:] = self.part_component[slab.offset + 1 : slab.offset + k + 1]
            yield slab, lut[local]


def _mask_lut(values: Sequence[int]) -> np.ndarray:
    lut = np.zeros(256, dtype=bool)
    lut[[v for v in values if 0 < v < 256]] = True
    return lut


def _label_window(
    labels: LabelMap,
    start: int,
    stop: int,
    box: tuple[int, int, int, int],
    values: Sequence[int],
    structure: np.ndarray,
) -> tuple[np.ndarray, int]:
    mask = _mask_lut(values)[labels.slab(start, stop, box)]
    local, k = ndimage.label(mask, structure=structure)
    return local, int(k)


def _masked_window(
    labels: LabelMap, start: int, stop: int, values: Sequence[int]
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """The bounding box of ``values`` in slices ``start:stop`` and the mask inside it (None when absent)."""
    box = labels.bbox(start, stop)
    if box is None:
        return None
    mask = _mask_lut(values)[labels.slab(start, stop, box)]
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return (box[0] + r0, box[0] + r1, box[2] + c0, box[2] + c1), mask[:, r0:r1, c0:c1]


def _plane(shape: tuple[int, int], local: np.ndarray, box: tuple[int, int, int, int], offset: int) -> np.ndarray:
    """One plane of slab-local part ids as global part ids on the whole slice (0 = background)."""
    out = np.zeros(shape, dtype=np.int64)
    out[box[0] : box[1], box[2] : box[3]] = np.where(local > 0, local.astype(np.int64) + offset, 0)
    return out


def _touching(prev: np.ndarray, cur: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """(n, 2) pairs of global part ids on two adjacent planes that touch under ``offsets``."""
    rows, cols = cur.shape
    padded = np.pad(prev, 1)
    pairs = []
    for dr, dc in offsets:
        shifted = padded[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
        m = (shifted > 0) & (cur > 0)
        if m.any():
            pairs.append(np.stack([shifted[m], cur[m]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs), axis=0)


#: Bytes of slab-local part ids ``find_components`` keeps for ``Components.labelled`` by default: at 300
#: slices every slab of a liver fits, so its windows are labelled once, not twice (~0.1 s); beyond, the
#: rest is labelled again, so memory stays bounded whatever the series length.
KEEP_BYTES = 64 << 20


def find_components(
    labels: LabelMap, values: Sequence[int], slab_slices: int, full: bool, keep_bytes: int = KEEP_BYTES
) -> Components:
    """Connected components of the voxels whose label is in ``values``: 26-connected when ``full``, else
    6-connected (``ndimage.label``'s default), labelled ``slab_slices`` slices at a time. Up to
    ``keep_bytes`` of the slabs' part ids are kept for one later pass of ``labelled`` (the labels must not
    change in between, as for relabelling)."""
    structure = ndimage.generate_binary_structure(3, 3 if full else 1)
    offsets = _OFFSETS_FULL if full else _OFFSETS_FACE
    out = Components(structure=structure, values=tuple(int(v) for v in values))
    sizes: list[np.ndarray] = []
    lo: list[np.ndarray] = []
    hi: list[np.ndarray] = []
    edges: list[np.ndarray] = []
    offset = 0
    prev_plane: np.ndarray | None = None
    prev_stop = -1
    for start, stop in labels.slabs(slab_slices):
        found = _masked_window(labels, start, stop, values)
        if found is None:
            prev_plane = None
            continue
        box, mask = found
        local, k = ndimage.label(mask, structure=structure)
        del mask
        out.slabs.append(_Slab(start, stop, box, offset, k))
        if local.nbytes <= keep_bytes:
            keep_bytes -= local.nbytes
            out.kept[start] = local
        sizes.append(np.bincount(local.ravel(), minlength=k + 1)[1:].astype(np.int64))
        origin = np.array([start, box[0], box[2]], dtype=np.int64)
        objects = ndimage.find_objects(local)
        lo.append(np.array([[s.start for s in sl] for sl in objects], dtype=np.int64).reshape(-1, 3) + origin)
        hi.append(np.array([[s.stop for s in sl] for sl in objects], dtype=np.int64).reshape(-1, 3) + origin)
        if prev_plane is not None and prev_stop == start:
            edges.append(_touching(prev_plane, _plane(labels.shape[1:], local[0], box, offset), offsets))
        prev_plane = _plane(labels.shape[1:], local[-1], box, offset) if local[-1].any() else None
        prev_stop = stop
        offset += k
    if offset == 0:
        return out
    part_sizes = np.concatenate(sizes)
    part_lo, part_hi = np.concatenate(lo), np.concatenate(hi)
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
    # Parts are nodes 0..offset-1 (global id - 1); touching parts are joined.
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0] - 1, pairs[:, 1] - 1)), shape=(offset, offset))
    n, cc = connected_components(graph, directed=False)
    # Number components by their first part: parts are numbered slab by slab and, within a slab, in the
    # order of their first voxel, so this is the order of each component's first voxel in the volume.
    first = np.full(n, offset, dtype=np.int64)
    np.minimum.at(first, cc, np.arange(offset))
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n)
    comp = rank[cc]  # 0-based component of each part
    out.part_component = np.concatenate([[0], comp + 1])
    out.sizes = np.bincount(comp, weights=part_sizes, minlength=n).astype(np.int64)
    out.lo = np.full((n, 3), np.iinfo(np.int64).max, dtype=np.int64)
    out.hi = np.zeros((n, 3), dtype=np.int64)
    for axis in range(3):
        np.minimum.at(out.lo[:, axis], comp, part_lo[:, axis])
        np.maximum.at(out.hi[:, axis], comp, part_hi[:, axis])
    return out
