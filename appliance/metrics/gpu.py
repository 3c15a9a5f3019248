"""GPU health for the metrics: NVML on discrete GPUs, the board's own counters (``tegrastats``) on Jetson.

DCGM does not run on Jetson and NVML there reports almost nothing, so each kind of box is read the way its
vendor exposes it, into one set of gauges. Where neither exists (this CPU-only VM) the gauges are absent, not
zero: a fleet must be able to tell "no GPU" from "idle GPU".
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("appliance.metrics")


@dataclass(frozen=True)
class GpuSample:
    utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None


class GpuSource(Protocol):
    name: str

    def sample(self) -> GpuSample | None: ...

    def close(self) -> None: ...


# -- Jetson --------------------------------------------------------------------------------------------

_GR3D = re.compile(r"\bGR3D(?:_FREQ)? (\d+)%")
_GPU_TEMP = re.compile(r"\b(?:gpu|GPU)@(-?[\d.]+)C")
#: Orin: VDD_CPU_GPU_CV (GPU with CPU and CV cores); Xavier/Nano: VDD_GPU, VDD_SYS_GPU, or "GPU 123/456" (mW).
_GPU_POWER = (
    re.compile(r"\bVDD_GPU(?:_SOC)? (\d+)mW"),
    re.compile(r"\bVDD_SYS_GPU (\d+)/\d+"),
    re.compile(r"\bVDD_CPU_GPU_CV (\d+)mW"),
    re.compile(r"\bPOM_5V_GPU (\d+)/\d+"),
)


def parse_tegrastats(line: str) -> GpuSample | None:
    """One ``tegrastats`` line -> the GPU figures in it; None when it carries no GPU load figure at all."""
    util = _GR3D.search(line)
    if util is None:
        return None
    temp = _GPU_TEMP.search(line)
    power = next((m for m in (p.search(line) for p in _GPU_POWER) if m is not None), None)
    return GpuSample(
        utilization_ratio=int(util.group(1)) / 100.0,
        temperature_celsius=float(temp.group(1)) if temp else None,
        power_watts=int(power.group(1)) / 1000.0 if power else None,
    )


class TegrastatsSource:
    """Keeps the last line of a ``tegrastats --interval`` child; a scrape reads it, never waits for one."""

    name = "tegrastats"

    def __init__(self, exe: str, interval_ms: int = 1000) -> None:
        self._proc = subprocess.Popen(
            [exe, "--interval", str(interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._last: GpuSample | None = None
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            sample = parse_tegrastats(line[:4096])  # a line is ~300 bytes; never hold more of one
            if sample is not None:
                self._last = sample

    def sample(self) -> GpuSample | None:
        return self._last

    def close(self) -> None:
        self._proc.terminate()


# -- discrete GPUs -------------------------------------------------------------------------------------


class NvmlSource:
    """NVML through ``nvidia-ml-py`` (``import pynvml``), GPU 0, read at each scrape (microseconds)."""

    name = "nvml"

    def __init__(self, nvml: Any, index: int = 0) -> None:
        self._nvml = nvml
        nvml.nvmlInit()
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def sample(self) -> GpuSample | None:
        n, h = self._nvml, self._handle

        def read(fn: Any, *args: Any) -> Any:
            try:
                return fn(h, *args)
            except Exception:  # NVMLError_NotSupported and friends: that figure is absent
                return None

        util = read(n.nvmlDeviceGetUtilizationRates)
        mem = read(n.nvmlDeviceGetMemoryInfo)
        temp = read(n.nvmlDeviceGetTemperature, getattr(n, "NVML_TEMPERATURE_GPU", 0))
        power = read(n.nvmlDeviceGetPowerUsage)
        return GpuSample(
            utilization_ratio=util.gpu / 100.0 if util is not None else None,
            memory_used_bytes=int(mem.used) if mem is not None else None,
            temperature_celsius=float(temp) if temp is not None else None,
            power_watts=power / 1000.0 if power is not None else None,
        )

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


def detect() -> GpuSource | None:
    """The GPU source this box has: tegrastats on a Jetson, NVML where a driver answers, else None."""
    exe = shutil.which("tegrastats")
    if exe is not None:
        try:
            return TegrastatsSource(exe)
        except OSError as exc:
            log.warning("tegrastats is installed but cannot run (%s): no GPU metrics", exc)
    try:
        import pynvml  # nvidia-ml-py

        return NvmlSource(pynvml)
    except Exception as exc:  # not installed, or no driver / no GPU
        log.info("no GPU metrics here (%s: %s)", type(exc).__name__, exc)
        return None
