"""Clean-up of a label map that the manifest asks for, shared by serving and the training script's evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


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
