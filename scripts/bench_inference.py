#!/usr/bin/env python3
"""Inference benchmark: the demo model on ONNX Runtime against PyTorch eager, on the same inputs.

    .venv/bin/python scripts/bench_inference.py [--rounds 5] [--slices 300] [--no-series]

Why these references: PyTorch eager is what a model vendor runs before anyone optimises, so
"ONNX Runtime / PyTorch" on the CPU (goal >= 1.5x) and "TensorRT FP16 / PyTorch" on a GPU (goal >= 3x,
only where a GPU and TensorRT are present) say what the appliance's backends buy. The PyTorch model is the
training script's own architecture (``scripts/train_demo_model.py: build_model``) with the shipped weights
loaded from model.onnx, checked by comparing its output with ONNX Runtime's, so both run the same network.

How it measures: one fixed input of ``--slices`` slices on the model grid of a 350 mm field of view,
run in batches of the manifest's opt_batch; backends take turns within each round (order rotated) and the
median round counts; one untimed warm-up each. ``--series`` (default on) also times the whole series path
(decode, preprocess, infer, postprocess, measure) on a 300-slice 512x512 synthetic phantom written as
DICOM, which is the issue's 20-second budget. Progress goes to stderr; numbers to stdout, ratios last,
and JSON to bench-results/bench_inference.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from appliance.infer.preprocess import batch_input, model_grid
from appliance.models.package import bundled_models_dir, load_package
from appliance_dev.harness import log
from appliance_dev.train.model import torch_model_from_onnx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench-results" / "bench_inference.json"


def time_runner(run: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray]) -> float:
    t = time.perf_counter()
    for b in batches:
        run(b)
    return time.perf_counter() - t


def series_timing(package: Any, threads: int) -> dict[str, float]:
    """The whole series path on a 300-slice 512x512 phantom written as DICOM files."""
    from appliance.infer.backends.onnxruntime import OnnxRuntimeBackend
    from appliance.infer.pipeline import run_series
    from appliance_dev.dicom_factory import write_ct_volume
    from appliance_dev.synthetic import make_phantom, sample_spec

    spec = sample_spec(7, n_slices=300, fov_kind="full")
    spec = type(spec)(**{**spec.__dict__, "rows": 512}) if hasattr(spec, "rows") else spec
    hu, _, meta = make_phantom(spec)
    log(f"series: phantom {hu.shape}, spacing {meta.get('pixel_spacing')}, writing DICOM...")
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        ps = meta.get("pixel_spacing", (0.7, 0.7))
        write_ct_volume(Path(tmp), hu, spacing=(float(ps[0]), float(ps[1])),
                        thickness=float(meta.get("slice_spacing", meta.get("slice_thickness", 1.0))))
        backend = OnnxRuntimeBackend(package, threads=threads)
        files = sorted(Path(tmp).iterdir())
        t = time.perf_counter()
        result = run_series(files, package, backend)
        total = time.perf_counter() - t
    return {"total_s": total, **{f"{k}_s": v for k, v in result.timings.items()}, "slices": float(hu.shape[0]),
            "rows": float(hu.shape[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="liver-ct-demo", help="package under models/ (default liver-ct-demo)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--slices", type=int, default=300, help="slices per round (default 300)")
    p.add_argument("--fov-mm", type=float, default=350.0, help="field of view that sets the grid (default 350)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for both (default: cores)")
    p.add_argument("--series", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the whole series path on a 300x512^2 phantom (default on)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)

    import torch

    from appliance.infer.backends.onnxruntime import OnnxRuntimeBackend

    torch.set_num_threads(args.threads)
    package = load_package(bundled_models_dir() / args.model)
    spec = package.input_spec
    grid = model_grid(512, 512, (args.fov_mm / 512, args.fov_mm / 512), spec)
    rng = np.random.default_rng(0)
    prepared = rng.uniform(-1, 1, (args.slices, *grid.padded)).astype(np.float32)
    bs = package.manifest.input.opt_batch
    batches = [batch_input(prepared, s, min(args.slices, s + bs), spec.channels) for s in range(0, args.slices, bs)]
    log(f"{args.model}: {args.slices} slices on a {grid.padded[0]}x{grid.padded[1]} grid, batches of {bs}, "
        f"{args.threads} threads")

    ort_backend = OnnxRuntimeBackend(package, threads=args.threads)
    model = torch_model_from_onnx(package.onnx_path, spec.channels)

    def run_torch(b: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(b)).numpy()

    diff = float(np.abs(run_torch(batches[0]) - ort_backend.run(batches[0])).max())
    log(f"max |PyTorch - ONNX Runtime| on one batch: {diff:.2e}")
    if diff > 1e-2:
        raise SystemExit("bench: PyTorch and ONNX Runtime disagree; the comparison would be meaningless")
    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {"onnxruntime_cpu": ort_backend.run, "pytorch_eager_cpu": run_torch}

    gpu: dict[str, Any] = {}
    if torch.cuda.is_available():
        try:
            from appliance.infer.backends.tensorrt import TensorRTBackend

            trt = TensorRTBackend(package, precision="fp16", engines_dir=Path(tempfile.mkdtemp()) / "engines")
            cuda_model = model.to("cuda")

            def run_torch_gpu(b: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    out = cuda_model(torch.from_numpy(b).to("cuda")).cpu().numpy()
                return out

            runners["tensorrt_fp16_gpu"] = trt.run
            runners["pytorch_eager_gpu"] = run_torch_gpu
            gpu["device"] = torch.cuda.get_device_name(0)
        except Exception as exc:  # no TensorRT here: the GPU half is skipped and said so
            gpu["skipped"] = f"TensorRT backend unavailable: {exc}"
            log(gpu["skipped"])
    else:
        gpu["skipped"] = "no CUDA GPU"

    for name, run in runners.items():
        run(batches[0])  # warm-up (and lazy initialisation)
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(time_runner(runners[name], batches))
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names))
    med = {k: statistics.median(v) for k, v in times.items()}

    series = series_timing(package, args.threads) if args.series else None

    ratios = {"onnxruntime_vs_pytorch_cpu": med["pytorch_eager_cpu"] / med["onnxruntime_cpu"]}
    if "tensorrt_fp16_gpu" in med:
        ratios["tensorrt_fp16_vs_pytorch_gpu"] = med["pytorch_eager_gpu"] / med["tensorrt_fp16_gpu"]
    result = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), **gpu},
        "model": {"name": package.name, "version": package.version, "onnx_sha256": package.onnx_sha256},
        "input": {"slices": args.slices, "grid": list(grid.padded), "batch": bs, "threads": args.threads},
        "rounds": args.rounds, "seconds": times, "median_seconds": med, "ratios": ratios,
        "goals": {"onnxruntime_vs_pytorch_cpu": 1.5, "tensorrt_fp16_vs_pytorch_gpu": 3.0},
        "series_300x512": series,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in med.items():
        print(f"{k}: median {v:.2f} s for {args.slices} slices ({1000 * v / args.slices:.1f} ms/slice)")
    if series:
        print("series 300x512^2, ONNX Runtime, whole path: {:.1f} s (goal <= 20 s): ".format(series["total_s"])
              + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in series.items() if k.endswith("_s") and k != "total_s"))
    if "skipped" in gpu:
        print(f"GPU: skipped ({gpu['skipped']})")
    print(f"results: {args.json}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}x (goal >= {result['goals'][k]}x)" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
