"""Measurements from a label map: what a radiologist reads in the summary and the SR.

Volumes are voxel counts times the voxel volume (pixel spacing x distance between slice centres).
Lesions are the 3D connected parts of each lesion-type label; each gets its volume and its longest axial
diameter, measured edge to edge on the slice where it is longest (as RECIST measures on axial images).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from appliance.models.manifest import Label

#: SNOMED CT "Morphologically Altered Structure": labels of this category are counted as lesions.
LESION_CATEGORY = "49755003"


def _longest_in_plane(mask2d: np.ndarray, spacing: tuple[float, float]) -> float:
    """Longest edge-to-edge distance (mm) across a 2D mask, from the corners of its boundary pixels."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return 0.0
    # The convex hull's extreme points suffice: for each row keep the leftmost and rightmost pixel.
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
    ends = np.r_[starts[1:] - 1, rows.size - 1]
    er = np.concatenate([rows[starts], rows[ends]])
    ec = np.concatenate([cols[starts], cols[ends]])
    # Pixel corners: (r, c), (r+1, c), (r, c+1), (r+1, c+1), in mm.
    cr = np.concatenate([er, er + 1, er, er + 1]) * spacing[0]
    cc = np.concatenate([ec, ec, ec + 1, ec + 1]) * spacing[1]
    pts = np.stack([cr, cc], axis=1).astype(np.float64)
    if len(pts) > 400:  # only hull vertices can be the farthest pair
        from scipy.spatial import ConvexHull

        pts = pts[ConvexHull(pts).vertices]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    return float(d.max())


def measure(labels: np.ndarray, label_defs: list[Label], pixel_spacing: tuple[float, float],
            slice_spacing: float, sop_instance_uids: list[str]) -> dict[str, Any]:
    voxel_ml = pixel_spacing[0] * pixel_spacing[1] * slice_spacing / 1000.0
    counts = np.bincount(labels.ravel(), minlength=256)
    out_labels = []
    lesions = []
    for lab in label_defs:
        n = int(counts[lab.value])
        out_labels.append({"value": lab.value, "name": lab.name, "voxels": n, "volume_ml": round(n * voxel_ml, 3)})
        if lab.category.code != LESION_CATEGORY or n == 0:
            continue
        comp, k = ndimage.label(labels == lab.value, structure=np.ones((3, 3, 3), bool))
        objects = ndimage.find_objects(comp)
        sizes = np.bincount(comp.ravel(), minlength=k + 1)
        for i, sl in enumerate(objects, start=1):
            sub = comp[sl] == i
            best, best_z = 0.0, sl[0].start
            for dz in range(sub.shape[0]):
                if sub[dz].any():
                    d = _longest_in_plane(sub[dz], pixel_spacing)
                    if d > best:
                        best, best_z = d, sl[0].start + dz
            zc, rc, cc = ndimage.center_of_mass(sub)
            lesions.append({
                "label": lab.value,
                "volume_ml": round(int(sizes[i]) * voxel_ml, 3),
                "longest_axial_diameter_mm": round(best, 1),
                "slice_index": int(best_z),
                "slice_sop_instance_uid": sop_instance_uids[best_z],
                "centroid_voxel": [round(zc + sl[0].start, 1), round(rc + sl[1].start, 1), round(cc + sl[2].start, 1)],
            })
    lesions.sort(key=lambda d: -d["volume_ml"])
    for i, les in enumerate(lesions, start=1):
        les["index"] = i
    lesion_values = {lab.value for lab in label_defs if lab.category.code == LESION_CATEGORY}
    organ_values = {lab.value for lab in label_defs} - lesion_values
    organs = []
    # An organ's volume includes the lesions inside it (a liver volume with its metastases cut out is not
    # what a clinician means by liver volume); the label's own volume stays in "labels".
    for lab in label_defs:
        if lab.value in organ_values:
            inside = [d.value for d in label_defs if d.region is not None and d.region.code == lab.type.code]
            n = int(counts[lab.value] + sum(int(counts[v]) for v in inside))
            organs.append({"name": lab.name, "labels": [lab.value, *inside], "voxels": n,
                           "volume_ml": round(n * voxel_ml, 3)})
    return {
        "voxel_volume_ml": voxel_ml,
        "labels": out_labels,
        "organs": organs,
        "lesions": {
            "count": len(lesions),
            "total_volume_ml": round(sum(d["volume_ml"] for d in lesions), 3),
            "largest_diameter_mm": max((d["longest_axial_diameter_mm"] for d in lesions), default=0.0),
            "items": lesions,
        },
    }
