"""The panel inside ``appliance serve`` and alone: on its own port beside the receiver, its health endpoints
with the supervisor's checks, a taken port that costs the panel and not reception, and ``appliance panel``."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import appliance_exe, free_port, run_echoscu

pytestmark = pytest.mark.slow


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait_http(url: str, timeout: float = 30.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_serve_runs_the_panel_with_the_supervisors_health(appliance_factory: Any) -> None:
    app = appliance_factory()
    base = f"http://127.0.0.1:{app.panel_port}"
    status, body = _wait_http(base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    status, body = _get(base + "/readyz")
    report = json.loads(body)
    assert set(report["checks"]) == {"store", "listeners", "worker", "models", "disk"}, report
    assert status == (200 if report["status"] == "ready" else 503)
    assert _get(base + "/api/v1/series")[0] == 401
    deadline = time.monotonic() + 10
    while "panel on http://127.0.0.1:" not in app.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "panel on http://127.0.0.1:" in app.log_text() and "Logging error" not in app.log_text()


def test_a_taken_panel_port_costs_the_panel_not_reception(appliance_factory: Any) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        app = appliance_factory(panel={"port": blocker.getsockname()[1]})
        deadline = time.monotonic() + 30  # the panel starts just after the receiver (it imports Flask)
        while "running WITHOUT the panel" not in app.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cannot serve the panel on 127.0.0.1:" in app.log_text(), app.log_tail()
        assert run_echoscu(app).returncode == 0
        assert app.running
    finally:
        blocker.close()


def test_appliance_panel_runs_alone_on_a_data_directory(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[panel]\nbind = "127.0.0.1"\nport = {port}\n')
    proc = subprocess.Popen([appliance_exe(), "panel", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        status, _ = _wait_http(f"http://127.0.0.1:{port}/healthz")
        assert status == 200
        status, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and "outside 'appliance serve'" in json.loads(body)["reason"]
        status, page = _get(f"http://127.0.0.1:{port}/login")
        assert status == 200 and 'name="csrf_token"' in page and "No account exists yet" in page
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode(errors="replace")
    assert proc.returncode in (0, -15), out
