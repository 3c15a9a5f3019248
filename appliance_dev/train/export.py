"""ONNX export: BatchNorm folded, opset 17, dynamic batch and size; checked against PyTorch and timed."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from appliance_dev.train.config import MAX_BATCH, N_CLASSES, OPT_BATCH, SPEC
from appliance_dev.train.evaluate import onnx_runner
from appliance_dev.train.model import fold_batchnorm


def export_onnx(model, path: Path) -> dict[str, float]:
    """Export (BN folded, opset 17, dynamic N/H/W), check onnxruntime against PyTorch, time 300 slices."""
    import onnx
    import torch

    folded = fold_batchnorm(model.cpu()).eval()
    dummy = torch.zeros(1, SPEC.channels, 96, 96)
    axes = {0: "batch", 2: "height", 3: "width"}
    kwargs = dict(opset_version=17, input_names=["image"], output_names=["logits"],
                  dynamic_axes={"image": axes, "logits": axes}, do_constant_folding=True)
    try:
        torch.onnx.export(folded, dummy, str(path), dynamo=False, **kwargs)
    except TypeError:
        torch.onnx.export(folded, dummy, str(path), **kwargs)
    onnx.checker.check_model(onnx.load(str(path)))
    run = onnx_runner(path)
    rng = np.random.default_rng(0)
    max_diff = 0.0
    for n, h, w in ((1, 64, 64), (5, 96, 160), (MAX_BATCH, 176, 176)):
        x = rng.uniform(-1, 1, size=(n, SPEC.channels, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = model.cpu().eval()(torch.from_numpy(x)).numpy()
        out = run(x)
        assert out.shape == (n, N_CLASSES, h, w), out.shape
        max_diff = max(max_diff, float(np.abs(out - ref).max()))
    if max_diff > 1e-3:
        raise RuntimeError(f"onnxruntime disagrees with PyTorch: max abs diff {max_diff}")
    # Speed: a 300-slice series at a ~350 mm field of view (175 px at 2 mm, padded to 176).
    x = rng.uniform(-1, 1, size=(OPT_BATCH, SPEC.channels, 176, 176)).astype(np.float32)
    run(x)
    t0 = time.time()
    for s in range(0, 300, OPT_BATCH):
        run(x[: min(OPT_BATCH, 300 - s)])
    secs = time.time() - t0
    return {"max_abs_diff": max_diff, "ort_300_slices_176_s": secs, "size_bytes": path.stat().st_size}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

