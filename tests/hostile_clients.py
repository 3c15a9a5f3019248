"""Raw-socket DICOM upper-layer clients for the hostile-client tests (PS3.8 section 9.3).

Everything here is built byte by byte so a test can send what no well-behaved library would: wrong
lengths, unknown PDU types, PDVs longer than their PDU, fragments out of order, half-closed and
reset sockets. :class:`RawConn` reads the appliance's answers PDU by PDU and says how the
connection ended (A-ABORT, A-ASSOCIATE-RJ, plain close, reset, or nothing within a deadline).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
             5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}

#: PDV message control header bits (PS3.8 E.2): bit 0 command, bit 1 last fragment.
DATA_MORE, COMMAND_MORE, DATA_LAST, COMMAND_LAST = 0x00, 0x01, 0x02, 0x03

#: Default contexts a raw client proposes: 1 Verification, 3 CT Explicit VR LE, 5 CT Implicit VR LE.
DEFAULT_CONTEXTS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, VERIFICATION, (IMPLICIT_VR_LE,)),
    (3, CT_IMAGE_STORAGE, (EXPLICIT_VR_LE,)),
    (5, CT_IMAGE_STORAGE, (IMPLICIT_VR_LE,)),
)


# -- PDU builders -----------------------------------------------------------------------------------------


def pdu_header(pdu_type: int, length: int) -> bytes:
    """The 6-byte PDU header: type, reserved, 32-bit big-endian length (any length, however absurd)."""
    return struct.pack(">BBL", pdu_type & 0xFF, 0, length & 0xFFFFFFFF)


def pdu(pdu_type: int, body: bytes) -> bytes:
    return pdu_header(pdu_type, len(body)) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16)


def a_associate_rq(called: str = "EDGE", calling: str = "HOSTILE",
                   contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = DEFAULT_CONTEXTS,
                   max_pdu: int = 16384, extra_user_items: bytes = b"") -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""
    items = [_item(0x10, APPLICATION_CONTEXT.encode())]
    for cx_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items.append(_item(0x20, struct.pack(">BBBB", cx_id, 0, 0, 0) + sub))
    user = (_item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode())
            + _item(0x55, b"HOSTILE_TEST") + extra_user_items)
    items.append(_item(0x50, user))
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + b"\x00" * 32 + b"".join(items)
    return pdu(A_ASSOCIATE_RQ, body)


def a_release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, b"\x00" * 4)


def a_release_rp() -> bytes:
    return pdu(A_RELEASE_RP, b"\x00" * 4)


def a_abort(source: int = 0, reason: int = 0) -> bytes:
    return pdu(A_ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def pdv(context_id: int, control: int, data: bytes, item_length: int | None = None) -> bytes:
    """One Presentation Data Value item; ``item_length`` overrides the true length (a lie)."""
    length = len(data) + 2 if item_length is None else item_length
    return struct.pack(">LBB", length & 0xFFFFFFFF, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(pdvs))


# -- DIMSE command sets (Implicit VR Little Endian, PS3.7 E) ----------------------------------------------


def _elem(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def _command(*elems: bytes) -> bytes:
    body = b"".join(elems)
    return _elem(0x0000, struct.pack("<L", len(body))) + body


def c_echo_rq(msg_id: int = 1) -> bytes:
    return _command(_elem(0x0002, VERIFICATION.encode()), _elem(0x0100, _us(0x0030)), _elem(0x0110, _us(msg_id)),
                    _elem(0x0800, _us(0x0101)))


def c_store_rq(sop_instance_uid: str, msg_id: int = 1, sop_class_uid: str = CT_IMAGE_STORAGE) -> bytes:
    return _command(_elem(0x0002, sop_class_uid.encode()), _elem(0x0100, _us(0x0001)), _elem(0x0110, _us(msg_id)),
                    _elem(0x0700, _us(2)), _elem(0x0800, _us(0x0000)), _elem(0x1000, sop_instance_uid.encode()))


def parse_command(data: bytes) -> dict[int, bytes]:
    """Elements of an Implicit VR LE command set, by element number (group 0000)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        out[elem] = data[pos:pos + length]
        pos += length
    return out


def store_messages(sop_instance_uid: str, dataset: bytes, context_id: int = 3, msg_id: int = 1,
                   max_pdv: int = 16000) -> list[bytes]:
    """The P-DATA-TF PDUs of one well-formed C-STORE request: command, then the dataset in fragments."""
    out = [p_data(pdv(context_id, COMMAND_LAST, c_store_rq(sop_instance_uid, msg_id)))]
    chunks = [dataset[i:i + max_pdv] for i in range(0, len(dataset), max_pdv)] or [b""]
    for n, chunk in enumerate(chunks):
        out.append(p_data(pdv(context_id, DATA_LAST if n == len(chunks) - 1 else DATA_MORE, chunk)))
    return out


def split_pdus(stream: bytes) -> list[bytes]:
    """Cut a byte stream into whole PDUs by their headers (a trailing partial PDU is kept as is)."""
    out, pos = [], 0
    while pos < len(stream):
        if pos + 6 > len(stream):
            out.append(stream[pos:])
            break
        (length,) = struct.unpack_from(">L", stream, pos + 2)
        out.append(stream[pos:pos + 6 + length])
        pos += 6 + length
    return out


def pdvs_of(pdu_bytes: bytes) -> list[tuple[int, int, bytes]]:
    """(context id, control header, data) of each PDV in a well-formed P-DATA-TF PDU."""
    body, pos, out = pdu_bytes[6:], 0, []
    while pos + 6 <= len(body):
        length, cx, ctl = struct.unpack_from(">LBB", body, pos)
        out.append((cx, ctl, body[pos + 6:pos + 4 + length]))
        pos += 4 + length
    return out


# -- the connection -------------------------------------------------------------------------------------


@dataclass
class Ending:
    """How the appliance ended (or did not end) a connection, and what it sent before."""

    kind: str  # "abort", "reject", "closed", "reset", "timeout"
    seconds: float
    pdus: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.kind != "timeout"

    def __str__(self) -> str:
        got = ", ".join(PDU_NAMES.get(t, hex(t)) for t, _ in self.pdus) or "nothing"
        return f"{self.kind} after {self.seconds:.2f} s (received: {got})"


class RawConn:
    """One TCP connection to the appliance, spoken to in raw bytes."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False
        self.reset = False
        self.accepted: dict[int, str] = {}  # context id -> accepted transfer syntax
        self.peer_max_pdu = 0

    # -- sending --

    def send(self, data: bytes) -> bool:
        """Send everything; False when the appliance already closed or reset the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.reset = True
            return False
        except OSError:
            return False

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def kill(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST, as for a sender killed mid-transfer."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- receiving --

    def _fill(self, need: int, deadline: float) -> bool:
        while len(self.buf) < need and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return False
            except (ConnectionResetError, ConnectionAbortedError):
                self.eof = self.reset = True
                return False
            except OSError:
                self.eof = True
                return False
            if not chunk:
                self.eof = True
            self.buf += chunk
        return len(self.buf) >= need

    def read_pdu(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next whole PDU (type, body), or None on close/reset/timeout (see ``eof``/``reset``)."""
        deadline = time.monotonic() + timeout
        if not self._fill(6, deadline):
            return None
        pdu_type, _, length = struct.unpack_from(">BBL", self.buf)
        if not self._fill(6 + length, deadline):
            return None
        body = bytes(self.buf[6:6 + length])
        del self.buf[:6 + length]
        return pdu_type, body

    def ending(self, timeout: float) -> Ending:
        """Read until the appliance ends the connection or ``timeout`` passes; say how it ended."""
        start = time.monotonic()
        deadline = start + timeout
        got: list[tuple[int, bytes]] = []
        while True:
            item = self.read_pdu(max(0.0, deadline - time.monotonic()))
            if item is not None:
                got.append(item)
                if item[0] in (A_ABORT, A_ASSOCIATE_RJ):
                    # Both end the association; the socket close follows. Wait briefly for it.
                    self._fill(len(self.buf) + 1, min(deadline, time.monotonic() + 1.0))
                    kind = "abort" if item[0] == A_ABORT else "reject"
                    return Ending(kind, time.monotonic() - start, got)
                continue
            elapsed = time.monotonic() - start
            if self.reset:
                return Ending("reset", elapsed, got)
            if self.eof:
                return Ending("closed", elapsed, got)
            return Ending("timeout", elapsed, got)

    # -- association --

    def associate(self, called: str = "EDGE", calling: str = "HOSTILE", max_pdu: int = 16384,
                  contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = DEFAULT_CONTEXTS,
                  timeout: float = 10.0) -> bool:
        """Send an A-ASSOCIATE-RQ and read the answer; True when accepted (``accepted`` filled in)."""
        self.send(a_associate_rq(called, calling, contexts, max_pdu))
        item = self.read_pdu(timeout)
        if item is None or item[0] != A_ASSOCIATE_AC:
            return False
        self._parse_ac(item[1])
        return True

    def _parse_ac(self, body: bytes) -> None:
        pos = 68
        while pos + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, pos)
            value = body[pos + 4:pos + 4 + length]
            if item_type == 0x21:
                cx_id, result = value[0], value[2]
                ts = ""
                if len(value) > 8 and value[4] == 0x40:
                    (ts_len,) = struct.unpack_from(">H", value, 6)
                    ts = value[8:8 + ts_len].decode("ascii", "replace").rstrip("\x00 ")
                if result == 0:
                    self.accepted[cx_id] = ts
            elif item_type == 0x50:
                sub = 0
                while sub + 4 <= len(value):
                    st, _, sl = struct.unpack_from(">BBH", value, sub)
                    if st == 0x51 and sl == 4:
                        (self.peer_max_pdu,) = struct.unpack_from(">L", value, sub + 4)
                    sub += 4 + sl
            pos += 4 + length

    def read_response(self, timeout: float = 10.0) -> dict[int, bytes] | None:
        """The next DIMSE response's command set (reassembled from command PDVs), or None."""
        deadline = time.monotonic() + timeout
        command = b""
        while True:
            item = self.read_pdu(max(0.0, deadline - time.monotonic()))
            if item is None or item[0] != P_DATA_TF:
                return None
            for _, ctl, data in pdvs_of(pdu_header(P_DATA_TF, len(item[1])) + item[1]):
                if ctl & 0x01:
                    command += data
                    if ctl & 0x02:
                        return parse_command(command)

    def echo(self, msg_id: int = 1, context_id: int = 1, timeout: float = 5.0) -> int | None:
        self.send(p_data(pdv(context_id, COMMAND_LAST, c_echo_rq(msg_id))))
        rsp = self.read_response(timeout)
        return None if rsp is None or 0x0900 not in rsp else struct.unpack("<H", rsp[0x0900][:2])[0]

    def store(self, sop_instance_uid: str, dataset: bytes, context_id: int = 3, msg_id: int = 1,
              timeout: float = 20.0) -> int | None:
        """One well-formed C-STORE; returns the response status (None: no response)."""
        max_pdv = min(self.peer_max_pdu or 16384, 65536) - 12
        for message in store_messages(sop_instance_uid, dataset, context_id, msg_id, max_pdv):
            if not self.send(message):
                return None
        rsp = self.read_response(timeout)
        return None if rsp is None or 0x0900 not in rsp else struct.unpack("<H", rsp[0x0900][:2])[0]

    def release(self, timeout: float = 5.0) -> bool:
        self.send(a_release_rq())
        item = self.read_pdu(timeout)
        self.close()
        return item is not None and item[0] == A_RELEASE_RP


def response_uid(rsp: dict[int, bytes]) -> str:
    return rsp.get(0x1000, b"").decode("ascii", "replace").rstrip("\x00 ")
