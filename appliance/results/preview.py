"""PNG previews for the panel: the key image as the SC shows it, and a thumbnail for job lists.

The panel must not decode DICOM to show a result (it reads files, never another stage's memory), so the
key image's RGB pixels are saved as PNG next to the DICOM objects, each file written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.fsio import write_atomic

KEY_PNG = "key.png"
THUMB_PNG = "thumb.png"
#: Longest side of the thumbnail in pixels.
THUMB_MAX = 256


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def thumbnail(rgb: np.ndarray, max_side: int = THUMB_MAX) -> np.ndarray:
    """``rgb`` scaled down (never up) so its longest side is at most ``max_side``, aspect kept."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(img)


def write_previews(rgb: np.ndarray, out_dir: Path) -> list[str]:
    """Write ``key.png`` and ``thumb.png`` into ``out_dir`` (the caller fsyncs the directory)."""
    write_atomic(out_dir / KEY_PNG, png_bytes(rgb))
    write_atomic(out_dir / THUMB_PNG, png_bytes(thumbnail(rgb)))
    return [KEY_PNG, THUMB_PNG]
