"""Small TensorRT backend check and timing on a GPU machine (run by scripts/gpu_tensorrt_check.sh).

Prints: the GPU, TensorRT flavour and pycuda; whether a plan loads on this GPU (portable and, on
TensorRT-RTX, one built for the current GPU); plan build and open times; per-batch latency of the test
net and of a heavier conv stack at 512x512, against ONNX Runtime on the CPU. Exits 0 even when a step
fails (it says which), so the log always comes back complete.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from appliance.infer.backends import tensorrt as trtb
from appliance.infer.backends.onnxruntime import OnnxRuntimeBackend
from appliance_dev.model_factory import write_tiny_package


def heavy_onnx(width: int = 32, layers: int = 6) -> bytes:
    """A conv stack closer to a segmentation net's cost per pixel: 3 -> width x layers -> 3 at full size."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, prev, cin = [], [], "image", 3
    for i in range(layers):
        w = numpy_helper.from_array((rng.standard_normal((width, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")
        inits += [w, b]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", width
    inits.append(numpy_helper.from_array((rng.standard_normal((3, width, 1, 1)) * 0.1).astype(np.float32), "wo"))
    nodes.append(helper.make_node("Conv", [prev, "wo"], ["logits"], kernel_shape=[1, 1]))
    g = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, "H", "W"])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def step(title: str):
    def wrap(fn):
        print(f"\n== {title}", flush=True)
        try:
            fn()
        except Exception:
            print(f"!! {title} FAILED:\n{traceback.format_exc()}", flush=True)
        return fn
    return wrap


def timed(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="trt-timing-"))

    @step("environment")
    def _() -> None:
        print("gpu:", trtb.gpu_info())
        fl = trtb.trt_flavour()
        print("flavour:", fl.name, fl.version, "fp16 by builder flag:", fl.fp16_by_flag)
        import pycuda

        print("pycuda:", pycuda.VERSION_TEXT)

    @step("does a plan load on this GPU? (no pycuda involved)")
    def _() -> None:
        fl = trtb.trt_flavour()
        trt = fl.module
        pkg = write_tiny_package(work / "probe")
        targets = [None]
        if fl.is_rtx:
            targets.append("CURRENT")
        for target in targets:
            if target is None:
                plan, _ = trtb.build_engine(pkg, "fp32", work / "probe-engines")
                data = plan.read_bytes()
            else:  # TensorRT-RTX: build for the GPU in this machine (needs the GPU at build time)
                logger = trtb._make_logger(trt)
                b = trt.Builder(logger)
                net = b.create_network(0)
                p = trt.OnnxParser(net, logger)
                assert p.parse_from_file(str(pkg.onnx_path))
                cfg = b.create_builder_config()
                prof = b.create_optimization_profile()
                prof.set_shape("image", *pkg.profile)
                cfg.add_optimization_profile(prof)
                cfg.num_compute_capabilities = 1
                ok = cfg.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
                ser = b.build_serialized_network(net, cfg)
                print(f"  target CURRENT: set_compute_capability -> {ok}, build -> "
                      f"{'None ' + str(logger.errors[-3:]) if ser is None else len(memoryview(ser))}")
                if ser is None:
                    continue
                data = bytes(memoryview(ser))
            logger = trtb._make_logger(trt)
            t0 = time.perf_counter()
            eng = trt.Runtime(logger).deserialize_cuda_engine(data)
            print(f"  target {target or 'default (portable)'}: deserialize -> {'OK' if eng else 'FAILED'} in "
                  f"{time.perf_counter() - t0:.2f} s {'' if eng else logger.errors[-4:]}")

    for label, onnx_bytes, shape, iters in [("tiny test net", None, (4, 3, 128, 128), 200),
                                            ("conv stack 6x32ch", heavy_onnx(), (4, 3, 128, 128), 50)]:
        @step(f"{label}: build, open, run {shape}")
        def _(label=label, onnx_bytes=onnx_bytes, shape=shape, iters=iters) -> None:
            name = label.split()[0]
            pkg = write_tiny_package(work / name, "tinyseg", onnx_bytes=onnx_bytes)
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            ort = OnnxRuntimeBackend(pkg)
            ref = ort.run(x)
            print(f"  onnxruntime cpu: {timed(lambda: ort.run(x), max(3, iters // 20)):.2f} ms/batch")
            for precision in ("fp32", "fp16"):
                t0 = time.perf_counter()
                plan, built = trtb.build_engine(pkg, precision, work / "engines")
                t1 = time.perf_counter()
                b = trtb.TensorRTBackend(pkg, precision, engines_dir=work / "engines")
                t2 = time.perf_counter()
                got = b.run(x)
                err = float(np.abs(got - ref).max() / max(1e-6, float(np.abs(ref).max())))
                ms = timed(lambda: b.run(x), iters)
                print(f"  {precision}: build {t1 - t0:.2f} s (built {built}, plan {plan.stat().st_size / 1e6:.2f} MB), "
                      f"open {t2 - t1:.2f} s, {ms:.3f} ms/batch (incl. copies), max rel err vs ORT {err:.2e}, "
                      f"device {b.device}")
                b.close()
                t3 = time.perf_counter()
                b = trtb.TensorRTBackend(pkg, precision, engines_dir=work / "engines")
                print(f"  {precision}: second open (cached plan{', JIT cache' if b.flavour.is_rtx else ''}) "
                      f"{time.perf_counter() - t3:.2f} s")
                b.close()
            ort.close()


if __name__ == "__main__":
    main()
