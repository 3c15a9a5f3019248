"""The ``export`` stage: sends outbox rows to their destinations with pynetdicom's C-STORE SCU.

One association per destination per pass carries up to ``export.batch`` due objects. Every attempt is
recorded with the DICOM reason (association rejected and why, the peer's status code, no connection),
so a technician reading ``appliance outbox list`` knows whether to call the PACS admin or the network team.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from appliance.config import Config, Destination
from appliance.store import Store
from appliance.store.outbox import Outbox, OutboxRow
from appliance.store.states import OutboxState

log = logging.getLogger("appliance.export")


def status_text(code: int) -> str:
    """``0xA700 Refused: Out of Resources``: the code a PACS log shows, and what it means."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    return f"0x{code:04X}" + (f" {meaning[1]}" if meaning else f" ({code_to_category(code)})")


def association_failure(assoc: object, dest: Destination) -> tuple[str, str | None]:
    """Why an association was not established: (what to tell a technician, status text or None)."""
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    prim = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    if getattr(assoc, "is_rejected", False) and prim is not None:
        status = f"A-ASSOCIATE-RJ result {prim.result} source {prim.result_source} reason {prim.diagnostic}"
        return (
            f"association rejected by {where}: {prim.result_str}, {prim.source_str}: {prim.reason_str}"
            " (check the AE titles configured on both sides)",
            status,
        )
    if prim is None:
        return f"cannot connect to {where} (connection refused, host unreachable or timed out)", None
    if getattr(assoc, "is_aborted", False) and not getattr(assoc, "accepted_contexts", None):
        return f"{where} accepted none of the proposed presentation contexts", None
    return f"association with {where} aborted during negotiation", None


def _describe(exc: BaseException) -> str:
    """``OSError: [Errno 104] Connection reset by peer``: the type says which layer failed."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Sender:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.export = config.export
        self.destinations = {d.name: d for d in config.destinations}
        self.outbox = Outbox(store.index)
        self.data_dir = Path(store.data_dir)
        #: Set when the appliance stops: an association in progress ends after its current C-STORE.
        self.stopping = threading.Event()

    def tick(self) -> int:
        """One pass over due rows; the number of objects delivered."""
        rows = self.outbox.due(limit=self.export.batch * max(1, len(self.destinations)))
        by_dest: OrderedDict[str, list[OutboxRow]] = OrderedDict()
        for row in rows:
            by_dest.setdefault(row.destination, []).append(row)
        sent = 0
        for name, group in by_dest.items():
            sent += self.send_to(name, group[: self.export.batch])
        return sent

    def _fail(self, row: OutboxRow, detail: str, status: str | None, permanent: bool = False) -> None:
        e = self.export
        state = self.outbox.record_failure(
            row,
            detail,
            status,
            max_attempts=e.max_attempts,
            base=e.backoff_seconds,
            cap=e.backoff_max_seconds,
            permanent=permanent,
        )
        if state == OutboxState.DEAD:
            log.error(
                "%s %s to %s: giving up after %d attempt(s): %s (dead letter; `appliance outbox retry %d`)",
                row.kind,
                row.sop_instance_uid,
                row.destination,
                row.attempts + 1,
                detail,
                row.id,
            )
        else:
            log.warning(
                "%s %s to %s: attempt %d failed: %s; retrying later",
                row.kind,
                row.sop_instance_uid,
                row.destination,
                row.attempts + 1,
                detail,
            )

    def send_to(self, name: str, rows: list[OutboxRow]) -> int:
        dest = self.destinations.get(name)
        if dest is None:
            for row in rows:
                self._fail(
                    row, f"destination {name!r} is not configured any more ([[destinations]])", None, permanent=True
                )
            return 0
        datasets: list[tuple[OutboxRow, pydicom.Dataset]] = []
        contexts: set[tuple[str, str]] = set()
        for row in rows:
            try:
                ds = pydicom.dcmread(self.data_dir / row.path)
                context = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                self._fail(row, f"result file {row.path} cannot be read: {exc}", None, permanent=True)
                continue
            except Exception as exc:  # a file pydicom chokes on (no SOP Class UID, no file meta...): it stays so
                self._fail(row, f"result file {row.path} cannot be read: {_describe(exc)}", None, permanent=True)
                continue
            datasets.append((row, ds))
            contexts.add(context)
        if not datasets:
            return 0

        try:
            ae = AE(ae_title=self.config.dicom.ae_title)
            t = self.export.timeout_seconds
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
            for sop_class, ts in sorted(contexts)[:128]:
                ae.add_requested_context(
                    sop_class, list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
                )
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        except Exception as exc:  # e.g. a host name that does not resolve: an attempt like any other
            detail = f"cannot associate with {dest.ae_title}@{dest.host}:{dest.port}: {_describe(exc)}"
            for row, _ in datasets:
                self._fail(row, detail, None)
            return 0
        if not assoc.is_established:
            detail, status = association_failure(assoc, dest)
            for row, _ in datasets:
                self._fail(row, detail, status)
            return 0
        sent = 0
        try:
            for i, (row, out) in enumerate(datasets):
                if self.stopping.is_set():
                    break  # the rest stay pending, due now: sent after the restart
                try:
                    rsp = assoc.send_c_store(out)
                except Exception as exc:  # no accepted context for this SOP class, a socket error, a bug...
                    # Every failure is an attempt: recorded, backed off, a dead letter after max_attempts.
                    self._fail(row, f"cannot send to {dest.ae_title}: {_describe(exc)}", None)
                    if not assoc.is_established:  # the association went with it: the rest wait for the next one
                        detail = (
                            f"association with {dest.ae_title}@{dest.host}:{dest.port} ended by an earlier "
                            f"failure ({type(exc).__name__})"
                        )
                        for other, _ in datasets[i + 1 :]:
                            self._fail(other, detail, None)
                        break
                    continue
                if not rsp or "Status" not in rsp:
                    detail = (
                        f"no C-STORE response from {dest.ae_title}@{dest.host}:{dest.port} (association "
                        "aborted or timed out)"
                    )
                    for other, _ in datasets[i:]:
                        self._fail(other, detail, None)
                    break
                code = int(rsp.Status)
                if code_to_category(code) in ("Success", "Warning"):
                    self.outbox.record_sent(row, f"0x{code:04X}")
                    sent += 1
                else:
                    self._fail(row, f"{dest.ae_title} refused the object: {status_text(code)}", f"0x{code:04X}")
        finally:
            if assoc.is_established:
                try:
                    assoc.release()
                except Exception:  # the peer is gone: nothing to release, every attempt is recorded already
                    log.debug("release of the association with %s failed", dest.ae_title, exc_info=True)
        if sent:
            log.info("sent %d object(s) to %s (%s@%s:%d)", sent, name, dest.ae_title, dest.host, dest.port)
        return sent

    def run(self, stop: threading.Event) -> None:
        self.stopping = stop
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # the sender must outlive one bad pass; the rows stay pending
                log.exception("export pass failed")
            stop.wait(self.export.poll_seconds)
