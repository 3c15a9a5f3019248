"""One series through one model: the code path shared by the worker and ``appliance infer``.

header scan -> per slab of slices: decode + preprocess (the next slab, on threads, while this one is
predicted) -> infer (batches) -> scores back to the source grid, argmax, compact labels (on a thread, while
the next batch is predicted) -> clean-up (largest component) -> measure. Each stage's wall time is recorded; the
worker stores them with the job. Slabs keep the peak memory at ``[inference] memory_budget_mb`` whatever the
series length (a 3,000-slice series decoded whole would be 3 GB of HU alone).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import InferenceError
from appliance.fsio import write_atomic
from appliance.infer.backends import Backend
from appliance.infer.labelmap import LabelMap
from appliance.infer.measure import lesion_values, measure
from appliance.infer.postprocess import keep_largest_component_map
from appliance.infer.preprocess import (
    class_confidence,
    context_indices,
    model_grid,
    prepare_slices,
    scores_to_labels,
)
from appliance.infer.summary import SUMMARY_FILE, BackendInfo, ModelInfo, SeriesInfo, Summary
from appliance.infer.volume import Volume, scan_series
from appliance.models.package import ModelPackage

log = logging.getLogger("appliance.infer")

Progress = Callable[[str, int, int], None]


#: Slices per inference slab at most: beyond this a slab only costs memory (the context slices decoded
#: twice per slab boundary are already under 1 % of the work).
MAX_SLAB = 256
#: Bytes per voxel of a post-processing slab window (uint8 labels and mask, int32 components, lookups).
_POST_BYTES_PER_VOXEL = 12


@dataclass
class SeriesResult:
    labels: LabelMap | np.ndarray  # (slices, rows, cols) uint8, slices in geometric order; compact when run here
    volume: Volume
    summary: Summary
    timings: dict[str, float] = field(default_factory=dict)


def current_rss() -> int:
    """This process's resident memory in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: glibc mallopt parameter: allocations at least this big are mmapped (and so returned on free).
_M_MMAP_THRESHOLD = -3


def _libc() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): the allocator's defaults stay
        return None


def limit_heap_retention(threshold: int = 1 << 20) -> None:
    """Make glibc return big freed blocks to the system at once (process-wide; called by the worker and
    ``appliance infer`` at start).

    glibc raises its mmap threshold to the size of each big block freed (up to 32 MB), after which slab
    buffers (8-16 MB each) come from the heap and stay resident once freed: ~100 MB at 300 slices and
    more with the series. A fixed 1 MB threshold keeps them mmapped; the cost is a page fault per page
    of each new buffer, small against resampling it.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``) between stages."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_gc_paused = 0


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for one job (nested uses nest), a collection after it.

    A job creates ~100,000 objects (a header per slice, highdicom's per-frame items) and few cycles: the
    collector then runs a full collection or two in the middle of it, each traversing every object of
    the process (~0.15-0.25 s here); reference counting frees almost everything anyway. What cycles a job
    leaves are collected once, when the outermost pause ends: a collection of the youngest generation, which
    (no collection having run meanwhile) holds exactly what the job allocated and still exists, so it costs
    what the job left, not the whole process.
    """
    global _gc_paused
    was_enabled = gc.isenabled()
    _gc_paused += 1
    gc.disable()
    try:
        yield
    finally:
        _gc_paused -= 1
        if _gc_paused == 0 and was_enabled:
            gc.enable()
            gc.collect(0)


@dataclass(frozen=True)
class SlabPlan:
    """How a series is cut along z so that its peak memory follows the budget, not its length."""

    #: Slices predicted per inference slab (a multiple of the batch, so batches are the whole volume's).
    infer: int
    #: Slices per post-processing / measurement window.
    post: int


def plan_slabs(
    shape: tuple[int, int, int], padded: tuple[int, int], batch: int, memory_budget_mb: int, rss: int | None = None
) -> SlabPlan:
    """Slab sizes for a series of ``shape`` on a model grid of ``padded`` pixels.

    What the process already holds (interpreter, libraries, the opened model: ``rss``) is taken off the
    budget; half of the rest is for the slab working set, the other half for what does not shrink with the
    slab (the backend's activations, the compact label map, slice headers, the result objects).
    """
    n, rows, cols = shape
    held = current_rss() if rss is None else rss
    work = max(64 << 20, (int(memory_budget_mb) << 20) - held) // 2
    # Per predicted slice: its prepared model input (float32) and its dense labels until compacted.
    per_slice = padded[0] * padded[1] * 4 + rows * cols
    infer = max(batch, min(MAX_SLAB, work // max(1, per_slice)) // batch * batch)
    post = int(max(1, min(64, work // max(1, _POST_BYTES_PER_VOXEL * rows * cols))))
    return SlabPlan(infer=int(min(infer, max(batch, -(-n // batch) * batch))), post=post)


#: Slices per prepared slab at most when slabs are pipelined: the next slab is decoded and resampled on other
#: threads while the current one is predicted, so only the first (short) slab's preparation is on the job's
#: critical path. Large enough that per-slab costs stay negligible.
PIPELINE_SLAB = 64


def segment_volume(
    volume: Volume,
    package: ModelPackage,
    backend: Backend,
    progress: Progress | None = None,
    memory_budget_mb: int = 1024,
    plan: SlabPlan | None = None,
    confidence: LabelMap | None = None,
) -> tuple[LabelMap, dict[str, float]]:
    """Label map on the source grid, a slab of slices at a time; with ``confidence`` (a LabelMap of the
    volume's shape) also the model's probability of each lesion voxel's label, for the findings' confidence.

    Each slab's slices and their context neighbours (the manifest's channels) are decoded and resampled a
    few at a time (``prepare_slices``), predicted in the same batches as on the whole series, and kept as
    compact labels; HU and model input never exist for more than two slabs. The labels are exactly those
    of the whole series at once: every slice is resampled on its own and sees the same neighbours.

    Slabs are pipelined: while one slab is predicted, a thread prepares the next (decoding and numpy
    resampling release the GIL, as the backend's ``run`` does). A slab's context slices already prepared for
    the previous one are copied over, not decoded again. ``decode`` and ``preprocess`` in the timings are
    the time the job waited for them (the first slab, and any slab not ready when it was needed), split in
    proportion to the threads' reading and resampling. Likewise scores become labels on a thread while the
    next batch is predicted, and ``postprocess`` counts the waits for it. What ran during a forward pass is
    in ``infer``'s wall time, slowing it by what the model lost of the CPU (on a GPU backend: nothing).
    """
    spec = package.input_spec
    n, rows, cols = volume.shape
    grid = model_grid(rows, cols, volume.pixel_spacing, spec)
    batch = package.manifest.input.opt_batch
    plan = plan or plan_slabs(volume.shape, grid.padded, batch, memory_budget_mb)
    # Two slabs are prepared at once (the one predicted, the next): each half the plan's, at most PIPELINE_SLAB.
    step = max(batch, min(PIPELINE_SLAB, plan.infer // 2) // batch * batch)
    half = spec.channels // 2
    context = context_indices(n, spec.channels)
    labels = LabelMap((n, rows, cols))
    lesion_labels = lesion_values(package.labels)
    # The first slabs are short (two batches, then doubling): the first is prepared while nothing else
    # runs, each later one while the one before is predicted.
    bounds: list[tuple[int, int]] = []
    z0, size = 0, min(step, 2 * batch)
    while z0 < n:
        bounds.append((z0, min(n, z0 + size)))
        z0, size = z0 + size, min(step, 2 * size)
    # Prepared slices of slab i: [c0, c1), its slices and their context neighbours.
    spans = [(max(0, z0 - half), min(n, z1 + half)) for z0, z1 in bounds]

    def prepare(i: int, prev: np.ndarray | None) -> tuple[np.ndarray, float, float]:
        c0, c1 = spans[i]
        out = np.empty((c1 - c0, *grid.padded), dtype=np.float32)
        done = c0
        if prev is not None:  # the previous slab's prepared slices from c0 on (its last context ones)
            p0, p1 = spans[i - 1]
            done = min(p1, c1)
            if done > c0:
                out[: done - c0] = prev[c0 - p0 : done - p0]
            else:
                done = c0
        # The first slab on every core (nothing else runs yet); later ones on one thread, beside the forward
        # pass's own threads: more would only take turns with them.
        _, read_s, resample_s = prepare_slices(
            volume.read_hu, done, c1, grid, spec, out=out[done - c0 :], workers=None if i == 0 else 1
        )
        return out, read_s, resample_s

    def to_labels(
        scores: np.ndarray, start: int, stop: int, slab: np.ndarray, z0: int, conf_slab: np.ndarray | None
    ) -> None:
        if scores.ndim != 4 or scores.shape[0] != stop - start or scores.shape[2:] != grid.padded:
            raise InferenceError(
                f"model {package.name} returned scores of shape {scores.shape} for input "
                f"{(stop - start, spec.channels, *grid.padded)}"
            )
        scores_to_labels(scores, grid, out=slab[start - z0 : stop - z0])
        if conf_slab is not None:
            class_confidence(
                scores, grid, slab[start - z0 : stop - z0], lesion_labels, out=conf_slab[start - z0 : stop - z0]
            )

    t_read = t_prep = t_infer = t_post = 0.0
    # Scores become labels on a thread of their own while the next batch is predicted (one batch in flight:
    # the scores of at most two batches exist at once).
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as ahead,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="labels") as behind,
    ):
        pending: Future | None = ahead.submit(prepare, 0, None) if bounds else None
        for i, (z0, z1) in enumerate(bounds):
            c0 = spans[i][0]
            t = time.perf_counter()
            assert pending is not None  # submitted before the loop and at the end of each step
            prepared, read_s, resample_s = pending.result()
            wall = time.perf_counter() - t
            # The wait is split in proportion to what the threads did: reading and resampling run at once.
            share = read_s / (read_s + resample_s) if read_s + resample_s > 0 else 0.0
            t_read += wall * share
            t_prep += wall * (1.0 - share)
            pending = ahead.submit(prepare, i + 1, prepared) if i + 1 < len(bounds) else None
            if progress:
                progress("decode", z1, n)
            slab = np.empty((z1 - z0, rows, cols), dtype=np.uint8)
            conf_slab = np.empty((z1 - z0, rows, cols), dtype=np.uint8) if confidence is not None else None
            converting: Future | None = None
            for start in range(z0, z1, batch):
                stop = min(z1, start + batch)
                t = time.perf_counter()
                scores = backend.run(np.ascontiguousarray(prepared[context[start:stop] - c0]))
                t_infer += time.perf_counter() - t
                t = time.perf_counter()
                if converting is not None:
                    converting.result()
                converting = behind.submit(to_labels, scores, start, stop, slab, z0, conf_slab)
                del scores
                t_post += time.perf_counter() - t
                if progress:
                    progress("infer", stop, n)
            t = time.perf_counter()
            if converting is not None:
                converting.result()
            labels.set_slab(z0, slab)
            if confidence is not None and conf_slab is not None:
                confidence.set_slab(z0, conf_slab)
            t_post += time.perf_counter() - t
            del prepared, slab, conf_slab
    t = time.perf_counter()
    keep = package.manifest.postprocess.largest_component
    if keep:
        keep_largest_component_map(labels, keep, plan.post)
    timings = {
        "decode": t_read,
        "preprocess": t_prep,
        "infer": t_infer,
        "postprocess": t_post + time.perf_counter() - t,
    }
    log.debug(
        "series %s: %d slices in slabs of %d (post-processing %d); labels %.1f MB compact",
        volume.series_uid,
        n,
        step,
        plan.post,
        labels.nbytes / 1e6,
    )
    return labels, timings


def run_series(
    paths: Sequence[Path],
    package: ModelPackage,
    backend: Backend,
    progress: Progress | None = None,
    memory_budget_mb: int = 1024,
    plan: SlabPlan | None = None,
) -> SeriesResult:
    """Read the headers of ``paths`` (one series), then segment it slab by slab and measure the result.

    Peak memory follows ``memory_budget_mb`` (``[inference] memory_budget_mb``), not the series length.
    """
    with paused_gc():
        return _run_series(paths, package, backend, progress, memory_budget_mb, plan)


def _run_series(
    paths: Sequence[Path],
    package: ModelPackage,
    backend: Backend,
    progress: Progress | None,
    memory_budget_mb: int,
    plan: SlabPlan | None,
) -> SeriesResult:
    t = time.perf_counter()
    volume = scan_series(paths)
    t_scan = time.perf_counter() - t
    if plan is None:
        grid = model_grid(volume.shape[1], volume.shape[2], volume.pixel_spacing, package.input_spec)
        plan = plan_slabs(volume.shape, grid.padded, package.manifest.input.opt_batch, memory_budget_mb)
    confidence = LabelMap(volume.shape)
    labels, timings = segment_volume(volume, package, backend, progress, memory_budget_mb, plan, confidence)
    timings["decode"] += t_scan  # the header scan is part of reading the series
    trim_heap()  # the slabs' buffers are gone; what results build next then starts from a trimmed heap
    t = time.perf_counter()
    measurements = measure(
        labels,
        package.labels,
        volume.pixel_spacing,
        volume.slice_spacing,
        volume.sop_instance_uids,
        slab_slices=plan.post,
        reporting=package.manifest.reporting,
        confidence=confidence,
        read_hu=volume.read_hu,
        orientation=volume.orientation,
    )
    del confidence
    timings["measure"] = time.perf_counter() - t
    summary = Summary(
        model=ModelInfo(package.name, package.version, package.onnx_sha256),
        backend=BackendInfo(backend.name, backend.device, backend.precision),
        series=SeriesInfo(
            study_instance_uid=volume.study_uid,
            series_instance_uid=volume.series_uid,
            slices=int(labels.shape[0]),
            rows=int(labels.shape[1]),
            columns=int(labels.shape[2]),
            pixel_spacing_mm=(float(volume.pixel_spacing[0]), float(volume.pixel_spacing[1])),
            slice_spacing_mm=volume.slice_spacing,
            warnings=tuple(volume.warnings),
        ),
        measurements=measurements,
        timings_s={k: round(v, 3) for k, v in timings.items()},
    )
    return SeriesResult(labels=labels, volume=volume, summary=summary, timings=timings)


def write_outputs(result: SeriesResult, out_dir: Path) -> None:
    """``labelmap.npz`` (labels, sop_instance_uids) and ``summary.json``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "labelmap.npz", labelmap_npz(result.labels, result.volume.sop_instance_uids))
    write_atomic(out_dir / SUMMARY_FILE, result.summary.to_json().encode("utf-8"))


def labelmap_npz(labels: LabelMap | np.ndarray, sop_instance_uids: Sequence[str], slab_slices: int = 32) -> bytes:
    """``np.savez_compressed(labels=..., sop_instance_uids=...)`` bytes, the dense labels streamed into the
    archive ``slab_slices`` at a time: only the compressed file is ever whole in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, mode="w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        with zf.open("labels.npy", "w", force_zip64=True) as fid:
            shape = tuple(int(v) for v in labels.shape)
            np.lib.format.write_array_header_1_0(
                fid, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
            )
            for a in range(0, shape[0], slab_slices):
                b = min(shape[0], a + slab_slices)
                part = (
                    labels.slab(a, b)
                    if isinstance(labels, LabelMap)
                    else np.ascontiguousarray(labels[a:b], dtype=np.uint8)
                )
                fid.write(part.tobytes())
        with zf.open("sop_instance_uids.npy", "w", force_zip64=True) as fid:
            np.lib.format.write_array(fid, np.array(list(sop_instance_uids), dtype=np.str_), allow_pickle=False)
    return buf.getvalue()
