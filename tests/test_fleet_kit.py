"""The fleet kit loads into the real tools: promtool accepts and passes its rules, tests and configs, and a real
Prometheus scraping a running appliance evaluates every expression of its rules and dashboards."""

from __future__ import annotations

import json
import shutil
import sys
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from appliance.metrics.kit import RECORDING, KitOptions, alerts, dashboard, write_kit
from appliance_dev.dicom_factory import make_series
from conftest import appliance_exe, free_port, run_storescu


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/dev test installs Debian's prometheus package (it has promtool)")
    return path


def _run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_kit_written_by_the_cli_passes_promtool(tmp_path: Path) -> None:
    r = subprocess.run([appliance_exe(), "fleet", "kit", str(tmp_path / "kit"), "--clinic-hours", "6-20"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kit = tmp_path / "kit"
    promtool = _tool("promtool")
    for cmd in (("check", "rules", "appliance.rules.yml"), ("test", "rules", "appliance.rules.test.yml"),
                ("check", "config", "prometheus/scrape.yml"), ("check", "config", "--agent", "prometheus/agent.yml"),
                ("check", "config", "prometheus/federation.yml")):
        res = _run(promtool, *cmd, cwd=kit)
        assert res.returncode == 0, f"promtool {' '.join(cmd)}:\n{res.stdout}{res.stderr}"
    assert "hour() >= 6 and hour() < 20" in (kit / "appliance.rules.yml").read_text()


def test_bad_clinic_hours_are_refused(tmp_path: Path) -> None:
    r = subprocess.run([appliance_exe(), "fleet", "kit", str(tmp_path / "k"), "--clinic-hours", "20-6"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--clinic-hours" in r.stderr


def test_a_rule_test_that_cannot_fire_is_caught(tmp_path: Path) -> None:
    """The promtool tests are not vacuous: with an alert's threshold moved they fail."""
    kit = tmp_path / "kit"
    write_kit(kit, KitOptions(gpu_hot_celsius=95.0))  # the test's 90 C no longer fires
    res = _run(_tool("promtool"), "test", "rules", "appliance.rules.test.yml", cwd=kit)
    assert res.returncode != 0 and "ApplianceGpuHot" in res.stdout + res.stderr


def _query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


@pytest.mark.slow
def test_real_prometheus_scrapes_the_appliance_and_evaluates_the_kit(appliance_factory: Any, tmp_path: Path) -> None:
    app = appliance_factory()
    make_series(tmp_path / "s", 4)
    assert run_storescu(app, tmp_path / "s").returncode == 0
    kit = tmp_path / "kit"
    write_kit(kit)
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{kit}/appliance.rules.yml"]
scrape_configs:
  - job_name: appliance
    static_configs:
      - targets: ["127.0.0.1:{app.metrics_port}"]
        labels: {{site: "test-site", device: "box-1"}}
""")
    proc = subprocess.Popen([_tool("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "prometheus.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline:
            try:
                got = _query(base, 'sum(appliance_dicom_instances_received_total{job="appliance"})')
                if got.get("data", {}).get("result"):
                    value = float(got["data"]["result"][0]["value"][1])
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert value == 4.0, (tmp_path / "prometheus.log").read_text()[-2000:]
        up = _query(base, 'up{job="appliance"}')["data"]["result"]
        assert up and up[0]["metric"]["site"] == "test-site" and up[0]["value"][1] == "1"
        info = _query(base, "appliance_model_info")["data"]["result"]
        assert any(r["metric"].get("model") == "liver-ct-demo" for r in info)
        exprs = [e for _, e in RECORDING] + [a.expr for a in alerts(KitOptions())]
        for fleet in (False, True):
            for panel in dashboard(fleet)["panels"]:
                exprs += [t["expr"].replace("$site", ".*").replace("$device", ".*")
                          .replace("$instance", f"127.0.0.1:{app.metrics_port}") for t in panel["targets"]]
        bad = {e: r.get("error") for e in exprs if (r := _query(base, e)).get("status") != "success"}
        assert bad == {}
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.slow
def test_fleet_simulation_runs_end_to_end(tmp_path: Path) -> None:
    """The fleet benchmark at toy size: simulated boxes up in a real Prometheus with the kit's rules evaluated."""
    _tool("prometheus")
    out = tmp_path / "fleet.json"
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "fleet_sim.py"),
                        "--boxes", "4", "--reference-boxes", "2", "--interval", "1", "--minutes", "0.2",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["fleet"]["targets_up"] == 4 and result["fleet"]["rule_eval_s_max"] is not None
    assert result["fleet"]["head_series"] > result["reference"]["head_series"]
