"""Clean-up of a label map that the manifest asks for, shared by serving and the training script's evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from appliance.infer.components import find_components
from appliance.infer.labelmap import LabelMap


def keep_largest_component(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Zero every voxel of ``classes`` outside the largest 3D connected component of their union.

    An organ is one piece; islands elsewhere (a spleen tip, bowel wall) are false positives, and a lesion
    belongs to the organ it sits in, so it shares the organ's component.
    """
    mask = np.isin(labels, list(classes))
    if not mask.any():
        return labels
    comp, n = ndimage.label(mask)
    if n <= 1:
        return labels
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    out = labels.copy()
    out[mask & (comp != int(sizes.argmax()))] = 0
    return out


def keep_largest_component_map(labels: LabelMap, classes: Sequence[int], slab_slices: int) -> None:
    """:func:`keep_largest_component` on a compact label map, in place, ``slab_slices`` slices at a time.

    Same voxels kept as the whole-volume function (components are found slab by slab and joined across
    slab boundaries, numbered as ``ndimage.label`` numbers them, so ties go the same way), without the
    whole-volume int32 component map: memory is one slab's window.
    """
    comps = find_components(labels, classes, slab_slices, full=False)
    if comps.count <= 1:
        return
    keep = int(comps.sizes.argmax()) + 1  # the first of equal largest, as sizes.argmax() on the whole volume
    # Only slabs with a part outside the kept component change.
    touched = [s for s in comps.slabs if (comps.part_component[s.offset + 1 : s.offset + s.count + 1] != keep).any()]
    for slab, comp in comps.labelled(labels, touched):
        labels.zero_where(slab.start, (comp == 0) | (comp == keep), slab.box)
