"""The ``appliance`` command: help, start-up refusals, and a clean stop on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (CALLED_AE, appliance_exe, dcmtk_env, need_tool, parse_storescu, pynetdicom_ae,
                      write_toml)
from appliance_dev.dicom_factory import make_series


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([appliance_exe(), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("args,expect", [
    ((), ["serve", "series"]),
    (("serve",), ["--config"]),
    (("series",), ["--config", "--json"]),
])
def test_help(args: tuple[str, ...], expect: list[str]) -> None:
    res = run_cli(*args, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: appliance")
    for word in expect:
        assert word in res.stdout


def test_no_command_is_a_usage_error() -> None:
    res = run_cli()
    assert res.returncode == 2
    assert "usage:" in res.stderr


def test_version() -> None:
    from appliance import __version__

    res = run_cli("--version")
    assert res.returncode == 0
    assert __version__ in res.stdout


def test_series_without_data_is_an_error(tmp_path: Path) -> None:
    write_toml(tmp_path / "a.toml", {"storage": {"data_dir": str(tmp_path / "nothing-here")}})
    res = run_cli("series", "--config", str(tmp_path / "a.toml"))
    assert res.returncode != 0
    assert "no appliance data" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_serve_refuses_unknown_key(tmp_path: Path) -> None:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(f'[dicom]\nport = 11112\nprot = 1\n\n[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    res = run_cli("serve", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "dicom.prot" in out
    assert "Traceback" not in out
    assert not (tmp_path / "data").exists(), "serve touched the data directory with an invalid config"


@pytest.mark.slow
def test_serve_refuses_bad_value(tmp_path: Path) -> None:
    cfg = tmp_path / "appliance.toml"
    cfg.write_text('[dicom]\nport = 0\n')
    res = run_cli("serve", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode != 0
    assert "dicom.port" in res.stdout + res.stderr


@pytest.mark.slow
def test_port_in_use_is_a_clear_error(appliance_factory: Any, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        app = appliance_factory(start=False, dicom={"port": port})
        res = app.cli("serve", timeout=60)
    assert res.returncode != 0
    assert "already in use" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_second_appliance_on_same_data_dir_is_refused(appliance_factory: Any, tmp_path: Path) -> None:
    first = appliance_factory()
    second = appliance_factory("second", start=False, storage={"data_dir": str(first.data_dir)})
    res = second.cli("serve", timeout=60)
    assert res.returncode != 0
    assert "already running" in res.stderr
    assert first.running


@pytest.mark.slow
def test_sigterm_with_idle_association_exits_zero(appliance_factory: Any) -> None:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    app = appliance_factory()
    ae = pynetdicom_ae("IDLE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", app.port, ae_title=CALLED_AE)
    assert assoc.is_established
    assert app.proc is not None
    t0 = time.monotonic()
    app.proc.send_signal(signal.SIGTERM)
    rc = app.proc.wait(20)
    elapsed = time.monotonic() - t0
    assert rc == 0, app.log_tail()
    assert elapsed < 20
    # The open association was ended by the appliance, not left hanging.
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established
    log = app.log_text()
    assert "stopped" in log
    assert "Traceback" not in log, "the stop logged a traceback:\n" + app.log_tail()


@pytest.mark.slow
def test_sigterm_during_transfer_keeps_acknowledged_instances(appliance_factory: Any, tmp_path: Path) -> None:
    series = make_series(tmp_path / "series", 150, rows=64, cols=64)
    app = appliance_factory()
    cmd = [need_tool("storescu"), "-v", "-xs", "+sd", "+r", "-aet", "MODALITY", "-aec", CALLED_AE, "127.0.0.1",
           str(app.port), str(tmp_path / "series")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
    assert proc.stdout is not None and app.proc is not None
    lines, seen, t0 = [], 0, None
    for line in proc.stdout:
        lines.append(line)
        if t0 is None and "Received Store Response (Success)" in line:
            seen += 1
            if seen == 30:
                app.proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
    proc.wait(60)
    assert t0 is not None, "storescu finished before SIGTERM"
    rc = app.proc.wait(20)
    assert rc == 0, app.log_tail()
    assert time.monotonic() - t0 < 20
    acked = {Path(p).name for p, st in parse_storescu("".join(lines)).items() if st == "Success"}
    assert len(acked) < len(series), "the stop did not interrupt the transfer"
    stored = {r["sop_instance_uid"] for r in app.query("SELECT sop_instance_uid FROM instances")}
    for inst in series:
        if inst.path.name in acked:
            assert inst.sop_instance_uid in stored, f"{inst.path.name} acknowledged but not indexed"
    assert app.partials() == []
    assert "Traceback" not in app.log_text(), app.log_tail()


def test_start_waits_for_processes_of_a_killed_run(tmp_path: Path) -> None:
    """A process of a killed run that is still exiting (blocked in disk I/O) holds processes.lock;
    recovery must wait for it instead of cleaning up under its feet."""
    import fcntl
    import threading
    import time

    from appliance.store.locks import hold_processes_lock, wait_for_previous_run

    straggler = hold_processes_lock(tmp_path)
    t = threading.Thread(target=lambda: wait_for_previous_run(tmp_path, timeout=10).close())
    t.start()
    time.sleep(0.6)
    assert t.is_alive(), "recovery began while a process of the previous run still held the lock"
    straggler.close()
    t.join(5)
    assert not t.is_alive()
    with open(tmp_path / "processes.lock", "a") as f:  # and it let go afterwards
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- restart policies: listeners and the worker ---------------------------------------------------------


def test_worker_backoff_doubles_is_capped_and_resets_after_a_healthy_run() -> None:
    from appliance.service import RestartBackoff

    b = RestartBackoff(base=1.0, cap=8.0, healthy_after=60.0)
    assert [b.delay(lived=0.5) for _ in range(7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert b.delay(lived=120.0) == 0.0  # ran fine for a while: a fresh start
    assert b.delay(lived=0.1) == 1.0


def test_listener_budget_counts_deaths_within_the_window() -> None:
    from appliance.service import RestartBudget

    budget = RestartBudget(limit=2, window=10.0)
    assert budget.died(0.0) and budget.died(1.0)
    assert not budget.died(2.0)
    assert budget.died(30.0), "deaths older than the window are forgotten"


_CRASHING_WORKER_SUPERVISOR = '''
import os
import sys

from appliance import logs
from appliance.config import load_config
from appliance.service import RestartBackoff, Supervisor


def die_at_once(config, ready):
    os._exit(3)  # a model or driver that kills its process, every time


if __name__ == "__main__":
    cfg = load_config(sys.argv[1])
    logs.setup(cfg.logging.level)
    sys.exit(Supervisor(cfg, worker_target=die_at_once,
                        worker_backoff=RestartBackoff(base=0.05, cap=0.2, healthy_after=60.0)).run())
'''


@pytest.mark.slow
def test_worker_that_keeps_dying_never_stops_reception(appliance_factory: Any, tmp_path: Path) -> None:
    """Worker deaths have their own policy: far more of them than the listeners' budget (5 a minute) and
    the listeners still receive; the appliance still stops cleanly."""
    import sys

    from appliance.service import MAX_RESTARTS

    script = tmp_path / "hook" / "crashing_worker.py"  # not next to the appliance's root dir (named "appliance")
    script.parent.mkdir()
    script.write_text(_CRASHING_WORKER_SUPERVISOR)
    app = appliance_factory(start=False)
    log = open(app.log_path, "ab")
    log.write(b"\n===== start 1 =====\n")
    log.flush()
    app.proc = subprocess.Popen([sys.executable, str(script), str(app.config_path)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=app.root)
    log.close()
    app.starts = 1
    app._wait_ready(60)

    def deaths() -> int:
        return app.log_text().count("inference worker (pid")

    deadline = time.monotonic() + 90
    while deaths() <= MAX_RESTARTS + 2 and time.monotonic() < deadline:
        assert app.running, app.log_tail()
        time.sleep(0.2)
    assert deaths() > MAX_RESTARTS + 2, app.log_tail()
    series = make_series(tmp_path / "series", 5, rows=16, cols=16)
    res = subprocess.run([need_tool("storescu"), "-v", "-xs", "+sd", "+r", "-aet", "MODALITY", "-aec", CALLED_AE,
                          "127.0.0.1", str(app.port), str(tmp_path / "series")],
                         capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    statuses = parse_storescu(res.stdout + res.stderr)
    assert len(statuses) == len(series) and set(statuses.values()) == {"Success"}, res.stdout[-2000:]
    assert app.running
    text = app.log_text()
    assert "keep dying" not in text and "giving up" not in text
    assert "restarting it in" in text, "repeated deaths are backed off"
    assert "allowed_callers is empty" not in text, "bound to 127.0.0.1: no open-access warning"
    assert app.terminate() == 0, app.log_tail()


# -- open access warning --------------------------------------------------------------------------------


@pytest.mark.parametrize("bind,callers,warns", [
    ("0.0.0.0", [], True),
    ("::", [], True),
    ("", [], True),
    ("0.0.0.0", [{"ae_title": "CT01"}], False),
    ("127.0.0.1", [], False),
    ("10.1.2.3", [], False),
    ("::1", [], False),
    ("appliance.local", [], False),
])
def test_open_access_warning(bind: str, callers: list[dict[str, str]], warns: bool) -> None:
    from appliance.config import DicomConfig
    from appliance.service import open_access_warning

    msg = open_access_warning(DicomConfig(bind=bind, allowed_callers=callers))
    assert (msg is not None) == warns
    if msg:
        assert "allowed_callers" in msg and "11112" in msg


@pytest.mark.slow
def test_open_appliance_warns_once_at_start(appliance_factory: Any) -> None:
    app = appliance_factory(dicom={"bind": "0.0.0.0", "listeners": 2})
    lines = [line for line in app.log_text().splitlines() if "allowed_callers is empty" in line]
    assert len(lines) == 1, app.log_tail()
    assert "WARNING" in lines[0] and "[MainProcess]" in lines[0] and "'0.0.0.0'" in lines[0]


_FAILING_SUPERVISOR = """
import sys
from appliance import service
from appliance.config import load_config
calls = []
def check(self, store):
    calls.append(1)
    if len(calls) >= 2:  # the first watch turn passes: every process is up by the second
        raise RuntimeError("injected supervisor fault")
service.Supervisor._check_listeners = check
service.serve(load_config(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_supervisor_fault_stops_its_processes_and_exits_non_zero(tmp_path: Path) -> None:
    """An unexpected error in the supervisor's own loop must end the program (so systemd restarts it), not
    leave it waiting forever on the listeners and worker it started, which keep the DICOM port open."""
    import sys

    from conftest import free_port

    port = free_port()
    cfg = tmp_path / "appliance.toml"
    write_toml(cfg, {"dicom": {"ae_title": CALLED_AE, "bind": "127.0.0.1", "port": port, "listeners": 2},
                     "storage": {"data_dir": str(tmp_path / "data"), "min_free_bytes": 0},
                     "metrics": {"enabled": False}, "panel": {"enabled": False}}, top={"routes": []})
    exe = Path(appliance_exe()).with_name("python")
    proc = subprocess.Popen([str(exe) if exe.exists() else sys.executable, "-c", _FAILING_SUPERVISOR, str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        import os

        os.killpg(proc.pid, signal.SIGKILL)  # its children too: they hold the output pipe open
        out, _ = proc.communicate()
        pytest.fail("the supervisor hung after its fault:\n" + out[-3000:])
    assert proc.returncode != 0, out[-3000:]
    assert "injected supervisor fault" in out and "stopping every process it started" in out
    with socket.socket() as s:  # the listeners are gone: the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
