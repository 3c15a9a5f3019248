"""Bounds on what a peer can make a listener hold, and no thread that dies noisily.

pynetdicom 3.0.4 trusts the peer in three places that matter on a clinic network:

* it reads a PDU by asking the socket for as many bytes as the PDU header announces (up to 4 GiB),
  with no limit per PDU type and no deadline, so one connection can make a listener allocate
  gigabytes or hold a thread forever;
* it appends every fragment of a DIMSE message to one in-memory buffer, with no limit on the
  command or the data set, and accepts data-set fragments before any command;
* an exception in a DUL or association thread (an invalid state-machine event when the appliance
  stops, a decoding error) ends the thread with a traceback and can leave the socket open and the
  association's slot taken.

The patches here replace the PDU read with a bounded one (association-phase PDUs capped at
``max_association_pdu``, P-DATA-TF at the Maximum Length we advertised, a deadline per PDU and,
before the association is established, per connection), count DIMSE bytes per message (a data set
over ``max_instance_bytes``, a command over :data:`MAX_COMMAND_BYTES` or data before a command is a
protocol violation), spill a data set larger than ``memory_instance_bytes`` to a file on the data
filesystem while it arrives, and wrap both threads so that whatever happens, the connection is
closed, the slot is released and one log line names the peer.

A violation gets an A-ABORT (source: service provider, PS3.8 Table 9-26 reason), a warning naming the
peer and the length, a counter, and nothing else is disturbed. These patches are applied whenever
the listener runs the pinned pynetdicom, independently of the speed tuning in ``tuning.py``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dul as _dul

from appliance.ingest import pins

log = logging.getLogger("appliance.ingest")

GUARDED_VERSION = "3.0.4"

#: A DIMSE command set is a handful of short elements; real ones are a few hundred bytes.
MAX_COMMAND_BYTES = 64 * 1024
#: Slack over our Maximum Length for a P-DATA-TF PDU: some senders count the limit against each PDV
#: (4-byte item length + 2 header bytes) rather than the PDU's variable field.
PDATA_SLACK = 64
#: Bytes read from the socket at a time; the PDU buffer grows by at most this much per read.
READ_CHUNK = 256 * 1024

#: PS3.8 Table 9-26, A-ABORT reasons when the source is the service provider (2).
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PDU_PARAMETER = 0x06

_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}


@dataclass
class Limits:
    """What one listener process allows a peer; set once by :func:`guard_pynetdicom`."""

    max_pdu: int = 1_048_576
    max_association_pdu: int = 262_144
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    memory_instance_bytes: int = 32 * 1024 * 1024
    max_instance_bytes: int = 4 * 1024**3
    #: Directory on the data filesystem for spilled data sets (the spool's incoming directory).
    spill_dir: str | None = None
    #: Called with a short kind ("oversized_pdu", "undecodable_pdu", ...) for every violation.
    on_violation: Callable[[str], None] | None = None


_limits = Limits()
_applied = False
_spill_seq = itertools.count()


class ProtocolViolation(Exception):
    """The peer broke PS3.8/PS3.7 in a way that ends the association."""

    def __init__(self, kind: str, message: str, reason: int = ABORT_INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason


class SpilledDataset(BytesIO):
    """A received data set that outgrew memory: its bytes go to a ``.part`` file as they arrive.

    A ``BytesIO`` only because pynetdicom's C-STORE primitive insists on one; nothing is kept in
    memory. The file starts with ``prefix`` (the preamble and file meta the receiver would write), so
    storing it is an fsync and a rename, not a copy. Named like the spool's own partial writes, so a
    crash leaves nothing the next start does not remove.
    """

    def __init__(self, directory: str, prefix: bytes, initial: bytes | memoryview) -> None:
        super().__init__()
        self.path = f"{directory}/{os.getpid()}-spill{next(_spill_seq)}.part"
        self.offset = len(prefix)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        self.size = 0
        os.write(self._fd, prefix)
        self.write(initial)

    def write(self, data: Any) -> int:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.size += len(data)
        return len(data)

    def finish(self) -> None:
        """Make the bytes durable and close the descriptor; the file stays for the receiver."""
        if self._fd >= 0:
            try:
                os.fdatasync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def getbuffer(self) -> memoryview:  # pragma: no cover - a spilled set is never read as a buffer
        raise TypeError("a spilled data set lives in a file: use .path")


def peer_of(dul: Any) -> str:
    try:
        info = dul.assoc.requestor.address_info
        return f"{info.address}:{info.port}"
    except Exception:
        return "unknown peer"


def _count(kind: str) -> None:
    if _limits.on_violation is not None:
        try:
            _limits.on_violation(kind)
        except Exception:
            log.exception("could not count a protocol violation")


def _raw_socket(dul: Any) -> socket.socket | None:
    wrapped = getattr(dul, "socket", None)
    return getattr(wrapped, "socket", None) if wrapped is not None else None


def _abort_and_close(dul: Any, reason: int) -> None:
    """Send an A-ABORT (service provider) and close the connection; the state machine sees Evt17."""
    sock = _raw_socket(dul)
    if sock is not None:
        try:
            sock.settimeout(1.0)
            sock.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason))
        except OSError:
            pass
    try:
        dul.socket.close()  # queues Evt17: the association ends as an A-P-ABORT
    except Exception:
        pass


def _recv_into(sock: socket.socket, buf: bytearray, start: int, end: int, deadline: float) -> int:
    """Fill ``buf[start:end]`` before ``deadline``; returns the end of what arrived (less: peer closed).

    The socket keeps ``network_timeout`` (set when its reader thread starts), so a silent peer times
    out per read; the deadline also ends a peer that trickles. Only a deadline closer than that
    timeout shortens it, for that read, so the usual PDU costs no extra system calls.
    """
    view = memoryview(buf)
    shortened = False
    try:
        got = start
        while got < end:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            # The PDU's own deadline is network_timeout from its start, a hair under the socket's:
            # only a clearly closer one (a trickling peer, the negotiation's acse_timeout) shortens it,
            # so a read can overrun its deadline by at most that margin.
            if left < _limits.network_timeout - min(1.0, 0.1 * _limits.network_timeout):
                sock.settimeout(left)
                shortened = True
            n = sock.recv_into(view[got:end], end - got)
            if not n:
                break
            got += n
        return got
    finally:
        view.release()
        if shortened:
            try:
                sock.settimeout(_limits.network_timeout)
            except OSError:
                pass


def read_pdu(dul: Any) -> None:
    """Replacement for ``DULServiceProvider._read_pdu_data``: one PDU, bounded in size and time."""
    sock = _raw_socket(dul)
    if sock is None:
        dul.event_queue.put("Evt17")
        return
    now = time.monotonic()
    deadline = now + _limits.network_timeout
    state = dul.state_machine.current_state
    if state in ("Sta1", "Sta2"):  # no association yet: the whole negotiation has acse_timeout from the connect
        started = getattr(dul, "_edge_connected", now)
        deadline = min(deadline, started + _limits.acse_timeout)
    header = bytearray(6)
    try:
        got = _recv_into(sock, header, 0, 6, deadline)
    except (OSError, TimeoutError) as exc:
        log.info("connection from %s ended before a PDU header arrived (%s)", peer_of(dul), _why(exc))
        _close_quietly(dul)
        return
    if got < 6:
        if got:
            log.info("connection from %s closed after %d of a PDU header's 6 bytes", peer_of(dul), got)
        dul.event_queue.put("Evt17")
        return
    pdu_type, _, length = struct.unpack(">BBL", header)
    try:
        if pdu_type not in _PDU_NAMES:
            raise ProtocolViolation("unknown_pdu_type", f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
        if state in ("Sta1", "Sta2") and pdu_type not in (0x01, 0x07):  # before association: a request or an abort
            raise ProtocolViolation(
                "unexpected_pdu", f"{_PDU_NAMES[pdu_type]} before any A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU
            )
        cap = _limits.max_pdu + PDATA_SLACK if pdu_type == 0x04 else _limits.max_association_pdu
        if length > cap:
            raise ProtocolViolation(
                "oversized_pdu", f"{_PDU_NAMES[pdu_type]} announces {length} bytes, over the {cap}-byte limit"
            )
    except ProtocolViolation as exc:
        violation(dul, exc)
        return
    # The buffer grows with what arrives, never to the announced length ahead of the bytes.
    buf = bytearray(6 + min(length, READ_CHUNK))
    buf[:6] = header
    have = 6
    try:
        while have < 6 + length:
            if have == len(buf):
                buf.extend(bytes(min(6 + length - len(buf), max(READ_CHUNK, len(buf)))))
            got = _recv_into(sock, buf, have, len(buf), deadline)
            if got == have:
                break
            have = got
    except (OSError, TimeoutError) as exc:
        log.warning(
            "connection from %s: %s of %d bytes stopped after %d (%s); closed",
            peer_of(dul),
            _PDU_NAMES[pdu_type],
            length,
            have - 6,
            _why(exc),
        )
        _count("incomplete_pdu")
        _abort_and_close(dul, ABORT_INVALID_PDU_PARAMETER)
        return
    if have < 6 + length:
        log.warning(
            "connection from %s closed inside a %s (%d of %d bytes)",
            peer_of(dul),
            _PDU_NAMES[pdu_type],
            have - 6,
            length,
        )
        _count("truncated_pdu")
        dul.event_queue.put("Evt17")
        return
    try:
        pdu, event = dul._decode_pdu(buf)
    except Exception as exc:
        violation(
            dul,
            ProtocolViolation(
                "undecodable_pdu", f"{_PDU_NAMES[pdu_type]} cannot be decoded: {type(exc).__name__}: {exc}"
            ),
        )
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _why(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else (type(exc).__name__ + (f": {exc}" if str(exc) else ""))


def _close_quietly(dul: Any) -> None:
    try:
        dul.socket.close()
    except Exception:
        pass


def violation(dul: Any, exc: ProtocolViolation) -> None:
    log.warning("association from %s aborted: %s", peer_of(dul), exc)
    _count(exc.kind)
    _abort_and_close(dul, exc.reason)


# -- DIMSE message size accounting and spilling ------------------------------------------------------


def _decode_msg_guarded(orig: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(orig)
    def decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
        # Runs inside a state-machine action on the DUL thread: a violation is handled right here
        # (abort, close: the machine then sees the connection close) rather than raised into
        # pynetdicom, which would log a traceback and leave the machine in a state it never left.
        try:
            _account(self, primitive, assoc)
            done = orig(self, primitive, assoc)
        except ProtocolViolation as exc:
            return _violated(self, assoc, exc)
        except Exception as exc:
            return _violated(
                self, assoc, ProtocolViolation("invalid_dimse", f"invalid DIMSE message: {type(exc).__name__}: {exc}")
            )
        ds = self.data_set
        if (
            not done
            and type(ds) is BytesIO
            and ds.tell() > _limits.memory_instance_bytes
            and _limits.spill_dir is not None
            and assoc is not None
        ):
            self.data_set = _spill(self, ds, assoc)
        return done

    return decode_msg


def _violated(msg: Any, assoc: Any, exc: ProtocolViolation) -> bool:
    ds = getattr(msg, "data_set", None)
    if isinstance(ds, SpilledDataset):
        ds.discard()
    msg.data_set = BytesIO()
    if assoc is not None:
        violation(assoc.dul, exc)
    return False


def _account(msg: Any, primitive: Any, assoc: Any) -> None:
    for _cid, data in primitive.presentation_data_value_list:
        if not data:
            raise ProtocolViolation("invalid_dimse", "empty presentation data value")
        if data[0] & 1:
            n = getattr(msg, "_edge_cmd_bytes", 0) + len(data) - 1
            msg._edge_cmd_bytes = n
            if n > MAX_COMMAND_BYTES:
                raise ProtocolViolation("oversized_command", f"DIMSE command set over {MAX_COMMAND_BYTES} bytes")
        else:
            if getattr(msg, "context_id", None) is None:  # set when the command's last fragment arrived
                raise ProtocolViolation(
                    "data_before_command", "data set fragment before its command set", ABORT_UNEXPECTED_PDU
                )
            n = getattr(msg, "_edge_data_bytes", 0) + len(data) - 1
            msg._edge_data_bytes = n
            if n > _limits.max_instance_bytes:
                raise ProtocolViolation(
                    "oversized_dataset", f"data set over max_instance_bytes={_limits.max_instance_bytes}"
                )


def _spill(msg: Any, ds: BytesIO, assoc: Any) -> BytesIO:
    from appliance.ingest.receiver import file_meta  # the receiver owns the file format

    cs = msg.command_set
    ts = assoc._accepted_cx[msg.context_id].transfer_syntax[0] if msg.context_id in assoc._accepted_cx else None
    prefix = file_meta(
        str(cs.AffectedSOPClassUID), str(cs.AffectedSOPInstanceUID), str(ts), str(assoc.requestor.ae_title or "")
    )
    spilled = SpilledDataset(_limits.spill_dir or ".", prefix, ds.getbuffer())
    log.debug(
        "data set from %s over %d bytes: spilled to %s", peer_of(assoc.dul), _limits.memory_instance_bytes, spilled.path
    )
    return spilled


def _discard_spill(dul: Any) -> None:
    msg = getattr(getattr(dul.assoc, "dimse", None), "message", None)
    ds = getattr(msg, "data_set", None)
    if isinstance(ds, SpilledDataset):
        ds.discard()


# -- threads that end cleanly ------------------------------------------------------------------------

_hooks_lock = threading.Lock()


def on_connection_end(assoc: Any, hook: Callable[[], None]) -> None:
    """Run ``hook`` once when the association's connection is over, however it ended.

    If it is over already (the DUL thread ended before the association thread got here), at once.
    """
    with _hooks_lock:
        if not getattr(assoc, "_edge_ended", False):
            hooks = getattr(assoc, "_edge_end_hooks", None)
            if hooks is None:
                hooks = assoc._edge_end_hooks = []
            hooks.append(hook)
            return
    _call(hook)


def _call(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:
        log.exception("association clean-up failed")


def _run_end_hooks(assoc: Any) -> None:
    with _hooks_lock:
        assoc._edge_ended = True
        hooks = getattr(assoc, "_edge_end_hooks", None) or []
        assoc._edge_end_hooks = []
    for hook in reversed(hooks):
        _call(hook)


def _dul_run_guarded(orig: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(orig)
    def run_reactor(self: Any) -> None:
        self._edge_connected = time.monotonic()
        sock = _raw_socket(self)
        if sock is not None:  # an accepted socket is blocking, with no timeout: a silent peer would hold it
            try:
                sock.settimeout(_limits.network_timeout)
            except OSError:
                pass
        try:
            orig(self)
        except ProtocolViolation as exc:
            violation(self, exc)
        except Exception as exc:
            log.warning(
                "association from %s ended on an unexpected condition: %s: %s", peer_of(self), type(exc).__name__, exc
            )
            _count("internal_error")
            _abort_and_close(self, 0x00)
        finally:
            sock = _raw_socket(self)
            if sock is not None:  # nothing reads this socket any more: it must not outlive the thread
                try:
                    sock.close()
                except OSError:
                    pass
            self._kill_thread = True
            try:
                self.assoc._kill = True
            except Exception:
                pass
            _discard_spill(self)
            _run_end_hooks(self.assoc)

    return run_reactor


def _await_request(assoc: Any) -> bool:
    """Start the DUL and wait for the peer's A-ASSOCIATE-RQ; False if the connection ended first.

    pynetdicom's acceptor waits for the request for the full ACSE timeout even when the connection
    is already gone (a violation, a reset, a port scan), and every such waiting thread counts as an
    open association in its own limit. Here the wait ends as soon as the reader thread does.
    """
    dul = assoc.dul
    if not assoc._started_dul:
        dul.start()
        assoc._started_dul = True
        assoc._dul_ready.wait()
    deadline = time.monotonic() + (_limits.acse_timeout or 30.0)
    q = dul.to_user_queue
    while True:
        with q.not_empty:
            if q.queue:
                return True
            q.not_empty.wait(0.05)
        if q.queue:
            return True
        if not dul.is_alive() or _raw_socket(dul) is None or time.monotonic() >= deadline:
            return False  # the reader ended, or closed the connection (a violation, a reset, ARTIM)


def _assoc_run_guarded(orig: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(orig)
    def run_reactor(self: Any) -> None:
        try:
            if self.is_acceptor and not _await_request(self):
                if self.dul.is_alive():  # no request within acse_timeout: drop the connection (as ARTIM does)
                    _close_quietly(self.dul)
                    self.dul._kill_thread = True
                self._kill = True
                return
            orig(self)
        except Exception as exc:
            log.warning(
                "association from %s ended on an unexpected condition: %s: %s",
                peer_of(self.dul),
                type(exc).__name__,
                exc,
            )
            _count("internal_error")
            if self.dul.is_alive():
                _abort_and_close(self.dul, 0x00)
                self.dul._kill_thread = True
        finally:
            if not self.dul.is_alive() and not getattr(self, "_started_dul", False):
                _run_end_hooks(self)  # the DUL never ran, so its clean-up never will

    return run_reactor


def end_connection(assoc: Any) -> None:
    """Stop an association from outside its threads (the listener is stopping), in any state.

    An established association gets an A-ABORT through pynetdicom; one still negotiating (Sta2,
    where an A-ABORT request is an invalid event) just has its connection closed.
    """
    if assoc.is_established:
        try:
            assoc.abort()
            return
        except Exception:
            pass
    _abort_and_close(assoc.dul, 0x00)
    assoc.dul._kill_thread = True


def _thread_excepthook(args: Any) -> None:
    """Last resort for a thread the wrappers do not cover: one line, not a traceback."""
    if args.exc_type is SystemExit:
        return
    log.error(
        "thread %s ended on an unexpected condition: %s: %s",
        getattr(args.thread, "name", "?"),
        args.exc_type.__name__,
        args.exc_value,
    )


class OneLine(logging.Filter):
    """pynetdicom logs some conditions with a traceback; an operator needs one line, so fold it in."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom"):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        elif record.msg is not None and isinstance(record.msg, BaseException):
            exc = record.msg
            record.msg, record.args = f"{type(exc).__name__}: {exc}", None
        return True


#: Events that are our own requests (associate, accept, reject, data, release, abort): once the connection
#: is closing or gone they are moot, and pynetdicom would raise InvalidEventError on its reader thread.
_LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
_ENDED_STATES = frozenset({"Sta1", "Sta2", "Sta13"})


def _do_action_guarded(orig: Callable[[Any, str], None]) -> Callable[[Any, str], None]:
    from pynetdicom.fsm import TRANSITION_TABLE

    @functools.wraps(orig)
    def do_action(self: Any, event: str) -> None:
        if (
            (event, self.current_state) not in TRANSITION_TABLE
            and event in _LOCAL_EVENTS
            and self.current_state in _ENDED_STATES
        ):
            log.debug(
                "association with %s: %s dropped, the connection is %s",
                peer_of(self.dul),
                event,
                "closing" if self.current_state == "Sta13" else "gone",
            )
            return
        orig(self, event)

    return do_action


def guard_pynetdicom(limits: Limits) -> bool:
    """Apply the bounds in this process (idempotent; the limits may be updated); returns whether applied."""
    global _applied, _limits
    _limits = limits
    if _applied:
        return True
    why = pins.refusal(pins.GUARD, GUARDED_VERSION)
    if why is not None:
        log.error("%s: PDU sizes are NOT bounded; reinstall pynetdicom==%s", why, GUARDED_VERSION)
        return False
    from pynetdicom import fsm as _fsm

    # setattr: these replace pynetdicom's own methods, which a type checker rightly refuses as assignments.
    dul_cls, assoc_cls = _dul.DULServiceProvider, _association.Association
    setattr(dul_cls, "_read_pdu_data", read_pdu)
    setattr(dul_cls, "run_reactor", _dul_run_guarded(dul_cls.run_reactor))
    setattr(assoc_cls, "run_reactor", _assoc_run_guarded(assoc_cls.run_reactor))
    setattr(_fsm.StateMachine, "do_action", _do_action_guarded(_fsm.StateMachine.do_action))
    setattr(_dimse_messages.DIMSEMessage, "decode_msg", _decode_msg_guarded(_dimse_messages.DIMSEMessage.decode_msg))
    for handler in logging.getLogger().handlers:
        handler.addFilter(OneLine())
    threading.excepthook = _thread_excepthook
    _applied = True
    return True


def wait_readable(sock: socket.socket, seconds: float) -> bool:
    """Whether ``sock`` has bytes (or EOF) within ``seconds``; used by tests of half-closed peers."""
    try:
        return bool(select.select([sock], [], [], seconds)[0])
    except (OSError, ValueError):
        return True


__all__ = [
    "Limits",
    "ProtocolViolation",
    "SpilledDataset",
    "guard_pynetdicom",
    "end_connection",
    "on_connection_end",
    "threading",
]
