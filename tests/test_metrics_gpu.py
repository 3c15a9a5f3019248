"""GPU gauges from the board's own counters on Jetson and from NVML on discrete GPUs; absent where neither is."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import parse_config
from appliance.metrics.collect import ModelView, ProcessView
from appliance.metrics.gpu import GpuSample, NvmlSource, parse_tegrastats
from appliance.metrics.http import MetricsApp
from appliance.store import Store

#: Recorded tegrastats lines: Orin (JetPack 6), Xavier NX (JetPack 5), Nano (JetPack 4), and an idle Orin line.
ORIN = ("12-03-2026 10:14:02 RAM 3265/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [12%@1510,8%@1510,"
        "4%@1510,3%@1510,off,off] EMC_FREQ 0% GR3D_FREQ 63% cpu@52.5C soc2@49.8C soc0@50.3C gpu@51.9C tj@52.5C "
        "soc1@50.1C VDD_IN 9416mW/7010mW VDD_CPU_GPU_CV 3261mW/1894mW VDD_SOC 2165mW/1952mW")
XAVIER = ("RAM 2911/7765MB (lfb 98x4MB) SWAP 0/3883MB (cached 0MB) CPU [5%@1190,2%@1190,0%@1190,1%@1190,off,off] "
          "EMC_FREQ 0% GR3D_FREQ 31% AUX@36.5C CPU@38C thermal@37.45C AO@37.5C GPU@37.5C PMIC@50C "
          "VDD_IN 4331/4331 VDD_CPU_GPU_CV 612/612 VDD_SOC 1307/1307")
NANO = ("RAM 1700/3964MB (lfb 143x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) CPU [7%@102,3%@102,"
        "2%@102,1%@102] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@24.5C CPU@27C PMIC@50C GPU@25.5C AO@34C "
        "thermal@26.25C POM_5V_IN 1231/1231 POM_5V_GPU 40/40 POM_5V_CPU 160/160")


def test_orin_line() -> None:
    assert parse_tegrastats(ORIN) == GpuSample(utilization_ratio=0.63, temperature_celsius=51.9, power_watts=3.261)


def test_nano_line_and_its_gpu_rail() -> None:
    assert parse_tegrastats(NANO) == GpuSample(utilization_ratio=0.0, temperature_celsius=25.5, power_watts=0.04)


def test_xavier_line_without_a_gpu_only_rail_gives_no_power() -> None:
    # Xavier's VDD_CPU_GPU_CV has no mW unit there; the figure is not guessed.
    got = parse_tegrastats(XAVIER)
    assert got is not None and got.utilization_ratio == 0.31 and got.temperature_celsius == 37.5


def test_a_line_without_gpu_load_is_no_sample() -> None:
    assert parse_tegrastats("RAM 3265/7620MB (lfb 2x4MB) CPU [1%@729]") is None
    assert parse_tegrastats("") is None


def _fake_nvml(**over: Any) -> Any:
    """Recorded NVML answers of an RTX A2000 under load (values as nvidia-ml-py returns them)."""
    calls = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetHandleByIndex": lambda i: ("handle", i),
        "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=87, memory=41),
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(total=12_878_086_144, used=3_221_225_472, free=0),
        "nvmlDeviceGetTemperature": lambda h, sensor: 64,
        "nvmlDeviceGetPowerUsage": lambda h: 61_234,  # mW
        "NVML_TEMPERATURE_GPU": 0,
    }
    calls.update(over)
    return SimpleNamespace(**calls)


def test_nvml_sample() -> None:
    s = NvmlSource(_fake_nvml()).sample()
    assert s == GpuSample(utilization_ratio=0.87, memory_used_bytes=3_221_225_472, temperature_celsius=64.0,
                          power_watts=61.234)


def test_nvml_figure_not_supported_is_absent() -> None:
    def unsupported(h: Any) -> Any:
        raise RuntimeError("NVMLError_NotSupported")

    s = NvmlSource(_fake_nvml(nvmlDeviceGetPowerUsage=unsupported)).sample()
    assert s is not None and s.power_watts is None and s.utilization_ratio == 0.87


class _Fixed:
    name = "fixed"

    def __init__(self, sample: GpuSample | None) -> None:
        self._s = sample

    def sample(self) -> GpuSample | None:
        return self._s

    def close(self) -> None:
        pass


def _gpu_samples(tmp_path: Path, source: Any) -> dict[str, float]:
    app = MetricsApp(parse_config({}), Store.open(tmp_path), lambda: ProcessView(), lambda: [ModelView("m", "1")],
                     source)
    body = b"".join(app({"PATH_INFO": "/metrics", "HTTP_ACCEPT": ""}, lambda s, h: None)).decode()
    return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples
            if s.name.startswith("appliance_gpu_")}


@pytest.mark.parametrize("source", [None, _Fixed(None)])
def test_no_gpu_means_absent_not_zero(tmp_path: Path, source: Any) -> None:
    assert _gpu_samples(tmp_path, source) == {}


def test_jetson_sample_in_the_exposition(tmp_path: Path) -> None:
    got = _gpu_samples(tmp_path, _Fixed(parse_tegrastats(ORIN)))
    assert got == {"appliance_gpu_utilization_ratio": 0.63, "appliance_gpu_temperature_celsius": 51.9,
                   "appliance_gpu_power_watts": 3.261}
