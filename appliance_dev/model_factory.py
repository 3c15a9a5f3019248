"""Small, real ONNX model packages for tests and GPU checks: a threshold 'segmenter' whose right answer is
known, and a tiny conv net for the TensorRT backend.

The graph takes the centre channel x (normalised HU in [-1, 1]) and emits scores
[0, 10x - 2, 20x - 8]: argmax is background below x = 0.2, label 1 up to x = 0.6, label 2 above. With the
window [-250, 350] that is HU 110 and 230. So a test knows which voxels must come out as which label
without trusting any trained weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.models.package import ModelPackage, load_package, sha256_file
from appliance_dev.manifest import LIVER_LABELS, file_digests, manifest_toml

WINDOW = (-250.0, 350.0)


def hu_threshold_labels(hu: np.ndarray) -> np.ndarray:
    x = (np.clip(hu, *WINDOW) - sum(WINDOW) / 2) * 2 / (WINDOW[1] - WINDOW[0])
    scores = np.stack([np.zeros_like(x), 10 * x - 2, 20 * x - 8])
    return scores.argmax(0).astype(np.uint8)


def threshold_onnx(channels: int = 3) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Gather", ["image", "centre"], ["x"], axis=1),
        helper.make_node("Mul", ["x", "ten"], ["x10"]),
        helper.make_node("Sub", ["x10", "two"], ["s1"]),
        helper.make_node("Mul", ["x", "twenty"], ["x20"]),
        helper.make_node("Sub", ["x20", "eight"], ["s2"]),
        helper.make_node("Mul", ["x", "zero"], ["s0"]),
        helper.make_node("Concat", ["s0", "s1", "s2"], ["logits"], axis=1),
    ]
    inits = [
        helper.make_tensor("centre", TensorProto.INT64, [1], [channels // 2]),
        *(helper.make_tensor(n, TensorProto.FLOAT, [], [v])
          for n, v in (("ten", 10.0), ("two", 2.0), ("twenty", 20.0), ("eight", 8.0), ("zero", 0.0))),
    ]
    graph = helper.make_graph(
        nodes, "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def manifest_text(name: str, digests: dict[str, str], channels: int = 3, spacing: float = 1.5, *,
                  tensor: str = "image", min_hw: int = 32, opt_hw: int = 128, max_hw: int = 384,
                  opt_batch: int = 4, max_batch: int = 8) -> str:
    """The threshold model's manifest.toml (its labels are the demo model's), through the one manifest writer."""
    return manifest_toml({
        "schema": 1,
        "name": name,
        "version": "0.0.1",
        "task": "segmentation",
        "modality": "CT",
        "intended_use": "Tests only.",
        "licence": "Test fixture",
        "input": {"dims": 2, "tensor": tensor, "channels": channels, "spacing_mm": [spacing, spacing],
                  "size_multiple": 16, "min_size": [min_hw, min_hw], "opt_size": [opt_hw, opt_hw],
                  "max_size": [max_hw, max_hw], "opt_batch": opt_batch, "max_batch": max_batch},
        "normalisation": {"kind": "hu_window", "window": list(WINDOW)},
        "output": {"tensor": "logits", "kind": "scores", "classes": 3},
        "postprocess": {"largest_component": []},
        "labels": list(LIVER_LABELS),
        "files": digests,
    })


def write_package(models_dir: Path, name: str = "threshold-test", channels: int = 3, spacing: float = 1.5) -> Path:
    pkg = models_dir / name
    pkg.mkdir(parents=True, exist_ok=True)
    data = threshold_onnx(channels)
    (pkg / "model.onnx").write_bytes(data)
    (pkg / "MODEL_CARD.md").write_text("# Threshold test model\nNot a medical device; a test fixture.\n")
    digests = file_digests(pkg, ("model.onnx", "MODEL_CARD.md"))
    (pkg / "manifest.toml").write_text(manifest_text(name, digests, channels, spacing))
    return pkg


# -- a tiny conv net for the TensorRT backend (tests/test_tensorrt_backend.py, scripts/gpu_tensorrt_timing.py)

#: Profile of the tiny package: (N, 3, H, W), N 1..4 (opt 2), H and W 16..128 (opt 64).
TINY_MIN_HW, TINY_OPT_HW, TINY_MAX_HW, TINY_OPT_BATCH, TINY_MAX_BATCH = 16, 64, 128, 2, 4


def tiny_onnx(seed: int = 0, input_name: str = "image") -> bytes:
    """Conv3x3(3->8) + ReLU + Conv1x1(8->3): input (N,3,H,W) dynamic, output logits (N,3,H,W)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    b1 = numpy_helper.from_array((rng.standard_normal(8) * 0.1).astype(np.float32), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((3, 8, 1, 1)) * 0.3).astype(np.float32), "w2")
    b2 = numpy_helper.from_array((rng.standard_normal(3) * 0.1).astype(np.float32), "b2")
    nodes = [
        helper.make_node("Conv", [input_name, "w1", "b1"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Conv", ["hr", "w2", "b2"], ["logits"], kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "tinyseg",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        initializer=[w1, b1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_tiny_package(root: Path, name: str = "tinyseg", onnx_bytes: bytes | None = None, *,
                       max_batch: int = TINY_MAX_BATCH, input_tensor: str = "image") -> ModelPackage:
    """``root/name`` holding ``onnx_bytes`` (default: :func:`tiny_onnx`) with the tiny profile, loaded."""
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "model.onnx").write_bytes(onnx_bytes if onnx_bytes is not None else tiny_onnx())
    (pkg / "manifest.toml").write_text(manifest_text(
        name, {"model.onnx": sha256_file(pkg / "model.onnx")}, spacing=1.0, tensor=input_tensor,
        min_hw=TINY_MIN_HW, opt_hw=TINY_OPT_HW, max_hw=TINY_MAX_HW, opt_batch=TINY_OPT_BATCH,
        max_batch=max_batch), encoding="utf-8")
    return load_package(pkg)
