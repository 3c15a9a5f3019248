"""The TensorRT plan cache: keys, sidecars, per-key locks, and building a plan from a model package.

Part of the TensorRT backend (see ``tensorrt.py``). Plans are written atomically under a per-key file lock
with a JSON sidecar recording what went in and the plan's SHA-256.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import gc
import hashlib
import json
import logging
import socket
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from appliance.errors import BackendUnavailable, EngineBuildError, ModelPackageError
from appliance.fsio import fsync_dir, write_atomic
from appliance.infer.backends import PRECISIONS
from appliance.infer.backends.trt_probe import (
    PORTABLE,
    Flavour,
    _slug,
    default_gpu_id,
    gpu_info,
    trt_flavour,
)
from appliance.models.package import ModelPackage

log = logging.getLogger("appliance.infer")

#: Bump when the way plans are built changes (flags, conversion), so old plans are not reused.
RECIPE_VERSION = 1
#: Where plans go when the caller names no folder: ``<data_dir>/engines`` with the default data_dir.
DEFAULT_ENGINES_DIR = Path("var") / "engines"
#: Builder scratch memory: at most this, and at most a quarter of the GPU's memory when it is known.
DEFAULT_WORKSPACE = 2 << 30
#: Compute capabilities a TensorRT-RTX plan built with no explicit target runs on (its documentation:


# --------------------------------------------------------------------------------------------------
# The cache


def engine_cache_key(package: ModelPackage, precision: str, gpu_id: str, flavour: str, trt_version: str) -> str:
    """File stem of a plan: readable fields, then a digest of everything that shapes the plan."""
    _check_precision(precision)
    recipe = _recipe(package, precision, gpu_id, flavour, trt_version)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return "-".join(
        [
            _slug(package.name),
            package.onnx_sha256[:12],
            _slug(flavour),
            _slug(trt_version),
            _slug(gpu_id),
            precision,
            digest,
        ]
    )


def _recipe(package: ModelPackage, precision: str, gpu_id: str, flavour: str, trt_version: str) -> dict[str, Any]:
    return {
        "recipe": RECIPE_VERSION,
        "onnx_sha256": package.onnx_sha256,
        "input": package.input_name,
        "output": package.output_name,
        "profile": [list(s) for s in package.profile],
        "precision": precision,
        "gpu": gpu_id,
        "flavour": flavour,
        "trt_version": trt_version,
    }


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
        raise EngineBuildError(
            f"{where}: {path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "the file is damaged or not ONNX"
        ) from None
    if not model.graph.node or not model.graph.output:
        raise EngineBuildError(
            f"{where}: {path} holds no ONNX graph (no nodes or no outputs): the file is not an ONNX model or is empty"
        )


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


def _build_serialized(
    fl: Flavour, package: ModelPackage, precision: str, gpu_id: str, workspace: int
) -> tuple[bytes, dict[str, Any]]:
    """Build with Python's cyclic garbage collector paused, and no TensorRT object left in a cycle.

    TensorRT calls our logger while it holds its own lock (``createInferBuilder`` does); a collection that
    the callback happened to trigger once freed an ``IBuilder`` of an earlier, failed build (kept alive by
    its exception's traceback) and its destructor waited for that same lock: the process hung for good.
    So no collection runs during a build, and a failed build's frames are cleared before the error leaves.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _build(fl, package, precision, gpu_id, workspace)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the builder, network and parser go now, by reference count
        raise
    finally:
        if was_enabled:
            gc.enable()


def _build(
    fl: Flavour, package: ModelPackage, precision: str, gpu_id: str, workspace: int
) -> tuple[bytes, dict[str, Any]]:
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
            raise EngineBuildError(
                f"{where}: {fl.name}'s ONNX parser cannot read {package.onnx_path}: "
                + " | ".join(e.strip() for e in errs[:8])
            )
    if network.num_inputs == 0 or network.num_outputs == 0:  # the parser accepts some garbage as an empty graph
        raise EngineBuildError(
            f"{where}: {fl.name}'s ONNX parser found no graph inputs or outputs in "
            f"{package.onnx_path}: the file is not an ONNX model or is empty"
        )
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if package.input_name not in inputs or package.output_name not in outputs:
        raise ModelPackageError(
            f"model package {package.path}: model.onnx has inputs {list(inputs)} and outputs "
            f"{outputs}, the manifest names {package.input_name!r} -> {package.output_name!r}"
        )
    if len(inputs) != 1:
        raise ModelPackageError(
            f"model package {package.path}: model.onnx has inputs {list(inputs)}; the appliance feeds exactly one"
        )
    dims = tuple(inputs[package.input_name].shape)
    if len(dims) != 4:
        raise ModelPackageError(
            f"model package {package.path}: input {package.input_name!r} has shape {dims}, not (N, C, H, W)"
        )
    mn, opt, mx = package.profile
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(package.input_name, mn, opt, mx)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(
            f"{where}: input profile min {mn} opt {opt} max {mx} does not fit input "
            f"{package.input_name!r} of shape {dims}: " + " | ".join(logger.errors[-4:])
        )
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if fp16_method == "BuilderFlag.FP16":
        config.set_flag(trt.BuilderFlag.FP16)
    if fl.is_rtx and gpu_id != PORTABLE:
        cc = getattr(trt.ComputeCapability, gpu_id.split("-")[0].upper(), None)
        if cc is None:
            raise EngineBuildError(
                f"{where}: {fl.name} {fl.version} cannot target {gpu_id!r}; it knows "
                + ", ".join(trt.ComputeCapability.__members__)
            )
        config.num_compute_capabilities = 1
        config.set_compute_capability(cc, 0)
    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - t0
    if serialized is None:
        raise EngineBuildError(
            f"{where}: {fl.name} {fl.version} could not build a {precision} engine: "
            + (" | ".join(logger.errors[-8:]) or "(the builder gave no reason)")
        )
    info = {
        "fp16_method": fp16_method,
        "build_seconds": round(seconds, 3),
        "workspace_bytes": workspace,
        "onnx_input_shape": list(dims),
    }
    return bytes(memoryview(serialized)), info


def build_engine(
    package: ModelPackage, precision: str, engines_dir: Path, *, gpu_id: str | None = None, workspace: int | None = None
) -> tuple[Path, bool]:
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
        log.info(
            "building %s engine for %s %s (%s, target %s): this takes a while once",
            fl.name,
            package.name,
            package.version,
            precision,
            gpu_id,
        )
        data, info = _build_serialized(fl, package, precision, gpu_id, workspace)
        meta = {
            "key": key,
            **_recipe(package, precision, gpu_id, fl.name, fl.version),
            "model": package.name,
            "model_version": package.version,
            **info,
            "plan_bytes": len(data),
            "plan_sha256": hashlib.sha256(data).hexdigest(),
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "built_on": socket.gethostname(),
            "built_with_gpu": gpu.device if gpu else None,
        }
        # Any old plan goes first, then the sidecar, the plan last: a plan file exists only once both
        # are complete on disk, and never beside a sidecar written for another plan.
        plan.unlink(missing_ok=True)
        write_atomic(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
        write_atomic(plan, data)
        with contextlib.suppress(OSError):  # best effort: the plan is re-built if it is lost
            fsync_dir(engines_dir)
        log.info("built %s (%.1f MB) in %.1f s", plan.name, len(data) / 1e6, info["build_seconds"])
    return plan, True
