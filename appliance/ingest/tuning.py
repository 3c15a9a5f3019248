"""Performance adjustments to pynetdicom 3.0.4, each found by profiling (see README, "Ingest speed").

pynetdicom runs two polling loops per association: the DUL thread reads PDUs and sends queued
ones, sleeping 1 ms whenever it finds nothing to do; the association thread sleeps 1 ms before every
look for a complete DIMSE message. One C-STORE waits on three of these sleeps (dataset complete ->
handler, response -> socket, next request -> read), ~1.5 ms an instance, and every idle
association wakes 2000 times a second. Here the same loops wait *for the thing they poll for*:

* the DUL thread waits in ``select`` on its socket and a wake-up pipe that ``send_pdu`` writes to,
* the association thread (acceptors only) waits on its DIMSE queue's condition,
* the Success C-STORE-RSP, sent once per instance, is encoded directly instead of through
  pydicom datasets (other responses take pynetdicom's path),

each with a cap so timers, release and abort are still noticed promptly. Only the sleep at the top of
those two loops waits for work: every other ``time.sleep`` in pynetdicom (the settle delay after an
abort, waits for a thread to end) stays a real sleep of the length asked for. Socket reads are not here:
``guard.py`` replaces pynetdicom's PDU read with a bounded one (larger reads, never sized by the
peer's claim), whether or not these adjustments are on.

The patches are applied only when every callable they replace has the source they were written
against (``pins.py``: hashes, not only the version); otherwise the appliance logs which differ and runs
pynetdicom unmodified. ``APPLIANCE_PYNETDICOM_TUNING=0`` turns them off (used by the benchmark to
show what they are worth).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import select
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dul as _dul
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from appliance.ingest import pins

log = logging.getLogger("appliance.ingest")

TUNED_VERSION = "3.0.4"
#: Longest a DUL thread waits without data or work before re-checking its timers and kill flag.
DUL_WAIT_CAP = 0.02
#: Longest an acceptor's association thread waits for a DIMSE message before checking release/abort.
ASSOC_WAIT_CAP = 0.005

_applied = False
#: Code of the two reactor loops (pynetdicom's own, under any wrapper): only their sleeps become waits.
_REACTOR_LOOPS: frozenset[Any] = frozenset()


class _ReactorClock:
    """Stands in for the ``time`` module inside pynetdicom's reactor modules.

    Everything is the real ``time`` except ``sleep`` called by the body of a reactor loop on a thread that
    has a wait strategy attached: it waits for its work instead of sleeping blindly. The caller is told by
    its code object, so a sleep anywhere else (``Association.abort``'s settle delay, called on the same
    thread from an event handler) is the real one.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait = getattr(threading.current_thread(), "_edge_wait", None)
        if wait is not None and sys._getframe(1).f_code in _REACTOR_LOOPS:
            wait(seconds)
        else:
            time.sleep(seconds)


def _dul_wait(dul: Any, seconds: float) -> None:
    wrapped = dul.socket
    sock = getattr(wrapped, "socket", None) if wrapped is not None else None
    if sock is None or isinstance(sock, ssl.SSLSocket) or sock.fileno() < 0:
        # TLS may hold decrypted bytes select() cannot see: keep pynetdicom's polling there.
        time.sleep(seconds)
        return
    try:
        ready, _, _ = select.select([sock, dul._edge_wake_r], [], [], DUL_WAIT_CAP)
    except (OSError, ValueError):
        time.sleep(seconds)
        return
    if dul._edge_wake_r in ready:
        try:
            while dul._edge_wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass


def _assoc_wait(assoc: Any, seconds: float) -> None:
    q = assoc.dimse.msg_queue
    with q.not_empty:
        if not q.queue:
            q.not_empty.wait(ASSOC_WAIT_CAP)


def _implicit(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _uid_value(uid: str) -> bytes:
    v = str(uid).encode("ascii")
    return v + b"\0" if len(v) % 2 else v


def encode_store_success(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """The command set of a C-STORE-RSP with Status Success (PS3.7 9.3.1.2), Implicit VR Little Endian.

    Every instance gets one; pynetdicom builds it through pydicom datasets at ~1 ms of CPU each,
    a quarter of a listener's Python time. The bytes are the same (tested against pynetdicom).
    """
    body = b"".join(
        (
            _implicit(0x0002, _uid_value(sop_class_uid)),
            _implicit(0x0100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
            _implicit(0x0120, struct.pack("<H", message_id)),  # Message ID Being Responded To
            _implicit(0x0800, struct.pack("<H", 0x0101)),  # Command Data Set Type: no data set
            _implicit(0x0900, struct.pack("<H", 0x0000)),  # Status: Success
            _implicit(0x1000, _uid_value(sop_instance_uid)),
        )
    )
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def quiet_pydicom_validation() -> None:
    """Skip pydicom's per-value regex validation in a listener process.

    pynetdicom builds every C-STORE response through pydicom datasets, which validate each UID
    against a regex (~7% of a listener's CPU). The receiver checks the UIDs that matter itself
    (``check_uid``) and stores datasets as received, so nothing here depends on pydicom's checks.
    """
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE


def tune_pynetdicom() -> bool:
    """Apply the adjustments in this process; returns whether they are active. Idempotent."""
    global _applied
    if _applied:
        return True
    if os.environ.get("APPLIANCE_PYNETDICOM_TUNING", "1") == "0":
        log.info("pynetdicom tuning disabled by APPLIANCE_PYNETDICOM_TUNING=0")
        return False
    why = pins.refusal(pins.TUNING, TUNED_VERSION)
    if why is not None:
        log.warning("%s: running it unmodified (slower ingest)", why)
        return False
    global _REACTOR_LOOPS
    _REACTOR_LOOPS = frozenset(
        {
            inspect.unwrap(_dul.DULServiceProvider.run_reactor).__code__,
            inspect.unwrap(_association.Association._run_reactor).__code__,
        }
    )

    orig_send_msg = _dimse.DIMSEServiceProvider.send_msg

    @functools.wraps(orig_send_msg)
    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        # Fast path only for the plain Success response; anything else, or anyone listening for
        # EVT_DIMSE_SENT, goes through pynetdicom unchanged.
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status == 0x0000
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_store_success(
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                primitive.MessageIDBeingRespondedTo,
            )
            max_pdu = self.maximum_pdu_size
            if not max_pdu or len(command) + 1 + 6 <= max_pdu:
                pdata = P_DATA()
                # Command, last fragment. A list, not a tuple: pynetdicom's setter insists, its annotation says tuple.
                pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]  # type: ignore[list-item]
                self.dul.send_pdu(pdata)
                return
        orig_send_msg(self, primitive, context_id)

    dul_cls = _dul.DULServiceProvider
    orig_dul_init = dul_cls.__init__
    orig_send_pdu = dul_cls.send_pdu
    orig_dul_run = dul_cls.run_reactor
    orig_assoc_run = _association.Association._run_reactor

    @functools.wraps(orig_dul_init)
    def dul_init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_dul_init(self, *args, **kwargs)
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._edge_wake_r, self._edge_wake_w = r, w
        self._edge_wait = lambda seconds: _dul_wait(self, seconds)

    @functools.wraps(orig_send_pdu)
    def send_pdu(self: Any, primitive: Any) -> None:
        orig_send_pdu(self, primitive)
        try:
            self._edge_wake_w.send(b"\0")
        except (BlockingIOError, OSError, AttributeError):
            pass  # a full pipe already means "wake up"; a closed one, that the DUL is gone

    @functools.wraps(orig_dul_run)
    def dul_run(self: Any) -> None:
        try:
            orig_dul_run(self)
        finally:
            self._edge_wake_r.close()
            self._edge_wake_w.close()

    @functools.wraps(orig_assoc_run)
    def assoc_run(self: Any) -> None:
        # Only acceptors: a requestor's user thread pauses the reactor between its own messages,
        # and a longer wait there would slow every send.
        if self.is_acceptor:
            self._edge_wait = lambda seconds: _assoc_wait(self, seconds)
        orig_assoc_run(self)

    # setattr: these replace pynetdicom's own methods and module globals, which a type checker refuses.
    setattr(dul_cls, "__init__", dul_init)
    setattr(dul_cls, "send_pdu", send_pdu)
    setattr(dul_cls, "run_reactor", dul_run)
    setattr(_association.Association, "_run_reactor", assoc_run)
    setattr(_dul, "time", _ReactorClock())
    setattr(_association, "time", _ReactorClock())
    setattr(_dimse.DIMSEServiceProvider, "send_msg", send_msg)
    _applied = True
    log.debug("pynetdicom %s tuned: event-driven reactor waits, direct C-STORE-RSP encoding", TUNED_VERSION)
    return True
