"""Small, real ONNX model packages for tests: a threshold 'segmenter' whose right answer is known.

The graph takes the centre channel x (normalised HU in [-1, 1]) and emits scores
[0, 10x - 2, 20x - 8]: argmax is background below x = 0.2, label 1 up to x = 0.6, label 2 above. With the
window [-250, 350] that is HU 110 and 230. So a test knows which voxels must come out as which label
without trusting any trained weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

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
    files = "\n".join(f'"{k}" = "{v}"' for k, v in digests.items())
    return f'''schema = 1
name = "{name}"
version = "0.0.1"
task = "segmentation"
modality = "CT"
intended_use = "Tests only."
licence = "Test fixture"

[input]
dims = 2
tensor = "{tensor}"
channels = {channels}
spacing_mm = [{spacing}, {spacing}]
size_multiple = 16
min_size = [{min_hw}, {min_hw}]
opt_size = [{opt_hw}, {opt_hw}]
max_size = [{max_hw}, {max_hw}]
opt_batch = {opt_batch}
max_batch = {max_batch}

[normalisation]
kind = "hu_window"
window = [{WINDOW[0]}, {WINDOW[1]}]

[output]
tensor = "logits"
kind = "scores"
classes = 3

[postprocess]
largest_component = []

[[labels]]
value = 1
name = "Liver"
category = {{ scheme = "SCT", code = "91723000", meaning = "Anatomical Structure" }}
type = {{ scheme = "SCT", code = "10200004", meaning = "Liver" }}

[[labels]]
value = 2
name = "Liver lesion"
category = {{ scheme = "SCT", code = "49755003", meaning = "Morphologically Altered Structure" }}
type = {{ scheme = "SCT", code = "52988006", meaning = "Lesion" }}
region = {{ scheme = "SCT", code = "10200004", meaning = "Liver" }}

[files]
{files}
'''


def write_package(models_dir: Path, name: str = "threshold-test", channels: int = 3, spacing: float = 1.5) -> Path:
    pkg = models_dir / name
    pkg.mkdir(parents=True, exist_ok=True)
    data = threshold_onnx(channels)
    (pkg / "model.onnx").write_bytes(data)
    (pkg / "MODEL_CARD.md").write_text("# Threshold test model\nNot a medical device; a test fixture.\n")
    digests = {f: hashlib.sha256((pkg / f).read_bytes()).hexdigest() for f in ("model.onnx", "MODEL_CARD.md")}
    (pkg / "manifest.toml").write_text(manifest_text(name, digests, channels, spacing))
    return pkg
