"""The DICOM receivers the benchmarks start and send to: Orthanc, DCMTK storescp, and the appliance's
listeners' resident memory while they receive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance_dev.harness import DCMTK_ENV, BenchError, Children, free_port, log_tail, wait_port

START_TIMEOUT_S = 90.0


@dataclass
class Receiver:
    name: str
    aec: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    #: storescp's output folder: emptied between rounds (the others keep their data).
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            hint = " (a clean stop: was it sent SIGTERM/SIGINT from outside, e.g. by a pkill?)" \
                if self.proc.returncode == 0 else ""
            raise BenchError(f"{self.name} exited with status {self.proc.returncode}{hint}; log: {log_tail(self.log)}")


class ListenerRss:
    """Samples the resident memory (VmRSS) of the appliance's listener processes while a send runs.

    The listeners are the supervisor's children that hold its listening socket (the inference worker
    does not). ``peak_mb`` is the largest single listener's VmRSS seen since :meth:`start`; each
    listener's own kernel-kept peak (VmHWM, since it started) is read at :meth:`stop` too, so a spike
    between two samples is not missed.
    """

    INTERVAL_S = 0.02

    def __init__(self, supervisor_pid: int, port: int) -> None:
        self.supervisor_pid, self.port = supervisor_pid, port
        self.peak_mb: float | None = None
        self.hwm_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status_mb(pid: int, key: str) -> float | None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
        return None

    def listener_pids(self) -> list[int]:
        want = f":{self.port:04X}"
        inode = None
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                for line in Path(table).read_text().splitlines()[1:]:
                    f = line.split()
                    if f[1].endswith(want) and f[3] == "0A":
                        inode = f[9]
            except OSError:
                continue
        if inode is None:
            return []
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != self.supervisor_pid:
                    continue
                if any(os.readlink(fd) == f"socket:[{inode}]" for fd in (d / "fd").iterdir()):
                    pids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def _run(self) -> None:
        pids = self.listener_pids()
        while True:
            for pid in pids:
                mb = self._status_mb(pid, "VmRSS")
                if mb is not None and (self.peak_mb is None or mb > self.peak_mb):
                    self.peak_mb = mb
            if self._stop.wait(self.INTERVAL_S):
                break

    def start(self) -> "ListenerRss":
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for pid in self.listener_pids():
            hwm = self._status_mb(pid, "VmHWM")
            if hwm is not None:
                self.hwm_mb[pid] = hwm
        return self.peak_mb


def start_storescp(children: Children, exe: str, work: Path, fork: bool) -> Receiver:
    port = free_port()
    tag = "storescp-fork" if fork else "storescp"
    out = work / tag
    out.mkdir()
    log = work / f"{tag}.log"
    cmd = [exe, *(["--fork"] if fork else []), "-od", str(out), str(port)]
    proc = children.start(cmd, log, env=DCMTK_ENV)
    return Receiver("storescp", "STORESCP", port, proc, log, out_dir=out)


def start_orthanc(children: Children, exe: str, work: Path) -> Receiver:
    port, http = free_port(), free_port()
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(work / "orthanc-storage"),
        "IndexDirectory": str(work / "orthanc-index"), "StorageCompression": False, "SyncStorageArea": True,
        "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": port, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True, "HttpServerEnabled": True,
        "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        "DicomModalities": {}, "OrthancPeers": {},
    }, indent=2))
    log = work / "orthanc.log"
    proc = children.start([exe, str(cfg)], log, env=DCMTK_ENV)
    return Receiver("orthanc", "ORTHANC", port, proc, log, extra={"http_port": http})


def wait_ready(receivers: list[Receiver]) -> None:
    for r in receivers:
        ports = [r.port, *([r.extra["http_port"]] if "http_port" in r.extra else [])]
        for p in ports:
            if not wait_port(p, r.proc, START_TIMEOUT_S):
                raise BenchError(f"{r.name} did not listen on port {p} within {START_TIMEOUT_S:.0f}s; "
                                 f"log: {log_tail(r.log)}")


def clear_dir(d: Path) -> None:
    for p in d.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
