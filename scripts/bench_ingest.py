#!/usr/bin/env python3
"""Ingest benchmark: how fast the appliance takes a CT series compared with Orthanc and DCMTK storescp.

Run from the project root with the project's environment:

    .venv/bin/python scripts/bench_ingest.py [--rounds 5] [--parallel both]

Why these peers: Orthanc with ``SyncStorageArea: true`` is the durable receiver clinics already trust,
so appliance/Orthanc is the figure with a goal (<= 1.0 with one association, <= 0.8 with four);
``storescp`` writes without fsync and is about as fast as DICOM over loopback gets, so
appliance/storescp shows how far we are from the network's ceiling.

How it measures, and why:
- One synthetic series (default 300 slices of 512x512 int16, Explicit VR Little Endian, a full CT
  header) is written afresh for every round and association count with new UIDs, so neither the
  appliance nor Orthanc ever sees a duplicate (duplicates take a different, cheaper path).
- DCMTK ``storescu`` sends it, the way a modality would; DCMTK and Orthanc get ``TCP_NODELAY=1`` in
  their environment, without which every instance waits ~44 ms for a delayed ACK on loopback.
- Within a round the receivers take turns, starting with a different one each round, so slow drift
  of the machine (other jobs, page cache, writeback) spreads over all of them instead of one.
- Before every timed send the dirty page cache is flushed and the machine left idle for a moment,
  so one receiver's deferred writeback (storescp never fsyncs) is not charged to the next one.
- Each receiver first gets a short untimed warm-up series, so first-connection costs (imports,
  database creation) do not land on round 1.
- A send counts only if storescu exits 0 and reports a Success response for every instance; a
  failed send is reported and left out of the statistics, never silently timed.

This is a benchmark, not a test: its output is numbers (stdout, and JSON for machines); progress
goes to stderr. Every child runs in its own session and its whole process group is killed on exit,
on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Callable

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = PROJECT_ROOT / "bench-results" / "bench_ingest.json"

#: Goals for appliance/Orthanc (ratio of median seconds) per association count.
GOALS: dict[int, float] = {1: 1.0, 4: 0.8}
#: What storescu -v prints once per acknowledged instance.
SUCCESS_MARK = "Received Store Response (Success)"
#: DCMTK (and Orthanc, which uses DCMTK's network code) read this; without it loopback stalls on delayed ACKs.
DCMTK_ENV = {"TCP_NODELAY": "1"}
CALLING_AET = "BENCH"
WARMUP_SLICES = 10
SETTLE_SECONDS = 1.0
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
SEND_TIMEOUT_S = 600.0
RECEIVERS = ("appliance", "orthanc", "storescp")


class BenchError(Exception):
    """A setup problem that makes the benchmark meaningless (missing tool, a receiver that will not start)."""


def progress(msg: str) -> None:
    """Progress goes to stderr so stdout stays the results only."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- processes


class Children:
    """Every process the benchmark starts, each in its own session so that stopping it takes its whole
    process group (storescp --fork and the appliance's listener processes included), and so that a
    Ctrl-C at the terminal reaches only us: we then stop them in order, gracefully first."""

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        logf = open(log, "ab")  # noqa: SIM115 - stays open for the child's lifetime; closed in stop()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        except BaseException:
            logf.close()
            raise
        self._procs.append((proc, logf))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the process group, SIGKILL it if it lingers; returns the exit status."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass  # the group is gone already
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for i, (p, logf) in enumerate(self._procs):
            if p is proc:
                logf.close()
                del self._procs[i]
                break
        return proc.returncode

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """Drop a process that has exited by itself, killing any group members it left behind."""
        self.stop(proc, timeout=0.1)

    def running(self) -> bool:
        return bool(self._procs)

    def stop_all(self) -> None:
        # Reverse order: senders before receivers.
        for proc, _ in reversed(list(self._procs)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """True once something accepts on the port; False on timeout or if the process died first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def log_tail(log: Path, n: int = 800) -> str:
    try:
        return log.read_text(errors="replace")[-n:].replace("\n", " | ")
    except OSError:
        return "(no log)"


def find_dcmtk(name: str) -> str:
    """The DCMTK tool, not a same-named one earlier on PATH: pynetdicom installs its own ``storescu`` and
    ``storescp`` into the venv's bin, which would shadow DCMTK's when the venv is activated."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for d in dirs:
        cand = Path(d) / name
        if not (d and cand.is_file() and os.access(cand, os.X_OK)):
            continue
        try:
            out = subprocess.run([str(cand), "--version"], check=False, capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in out.lower():
            return str(cand)
    raise BenchError(f"DCMTK `{name}` not found (apt-get install dcmtk)")


def find_orthanc() -> str:
    # Debian puts it in /usr/sbin, which is not on every user's PATH.
    exe = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if not exe:
        raise BenchError("`Orthanc` not found (apt-get install orthanc)")
    return exe


def first_line(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return lines[0] if lines else None


# --------------------------------------------------------------------------------------------- series


def make_volume(slices: int, size: int, seed: int = 0) -> np.ndarray:
    """Stored values (HU + 1024, int16) of a crude abdomen: air, body, liver, spine, scanner-like noise.
    The content does not matter for speed (nothing is compressed); it only keeps the files plausible.
    Made once: rounds differ in their UIDs, not their pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    base = np.full((size, size), -1000.0, np.float32)
    body = (x / 0.45) ** 2 + (y / 0.33) ** 2 <= 1
    base[body] = 40.0
    base[((x + 0.15) / 0.2) ** 2 + ((y + 0.03) / 0.16) ** 2 <= 1] = 105.0  # liver
    base[(x ** 2 + (y - 0.22) ** 2) <= 0.04 ** 2] = 450.0  # vertebral body
    vol = np.empty((slices, size, size), np.int16)
    for i in range(slices):
        noisy = base + rng.normal(0.0, 12.0, base.shape).astype(np.float32) * body
        vol[i] = np.clip(noisy + 1024.0, -32768, 32767).astype(np.int16)
    return vol


def ct_slice(vol: np.ndarray, i: int, study: str, series: str, frame: str, label: str) -> Dataset:
    """One CT Image Storage instance with the modules a real scanner fills (patient, study, series,
    frame of reference, equipment, image plane, CT image, VOI LUT, SOP common)."""
    now = dt.datetime.now()
    date, tm = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    spacing, thickness = 0.78125 * 512 / vol.shape[2], 1.0
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, tm
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = tm
    ds.AccessionNumber = f"BENCH{label}"[:16]
    ds.Modality = "CT"
    ds.Manufacturer, ds.ManufacturerModelName = "Benchmark", "Synthetic CT"
    ds.InstitutionName, ds.StationName = "Edge Bench Clinic", "BENCHCT01"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT ABDOMEN WITH CONTRAST"
    ds.SeriesDescription = "Abdomen 1.0 portal venous"
    ds.PatientName, ds.PatientID = "Bench^Synthetic", "BENCH0001"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600101", "O", "066Y"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = f"{thickness:.1f}"
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{spacing * vol.shape[2]:.1f}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime, ds.XRayTubeCurrent, ds.Exposure = "500", "250", "125"
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber, ds.InstanceNumber = "1", 3, 1, i + 1
    z = -float(i) * thickness
    ds.ImagePositionPatient = [f"{-spacing * vol.shape[2] / 2:.3f}", f"{-spacing * vol.shape[1] / 2:.3f}", f"{z:.3f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.3f}"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[2])
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.PixelData = vol[i].tobytes()
    return ds


def write_series(vol: np.ndarray, root: Path, parts: int, label: str) -> list[Path]:
    """Write the volume as a new series (fresh Study/Series/SOP UIDs) into ``parts`` folders of
    consecutive slices, one folder per association; returns the folders."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    bounds = np.linspace(0, vol.shape[0], parts + 1).round().astype(int)
    folders = [root / f"part{k}" if parts > 1 else root for k in range(parts)]
    for k, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(bounds[k], bounds[k + 1]):
            ct_slice(vol, i, study, series, frame, label).save_as(folder / f"CT{i:04d}.dcm", enforce_file_format=True)
    return folders


# --------------------------------------------------------------------------------------------- receivers


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


def start_appliance(children: Children, exe: Path, work: Path, listeners: int = 0) -> Receiver:
    port = free_port()
    cfg = work / "appliance.toml"
    cfg.write_text(
        # Ingest alone: no routes, so no model runs on the benchmark's random-noise series between rounds.
        "routes = []\n"
        "[dicom]\n"
        'ae_title = "EDGE"\n'
        'bind = "127.0.0.1"\n'
        f"port = {port}\n"
        f"listeners = {listeners}\n"
        "[storage]\n"
        f"data_dir = {json.dumps(str(work / 'appliance-data'))}\n"
        "min_free_bytes = 0\n"
        "[assemble]\n"
        "stable_seconds = 30\n"
        "release_grace_seconds = 1\n"
    )
    log = work / "appliance.log"
    proc = children.start([str(exe), "serve", "--config", str(cfg)], log, cwd=work)
    return Receiver("appliance", "EDGE", port, proc, log, extra={"config": str(cfg)})


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


def settle() -> None:
    """Flush dirty pages and pause, so the next send starts from a quiet disk (see module docstring)."""
    os.sync()
    time.sleep(SETTLE_SECONDS)


# --------------------------------------------------------------------------------------------- sending


@dataclass
class Send:
    """One timed send of one series to one receiver (raw data for the JSON)."""
    receiver: str
    associations: int
    round: int
    position: int  # 0-based turn within the round for this association count
    seconds: float
    acknowledged: int
    expected: int
    returncodes: list[int | None]
    ok: bool
    error: str | None = None
    #: Largest resident memory of one appliance listener process during this send (MB; None for the others).
    listener_peak_rss_mb: float | None = None


def send(children: Children, storescu: str, rcv: Receiver, folders: list[Path], expected: int, logdir: Path,
         tag: str, rss: ListenerRss | None = None) -> tuple[float, int, list[int | None], str | None]:
    """Start one storescu per folder at once (one association each) and time until all have finished.
    Returns (seconds, instances acknowledged with Success, exit codes, error or None). With ``rss``, the
    listeners' resident memory is sampled meanwhile (read it from ``rss.peak_mb``)."""
    rcv.check_alive()
    if rss is not None:
        rss.start()
    logs = [logdir / f"{tag}-{k}.log" for k in range(len(folders))]
    t0 = time.perf_counter()
    procs = [children.start([storescu, "-v", "-xs", "+sd", "+r", "-aet", CALLING_AET, "-aec", rcv.aec,
                             "127.0.0.1", str(rcv.port), str(folder)], log, env=DCMTK_ENV)
             for folder, log in zip(folders, logs)]
    error = None
    deadline = time.monotonic() + SEND_TIMEOUT_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            error = f"storescu still running after {SEND_TIMEOUT_S:.0f}s; killed"
            break
    seconds = time.perf_counter() - t0
    if rss is not None:
        rss.stop()
    for p in procs:
        if p.returncode is None:
            children.stop(p, timeout=5.0)
        else:
            children.forget(p)
    codes = [p.returncode for p in procs]
    acked = sum(log.read_text(errors="replace").count(SUCCESS_MARK) for log in logs)
    if error is None and (any(codes) or acked != expected):
        error = (f"exit codes {codes}, {acked}/{expected} acknowledged; storescu log tail: "
                 f"{log_tail(logs[0], 300)}")
    return seconds, acked, codes, error


def stats(values: list[float]) -> dict[str, Any]:
    """n/min/median/max of the successful sends (None where there were none)."""
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


def orthanc_instances(rcv: Receiver) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{rcv.extra['http_port']}/statistics", timeout=30) as r:
            return int(json.load(r)["CountInstances"])
    except (OSError, ValueError, KeyError):
        return None


def appliance_instances(exe: Path, rcv: Receiver) -> int | None:
    try:
        r = subprocess.run([str(exe), "series", "--config", rcv.extra["config"], "--json"], check=False,
                           capture_output=True, text=True, timeout=60, cwd=rcv.log.parent)
        return sum(int(s.get("instances", 0)) for s in json.loads(r.stdout))
    except (OSError, subprocess.SubprocessError, ValueError, TypeError):
        return None


def host_info(appliance: Path, storescu: str, orthanc: str) -> dict[str, Any]:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    git = first_line(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           check=False, capture_output=True, text=True).stdout.strip() != "" if git else None
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": mem,
        "python": sys.version.split()[0],
        "appliance_version": first_line([str(appliance), "--version"]),
        "appliance_exe": str(appliance),
        "dcmtk_version": first_line([storescu, "--version"]),
        "orthanc_version": first_line([orthanc, "--version"]),
        "git_commit": git,
        "git_dirty": dirty,
    }


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark DICOM ingest: the appliance against Orthanc (durable, SyncStorageArea) and DCMTK "
                    "storescp (no fsync), DCMTK storescu over loopback, alternating rounds. Results on stdout "
                    "(last line: the ratios) and as JSON; progress on stderr.")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per receiver and association count (default 5)")
    p.add_argument("--slices", type=int, default=300, help="instances in the series (default 300)")
    p.add_argument("--size", type=int, default=512, help="rows = columns of each slice (default 512)")
    p.add_argument("--parallel", choices=("1", "4", "both"), default="both",
                   help="associations per send: 1, 4 (series split into 4 folders, 4 storescu at once), "
                        "or both (default)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--listeners", type=int, default=0,
                   help="appliance listener processes ([dicom] listeners; default 0 = the appliance's own choice)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, receivers' data)")
    p.add_argument("--appliance", type=Path, default=Path(sys.executable).parent / "appliance",
                   help="the appliance executable (default: next to this Python)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.slices < 1 or args.size < 8:
        p.error("--rounds and --slices must be >= 1 and --size >= 8")
    args.assoc_counts = [1, 4] if args.parallel == "both" else [int(args.parallel)]
    if args.slices < max(args.assoc_counts):
        most = max(args.assoc_counts)
        p.error(f"--slices must be at least {most} to split the series over {most} associations")
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def run(args: argparse.Namespace, children: Children, work: Path) -> tuple[int, list[str]]:
    """The whole benchmark; returns the exit status and the result lines, which main() prints only after
    every child has stopped, so that the ratio line stays the last line even with stderr merged in."""
    appliance = args.appliance
    if not appliance.exists():
        raise BenchError(f"appliance executable {appliance} not found (pip install -e . in the venv, or --appliance)")
    storescu, storescp, orthanc = find_dcmtk("storescu"), find_dcmtk("storescp"), find_orthanc()
    series_bytes = args.slices * args.size * args.size * 2
    need = series_bytes * (args.rounds * len(args.assoc_counts) * 3 + 2)
    free = shutil.disk_usage(work).free
    if free < need:
        raise BenchError(f"{work} has {free / 1e9:.1f} GB free, the run needs about {need / 1e9:.1f} GB")

    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    progress(f"work dir {work}; generating a {args.slices}x{args.size}^2 int16 volume")
    vol = make_volume(args.slices, args.size)
    warm_vol = vol[:min(WARMUP_SLICES, args.slices)]

    progress("starting receivers: appliance, Orthanc, storescp" + (" (+ --fork)" if 4 in args.assoc_counts else ""))
    app = start_appliance(children, appliance, work, args.listeners)
    orth = start_orthanc(children, orthanc, work)
    scp: dict[int, Receiver] = {n: start_storescp(children, storescp, work, fork=n > 1) for n in args.assoc_counts}
    wait_ready([app, orth, *scp.values()])
    by_count: dict[int, dict[str, Receiver]] = {
        n: {"appliance": app, "orthanc": orth, "storescp": scp[n]} for n in args.assoc_counts}
    logs = work / "storescu-logs"
    logs.mkdir()

    # Untimed warm-up, one association each; also proves every path works before the long part.
    warm = write_series(warm_vol, work / "series-warmup", 1, "WARM")
    for name, rcv in by_count[args.assoc_counts[0]].items():
        _, acked, codes, err = send(children, storescu, rcv, warm, len(warm_vol), logs, f"warmup-{name}")
        if err:
            raise BenchError(f"warm-up send to {name} failed: {err}")
    shutil.rmtree(work / "series-warmup")
    progress("receivers up and warmed")

    sends: list[Send] = []
    listener_hwm: dict[int, float] = {}  # listener pid -> VmHWM (its peak since it started), last read
    for rnd in range(args.rounds):
        for n in args.assoc_counts:
            root = work / f"series-r{rnd}-a{n}"
            folders = write_series(vol, root, n, f"R{rnd}A{n}")
            k = rnd % len(RECEIVERS)
            order = RECEIVERS[k:] + RECEIVERS[:k]
            for pos, name in enumerate(order):
                settle()
                rss = ListenerRss(app.proc.pid, app.port) if name == "appliance" else None
                secs, acked, codes, err = send(children, storescu, by_count[n][name], folders, args.slices, logs,
                                               f"r{rnd}-a{n}-{name}", rss)
                s = Send(name, n, rnd, pos, secs, acked, args.slices, codes, err is None, err,
                         rss.peak_mb if rss is not None else None)
                if rss is not None:
                    listener_hwm.update(rss.hwm_mb)
                sends.append(s)
                if err:
                    progress(f"round {rnd + 1}/{args.rounds}, {n} assoc, {name}: FAILED after {secs:.2f}s: {err}")
                else:
                    progress(f"round {rnd + 1}/{args.rounds}, {n} assoc, {name}: {secs:.2f}s")
            shutil.rmtree(root)
        for r in scp.values():
            assert r.out_dir is not None
            clear_dir(r.out_dir)

    # Did the durable receivers really keep everything they acknowledged?
    time.sleep(2.0)
    stored = {
        "appliance": {"reported": appliance_instances(appliance, app)},
        "orthanc": {"reported": orthanc_instances(orth)},
    }
    for name, counts in stored.items():
        counts["acknowledged"] = len(warm_vol) + sum(s.acknowledged for s in sends if s.receiver == name)

    results: dict[str, Any] = {}
    for n in args.assoc_counts:
        per = {name: stats([s.seconds for s in sends if s.ok and s.receiver == name and s.associations == n])
               for name in RECEIVERS}
        med: dict[str, float | None] = {name: per[name]["median"] for name in RECEIVERS}
        peaks = [s.listener_peak_rss_mb for s in sends
                 if s.receiver == "appliance" and s.associations == n and s.listener_peak_rss_mb is not None]
        results[f"{n}"] = {
            "seconds": per,
            "appliance_listener_peak_rss_mb": max(peaks) if peaks else None,
            "ratios": {"appliance/orthanc": ratio(med["appliance"], med["orthanc"]),
                       "appliance/storescp": ratio(med["appliance"], med["storescp"])},
            "goal_appliance/orthanc": GOALS.get(n),
        }

    failed = [s for s in sends if not s.ok]
    report = {
        "benchmark": "ingest",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "rounds": args.rounds, "slices": args.slices, "size": args.size, "associations": args.assoc_counts,
            "series_bytes_pixels": series_bytes, "transfer_syntax": "Explicit VR Little Endian",
            "sender": f"{storescu} -v -xs +sd +r -aet {CALLING_AET} -aec <AET> 127.0.0.1 <port> <dir>",
            "env": DCMTK_ENV, "warmup_slices": len(warm_vol), "settle_seconds": SETTLE_SECONDS,
            "order": "receivers alternate within each round, rotating the first each round",
            "appliance_config": (work / "appliance.toml").read_text(),
            "orthanc": "SyncStorageArea true, StorageCompression false",
            "storescp": {"1": "storescp -od DIR PORT", "4": "storescp --fork -od DIR PORT"},
        },
        "host": {**host_info(appliance, storescu, orthanc), "loadavg_start": load_start,
                 "loadavg_end": os.getloadavg()},
        "results": results,
        "stored_check": stored,
        "appliance_listener_rss": {
            "peak_rss_mb": max((s.listener_peak_rss_mb for s in sends if s.listener_peak_rss_mb is not None),
                               default=None),
            "vmhwm_mb": {str(pid): mb for pid, mb in sorted(listener_hwm.items())},
            "how": f"VmRSS of each listener process sampled every {ListenerRss.INTERVAL_S * 1000:.0f} ms during "
                   "every timed appliance send (the largest single process); VmHWM = each listener's own peak "
                   "since it started (warm-up included), read after each send",
        },
        "failed_sends": len(failed),
        "sends": [asdict(s) for s in sends],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {args.json}")

    mb = series_bytes / 1e6
    out: list[str] = []
    out.append(f"ingest of {args.slices} x {args.size}x{args.size} int16 CT ({mb:.0f} MB of pixels) over loopback, "
               f"seconds per series, {args.rounds} rounds")
    out.append(f"{'receiver':<10} {'assoc':>5} {'ok':>4} {'min':>7} {'median':>7} {'max':>7} {'peak RSS MB':>12}")
    for n in args.assoc_counts:
        for name in RECEIVERS:
            st = results[f"{n}"]["seconds"][name]
            # Peak resident memory of one listener process: measured for the appliance only.
            peak = fmt(results[f"{n}"]["appliance_listener_peak_rss_mb"], 0) if name == "appliance" else "-"
            out.append(f"{name:<10} {n:>5} {st['n']:>4} {fmt(st['min'], 2):>7} {fmt(st['median'], 2):>7} "
                       f"{fmt(st['max'], 2):>7} {peak:>12}")
    if listener_hwm:
        out.append("appliance listener VmHWM (peak since start, MB): "
                   + ", ".join(f"pid {pid} {mb:.0f}" for pid, mb in sorted(listener_hwm.items())))
    for s in failed:
        out.append(f"FAILED: round {s.round + 1}, {s.associations} assoc, {s.receiver}: {s.error}")
    mismatch = False
    for name, c in stored.items():
        if c["reported"] != c["acknowledged"]:
            mismatch = True
            out.append(f"WARNING: {name} reports {c['reported']} instances stored, "
                       f"{c['acknowledged']} were acknowledged")
    vs_o = ", ".join(f"{n}-assoc {fmt(results[f'{n}']['ratios']['appliance/orthanc'], 2)} (goal <= {GOALS[n]})"
                     for n in args.assoc_counts)
    vs_s = ", ".join(f"{n}-assoc {fmt(results[f'{n}']['ratios']['appliance/storescp'], 1)}" for n in args.assoc_counts)
    out.append(f"appliance/orthanc {vs_o}; appliance/storescp {vs_s}")
    return (1 if failed or mismatch else 0), out


def bench_main(name: str, args: argparse.Namespace, children: Children,
               run_fn: Callable[[argparse.Namespace, Any, Path], tuple[int, list[str]]], stopping: str) -> int:
    """Run ``run_fn`` in a scratch folder, always stop every child, then print the result lines last.

    Shared by the benchmarks: SIGTERM/SIGHUP become KeyboardInterrupt so the clean-up below still stops
    every child (a SIGHUP ignored on purpose, as under nohup, stays ignored).
    """
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _raise_interrupt)
    work = Path(tempfile.mkdtemp(prefix=f"{name.replace('_', '-')}-"))
    lines: list[str] = []
    try:
        code, lines = run_fn(args, children, work)
        return code
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if children.running():
            progress(stopping)
        children.stop_all()
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        for line in lines:
            print(line)


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench_ingest", parse_args(argv), Children(), run,
                      "stopping receivers (the appliance drains first; this can take a few seconds)")


if __name__ == "__main__":
    sys.exit(main())
