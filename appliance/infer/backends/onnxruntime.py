"""ONNX Runtime on the CPU: the backend that runs everywhere, and the reference the others are checked against."""

from __future__ import annotations

import os

import numpy as np

from appliance.errors import BackendUnavailable, ModelPackageError
from appliance.models.package import ModelPackage


class OnnxRuntimeBackend:
    name = "onnxruntime"
    device = "cpu"
    precision = "fp32"

    def __init__(self, package: ModelPackage, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a hard dependency
            raise BackendUnavailable(f"onnxruntime is not installed: {exc}") from None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(package.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelPackageError(
                f"model package {package.path}: ONNX Runtime cannot load model.onnx: {exc}"
            ) from None
        self.input_name, self.output_name = package.input_name, package.output_name
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if self.input_name not in names_in or self.output_name not in names_out:
            raise ModelPackageError(
                f"model package {package.path}: model.onnx has inputs {names_in} and outputs {names_out}, "
                f"the manifest names {self.input_name!r} -> {self.output_name!r}"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return out

    def close(self) -> None:
        self.session = None
