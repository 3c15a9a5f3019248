"""The panel's slice scroller: any slice of a received series as a PNG, with the AI label overlay, on demand.

The technician scrolls a series to check what the model outlined, so every slice must come back well under
300 ms, from a waitress thread pool, while the box keeps receiving and inferring. Hence:

* the order of the slices is worked out once per series from the headers alone (never the pixels) and kept
  in memory until the series' instance count in the index changes (a late instance re-opens the series);
* a render decodes exactly one frame of one file, after its header passed the size bounds: a hostile or
  broken file is a :class:`SliceUnreadable`, never a crash and never a gigabyte allocation;
* a job's ``labelmap.npz`` is read once per result directory, slice by slice, and kept as each slice's
  bounding-box crop (most of a label volume is zeros), so neither loading nor keeping it costs the dense
  volume;
* every PNG made is written atomically to a bounded disk cache, keyed by everything that changes what it
  shows (series, instance count, the slice file itself, window, result files), so a re-scroll is a file read.

The panel may not import the results stage (``tests/test_layers.py``), so the CT windowing and the overlay
colours that :mod:`appliance.results.keyimage` uses are restated here: same organ green and lesion red.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut
from pydicom.pixels import pixel_array as _pixel_array
from pydicom.uid import UID

from appliance.dicomio import frame_bytes, read_header
from appliance.errors import ApplianceError
from appliance.fsio import unlink_quietly, write_atomic
from appliance.infer.measure import SummaryFormatError
from appliance.infer.summary import SUMMARY_FILE, Summary
from appliance.store.browse import Browse
from appliance.store.index import Index
from appliance.store.spool import check_uid

log = logging.getLogger("appliance.panel")

#: Where the receiver's spool lives under the data directory: instance rows' ``path`` is relative to it
#: (``Store.open`` makes ``Spool(data_dir / "spool")``; the worker reads ``spool.root / row["path"]``).
SPOOL_DIR = "spool"
LABELMAP_FILE = "labelmap.npz"

#: CT windows (width, level) in HU. Liver is narrow and high for contrast-enhanced (portal venous) CT, where
#: liver enhances to ~100 HU and lesions stand out darker or brighter; the others are the usual reading ones.
WINDOWS: dict[str, tuple[float, float]] = {
    "liver": (150.0, 90.0),
    "abdomen": (400.0, 50.0),
    "bone": (1800.0, 400.0),
    "lung": (1500.0, -600.0),
}
#: Larger images are refused before decoding: 4096 x 4096 is a mammogram; a CT slice is 512 x 512.
MAX_SIDE = 4096
#: A Deflated file is inflated whole to show its first frame: at most this much decoded pixel data.
MAX_DEFLATED_BYTES = 64 * 1024 * 1024
#: The most slices a label map may claim (a whole-body thin-slice CT has ~3,000).
MAX_LABEL_SLICES = 10_000
#: Fill opacity of a label; the outline is opaque.
FILL_ALPHA = 0.35
#: Outline thickness in pixels, inside the structure (as the key image draws it).
OUTLINE_PX = 2
#: The key image's colours (results/keyimage.py): organs green first, lesions red first.
ORGAN_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 220, 0),
    (0, 200, 255),
    (255, 140, 0),
    (80, 120, 255),
    (200, 80, 255),
)
LESION_COLOURS: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (255, 255, 0), (255, 0, 255))
#: Without a readable summary: the demo model's convention (1 liver, 2 lesion), then a fixed cycle.
FALLBACK_COLOURS: dict[int, tuple[int, int, int]] = {1: ORGAN_COLOURS[0], 2: LESION_COLOURS[0]}
_CYCLE = ORGAN_COLOURS[1:] + LESION_COLOURS[1:]
#: PNG zlib level: 1 encodes a 512 x 512 RGB slice several times faster than the default 6, ~20% larger.
PNG_COMPRESS_LEVEL = 1
#: Bumped when the rendering changes, so PNGs cached by an older version are never served.
RENDER_VERSION = 1
_MIB = 1024 * 1024


class SliceError(ApplianceError):
    """Base of what :class:`SliceRenderer` raises about a slice; the message is fit for the technician."""


class SliceNotFound(SliceError, LookupError):
    """No such series, no such slice index, or its file is gone (purged): the panel answers 404."""


class SliceUnreadable(SliceError, ValueError):
    """The slice's file (or the job's label map) cannot be decoded within the bounds: the panel answers 422."""


@dataclass(frozen=True)
class SliceStack:
    """One series' image instances in display order (along the slice normal, feet to head for axial CT:
    the order inference numbers its label map slices in, so a lesion's ``slice_index`` is a scroller position).

    ``errors[i]`` is why slice ``i``'s header could not be read (such slices come last, in arrival order, and
    render as :class:`SliceUnreadable`); ``None`` for a readable one.
    """

    series_uid: str
    #: The series' instance count in the index when the stack was built: a different count rebuilds it.
    instance_count: int
    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    errors: tuple[str | None, ...]
    #: "position" (ImagePositionPatient on the normal), "instance_number", or "arrival" (neither available).
    ordered_by: str

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True, eq=False)
class _LabelSlices:
    """A job's label map, kept sparse: per slice, None (no label) or (top row, left column, crop)."""

    shape: tuple[int, int, int]
    by_uid: dict[str, int]
    crops: tuple[tuple[int, int, np.ndarray] | None, ...]
    colours: dict[int, tuple[int, int, int]]
    #: Organ values first, lesions last: lesions are drawn on top. Each with the values its outline encloses.
    draw_order: tuple[tuple[int, tuple[int, ...]], ...]
    nbytes: int


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _LRU(Generic[K, V]):
    """Least-recently-used map bounded by entries and by bytes; not thread-safe (the renderer locks it)."""

    def __init__(self, max_items: int, max_bytes: int | None = None) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._d: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: K) -> V | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key: K, value: V, nbytes: int = 0) -> None:
        self.pop(key)
        self._d[key] = (value, nbytes)
        self._bytes += nbytes
        # The newest entry always stays, even alone over the byte bound: it is what is being shown.
        while len(self._d) > 1 and (
            len(self._d) > self.max_items or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            _, (_, n) = self._d.popitem(last=False)
            self._bytes -= n

    def pop(self, key: K) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self._bytes -= old[1]

    def __len__(self) -> int:
        return len(self._d)


def decode_frame(path: Path) -> tuple[np.ndarray, Dataset]:
    """The first frame of ``path`` as pydicom decodes it (YBR converted to RGB), and the file's header.

    Only one frame is read and decoded, and only after the header passed :func:`check_image`: pydicom's
    file-based :func:`pydicom.pixels.pixel_array` seeks to that frame. A Deflated file (rare; the whole data
    set is one zlib stream) is inflated whole, which the same bounds keep small. Raises
    :class:`SliceUnreadable` for anything pydicom or its decoders refuse.
    """
    try:
        header = read_header(path)
    except OSError as exc:
        if not path.exists():
            raise SliceNotFound(f"{path.name}: the file is gone (purged?)") from None
        raise SliceUnreadable(f"{path.name}: cannot read the file: {exc.strerror or exc}") from None
    except Exception as exc:  # pydicom raises many types for a damaged header
        raise SliceUnreadable(f"{path.name}: not a readable DICOM file: {exc}") from None
    check_image(header, path.name)
    ts = UID(str(header.file_meta.get("TransferSyntaxUID", "")))
    if ts.is_deflated and frame_bytes(header) > MAX_DEFLATED_BYTES:
        raise SliceUnreadable(
            f"{path.name}: a Deflated file whose pixel data would inflate to {frame_bytes(header)} bytes "
            f"(over {MAX_DEFLATED_BYTES}): only its first frame is shown, and that needs it all inflated"
        )
    try:
        if ts.is_deflated:
            ds = pydicom.dcmread(path)
            arr = _pixel_array(ds, index=0)
        else:
            arr = _pixel_array(path, index=0)
    except MemoryError:
        raise SliceUnreadable(f"{path.name}: its pixel data is too large to decode here") from None
    except Exception as exc:  # missing plugin, damaged stream, lying header: all one answer to the panel
        raise SliceUnreadable(f"{path.name}: cannot decode its pixel data ({ts.name or ts}): {exc}") from None
    return arr, header


#: Address space of a decoding child: a decoder that a hostile file drives past it fails there (MemoryError).
DECODER_MEMORY_BYTES = 4 * 1024**3


def _limit_decoder() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (DECODER_MEMORY_BYTES, DECODER_MEMORY_BYTES))
        os.nice(5)
    except (ImportError, OSError, ValueError):  # not Linux, or a tighter limit already: keep it
        pass


class IsolatedDecoder:
    """:func:`decode_frame` in child processes. The panel runs inside the supervisor, and the compiled
    decoders (libjpeg, OpenJPEG, CharLS) are the one place where a hostile file could crash a process
    rather than raise: here it costs that slice (:class:`SliceUnreadable`) and a fresh child, not the box.
    A decode that hangs is given up after ``timeout`` seconds the same way."""

    def __init__(
        self,
        target: Callable[[Path], tuple[np.ndarray, Dataset]] = decode_frame,
        *,
        workers: int = 2,
        timeout: float = 20.0,
    ) -> None:
        self.target = target
        self.workers = workers
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_limit_decoder
                )
            return self._pool

    def _drop(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # a hung child must not linger
            if proc.is_alive():
                proc.kill()

    def __call__(self, path: Path) -> tuple[np.ndarray, Dataset]:
        pool = self._get()
        try:
            return pool.submit(self.target, path).result(timeout=self.timeout)
        except BrokenProcessPool:
            self._drop(pool)
            log.error("panel: the image decoder died on %s (a damaged or hostile file?); started a new one", path)
            raise SliceUnreadable(f"{path.name}: the image decoder failed on this file") from None
        except FutureTimeout:
            self._drop(pool)
            raise SliceUnreadable(f"{path.name}: decoding took longer than {self.timeout:g} s") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def check_image(ds: Dataset, where: str) -> None:
    """Refuse, before anything is decoded, what is not one image of at most ``MAX_SIDE`` pixels a side."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise SliceUnreadable(f"{where}: its image pixel attributes are not numbers ({exc})") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise SliceUnreadable(f"{where}: not an image (no Rows/Columns)")
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise SliceUnreadable(f"{where}: {rows}x{cols} pixels, outside 1..{MAX_SIDE} a side")
    if samples not in (1, 3) or bits not in (1, 8, 16, 32) or frames < 1:
        raise SliceUnreadable(
            f"{where}: unsupported pixel layout (SamplesPerPixel {samples}, BitsAllocated {bits}, frames {frames})"
        )


def _float(ds: Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, (MultiValue, list, tuple)):
            value = value[0]  # a multi-valued window: its first
        out = float(value)
    except (TypeError, ValueError, IndexError):
        return default
    return out if np.isfinite(out) else default


def _rescale(ds: Dataset) -> tuple[float, float]:
    """Slope and intercept: top level, else the enhanced multi-frame shared functional group."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return _float(ds, "RescaleSlope", 1.0) or 1.0, _float(ds, "RescaleIntercept", 0.0)
    try:
        item = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        return _float(item, "RescaleSlope", 1.0) or 1.0, _float(item, "RescaleIntercept", 0.0)
    except (AttributeError, IndexError, KeyError, TypeError):
        return 1.0, 0.0


def window_to_grey(values: np.ndarray, width: float, level: float) -> np.ndarray:
    """``values`` through a linear window (as keyimage's ``_window``: level - width/2 black, + width/2 white)."""
    lo = level - width / 2.0
    scaled = (values.astype(np.float32, copy=False) - np.float32(lo)) * np.float32(255.0 / max(width, 1e-6))
    return np.clip(scaled + 0.5, 0.0, 255.0).astype(np.uint8)


def to_rgb(frame: np.ndarray, ds: Dataset, window: str) -> np.ndarray:
    """A decoded frame as (rows, cols, 3) uint8.

    CT: rescaled to HU and shown in the ``window`` preset. Other grey images have no HU, so the preset means
    nothing there: their own first VOI window is used, else their value range. Colour images as they are.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if frame.ndim == 3 and frame.shape[-1] == 3:
        return _to_uint8(frame, ds)
    if photometric == "PALETTE COLOR":
        try:
            coloured = apply_color_lut(frame, ds)
            return _to_uint8(coloured, ds, bits=8 * coloured.dtype.itemsize)  # the LUT's own depth
        except Exception:  # a damaged LUT: show the indices as grey rather than nothing
            log.debug("palette lookup failed; shown as grey", exc_info=True)
    if frame.ndim != 2:
        raise SliceUnreadable(f"decoded pixel data has shape {frame.shape}, not one image")
    slope, intercept = _rescale(ds)
    values = frame.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    if str(ds.get("Modality", "")).upper() == "CT":
        width, level = WINDOWS[window]
    elif "WindowWidth" in ds and _float(ds, "WindowWidth", 0.0) > 0:
        width, level = _float(ds, "WindowWidth", 1.0), _float(ds, "WindowCenter", 0.0)
    else:
        lo, hi = float(values.min()), float(values.max())
        width, level = max(hi - lo, 1.0), (hi + lo) / 2.0
    grey = window_to_grey(values, width, level)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[:, :, None], 3, axis=2)


def _to_uint8(rgb: np.ndarray, ds: Dataset, bits: int | None = None) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    stored = bits or int(ds.get("BitsStored", 8) or 8)
    shift = max(0, stored - 8)
    return np.clip(rgb.astype(np.int64) >> shift, 0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-connected erosion with everything outside the array counted as background (scipy's border 0)."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def blend_labels(rgb: np.ndarray, labels: _LabelSlices, k: int) -> None:
    """Draw slice ``k``'s labels onto ``rgb`` in place: a translucent fill and an opaque inner outline."""
    crop = labels.crops[k]
    if crop is None:
        return
    r0, c0, lab = crop
    view = rgb[r0 : r0 + lab.shape[0], c0 : c0 + lab.shape[1]]
    present = set(np.unique(lab).tolist()) - {0}
    for value in present:  # fills first, so no fill covers another label's outline
        colour = np.array(labels.colours.get(value, _cycle(value)), dtype=np.float32)
        m = lab == value
        view[m] = (view[m].astype(np.float32) * (1.0 - FILL_ALPHA) + colour * FILL_ALPHA + 0.5).astype(np.uint8)
    for value, enclosed in labels.draw_order:
        if value not in present and not present.intersection(enclosed):
            continue
        mask = np.isin(lab, (value, *enclosed))
        inner = mask
        for _ in range(OUTLINE_PX):
            inner = _erode(inner)
        view[mask & ~inner] = labels.colours.get(value, _cycle(value))


def _cycle(value: int) -> tuple[int, int, int]:
    return FALLBACK_COLOURS.get(value, _CYCLE[value % len(_CYCLE)])


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _label_colours(
    summary: Summary | None, values: set[int]
) -> tuple[dict[int, tuple[int, int, int]], list[tuple[int, tuple[int, ...]]]]:
    """Colours and drawing order from the summary: its organs are the labels that are not lesions (and list
    the lesion labels inside them), so lesion values are the rest. Without a summary, fixed colours."""
    if summary is None:
        fallback = sorted(values, key=lambda v: (FALLBACK_COLOURS.get(v) in LESION_COLOURS, v))
        return {v: _cycle(v) for v in values}, [(v, ()) for v in fallback]
    m = summary.measurements
    organs = [o.labels for o in m.organs if o.labels]
    organ_values = [o[0] for o in organs]
    lesion_values = [lv.value for lv in m.labels if lv.value not in organ_values]
    lesion_values += sorted({les.label for les in m.lesions} - set(lesion_values) - set(organ_values))
    colours: dict[int, tuple[int, int, int]] = {}
    for i, v in enumerate(organ_values):
        colours[v] = ORGAN_COLOURS[i % len(ORGAN_COLOURS)]
    for i, v in enumerate(lesion_values):
        colours[v] = LESION_COLOURS[i % len(LESION_COLOURS)]
    unnamed = sorted(values - set(colours))  # in the label map, not in the summary: still shown
    for v in unnamed:
        colours[v] = _cycle(v)
    # Organs (outlined around the lesions they hold) first, lesions last: drawn on top.
    order: list[tuple[int, tuple[int, ...]]] = [(o[0], tuple(o[1:])) for o in organs]
    order += [(v, ()) for v in unnamed]
    order += [(v, ()) for v in lesion_values]
    return colours, order


def load_labelmap(result_dir: Path) -> _LabelSlices | None:
    """``labelmap.npz`` of a result directory, read slice by slice into crops; None when there is none.

    The archive is the one :func:`appliance.infer.pipeline.labelmap_npz` writes (``labels`` uint8 (slices,
    rows, cols) in the order of ``sop_instance_uids``); anything else is a :class:`SliceUnreadable`.
    """
    path = result_dir / LABELMAP_FILE
    if not path.is_file():
        return None
    where = f"label map {path.parent.name}/{path.name}"
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open("sop_instance_uids.npy") as f:
                uids = np.lib.format.read_array(f, allow_pickle=False)
            with zf.open("labels.npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                if dtype != np.dtype(np.uint8) or fortran or len(shape) != 3:
                    raise ValueError(f"labels are {dtype} {shape}, not uint8 (slices, rows, cols)")
                n, rows, cols = (int(v) for v in shape)
                if not (0 <= n <= MAX_LABEL_SLICES and 0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
                    raise ValueError(f"labels of shape {shape} are outside the bounds")
                if uids.ndim != 1 or len(uids) != n or uids.dtype.kind != "U":
                    raise ValueError(f"{len(uids)} SOP Instance UIDs for {n} label slices")
                crops: list[tuple[int, int, np.ndarray] | None] = []
                values: set[int] = set()
                nbytes = 0
                for _ in range(n):
                    raw = f.read(rows * cols)
                    if len(raw) != rows * cols:
                        raise ValueError("the labels end early")
                    sl = np.frombuffer(raw, dtype=np.uint8).reshape(rows, cols)
                    any_r, any_c = sl.any(axis=1), sl.any(axis=0)
                    if not any_r.any():
                        crops.append(None)
                        continue
                    r = np.flatnonzero(any_r)
                    c = np.flatnonzero(any_c)
                    crop = sl[r[0] : r[-1] + 1, c[0] : c[-1] + 1].copy()
                    values.update(np.unique(crop).tolist())
                    crops.append((int(r[0]), int(c[0]), crop))
                    nbytes += crop.nbytes
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise SliceUnreadable(f"{where} cannot be read: {exc}") from None
    values.discard(0)
    summary: Summary | None = None
    summary_path = result_dir / SUMMARY_FILE
    if summary_path.is_file():
        try:
            summary = Summary.read(summary_path)
        except SummaryFormatError as exc:
            log.warning("%s: fixed overlay colours: %s", summary_path, exc)
    colours, order = _label_colours(summary, values)
    return _LabelSlices(
        shape=(n, rows, cols),
        by_uid={str(u): i for i, u in enumerate(uids.tolist())},
        crops=tuple(crops),
        colours=colours,
        draw_order=tuple(order),
        nbytes=nbytes + 200 * n,
    )


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class SliceRenderer:
    """Slices of stored series as PNGs with an optional label overlay, cached in memory and on disk.

    Thread-safe: one lock guards the caches and is never held while reading or decoding; work for one key is
    done once (a second thread asking for the same series or label map waits for the first's result), so
    the scroller's burst of requests on a cold series scans its headers once, not once per thread.
    """

    def __init__(
        self,
        data_dir: Path,
        index: Index,
        cache_dir: Path,
        max_cache_bytes: int = 256 * _MIB,
        *,
        max_series: int = 32,
        max_labelmap_bytes: int = 256 * _MIB,
        decoder: Callable[[Path], tuple[np.ndarray, Dataset]] | None = None,
    ) -> None:
        self.decoder = decoder  # IsolatedDecoder() in the panel; in-process where nothing else is at stake
        self.data_dir = Path(data_dir).absolute()
        self.spool_root = self.data_dir / SPOOL_DIR
        self.index = index
        self.cache_dir = Path(cache_dir)
        self.max_cache_bytes = int(max_cache_bytes)
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}
        self._stacks: _LRU[str, SliceStack] = _LRU(max_series)
        self._labelmaps: _LRU[tuple[str, tuple[int, int, int] | None, tuple[int, int, int] | None], _LabelSlices] = (
            _LRU(8, max_labelmap_bytes)
        )
        self._disk_bytes: int | None = None  # unknown until the first write scans the cache directory

    # -- public -------------------------------------------------------------------------------------

    def slices(self, series_uid: str) -> SliceStack:
        """The series' image instances in display order; :class:`SliceNotFound` for an unknown series."""
        uid, count = self._series_count(series_uid)
        with self._lock:
            stack = self._stacks.get(uid)
        if stack is not None and stack.instance_count == count:
            return stack
        return self._once(("stack", uid, count), lambda: self._fresh_stack(uid, count))

    def count(self, series_uid: str) -> int:
        """How many slices the scroller has (``len(slices(series_uid))``)."""
        return len(self.slices(series_uid))

    def render(self, series_uid: str, index: int, *, job_result_dir: str | None, window: str = "liver") -> bytes:
        """Slice ``index`` (display order) as PNG bytes, with ``job_result_dir``'s labels over it if given.

        ``job_result_dir`` is a job's ``result_dir`` column (relative to the data directory). ``window`` is a
        :data:`WINDOWS` name (CT only; other images use their own window). Raises :class:`SliceNotFound`
        (unknown series, index out of range, file purged) or :class:`SliceUnreadable` (undecodable file or
        label map); ``ValueError`` for an unknown window name.
        """
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; one of {', '.join(WINDOWS)}")
        stack = self.slices(series_uid)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(stack):
            raise SliceNotFound(
                f"series {stack.series_uid} has {len(stack)} slice(s); there is no slice {index!r}"
                + (f" (0 to {len(stack) - 1})" if len(stack) else "")
            )
        if stack.errors[index] is not None:
            raise SliceUnreadable(f"slice {index} of series {stack.series_uid}: {stack.errors[index]}")
        path = stack.paths[index]
        file_id = _stat_key(path)
        if file_id is None:
            raise SliceNotFound(f"slice {index} of series {stack.series_uid}: its file is gone (purged?)")
        result = self._result_dir(job_result_dir)
        lm_id = _stat_key(result / LABELMAP_FILE) if result is not None else None
        sum_id = _stat_key(result / SUMMARY_FILE) if result is not None else None
        key = "|".join(
            str(p)
            for p in (
                RENDER_VERSION,
                stack.series_uid,
                stack.instance_count,
                index,
                window,
                file_id,
                job_result_dir or "",
                lm_id,
                sum_id,
            )
        )
        # one folder per series, so retention deletes a purged series' renders with it (store.SLICE_CACHE_DIR)
        cached = self.cache_dir / stack.series_uid / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.png"
        png = self._read_cached(cached)
        if png is not None:
            return png
        frame, header = (self.decoder or decode_frame)(path)
        where = f"slice {index} of series {stack.series_uid}"
        try:
            rgb = to_rgb(frame, header, window)
        except SliceError:
            raise
        except Exception as exc:  # a header whose numbers make no sense with its pixels
            raise SliceUnreadable(f"{where}: cannot be shown: {exc}") from None
        del frame
        if result is not None and lm_id is not None:
            labels = self._labelmap(result, lm_id, sum_id)
            k = labels.by_uid.get(stack.sop_instance_uids[index]) if labels is not None else None
            if labels is not None and k is not None:
                if labels.shape[1:] == rgb.shape[:2]:
                    blend_labels(rgb, labels, k)
                else:
                    log.warning(
                        "%s: label map %s is %dx%d, the image %dx%d: no overlay",
                        where,
                        job_result_dir,
                        labels.shape[1],
                        labels.shape[2],
                        rgb.shape[0],
                        rgb.shape[1],
                    )
        png = encode_png(rgb)
        self._write_cached(cached, png)
        return png

    # -- series order -------------------------------------------------------------------------------

    def _series_count(self, series_uid: str) -> tuple[str, int]:
        try:
            uid = check_uid(series_uid, "Series Instance UID")
        except ApplianceError:
            raise SliceNotFound(f"no series {str(series_uid)[:80]!r}") from None
        row = Browse(self.index).series(uid)
        if row is None:
            with self._lock:
                self._stacks.pop(uid)
            raise SliceNotFound(f"no series {uid} in the store")
        return uid, int(row["instances"] or 0)

    def _fresh_stack(self, uid: str, count: int) -> SliceStack:
        with self._lock:
            stack = self._stacks.get(uid)
        if stack is not None and stack.instance_count == count:
            return stack  # built by the thread this one waited for
        stack = order_series(uid, count, self.spool_root, self.index.series_instances(uid))
        with self._lock:
            self._stacks.put(uid, stack)
        return stack

    # -- label maps ---------------------------------------------------------------------------------

    def _result_dir(self, job_result_dir: str | None) -> Path | None:
        if not job_result_dir:
            return None
        d = (self.data_dir / job_result_dir).resolve()
        if not d.is_relative_to(self.data_dir.resolve()):
            raise SliceNotFound(f"result directory {job_result_dir!r} is not under the data directory")
        return d

    def _labelmap(
        self, result: Path, lm_id: tuple[int, int, int], sum_id: tuple[int, int, int] | None
    ) -> _LabelSlices | None:
        key = (str(result), lm_id, sum_id)
        with self._lock:
            hit = self._labelmaps.get(key)
        if hit is not None:
            return hit

        def build() -> _LabelSlices | None:
            with self._lock:
                again = self._labelmaps.get(key)
            if again is not None:
                return again
            lm = load_labelmap(result)
            if lm is not None:
                with self._lock:
                    self._labelmaps.put(key, lm, lm.nbytes)
            return lm

        return self._once(("labels", *key), build)

    # -- single flight ------------------------------------------------------------------------------

    def _once(self, key: Hashable, build: Callable[[], V]) -> V:
        """Run ``build`` for ``key`` in one thread at a time; ``build`` first looks whether a thread it
        waited for has already cached the result."""
        with self._lock:
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            try:
                return build()
            finally:
                with self._lock:
                    if self._building.get(key) is lock:
                        del self._building[key]

    # -- disk cache ---------------------------------------------------------------------------------

    def _read_cached(self, path: Path) -> bytes | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            os.utime(path)  # recently used: eviction takes the oldest
        except OSError:
            pass
        return data

    def _write_cached(self, path: Path, png: bytes) -> None:
        """Keep ``png``; a cache that cannot be written (disk full, read-only) costs speed, not the answer."""
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            write_atomic(path, png)
        except OSError as exc:
            log.warning("slice cache %s not written: %s", self.cache_dir, exc.strerror or exc)
            return
        with self._lock:
            if self._disk_bytes is not None:
                self._disk_bytes += len(png)
            over = self._disk_bytes is None or self._disk_bytes > self.max_cache_bytes
        if over:
            self._evict()

    def _evict(self) -> None:
        """Delete the least recently used files until the cache is at 80% of its bound (so eviction runs
        once per many writes, not on each)."""
        entries: list[tuple[int, int, str]] = []
        try:
            with os.scandir(self.cache_dir) as top:
                folders = [e.path for e in top if e.is_dir(follow_symlinks=False)]
            for folder in folders:
                with os.scandir(folder) as it:
                    for e in it:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if e.is_file(follow_symlinks=False):
                            entries.append((st.st_mtime_ns, st.st_size, e.path))
        except OSError as exc:
            log.warning("slice cache %s cannot be listed: %s", self.cache_dir, exc.strerror or exc)
            return
        total = sum(size for _, size, _ in entries)
        if total > self.max_cache_bytes:
            target = int(self.max_cache_bytes * 0.8)
            for _, size, p in sorted(entries):
                if total <= target:
                    break
                unlink_quietly(p)
                total -= size
        with self._lock:
            self._disk_bytes = total


def order_series(series_uid: str, count: int, spool_root: Path, rows: Sequence[Mapping[str, Any]]) -> SliceStack:
    """Order a series' instance rows for display from their headers (no pixel data is read).

    Along the first slice's normal (ImagePositionPatient projected on the cross product of the
    ImageOrientationPatient directions) when every image has both; else by InstanceNumber; else as
    received. Instances without Rows (not images) are left out; unreadable headers go last.
    """
    good: list[tuple[Path, str, Dataset]] = []
    bad: list[tuple[Path, str, str]] = []
    for r in rows:
        path = spool_root / str(r["path"])
        sop = str(r["sop_instance_uid"])
        try:
            ds = read_header(path)
        except Exception as exc:  # any damage: the slice stays in the scroller and renders as unreadable
            bad.append((path, sop, f"{path.name}: not a readable DICOM header: {exc}"))
            continue
        if "Rows" not in ds:
            continue
        good.append((path, sop, ds))
    ordered_by = "position"
    keys: list[float] = []
    normal: np.ndarray | None = None
    for _, _, ds in good:
        try:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            if normal is None:
                iop = [float(v) for v in ds.ImageOrientationPatient]
                normal = np.cross(iop[:3], iop[3:6])
                if not 0.5 < float(np.linalg.norm(normal)) < 1.5:
                    raise ValueError("orientation is not two unit directions")
            if len(ipp) != 3 or not np.isfinite(ipp).all():
                raise ValueError("ImagePositionPatient is not 3 numbers")
            keys.append(float(np.dot(normal, ipp)))
        except (AttributeError, TypeError, ValueError, IndexError):
            ordered_by = "instance_number"
            break
    if ordered_by == "instance_number":
        try:
            keys = [float(int(ds.InstanceNumber)) for _, _, ds in good]
        except (AttributeError, TypeError, ValueError):
            ordered_by, keys = "arrival", [float(i) for i in range(len(good))]
    order = sorted(range(len(good)), key=lambda i: (keys[i], i)) if ordered_by != "arrival" else range(len(good))
    paths = [good[i][0] for i in order] + [b[0] for b in bad]
    uids = [good[i][1] for i in order] + [b[1] for b in bad]
    errors: list[str | None] = [None] * len(good) + [b[2] for b in bad]
    return SliceStack(
        series_uid=series_uid,
        instance_count=count,
        paths=tuple(paths),
        sop_instance_uids=tuple(uids),
        errors=tuple(errors),
        ordered_by=ordered_by,
    )
