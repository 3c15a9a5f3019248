"""What must hold for a running appliance after any client, however hostile, has come and gone.

:class:`Ledger` remembers which instances a client saw acknowledged (Success) across a module's tests;
:func:`check_invariants` then checks, in one place, everything the hostile-client tests promise:

* the appliance still runs, and answers a C-ECHO (association, echo, release) within 2 s;
* with no connection open, no association is left open: ``appliance status`` counts none, none is in the
  index without an outcome, and
  ``max_associations`` parallel senders are all accepted and can C-ECHO and C-STORE (a leaked slot
  would turn the last of them away with "local limit exceeded");
* nothing is left under ``<data_dir>/spool/.incoming/``;
* every instance in the index was acknowledged to someone, and every acknowledged one is indexed
  and has its file;
* every listener process's resident memory, now and at its peak (``VmHWM``), is under a bound;
* the log written since the previous check has no ``Traceback``, no ``InvalidEventError``, no
  thread exception and no listener death.

Problems are collected, not raised one by one, so a failing scenario reports everything it broke.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from conftest import CALLED_AE, Appliance, pynetdicom_ae

#: Bound on each listener process's resident memory (current and peak).
LISTENER_RSS_LIMIT_MB = 300
#: The appliance must answer a C-ECHO (associate + echo + release) within this.
ECHO_WITHIN_S = 2.0
#: How long in-flight clean-up (abort handling, slot release, temp-file removal) may take.
QUIESCE_S = 5.0
#: Longest a closed connection may keep a listener's association capacity (pynetdicom counts an
#: association until its threads have ended): after this, ``max_associations`` senders must all be accepted.
SLOT_RELEASE_S = 3.0
#: Log lines that must never appear.
FORBIDDEN_LOG = re.compile(r"Traceback|InvalidEventError|Exception in thread|died with exit code|Fatal Python")


@dataclass
class Ledger:
    """Instances clients saw acknowledged, and ones that may or may not have been (a killed sender)."""

    acked: set[str] = field(default_factory=set)
    maybe: set[str] = field(default_factory=set)
    log_offset: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, uid: str) -> None:
        with self.lock:
            self.acked.add(uid)

    def might_have(self, uid: str) -> None:
        with self.lock:
            self.maybe.add(uid)


# -- reading the appliance from the outside -------------------------------------------------------------


def _listen_inode(port: int) -> str | None:
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[1].endswith(want) and f[3] == "0A":
                return f[9]
    return None


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(d.name))
    return out


def listener_pids(app: Appliance) -> list[int]:
    """The appliance's child processes that hold its listening socket: the ingest listeners."""
    assert app.proc is not None
    inode = _listen_inode(app.port)
    pids = []
    for pid in _children(app.proc.pid):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if inode is not None and Path(fd).readlink().name == f"socket:[{inode}]":
                    pids.append(pid)
                    break
            except OSError:
                continue
    return sorted(pids)


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB; (0, 0) when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    values = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        values[key] = int(m.group(1)) / 1024 if m else 0.0
    return values["VmRSS"], values["VmHWM"]


def open_associations(app: Appliance) -> int:
    return app.query("SELECT COUNT(*) AS n FROM associations WHERE outcome IS NULL")[0]["n"]


def association_outcome(app: Appliance, local_port: int) -> str | None:
    """How the index recorded the association a client had from ``local_port`` (None: not recorded)."""
    rows = app.query("SELECT outcome FROM associations WHERE peer = ? ORDER BY opened_at DESC",
                     (f"127.0.0.1:{local_port}",))
    return rows[0]["outcome"] if rows else None


def incoming_files(app: Appliance) -> list[Path]:
    incoming = app.spool / ".incoming"
    return sorted(p for p in incoming.rglob("*") if p.is_file()) if incoming.exists() else []


def indexed_uids(app: Appliance) -> dict[str, str]:
    return {r["sop_instance_uid"]: r["path"] for r in app.query("SELECT sop_instance_uid, path FROM instances")}


def status_open_associations(app: Appliance, timeout: float = QUIESCE_S) -> int | None:
    """Open associations (across all listeners) as ``appliance status --json`` reports them, polled until
    0 or ``timeout``; None when the command is not available or cannot say."""
    import json

    deadline = time.monotonic() + timeout
    while True:
        try:
            res = app.cli("status", "--json", timeout=20)
            n = json.loads(res.stdout).get("open_associations") if res.returncode == 0 else None
        except (ValueError, AttributeError, OSError):
            return None
        if not isinstance(n, int):
            return None
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.3)


def quiesce(app: Appliance, timeout: float = QUIESCE_S) -> tuple[int, list[Path]]:
    """Wait until no association is open in the index and .incoming is empty; return what is left."""
    deadline = time.monotonic() + timeout
    while True:
        n, files = open_associations(app), incoming_files(app)
        if (n == 0 and not files) or time.monotonic() > deadline:
            return n, files
        time.sleep(0.05)


# -- DICOM probes ------------------------------------------------------------------------------------


def _associate(app: Appliance, calling: str = "INVARIANT") -> Any:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

    ae = pynetdicom_ae(calling)
    ae.acse_timeout = 5
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", app.port, ae_title=CALLED_AE)


def echo_seconds(app: Appliance) -> tuple[float | None, str]:
    """Seconds for associate + C-ECHO + release, or None with the reason."""
    start = time.monotonic()
    assoc = _associate(app)
    if not assoc.is_established:
        return None, "association not established" + (" (rejected)" if assoc.is_rejected else "")
    try:
        status = assoc.send_c_echo()
        if "Status" not in status or status.Status != 0:
            return None, f"C-ECHO answered {status!r}"
    finally:
        assoc.release()
    return time.monotonic() - start, ""


def storable(ds: Any) -> Any:
    """``ds`` with the file meta pynetdicom's ``send_c_store`` needs to pick a presentation context."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def parallel_senders(app: Appliance, ledger: Ledger, n: int) -> list[str]:
    """``n`` associations held open at once; each must be accepted, C-ECHO and C-STORE. Problems."""
    from appliance_dev.dicom_factory import ct_dataset

    problems: list[str] = []
    assocs: list[Any] = [None] * n
    barrier = threading.Barrier(n, timeout=20)

    def one(i: int) -> None:
        try:
            sender(i)
        except Exception as exc:
            problems.append(f"parallel sender {i + 1}: {type(exc).__name__}: {exc}")

    def sender(i: int) -> None:
        assoc = _associate(app, f"PARALLEL{i}")
        assocs[i] = assoc
        try:
            barrier.wait()  # all n are open at the same time
        except threading.BrokenBarrierError:
            pass
        if not assoc.is_established:
            problems.append(f"parallel sender {i + 1}/{n} not accepted"
                            + (" (rejected: a slot is still taken)" if assoc.is_rejected else ""))
            return
        try:
            status = assoc.send_c_echo()
            if "Status" not in status or status.Status != 0:
                problems.append(f"parallel sender {i + 1}: C-ECHO answered {status!r}")
            ds = storable(ct_dataset(study_uid=generate_uid(), series_uid=generate_uid()))
            status = assoc.send_c_store(ds)
            if "Status" in status and status.Status == 0:
                ledger.ack(str(ds.SOPInstanceUID))
            else:
                problems.append(f"parallel sender {i + 1}: C-STORE answered {status!r}")
        finally:
            assoc.release()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return problems


# -- the check -------------------------------------------------------------------------------------


def forbidden_log_lines(text: str, context: int = 3, limit: int = 6) -> list[str]:
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if FORBIDDEN_LOG.search(line):
            out.append("\n".join(lines[max(0, i - 1):i + context + 1]))
            if len(out) >= limit:
                break
    return out


def check_invariants(app: Appliance, ledger: Ledger, problems: list[str] | tuple[str, ...] = (),
                     label: str = "", max_associations: int = 4, echo_within: float = ECHO_WITHIN_S,
                     rss_limit_mb: float = LISTENER_RSS_LIMIT_MB) -> list[str]:
    """Check every invariant after a scenario (whose own ``problems`` are passed in); returns all problems.

    Call with no connection of the scenario left open. Use :func:`assert_invariants` in tests.
    """
    found = list(problems)
    if not app.running:
        found.append(f"the appliance is not running (exit code {app.proc.returncode if app.proc else None})")
        return found
    n_open, files = quiesce(app)
    if n_open:
        found.append(f"{n_open} association(s) still open in the index {QUIESCE_S:.0f} s after the last client left")
    if files:
        found.append(f"left in spool/.incoming: {[p.name for p in files][:10]}")
    n_status = status_open_associations(app)
    if n_status:
        found.append(f"`appliance status` reports {n_status} open association(s) {QUIESCE_S:.0f} s after the last "
                     "client left")
    # The echo must succeed within `echo_within`; retried (to tell a slow release from a leak) until QUIESCE_S.
    start = time.monotonic()
    while True:
        seconds, why = echo_seconds(app)
        if seconds is not None or time.monotonic() - start > QUIESCE_S:
            break
        time.sleep(0.2)
    total = time.monotonic() - start
    if seconds is None:
        found.append(f"C-ECHO failed for {total:.0f} s: {why}")
    elif total > echo_within:
        found.append(f"C-ECHO answered only {total:.2f} s after the scenario ended (bound {echo_within} s; "
                     f"earlier tries: {why or 'slow'})")
    start = time.monotonic()
    while True:
        parallel = parallel_senders(app, ledger, max_associations)
        if not parallel or time.monotonic() - start > QUIESCE_S:
            break
        time.sleep(0.5)
    if parallel:
        found += [f"after {QUIESCE_S:.0f} s of retries: {p}" for p in parallel]
    elif time.monotonic() - start > SLOT_RELEASE_S:
        found.append(f"{max_associations} parallel senders were only all accepted "
                     f"{time.monotonic() - start:.1f} s after the scenario ended")
    left = n_open
    n_open, _ = quiesce(app, 1.0 if left else QUIESCE_S)
    if n_open > left:
        found.append(f"{n_open - left} more association(s) open in the index after the parallel senders released")
    indexed = indexed_uids(app)
    with ledger.lock:
        unacked = set(indexed) - ledger.acked - ledger.maybe
        lost = ledger.acked - set(indexed)
    if unacked:
        found.append(f"{len(unacked)} indexed instance(s) no client saw acknowledged: {sorted(unacked)[:5]}")
    if lost:
        found.append(f"{len(lost)} acknowledged instance(s) missing from the index: {sorted(lost)[:5]}")
    missing_files = [u for u, p in indexed.items() if not (app.spool / p).is_file()]
    if missing_files:
        found.append(f"{len(missing_files)} indexed instance(s) without their spool file: {missing_files[:5]}")
    pids = listener_pids(app)
    if not pids:
        found.append("no listener process found holding the DICOM port")
    for pid in pids:
        rss, peak = memory_mb(pid)
        if rss > rss_limit_mb or peak > rss_limit_mb:
            found.append(f"listener pid {pid}: resident {rss:.0f} MB, peak {peak:.0f} MB (bound {rss_limit_mb} MB)")
    text = app.log_text()
    new, ledger.log_offset = text[ledger.log_offset:], len(text)
    bad = forbidden_log_lines(new)
    if bad:
        found.append("appliance log:\n" + "\n---\n".join(bad))
    if label and found:
        found.insert(0, f"[{label}]")
    return found


def assert_invariants(app: Appliance, ledger: Ledger, problems: list[str] | tuple[str, ...] = (),
                      **kwargs: Any) -> None:
    found = check_invariants(app, ledger, problems, **kwargs)
    assert not found, "\n".join(found)
