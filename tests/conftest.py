"""Shared fixtures: a real ``appliance serve`` process on a free port, and DICOM client helpers.

The integration tests drive the appliance as a modality would: over TCP with DCMTK's ``storescu``
and ``echoscu`` and with pynetdicom's SCU, against the installed ``appliance`` executable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: The console script installed next to the interpreter running the tests (the project's venv).
APPLIANCE_EXE = Path(sys.executable).parent / "appliance"
CALLED_AE = "EDGE"

# pynetdicom logs every PDU; the tests only need its warnings.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hostile", "hostile-client tests (tests/test_hostile.py)")
    group.addoption("--fuzz-cases", type=int, default=None, metavar="N",
                    help="mutation fuzzer cases over a captured storescu association (default 2000)")
    group.addoption("--fuzz-seed", type=int, default=None, metavar="S", help="the fuzzer's seed (default fixed)")


def appliance_exe() -> str:
    exe = shutil.which("appliance", path=str(APPLIANCE_EXE.parent))
    if exe is None:
        pytest.fail(f"the appliance executable is not installed at {APPLIANCE_EXE} (pip install -e .)")
    return exe


def dcmtk_env() -> dict[str, str]:
    """DCMTK waits ~44 ms per message on loopback delayed ACKs unless TCP_NODELAY=1 is set."""
    return {**os.environ, "TCP_NODELAY": "1"}


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install dcmtk)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(path: Path, sections: dict[str, dict[str, Any]], top: dict[str, Any] | None = None,
               tables: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Sections as [tables]; ``top`` keys first (e.g. ``routes = []``); ``tables`` as [[arrays of tables]]."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in (top or {}).items()]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(v)}" for key, v in values.items())
        lines.append("")
    for name, items in (tables or {}).items():
        for item in items:
            lines.append(f"[[{name}]]")
            lines.extend(f"{key} = {_toml_value(v)}" for key, v in item.items())
            lines.append("")
    path.write_text("\n".join(lines))


class Appliance:
    """One ``appliance serve`` process (restartable) with its config, data directory and log."""

    def __init__(self, root: Path, routes: list[dict[str, Any]] | None = None,
                 destinations: list[dict[str, Any]] | None = None, **sections: dict[str, Any]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        self.panel_port = free_port()
        self.data_dir = root / "data"
        self.config_path = root / "appliance.toml"
        self.log_path = root / "appliance.log"
        config: dict[str, dict[str, Any]] = {
            "dicom": {"ae_title": CALLED_AE, "bind": "127.0.0.1", "port": self.port, "listeners": 2},
            "storage": {"data_dir": str(self.data_dir), "min_free_bytes": 0},
            "assemble": {},
            "logging": {"level": "INFO"},
            # A port of its own: several appliances run at once in some tests.
            "metrics": {"bind": "127.0.0.1", "port": self.metrics_port},
            "panel": {"bind": "127.0.0.1", "port": self.panel_port},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        #: The metrics server starts after the listeners; tests that read it wait for it too.
        self.metrics_enabled = bool(config["metrics"].get("enabled", True))
        # No routes unless a test asks: series then end as no_model, and no model runs behind its back.
        write_toml(self.config_path, {k: v for k, v in config.items() if v},
                   top=None if routes else {"routes": []},
                   tables={"routes": routes or [], "destinations": destinations or []})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- process control ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "Appliance":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {self.starts + 1} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [appliance_exe(), "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=self.root,
        )
        log.close()
        self.starts += 1
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        marker = "receiving as AE"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"appliance exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            start_log = self.log_text().rsplit(f"===== start {self.starts} =====", 1)[-1]
            if marker in start_log and self._port_open(self.port) and (
                not self.metrics_enabled or self._port_open(self.metrics_port)
            ):
                return
            time.sleep(0.05)
        pytest.fail(f"appliance did not become ready within {timeout:.0f} s:\n{self.log_tail()}")

    def _port_open(self, port: int) -> bool:
        """Whether a socket listens on ``port``, read from /proc/net/tcp.

        Not probed by connecting: a connection that never sends an A-ASSOCIATE-RQ occupies an
        association thread in the appliance until its ACSE timeout.
        """
        want = f":{port:04X}"
        try:
            lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        except OSError:  # not Linux: fall back to the log line alone
            return True
        for line in lines:
            fields = line.split()
            if fields[1].endswith(want) and fields[3] == "0A":  # 0A: LISTEN
                return True
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM the supervisor and wait; returns its exit code (fails the test on a hang)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"appliance did not exit within {timeout:.0f} s of SIGTERM:\n{self.log_tail()}")
        self._wait_group_gone(10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (supervisor, listeners, helpers), as a power cut would."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._wait_group_gone(10)

    def _wait_group_gone(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        pytest.fail("processes of the appliance's group outlived it")

    # -- reading what it did ----------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([appliance_exe(), *args, "--config", str(self.config_path)], capture_output=True,
                              text=True, timeout=timeout, cwd=self.root)

    def series(self) -> list[dict[str, Any]]:
        """``appliance series --json``, parsed."""
        res = self.cli("series", "--json")
        assert res.returncode == 0, f"appliance series failed ({res.returncode}): {res.stderr}"
        return json.loads(res.stdout)

    def db(self) -> sqlite3.Connection:
        """A read-only connection to the index (the appliance's single source of truth)."""
        conn = sqlite3.connect(f"file:{self.data_dir / 'index.sqlite3'}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = self.db()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    def spool_files(self) -> list[Path]:
        """Instance files in the spool (not the .incoming work area)."""
        if not self.spool.exists():
            return []
        return sorted(p for p in self.spool.rglob("*") if p.is_file() and ".incoming" not in p.parts)

    def partials(self) -> list[Path]:
        incoming = self.spool / ".incoming"
        return sorted(incoming.glob("*.part")) if incoming.exists() else []


@pytest.fixture
def appliance_factory(tmp_path: Path) -> Iterator[Any]:
    """Start appliances with config overrides; each is SIGTERMed at teardown and must exit 0."""
    started: list[Appliance] = []

    def make(name: str = "appliance", start: bool = True, **sections: Any) -> Appliance:
        app = Appliance(tmp_path / name, **sections)
        started.append(app)
        if start:
            app.start()
        return app

    yield make
    failures = []
    for app in started:
        if app.running:
            rc = app.terminate()
            if rc != 0:
                failures.append(f"{app.root.name}: exit code {rc} after SIGTERM\n{app.log_tail()}")
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture(scope="module")
def shared_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """One appliance for a module's tests that do not interfere with one another."""
    app = Appliance(tmp_path_factory.mktemp("shared") / "appliance").start()
    yield app
    if app.running:
        rc = app.terminate()
        assert rc == 0, f"exit code {rc} after SIGTERM\n{app.log_tail()}"


# -- DICOM clients -------------------------------------------------------------------------------------


def run_storescu(app: Appliance, *paths: Path, calling_ae: str = "STORESCU", extra: tuple[str, ...] = (),
                 timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, verbose so each Store Response is printed; files or directories (recursive)."""
    cmd = [need_tool("storescu"), "-v", "-xs", "+sd", "+r", "-aet", calling_ae, "-aec", CALLED_AE, *extra,
           "127.0.0.1", str(app.port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def run_echoscu(app: Appliance, calling_ae: str = "ECHOSCU", called_ae: str = CALLED_AE,
                timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    cmd = [need_tool("echoscu"), "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(app.port)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def parse_storescu(output: str) -> dict[str, str]:
    """Map each file storescu sent to the status text of its Store Response ('Success', ...).

    ``storescu -v`` logs "Sending file: PATH" before each request and "Received Store Response
    (STATUS)" after it; a file without a response line was not acknowledged.
    """
    results: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        line = line.strip()
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response" in line and current is not None:
            status = line.split("Received Store Response", 1)[1].strip()
            results[current] = status[1:-1] if status.startswith("(") and status.endswith(")") else status
            current = None
    return results


def pynetdicom_ae(calling_ae: str = "PYTEST") -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    return ae


def raw_c_store(assoc: Any, payload: bytes, sop_class: str, sop_instance: str, transfer_syntax: str,
                msg_id: int = 1) -> int | None:
    """Send ``payload`` as a C-STORE's dataset, byte for byte, bypassing pynetdicom's checks.

    ``Association.send_c_store`` refuses datasets without SOP UIDs and re-encodes datasets; a
    modality with a bug does neither, so the tests build the request primitive themselves. Returns
    the response status, or None when no response came (abort, timeout).
    """
    from io import BytesIO

    from pydicom.uid import UID
    from pynetdicom.dimse_primitives import C_STORE

    cx = assoc._get_valid_context(sop_class, transfer_syntax, "scu", allow_conversion=False)
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = sop_class
    try:
        req.AffectedSOPInstanceUID = sop_instance
    except ValueError:  # pynetdicom refuses over-long UIDs; a broken sender would not
        req._affected_sop_instance_uid = UID(sop_instance)
    req.Priority = 2
    req.DataSet = BytesIO(payload)
    # Same hand-off with the association's reactor as Association.send_c_store does.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        return None
    return int(rsp.Status)
