"""Inference backends behind one small interface, chosen by config or automatically.

``auto`` prefers TensorRT where it imports and a GPU answers, and otherwise ONNX Runtime on the CPU,
saying in the log which it picked and why; the choice is also reported with every job's timings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from appliance.errors import BackendUnavailable, EngineBuildError
from appliance.models.package import ModelPackage

log = logging.getLogger("appliance.infer")

BACKENDS = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp16", "fp32")


class Backend(Protocol):
    """An opened model on one device."""

    name: str
    device: str
    precision: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(n, channels, H, W) float32 -> (n, classes, H, W) float32 scores.

        The scores returned are the caller's own array (never a buffer the next call reuses): the
        pipeline turns them into labels on another thread while the next batch runs."""

    def close(self) -> None: ...


def open_backend(
    package: ModelPackage,
    backend: str = "auto",
    precision: str = "fp16",
    engines_dir: Path | None = None,
    threads: int = 0,
) -> Backend:
    """Open ``package`` on the configured backend; ``auto`` falls back to ONNX Runtime and logs why."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown inference backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend in ("auto", "tensorrt"):
        try:
            from appliance.infer.backends.tensorrt import TensorRTBackend

            return TensorRTBackend(package, precision=precision, engines_dir=engines_dir)
        except (BackendUnavailable, ImportError) as exc:
            if backend == "tensorrt":
                if isinstance(exc, ImportError):
                    raise BackendUnavailable(f"TensorRT backend cannot load: {exc}") from None
                raise
            log.info("TensorRT not used for %s (%s); running on ONNX Runtime (CPU)", package.name, exc)
        except EngineBuildError as exc:
            if backend == "tensorrt":
                raise
            # A GPU is here but TensorRT rejects this model: keep serving on the CPU, loudly.
            log.error(
                "TensorRT cannot build an engine for %s (%s); running it on ONNX Runtime (CPU) instead",
                package.name,
                exc,
            )
    from appliance.infer.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(package, threads=threads)
