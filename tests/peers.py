"""Real PACS peers for the export tests: Orthanc (with its REST API) and DCMTK ``storescp``.

Both run on loopback on free ports, each in its own process group, and are stopped at teardown. A test
can stop a peer and start it again on the same port (a PACS going down and coming back).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import dcmtk_env, free_port, need_tool


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


class Orthanc:
    """Orthanc 1.10 as the PACS: C-STORE SCP on ``port`` (AE ``ORTHANC``), REST API on ``http_port``."""

    def __init__(self, root: Path, ae_title: str = "ORTHANC") -> None:
        exe = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
        if exe is None:
            pytest.fail("Orthanc is not installed (apt-get install orthanc)")
        self.exe, self.root, self.ae_title = exe, root, ae_title
        root.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "test-pacs", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "StorageCompression": False, "SyncStorageArea": True, "DicomServerEnabled": True,
            "DicomAet": ae_title, "DicomPort": self.port, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomModalities": {}, "OrthancPeers": {}, "Plugins": [],
        }))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "Orthanc":
        log = open(self.root / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.exe, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                     env=dcmtk_env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"Orthanc did not answer on HTTP port {self.http_port} within {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        _stop(self.proc)

    def log_tail(self) -> str:
        p = self.root / "orthanc.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance's main tags (Modality, SOPInstanceUID, SOPClassUID, ...)."""
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]

    def file(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file",
                                    timeout=10) as r:
            return r.read()


class StoreSCP:
    """DCMTK ``storescp -v``: writes each object it receives into ``out``; its log counts every C-STORE."""

    def __init__(self, root: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        self.exe = need_tool("storescp")
        self.root, self.ae_title = root, ae_title
        self.out = root / "received"
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = root / "storescp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "StoreSCP":
        log = open(self.log, "ab")
        # -aet: only associations addressed to our AE title are accepted (like a real PACS).
        self.proc = subprocess.Popen([self.exe, "-v", "-aet", self.ae_title, "-od", str(self.out), str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._listening():
                return self
            time.sleep(0.05)
        pytest.fail(f"storescp did not listen on {self.port}: {self.log.read_text(errors='replace')[-2000:]}")

    def _listening(self) -> bool:
        want = f":{self.port:04X}"
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            if f[1].endswith(want) and f[3] == "0A":
                return True
        return False

    def stop(self) -> None:
        _stop(self.proc)

    def received_requests(self) -> int:
        return self.log.read_text(errors="replace").count("Received Store Request") if self.log.exists() else 0

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())
