"""A real Prometheus scraping a real appliance through a whole series: received, processed, delivered to a
DCMTK storescp PACS (time-to-result observed), then the PACS gone (oldest pending grows, then a dead letter)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Appliance, free_port
from peers import StoreSCP
from test_export import ct_series, make
from test_worker import send, series_uid_of, wait_series

pytestmark = pytest.mark.slow


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[Appliance], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(app: Appliance) -> str:
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("prometheus is not installed: scripts/dev test installs Debian's prometheus package")
        port = free_port()
        cfg = tmp_path / "prom.yml"
        cfg.write_text(f"""global: {{scrape_interval: 1s}}
scrape_configs:
  - job_name: appliance
    static_configs: [{{targets: ["127.0.0.1:{app.metrics_port}"]}}]
""")
        procs.append(subprocess.Popen([exe, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        p.wait(20)


def promql(base: str, expr: str) -> float | None:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            res = json.loads(r.read())["data"]["result"]
    except OSError:
        return None
    return float(res[0]["value"][1]) if res else None


def eventually(base: str, expr: str, ok: Callable[[float], bool], within: float = 60.0) -> float:
    deadline, last = time.monotonic() + within, None
    while time.monotonic() < deadline:
        last = promql(base, expr)
        if last is not None and ok(last):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{expr} = {last} after {within:.0f} s")


def test_prometheus_follows_a_series_to_pacs_and_an_outage(appliance_factory: Any, tmp_path: Path,
                                                           prometheus: Callable[[Appliance], str]) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    app = make(appliance_factory, tmp_path, {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
               max_attempts=4)
    base = prometheus(app)
    folder, _ = ct_series(tmp_path)
    send(app, folder)
    n = len(list(folder.glob("*.dcm")))
    uid = series_uid_of(folder)
    assert wait_series(app, uid, {"done", "failed", "export_failed"}, within=60)["state"] == "done"
    eventually(base, "sum(appliance_dicom_instances_received_total)", lambda v: v == n)
    eventually(base, 'sum(appliance_time_to_result_seconds_count{model="threshold-test"})', lambda v: v == 1)
    eventually(base, 'count(appliance_model_info{model="threshold-test"})', lambda v: v == 1)
    eventually(base, 'sum(appliance_stage_duration_seconds_count{stage="infer"})', lambda v: v == 1)

    # The PACS goes away: the next series' results wait (oldest pending grows), then become dead letters.
    pacs.stop()
    folder2, _ = ct_series(tmp_path / "second", seed=5)
    send(app, folder2)
    eventually(base, 'appliance_export_oldest_pending_seconds{destination="pacs"}', lambda v: v > 0)
    eventually(base, 'appliance_outbox_dead{destination="pacs"}', lambda v: v >= 1, within=90)
    eventually(base, 'sum(appliance_export_attempts_total{destination="pacs", result="failed"})', lambda v: v >= 4)
