"""TensorRT on an NVIDIA GPU: one adapter over TensorRT and TensorRT for RTX.

Two flavours share one Python API (Builder, OnnxParser, Runtime, the tensor-name execution API):

- ``tensorrt``: JetPack on Jetson, datacenter installs. Plans are specific to one GPU model and
  need that GPU to build. FP16 comes from ``BuilderFlag.FP16``.
- ``tensorrt_rtx`` (``pip install tensorrt-rtx``): RTX-class workstations. Its builder needs no GPU
  (ahead-of-time build on the CPU; kernels are compiled for the actual GPU when the plan is loaded),
  and by default a plan runs on compute capability 8.0/8.6/8.9/12.x; 7.5 (Turing) needs a plan of its
  own. It has no FP16 builder flag: precision follows the network's types, so for FP16 the ONNX is
  converted to FP16 first (inputs and outputs stay float32).

Plans are cached under ``<data>/engines/`` named by :func:`engine_cache_key` (model hash, GPU target,
flavour and version, precision, input profile). They are written atomically (temporary file, fsync,
rename) under a per-key file lock, with a JSON sidecar that records what went in and the plan's SHA-256,
so a crash mid-build never leaves a plan that later loads, and two processes never build the same
plan at once.

Three modules: ``trt_probe.py`` (which flavour imports, which GPU answers), ``trt_engines.py`` (the plan
cache and the builder) and this one, the runtime (:class:`TensorRTBackend`); the first two's public names
are importable from here too.

Nothing here imports ``tensorrt``, ``tensorrt_rtx``, ``pycuda`` or ``onnx`` at module level: this module
imports on machines that have none of them, and :class:`TensorRTBackend` then raises
:class:`BackendUnavailable`, on which ``auto`` falls back to ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from appliance.errors import (
    BackendUnavailable,
    EngineBuildError,
    InferenceError,
    ModelPackageError,
)
from appliance.fsio import write_atomic
from appliance.infer.backends.trt_engines import (  # noqa: F401  (the backend's public names live here too)
    DEFAULT_ENGINES_DIR,
    DEFAULT_WORKSPACE,
    RECIPE_VERSION,
    _check_precision,
    _make_logger,
    build_engine,
    convert_onnx_fp16,
    engine_cache_key,
    engine_paths,
    read_sidecar,
)
from appliance.infer.backends.trt_probe import (  # noqa: F401
    _RTX_DEFAULT_TARGETS,
    PORTABLE,
    Flavour,
    GpuInfo,
    _slug,
    default_gpu_id,
    gpu_info,
    trt_flavour,
)
from appliance.models.package import ModelPackage

log = logging.getLogger("appliance.infer")


# --------------------------------------------------------------------------------------------------
# Running


def _import_pycuda() -> Any:
    try:
        import pycuda.driver as cuda
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a missing libcuda
        raise BackendUnavailable(
            f"pycuda is not usable ({type(exc).__name__}: {exc}); the TensorRT backend needs "
            "it for device memory and streams (pip install pycuda builds it against CUDA)"
        ) from None
    return cuda


def _np_dtype(trt: ModuleType, dt: Any) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dt))
    except Exception:
        raise ModelPackageError(f"the engine uses tensor type {dt}, which the appliance cannot feed or read") from None


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self, package: ModelPackage, precision: str = "fp16", engines_dir: Path | None = None, *, device_index: int = 0
    ) -> None:
        _check_precision(precision)
        self.precision = precision
        self.package = package
        # Cheapest checks first, so ``auto`` falls back in milliseconds on a machine without a GPU.
        gpu = gpu_info(device_index)
        fl = trt_flavour()
        cuda = _import_pycuda()
        self.gpu, self.flavour = gpu, fl
        self.device = gpu.device
        self.engines_dir = Path(engines_dir) if engines_dir is not None else DEFAULT_ENGINES_DIR
        self._cuda = cuda
        self._trt = trt = fl.module
        self._ctx: Any = None  # pycuda's primary context, once the GPU is opened
        self._closed = False
        self._lock = threading.Lock()
        gpu_id = default_gpu_id(fl, gpu)
        self.plan_path, self.built_now = build_engine(package, precision, self.engines_dir, gpu_id=gpu_id)
        data = self._read_plan(self.plan_path)
        if data is None:  # damaged on disk: build once more
            self.plan_path.unlink(missing_ok=True)
            self.plan_path, self.built_now = build_engine(package, precision, self.engines_dir, gpu_id=gpu_id)
            data = self._read_plan(self.plan_path)
            if data is None:
                raise EngineBuildError(f"{self.plan_path}: the plan just written does not match its sidecar")

        cuda.init()
        self._ctx = cuda.Device(device_index).retain_primary_context()
        self._logger = _make_logger(trt)
        try:
            self._open(data)
        except BaseException:
            self.close()
            raise
        log.info(
            "TensorRT backend: %s %s on %s, %s, plan %s (%s)",
            package.name,
            package.version,
            self.device,
            precision,
            self.plan_path.name,
            "built now" if self.built_now else "cached",
        )

    # -- setup --------------------------------------------------------------------------------------

    def _open(self, data: bytes) -> None:
        trt, fl, gpu, cuda = self._trt, self.flavour, self.gpu, self._cuda
        with self._current():
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                raise BackendUnavailable(
                    f"{fl.name} {fl.version} cannot load the plan on {gpu.name} (compute capability {gpu.cc}"
                    + (f"; TensorRT-RTX plans target {_RTX_DEFAULT_TARGETS} by default" if fl.is_rtx else "")
                    + "): "
                    + (" | ".join(self._logger.errors[-4:]) or "no reason given")
                )
            self._runtime_cache: tuple[Any, Any] | None = None  # (TensorRT runtime config, its cache)
            self._context = self._create_context()
            if self._context is None:
                raise BackendUnavailable(
                    f"{fl.name}: cannot create an execution context on {gpu.name}: "
                    + " | ".join(self._logger.errors[-4:])
                )
            self._setup_io()
            self._stream = cuda.Stream()

    @staticmethod
    def _read_plan(plan: Path) -> bytes | None:
        data = plan.read_bytes()
        meta = read_sidecar(plan) or {}
        if hashlib.sha256(data).hexdigest() != meta.get("plan_sha256"):
            log.warning("%s does not match the SHA-256 in its sidecar; rebuilding it", plan)
            return None
        return data

    def _jit_cache_path(self) -> Path:
        return self.plan_path.with_name(f"{self.plan_path.stem}.{self.gpu.sm}-{_slug(self.gpu.name)}.jitcache")

    def _create_context(self) -> Any:
        """TensorRT-RTX compiles kernels for this GPU when the plan loads: keep them in a runtime cache file."""
        if self.flavour.is_rtx and hasattr(self._engine, "create_runtime_config"):
            try:
                rc = self._engine.create_runtime_config()
                cache = rc.create_runtime_cache()
                path = self._jit_cache_path()
                if path.is_file():
                    cache.deserialize(path.read_bytes())
                rc.set_runtime_cache(cache)
                ctx = self._engine.create_execution_context(rc)
                if ctx is not None:
                    self._runtime_cache = (rc, cache)
                    return ctx
            except Exception as exc:  # best effort: run without the cache
                log.info("TensorRT-RTX runtime cache not used: %s", exc)
        return self._engine.create_execution_context()

    def _save_jit_cache(self) -> None:
        if self._runtime_cache is None:
            return
        with contextlib.suppress(Exception):
            blob = self._runtime_cache[1].serialize()
            if blob is not None and len(memoryview(blob)):
                write_atomic(self._jit_cache_path(), bytes(memoryview(blob)))

    def _setup_io(self) -> None:
        trt, eng, ctx, pkg = self._trt, self._engine, self._context, self.package
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        self._inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self._inputs != [pkg.input_name] or pkg.output_name not in self._outputs:
            raise ModelPackageError(
                f"model package {pkg.path}: the engine has inputs {self._inputs} and outputs "
                f"{self._outputs}, the manifest names {pkg.input_name!r} -> {pkg.output_name!r}"
            )
        self.min_shape, self.opt_shape, self.max_shape = (
            tuple(int(d) for d in s) for s in eng.get_tensor_profile_shape(pkg.input_name, 0)
        )
        self.max_batch = self.max_shape[0]
        if not ctx.set_input_shape(pkg.input_name, self.max_shape):
            raise EngineBuildError(f"{self.plan_path}: the engine refuses its own max shape {self.max_shape}")
        self._dtypes = {n: _np_dtype(trt, eng.get_tensor_dtype(n)) for n in names}
        self._dev: dict[str, Any] = {}
        self._host: dict[str, np.ndarray] = {}
        for n in names:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise ModelPackageError(f"model package {pkg.path}: output {n!r} has a data-dependent shape {shape}")
            count = int(np.prod(shape)) if shape else 1
            nbytes = max(1, count * self._dtypes[n].itemsize)
            self._dev[n] = self._cuda.mem_alloc(nbytes)
            if n == pkg.input_name or n == pkg.output_name:
                self._host[n] = self._cuda.pagelocked_empty(count, self._dtypes[n])
        out_max = tuple(ctx.get_tensor_shape(pkg.output_name))
        classes = pkg.manifest.output.classes
        if len(out_max) != 4 or out_max[1] != classes:
            raise ModelPackageError(
                f"model package {pkg.path}: output {pkg.output_name!r} has shape {out_max} for "
                f"input {self.max_shape}; the manifest says (N, {classes}, H, W)"
            )

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        """Make the GPU's primary context current on this thread (run() may be called from any thread)."""
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    # -- running ------------------------------------------------------------------------------------

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """InferenceError unless (n, C, H, W) fits the engine's profile (any n: batches are split)."""
        mn, mx = self.min_shape, self.max_shape
        ok = len(shape) == 4 and shape[1] == mx[1] and mn[2] <= shape[2] <= mx[2] and mn[3] <= shape[3] <= mx[3]
        if not ok:
            raise InferenceError(
                f"model {self.package.name}: input of shape {tuple(shape)} does not fit the engine's "
                f"profile: (N, {mx[1]}, H, W) with H in {mn[2]}..{mx[2]} and W in {mn[3]}..{mx[3]} "
                f"(batches over {mx[0]} are split)"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise InferenceError("the TensorRT backend is closed")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        self.check_shape(x.shape)
        if x.shape[0] == 0:
            return np.empty((0, self.package.manifest.output.classes, *x.shape[2:]), np.float32)
        parts = []
        with self._lock, self._current():  # one stream and one set of buffers: one run at a time
            for start in range(0, x.shape[0], self.max_batch):
                parts.append(self._run_chunk(x[start : start + self.max_batch]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run_chunk(self, x: np.ndarray) -> np.ndarray:
        cuda, ctx, stream = self._cuda, self._context, self._stream
        iname, oname = self.package.input_name, self.package.output_name
        if not ctx.set_input_shape(iname, x.shape):
            raise InferenceError(f"TensorRT refused input shape {x.shape}: " + " | ".join(self._logger.errors[-3:]))
        h_in = self._host[iname][: x.size].reshape(x.shape)
        np.copyto(h_in, x, casting="same_kind" if h_in.dtype.kind == "f" else "unsafe")
        for n, mem in self._dev.items():
            ctx.set_tensor_address(n, int(mem))
        out_shape = tuple(ctx.get_tensor_shape(oname))
        size = int(np.prod(out_shape))
        cuda.memcpy_htod_async(self._dev[iname], h_in, stream)
        if not ctx.execute_async_v3(stream.handle):
            stream.synchronize()
            raise InferenceError(
                f"TensorRT failed to run {self.package.name} on {self.device}: "
                + (" | ".join(self._logger.errors[-3:]) or "no reason given")
            )
        h_out = self._host[oname][:size]
        cuda.memcpy_dtoh_async(h_out, self._dev[oname], stream)
        stream.synchronize()
        # astype copies, so the page-locked buffer can be reused by the next chunk.
        return h_out.reshape(out_shape).astype(np.float32, copy=True)

    def close(self) -> None:
        if self._closed or self._ctx is None:
            self._closed = True
            return
        self._closed = True
        with self._current():
            self._save_jit_cache()
            for mem in getattr(self, "_dev", {}).values():
                mem.free()
            self._dev, self._host = {}, {}
            for attr in ("_stream", "_context", "_runtime_cache", "_engine", "_runtime"):
                if hasattr(self, attr):
                    setattr(self, attr, None)
        self._ctx.detach()
        self._ctx = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
