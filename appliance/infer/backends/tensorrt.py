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

Nothing here imports ``tensorrt``, ``tensorrt_rtx``, ``pycuda`` or ``onnx`` at module level: this module
imports on machines that have none of them, and :class:`TensorRTBackend` then raises
:class:`BackendUnavailable`, on which ``auto`` falls back to ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from appliance.errors import BackendUnavailable, EngineBuildError, InferenceError, ModelPackageError
from appliance.models.package import ModelPackage
from appliance.store.spool import fsync_dir, write_atomic

log = logging.getLogger("appliance.infer")

PRECISIONS = ("fp16", "fp32")
#: Bump when the way plans are built changes (flags, conversion), so old plans are not reused.
RECIPE_VERSION = 1
#: ``gpu_id`` of a TensorRT-RTX plan built for its default (portable) set of compute capabilities.
PORTABLE = "portable"
#: Where plans go when the caller names no folder: ``<data_dir>/engines`` with the default data_dir.
DEFAULT_ENGINES_DIR = Path("var") / "engines"
#: Builder scratch memory: at most this, and at most a quarter of the GPU's memory when it is known.
DEFAULT_WORKSPACE = 2 << 30
#: Compute capabilities a TensorRT-RTX plan built with no explicit target runs on (its documentation:
#: "8.0, 8.6, 8.9, 12.0 and later"); 7.5 needs ``ComputeCapability.SM75`` set at build time.
_RTX_DEFAULT_TARGETS = "8.0, 8.6, 8.9, 12.x"


# --------------------------------------------------------------------------------------------------
# Which TensorRT


@dataclass(frozen=True)
class Flavour:
    module: ModuleType
    #: "tensorrt" or "tensorrt_rtx": the module's name, used in cache keys.
    name: str
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def fp16_by_flag(self) -> bool:
        """TensorRT (up to 10.x at least) has BuilderFlag.FP16; TensorRT-RTX does not."""
        return hasattr(self.module.BuilderFlag, "FP16")


def trt_flavour(prefer: tuple[str, ...] = ("tensorrt", "tensorrt_rtx")) -> Flavour:
    """The TensorRT module that imports here (``tensorrt`` preferred), its name and version."""
    import importlib

    errors = []
    for name in prefer:
        try:
            mod = importlib.import_module(name)
            version = str(mod.__version__)
            mod.Builder  # noqa: B018 - the stub "tensorrt" wheels import but hold no bindings
        except Exception as exc:  # ImportError, or a broken install (missing libnvinfer, stub package)
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        return Flavour(mod, name, version)
    raise BackendUnavailable("TensorRT is not installed: neither the tensorrt module (JetPack, datacenter "
                             "installs) nor tensorrt_rtx (pip install tensorrt-rtx) imports ("
                             + "; ".join(errors) + ")")


# --------------------------------------------------------------------------------------------------
# Which GPU (through the CUDA driver API with ctypes: no pycuda or cuda-python needed)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    driver_version: int  # e.g. 13000 for CUDA 13.0

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def device(self) -> str:
        return f"cuda:{self.index} {self.name}"


def _cu_error(lib: Any, rc: int) -> str:
    name, text = ctypes.c_char_p(), ctypes.c_char_p()
    with contextlib.suppress(Exception):
        lib.cuGetErrorName(rc, ctypes.byref(name))
        lib.cuGetErrorString(rc, ctypes.byref(text))
    parts = [p.value.decode(errors="replace") for p in (name, text) if p.value]
    return f"error {rc}" + (f" ({': '.join(parts)})" if parts else "")


def gpu_info(index: int = 0) -> GpuInfo:
    """Name, compute capability and memory of CUDA device ``index``; BackendUnavailable where none answers."""
    lib = None
    errors = []
    for soname in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(soname)
            break
        except OSError as exc:
            errors.append(str(exc))
    if lib is None:
        raise BackendUnavailable(f"no CUDA GPU/driver: the NVIDIA driver's libcuda.so.1 is not installed ({errors[0]})")
    rc = lib.cuInit(0)
    if rc != 0:
        raise BackendUnavailable(f"no CUDA GPU/driver: cuInit failed with {_cu_error(lib, rc)}")
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        raise BackendUnavailable("no CUDA GPU/driver: the driver reports no CUDA device"
                                 + (f" ({_cu_error(lib, rc)})" if rc else ""))
    if not 0 <= index < count.value:
        raise BackendUnavailable(f"no CUDA GPU/driver: device {index} asked for, {count.value} present")
    dev = ctypes.c_int(0)
    rc = lib.cuDeviceGet(ctypes.byref(dev), index)
    if rc != 0:
        raise BackendUnavailable(f"no CUDA GPU/driver: cuDeviceGet({index}) failed with {_cu_error(lib, rc)}")
    buf = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(buf, 256, dev)
    major, minor, drv = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    lib.cuDriverGetVersion(ctypes.byref(drv))
    mem = ctypes.c_size_t(0)
    lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
    return GpuInfo(index, buf.value.decode(errors="replace").strip() or "unknown GPU",
                   (major.value, minor.value), int(mem.value), drv.value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-") or "x"


def default_gpu_id(flavour: Flavour, gpu: GpuInfo | None = None, *, index: int = 0) -> str:
    """The GPU part of a cache key: what the plan is built for.

    TensorRT: one GPU model, e.g. ``sm90-nvidia-h100-80gb-hbm3`` (queries the GPU when ``gpu`` is None,
    so BackendUnavailable without one). TensorRT-RTX: ``portable`` (its default targets, no GPU needed)
    or, for a Turing GPU, ``sm75``.
    """
    if flavour.is_rtx:
        if gpu is not None and gpu.compute_capability == (7, 5):
            return "sm75"
        return PORTABLE
    gpu = gpu or gpu_info(index)
    return f"{gpu.sm}-{_slug(gpu.name)}"


# --------------------------------------------------------------------------------------------------
# The cache


def engine_cache_key(package: ModelPackage, precision: str, gpu_id: str, flavour: str, trt_version: str) -> str:
    """File stem of a plan: readable fields, then a digest of everything that shapes the plan."""
    _check_precision(precision)
    recipe = _recipe(package, precision, gpu_id, flavour, trt_version)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return "-".join([_slug(package.name), package.onnx_sha256[:12], _slug(flavour), _slug(trt_version),
                     _slug(gpu_id), precision, digest])


def _recipe(package: ModelPackage, precision: str, gpu_id: str, flavour: str, trt_version: str) -> dict[str, Any]:
    return {"recipe": RECIPE_VERSION, "onnx_sha256": package.onnx_sha256, "input": package.input_name,
            "output": package.output_name, "profile": [list(s) for s in package.profile],
            "precision": precision, "gpu": gpu_id, "flavour": flavour, "trt_version": trt_version}


def engine_paths(engines_dir: Path, key: str) -> tuple[Path, Path]:
    """(plan, sidecar JSON) for a cache key."""
    engines_dir = Path(engines_dir)
    return engines_dir / f"{key}.plan", engines_dir / f"{key}.json"


def read_sidecar(plan: Path) -> dict[str, Any] | None:
    try:
        return json.loads(plan.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached(plan: Path) -> bool:
    """A plan counts only with its sidecar and the size the sidecar recorded (written before the plan)."""
    meta = read_sidecar(plan)
    try:
        return meta is not None and plan.stat().st_size == meta.get("plan_bytes")
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock across processes; released when the process dies, so never stale."""
    with open(path, "a+b") as f:
        waited = time.monotonic()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building %s", path.stem.lstrip("."))
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            log.info("the other build finished after %.1f s", time.monotonic() - waited)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# Building


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")


def _make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps errors (for exception messages) and passes warnings to our log."""

    class _Logger(trt.ILogger):  # type: ignore[name-defined]  # trt is imported lazily: no GPU stack, no type
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.debug("TensorRT error: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _check_onnx_readable(path: Path, where: str) -> None:
    """Decode the ONNX protobuf first where the onnx package is installed: a clearer error than the parser's."""
    try:
        import onnx
    except ImportError:  # e.g. a JetPack install with TensorRT only: the parser's own checks remain
        return
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise EngineBuildError(f"{where}: {path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                               "the file is damaged or not ONNX") from None
    if not model.graph.node or not model.graph.output:
        raise EngineBuildError(f"{where}: {path} holds no ONNX graph (no nodes or no outputs): the file is not "
                               "an ONNX model or is empty")


def convert_onnx_fp16(src: Path, dst: Path) -> None:
    """Write an FP16 copy of an ONNX model whose inputs and outputs stay float32 (Casts at the edges)."""
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as exc:
        raise EngineBuildError(f"an FP16 engine on TensorRT-RTX needs onnx and onnxconverter-common: {exc}") from None
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # DecodeError and friends
        raise EngineBuildError(f"{src} is not a readable ONNX model: {type(exc).__name__}: {exc}") from None
    try:
        model16 = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise EngineBuildError(f"{src}: converting the model to FP16 failed: {type(exc).__name__}: {exc}") from None
    big = model16.ByteSize() > (1 << 30)
    onnx.save_model(model16, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)


def _build_serialized(fl: Flavour, package: ModelPackage, precision: str, gpu_id: str,
                      workspace: int) -> tuple[bytes, dict[str, Any]]:
    trt = fl.module
    logger = _make_logger(trt)
    where = f"model {package.name} {package.version}"
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    fp16_method = None
    _check_onnx_readable(package.onnx_path, where)
    with tempfile.TemporaryDirectory(prefix="appliance-trt-") as td:
        onnx_file = package.onnx_path
        if precision == "fp16":
            if fl.fp16_by_flag:
                fp16_method = "BuilderFlag.FP16"
            else:
                onnx_file = Path(td) / "model.fp16.onnx"
                convert_onnx_fp16(package.onnx_path, onnx_file)
                fp16_method = "ONNX converted to FP16 (float32 I/O)"
        ok = parser.parse_from_file(str(onnx_file))
        if not ok:
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors or ["(no detail)"]
            raise EngineBuildError(f"{where}: {fl.name}'s ONNX parser cannot read {package.onnx_path}: "
                                   + " | ".join(e.strip() for e in errs[:8]))
    if network.num_inputs == 0 or network.num_outputs == 0:  # the parser accepts some garbage as an empty graph
        raise EngineBuildError(f"{where}: {fl.name}'s ONNX parser found no graph inputs or outputs in "
                               f"{package.onnx_path}: the file is not an ONNX model or is empty")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if package.input_name not in inputs or package.output_name not in outputs:
        raise ModelPackageError(f"model package {package.path}: model.onnx has inputs {list(inputs)} and outputs "
                                f"{outputs}, the manifest names {package.input_name!r} -> {package.output_name!r}")
    if len(inputs) != 1:
        raise ModelPackageError(f"model package {package.path}: model.onnx has inputs {list(inputs)}; "
                                "the appliance feeds exactly one")
    dims = tuple(inputs[package.input_name].shape)
    if len(dims) != 4:
        raise ModelPackageError(f"model package {package.path}: input {package.input_name!r} has shape {dims}, "
                                "not (N, C, H, W)")
    mn, opt, mx = package.profile
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(package.input_name, mn, opt, mx)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"{where}: input profile min {mn} opt {opt} max {mx} does not fit input "
                               f"{package.input_name!r} of shape {dims}: " + " | ".join(logger.errors[-4:]))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16_method == "BuilderFlag.FP16":
        config.set_flag(trt.BuilderFlag.FP16)
    if fl.is_rtx and gpu_id != PORTABLE:
        cc = getattr(trt.ComputeCapability, gpu_id.split("-")[0].upper(), None)
        if cc is None:
            raise EngineBuildError(f"{where}: {fl.name} {fl.version} cannot target {gpu_id!r}; it knows "
                                   + ", ".join(trt.ComputeCapability.__members__))
        config.num_compute_capabilities = 1
        config.set_compute_capability(cc, 0)
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - t0
    if serialized is None:
        raise EngineBuildError(f"{where}: {fl.name} {fl.version} could not build a {precision} engine: "
                               + (" | ".join(logger.errors[-8:]) or "(the builder gave no reason)"))
    info = {"fp16_method": fp16_method, "build_seconds": round(seconds, 3), "workspace_bytes": workspace,
            "onnx_input_shape": list(dims)}
    return bytes(memoryview(serialized)), info


def build_engine(package: ModelPackage, precision: str, engines_dir: Path, *, gpu_id: str | None = None,
                 workspace: int | None = None) -> tuple[Path, bool]:
    """The plan for ``package`` under ``engines_dir``, building it unless cached: (path, built_now).

    ``gpu_id`` None picks :func:`default_gpu_id` (TensorRT-RTX: ``portable``, no GPU needed; TensorRT:
    the GPU here). Raises BackendUnavailable (no TensorRT, or TensorRT with no GPU), EngineBuildError
    (unreadable or unsupported ONNX), ModelPackageError (ONNX tensors differ from the manifest).
    """
    _check_precision(precision)
    fl = trt_flavour()
    gpu = None
    if gpu_id is None or workspace is None:
        with contextlib.suppress(BackendUnavailable):
            gpu = gpu_info()
    if gpu_id is None:
        gpu_id = default_gpu_id(fl, gpu)
    if workspace is None:
        workspace = min(DEFAULT_WORKSPACE, gpu.total_memory // 4) if gpu else DEFAULT_WORKSPACE
    engines_dir = Path(engines_dir)
    engines_dir.mkdir(parents=True, exist_ok=True)
    key = engine_cache_key(package, precision, gpu_id, fl.name, fl.version)
    plan, sidecar = engine_paths(engines_dir, key)
    if _cached(plan):
        return plan, False
    with _file_lock(engines_dir / f".{key}.lock"):
        if _cached(plan):  # another process built it while we waited
            return plan, False
        for stale in engines_dir.glob(f".{key}.*.tmp"):  # left by a crash; nobody else holds the lock
            with contextlib.suppress(OSError):
                stale.unlink()
        log.info("building %s engine for %s %s (%s, target %s): this takes a while once",
                 fl.name, package.name, package.version, precision, gpu_id)
        data, info = _build_serialized(fl, package, precision, gpu_id, workspace)
        meta = {"key": key, **_recipe(package, precision, gpu_id, fl.name, fl.version),
                "model": package.name, "model_version": package.version, **info,
                "plan_bytes": len(data), "plan_sha256": hashlib.sha256(data).hexdigest(),
                "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "built_on": socket.gethostname(), "built_with_gpu": gpu.device if gpu else None}
        # Any old plan goes first, then the sidecar, the plan last: a plan file exists only once both
        # are complete on disk, and never beside a sidecar written for another plan.
        plan.unlink(missing_ok=True)
        write_atomic(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
        write_atomic(plan, data)
        with contextlib.suppress(OSError):  # best effort: the plan is re-built if it is lost
            fsync_dir(engines_dir)
        log.info("built %s (%.1f MB) in %.1f s", plan.name, len(data) / 1e6, info["build_seconds"])
    return plan, True


# --------------------------------------------------------------------------------------------------
# Running


def _import_pycuda() -> Any:
    try:
        import pycuda.driver as cuda
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a missing libcuda
        raise BackendUnavailable(f"pycuda is not usable ({type(exc).__name__}: {exc}); the TensorRT backend needs "
                                 "it for device memory and streams (pip install pycuda builds it against CUDA)") from None
    return cuda


def _np_dtype(trt: ModuleType, dt: Any) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dt))
    except Exception:
        raise ModelPackageError(f"the engine uses tensor type {dt}, which the appliance cannot feed or read") from None


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, package: ModelPackage, precision: str = "fp16", engines_dir: Path | None = None,
                 *, device_index: int = 0) -> None:
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
        log.info("TensorRT backend: %s %s on %s, %s, plan %s (%s)", package.name, package.version, self.device,
                 precision, self.plan_path.name, "built now" if self.built_now else "cached")

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
                    + "): " + (" | ".join(self._logger.errors[-4:]) or "no reason given"))
            self._runtime_cache: tuple[Any, Any] | None = None  # (TensorRT runtime config, its cache)
            self._context = self._create_context()
            if self._context is None:
                raise BackendUnavailable(f"{fl.name}: cannot create an execution context on {gpu.name}: "
                                         + " | ".join(self._logger.errors[-4:]))
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
            raise ModelPackageError(f"model package {pkg.path}: the engine has inputs {self._inputs} and outputs "
                                    f"{self._outputs}, the manifest names {pkg.input_name!r} -> {pkg.output_name!r}")
        self.min_shape, self.opt_shape, self.max_shape = (tuple(int(d) for d in s) for s in
                                                          eng.get_tensor_profile_shape(pkg.input_name, 0))
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
            raise ModelPackageError(f"model package {pkg.path}: output {pkg.output_name!r} has shape {out_max} for "
                                    f"input {self.max_shape}; the manifest says (N, {classes}, H, W)")

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
        ok = (len(shape) == 4 and shape[1] == mx[1] and mn[2] <= shape[2] <= mx[2] and mn[3] <= shape[3] <= mx[3])
        if not ok:
            raise InferenceError(f"model {self.package.name}: input of shape {tuple(shape)} does not fit the engine's "
                                 f"profile: (N, {mx[1]}, H, W) with H in {mn[2]}..{mx[2]} and W in {mn[3]}..{mx[3]} "
                                 f"(batches over {mx[0]} are split)")

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
                parts.append(self._run_chunk(x[start:start + self.max_batch]))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run_chunk(self, x: np.ndarray) -> np.ndarray:
        cuda, ctx, stream = self._cuda, self._context, self._stream
        iname, oname = self.package.input_name, self.package.output_name
        if not ctx.set_input_shape(iname, x.shape):
            raise InferenceError(f"TensorRT refused input shape {x.shape}: " + " | ".join(self._logger.errors[-3:]))
        h_in = self._host[iname][:x.size].reshape(x.shape)
        np.copyto(h_in, x, casting="same_kind" if h_in.dtype.kind == "f" else "unsafe")
        for n, mem in self._dev.items():
            ctx.set_tensor_address(n, int(mem))
        out_shape = tuple(ctx.get_tensor_shape(oname))
        size = int(np.prod(out_shape))
        cuda.memcpy_htod_async(self._dev[iname], h_in, stream)
        if not ctx.execute_async_v3(stream.handle):
            stream.synchronize()
            raise InferenceError(f"TensorRT failed to run {self.package.name} on {self.device}: "
                                 + (" | ".join(self._logger.errors[-3:]) or "no reason given"))
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
