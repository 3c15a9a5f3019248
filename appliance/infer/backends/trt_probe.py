"""Which TensorRT flavour imports here, and which NVIDIA GPU answers (CUDA driver API through ctypes).

Part of the TensorRT backend (see ``tensorrt.py``); imports no GPU library at module level.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from appliance.errors import BackendUnavailable

#: "8.0, 8.6, 8.9, 12.0 and later"); 7.5 needs ``ComputeCapability.SM75`` set at build time.
_RTX_DEFAULT_TARGETS = "8.0, 8.6, 8.9, 12.x"
#: ``gpu_id`` of a TensorRT-RTX plan built for its default (portable) set of compute capabilities.
PORTABLE = "portable"


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
    raise BackendUnavailable(
        "TensorRT is not installed: neither the tensorrt module (JetPack, datacenter "
        "installs) nor tensorrt_rtx (pip install tensorrt-rtx) imports (" + "; ".join(errors) + ")"
    )


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
        raise BackendUnavailable(
            "no CUDA GPU/driver: the driver reports no CUDA device" + (f" ({_cu_error(lib, rc)})" if rc else "")
        )
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
    return GpuInfo(
        index,
        buf.value.decode(errors="replace").strip() or "unknown GPU",
        (major.value, minor.value),
        int(mem.value),
        drv.value,
    )


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
