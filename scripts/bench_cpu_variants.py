#!/usr/bin/env python3
"""CPU levers for the demo model, measured against PyTorch eager in the same run.

    .venv/bin/python scripts/bench_cpu_variants.py [--rounds 3] [--widths 8 12 16] [--no-int8]

Why: the goal "ONNX Runtime >= 1.5x PyTorch eager on the CPU" depends on the CPU and on the network's
shape, and the two obvious levers are int8 and a narrower network. This script measures both, so the
choice can be re-checked on another CPU (a Jetson's ARM cores, an x86 with VNNI) rather than argued:

- ``fp32``: the shipped model.onnx on ONNX Runtime, as the appliance runs it;
- ``int8``: the same model statically quantised by ONNX Runtime (QDQ, per-channel int8 weights, uint8
  activations), calibrated on slices of training-seed phantoms (never held-out ones), with the share of
  pixels whose argmax agrees with fp32;
- ``--widths``: untrained U-Nets of the training script's architecture at other base widths, exported the
  same way (timing only; the network's quality needs training, see train_demo_model.py).

Every variant runs the same input (batches of 8 slices at 176x176, a ~350 mm field of view) against PyTorch
eager of the same network; the median of ``--rounds`` rounds counts. Ratios last; JSON to
bench-results/bench_cpu_variants.json.
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

from appliance_dev.harness import log
from appliance_dev.train.model import torch_model_from_onnx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench-results" / "bench_cpu_variants.json"
BATCH, SIZE, SLICES = 8, 176, 64


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def calibration_batches(package: Any, phantoms: int) -> list[np.ndarray]:
    """Serving-preprocessed slices of training-seed phantoms (seeds 0.., disjoint from held-out ones)."""
    from appliance.infer.preprocess import batch_input, model_grid, to_model_grid
    from appliance_dev.synthetic import sample_case

    spec = package.input_spec
    out = []
    for seed in range(phantoms):
        hu, _, meta = sample_case(seed, n_slices=16, fov_kind="full" if seed % 2 == 0 else "targeted")
        grid = model_grid(hu.shape[1], hu.shape[2], tuple(meta["pixel_spacing"]), spec)
        prep = to_model_grid(hu, grid, spec)
        out += [batch_input(prep, s, min(s + BATCH, len(prep)), spec.channels) for s in range(0, len(prep), BATCH)]
    return out


def quantise_int8(onnx_path: Path, batches: list[np.ndarray], out: Path, input_name: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.it, None)
            return None if b is None else {input_name: b}

    pre = out.with_suffix(".pre.onnx")
    # Symbolic shape inference cannot resolve the dynamic H/W through the transposed convolutions; the
    # ONNX shape inference that runs instead is enough for static quantisation.
    quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return out


def untrained(width: int, folder: Path) -> tuple[Path, Any]:
    """The training architecture at ``width`` with seeded random weights and non-trivial BatchNorm statistics."""
    import torch

    from appliance_dev.train.config import WIDTHS
    from appliance_dev.train.export import export_onnx
    from appliance_dev.train.model import build_model, fold_batchnorm

    torch.manual_seed(width)
    widths = tuple(width * 2**i for i in range(len(WIDTHS)))
    model = build_model(widths)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.1, 0.1)
    path = folder / f"unet_w{width}.onnx"
    export_onnx(model, path)
    return path, fold_batchnorm(model).eval()


def round_time(run: Callable[[np.ndarray], Any], batches: list[np.ndarray]) -> float:
    t = time.perf_counter()
    for b in batches:
        run(b)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="liver-ct-demo", help="package under models/ (default liver-ct-demo)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for all (default: cores)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="quantise the shipped model to int8 and time it (default on)")
    p.add_argument("--calibration-phantoms", type=int, default=4, help="training-seed phantoms for int8 (default 4)")
    p.add_argument("--widths", type=int, nargs="*", default=[], help="also time untrained U-Nets of these base widths")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)

    import torch

    from appliance.models.package import bundled_models_dir, load_package

    torch.set_num_threads(args.threads)
    package = load_package(bundled_models_dir() / args.model)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (BATCH, package.input_spec.channels, SIZE, SIZE)).astype(np.float32)
               for _ in range(SLICES // BATCH)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-"))

    def torch_runner(model: Any) -> Callable[[np.ndarray], np.ndarray]:
        def run(b: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(b)).numpy()
        return run

    def ort_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        sess = ort_session(path, args.threads)
        name = sess.get_inputs()[0].name
        return lambda b: sess.run(None, {name: b})[0]

    shipped_torch = torch_runner(torch_model_from_onnx(package.onnx_path, package.input_spec.channels))
    variants: dict[str, tuple[Callable, Callable]] = {
        f"{package.name} {package.version} fp32": (ort_runner(package.onnx_path), shipped_torch)}
    agreement: dict[str, float] = {}
    if args.int8:
        log(f"int8: calibrating on {args.calibration_phantoms} training-seed phantoms...")
        q = quantise_int8(package.onnx_path, calibration_batches(package, args.calibration_phantoms),
                          tmp / "int8.onnx", package.input_name)
        name = f"{package.name} {package.version} int8"
        variants[name] = (ort_runner(q), shipped_torch)
        ref, got = variants[next(iter(variants))][0](batches[0]), variants[name][0](batches[0])
        agreement[name] = float((ref.argmax(1) == got.argmax(1)).mean())
    for w in args.widths:
        path, model = untrained(w, tmp)
        variants[f"untrained width {w}"] = (ort_runner(path), torch_runner(model))

    results: dict[str, dict[str, Any]] = {}
    for name, (ort_run, torch_run) in variants.items():
        ort_run(batches[0])
        torch_run(batches[0])
        t_ort, t_torch = [], []
        for _ in range(args.rounds):
            t_ort.append(round_time(ort_run, batches))
            t_torch.append(round_time(torch_run, batches))
        o, t = statistics.median(t_ort), statistics.median(t_torch)
        results[name] = {"onnxruntime_ms_per_slice": 1000 * o / SLICES, "pytorch_ms_per_slice": 1000 * t / SLICES,
                         "ratio": t / o, "argmax_agreement_with_fp32": agreement.get(name)}
        log(f"{name}: ONNX Runtime {1000 * o / SLICES:.1f} ms/slice, PyTorch eager {1000 * t / SLICES:.1f} ms/slice")

    out = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
           "input": {"batch": BATCH, "size": SIZE, "slices": SLICES, "threads": args.threads}, "rounds": args.rounds,
           "variants": results, "goal_ratio": 1.5}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {args.json}")
    for name, r in results.items():
        extra = f", argmax agrees with fp32 on {100 * r['argmax_agreement_with_fp32']:.2f}% of pixels" \
            if r["argmax_agreement_with_fp32"] is not None else ""
        print(f"{name}: ONNX Runtime {r['onnxruntime_ms_per_slice']:.1f} ms/slice, PyTorch eager "
              f"{r['pytorch_ms_per_slice']:.1f} ms/slice{extra}")
    print("ratios (PyTorch eager / ONNX Runtime, goal >= 1.5x): "
          + ", ".join(f"{name} {r['ratio']:.2f}x" for name, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
