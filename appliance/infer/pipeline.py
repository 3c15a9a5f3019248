"""One series through one model: the code path shared by the worker and ``appliance infer``.

decode -> preprocess -> infer (batches) -> postprocess (scores back to the source grid, argmax, clean-up)
-> measure. Each stage's wall time is recorded; the worker stores them with the job.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import InferenceError
from appliance.infer.backends import Backend
from appliance.infer.measure import measure
from appliance.infer.postprocess import keep_largest_component
from appliance.infer.preprocess import batch_input, model_grid, scores_to_labels, to_model_grid
from appliance.infer.volume import Volume, load_volume
from appliance.models.package import ModelPackage
from appliance.store.spool import write_atomic

log = logging.getLogger("appliance.infer")

Progress = Callable[[str, int, int], None]


@dataclass
class SeriesResult:
    labels: np.ndarray  # (slices, rows, cols) uint8, slices in geometric order
    volume: Volume
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def segment_volume(volume: Volume, package: ModelPackage, backend: Backend,
                   progress: Progress | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Label map on the source grid for an already decoded volume."""
    spec = package.input_spec
    timings: dict[str, float] = {}
    t = time.perf_counter()
    n, rows, cols = volume.hu.shape
    grid = model_grid(rows, cols, volume.pixel_spacing, spec)
    prepared = to_model_grid(volume.hu, grid, spec)
    timings["preprocess"] = time.perf_counter() - t

    labels = np.empty((n, rows, cols), dtype=np.uint8)
    batch = package.manifest.input.opt_batch
    t_infer = t_post = 0.0
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        t = time.perf_counter()
        scores = backend.run(batch_input(prepared, start, stop, spec.channels))
        t_infer += time.perf_counter() - t
        t = time.perf_counter()
        if scores.ndim != 4 or scores.shape[0] != stop - start or scores.shape[2:] != prepared.shape[1:]:
            raise InferenceError(f"model {package.name} returned scores of shape {scores.shape} for input "
                                 f"{(stop - start, spec.channels, *prepared.shape[1:])}")
        labels[start:stop] = scores_to_labels(scores, grid)
        t_post += time.perf_counter() - t
        if progress:
            progress("infer", stop, n)
    t = time.perf_counter()
    keep = package.manifest.postprocess.largest_component
    if keep:
        labels = keep_largest_component(labels, keep)
    timings["infer"] = t_infer
    timings["postprocess"] = t_post + time.perf_counter() - t
    return labels, timings


def run_series(paths: Sequence[Path], package: ModelPackage, backend: Backend,
               progress: Progress | None = None) -> SeriesResult:
    """Decode ``paths`` (one series), segment it and measure the result."""
    t = time.perf_counter()
    volume = load_volume(paths, progress=(lambda i, k: progress("decode", i, k)) if progress else None)
    timings = {"decode": time.perf_counter() - t}
    labels, more = segment_volume(volume, package, backend, progress)
    timings.update(more)
    t = time.perf_counter()
    summary = {
        "model": {"name": package.name, "version": package.version, "onnx_sha256": package.onnx_sha256},
        "backend": {"name": backend.name, "device": backend.device, "precision": backend.precision},
        "series": {
            "study_instance_uid": volume.study_uid,
            "series_instance_uid": volume.series_uid,
            "slices": int(labels.shape[0]),
            "rows": int(labels.shape[1]),
            "columns": int(labels.shape[2]),
            "pixel_spacing_mm": list(volume.pixel_spacing),
            "slice_spacing_mm": volume.slice_spacing,
            "warnings": volume.warnings,
        },
        **measure(labels, package.labels, volume.pixel_spacing, volume.slice_spacing, volume.sop_instance_uids),
    }
    timings["measure"] = time.perf_counter() - t
    summary["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return SeriesResult(labels=labels, volume=volume, summary=summary, timings=timings)


def write_outputs(result: SeriesResult, out_dir: Path) -> None:
    """``labelmap.npz`` (labels, sop_instance_uids) and ``summary.json``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=result.labels,
                        sop_instance_uids=np.array(result.volume.sop_instance_uids, dtype=np.str_))
    write_atomic(out_dir / "labelmap.npz", buf.getvalue())
    write_atomic(out_dir / "summary.json", (json.dumps(result.summary, indent=2) + "\n").encode("utf-8"))
