"""Process handling shared by the benchmarks (scripts/bench_*.py): children in their own sessions, ports,
the DCMTK and Orthanc executables, host facts for the results, and the run-then-clean-up main.

Every child runs in its own session and its whole process group is stopped on exit, on error and on
Ctrl-C (and on SIGTERM/SIGHUP, see :func:`bench_main`). Progress goes to stderr, so stdout stays the
results only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: What storescu -v prints once per acknowledged instance.
SUCCESS_MARK = "Received Store Response (Success)"
#: DCMTK (and Orthanc, which uses DCMTK's network code) read this; without it loopback stalls on delayed ACKs.
DCMTK_ENV = {"TCP_NODELAY": "1"}
CALLING_AET = "BENCH"
SETTLE_SECONDS = 1.0
STOP_TIMEOUT_S = 30.0


class BenchError(Exception):
    """A setup problem that makes the benchmark meaningless (missing tool, a receiver that will not start)."""


def progress(msg: str) -> None:
    """Progress goes to stderr so stdout stays the results only."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def log(msg: str) -> None:
    """A plain progress line on stderr (the inference benchmarks and the training script)."""
    print(msg, file=sys.stderr, flush=True)


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


def settle() -> None:
    """Flush dirty pages and pause, so the next send starts from a quiet disk (see module docstring)."""
    os.sync()
    time.sleep(SETTLE_SECONDS)


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


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def fmt(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


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
