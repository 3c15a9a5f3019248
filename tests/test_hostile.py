"""Hostile clients against the real ``appliance serve`` process.

What a broken or malicious peer on the clinic network can send: random bytes, PDU headers with
absurd lengths for every PDU type, truncated PDUs, garbage P-DATA inside a valid association, PDVs
longer than their PDU, fragments out of order, idle and half-closed sockets, senders killed inside
a large instance, all of it mixed, and a seeded mutation fuzzer over what DCMTK's ``storescu``
really sends. After each scenario :func:`appliance_invariants.check_invariants` checks that the
appliance still answers, releases every association slot, leaves no partial file, indexes only what
it acknowledged, stays within its memory bound and logged no traceback.

One appliance serves the module (``max_associations = 4``, short timeouts); a scenario that breaks
an invariant marks it dirty and the next test gets a freshly started one, so one failure does not
cascade. ``--fuzz-cases N`` / ``--fuzz-seed S`` make the fuzzer run longer or differently.
"""

from __future__ import annotations

import random
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

import hostile_clients as hc
from appliance_invariants import (SLOT_RELEASE_S, Ledger, association_outcome, check_invariants, incoming_files, indexed_uids,
                                  listener_pids, memory_mb, quiesce, storable)
from conftest import Appliance, dcmtk_env, need_tool, parse_storescu, pynetdicom_ae
from appliance_dev.dicom_factory import ct_dataset, encode, make_series, write_file
from hostile_clients import RawConn
from pdu_capture import RecordingProxy

pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
              pytest.mark.filterwarnings("ignore:The value length")]

MAX_ASSOCIATIONS = 4
NETWORK_TIMEOUT = 4.0
ACSE_TIMEOUT = 2.0
MAX_PDU = 1_048_576              # [dicom] max_pdu_size default: what the appliance advertises
MAX_ASSOCIATION_PDU = 262_144    # [dicom] max_association_pdu default
#: A protocol violation the appliance can see at once must end the connection within this (< ACSE_TIMEOUT,
#: so a connection dropped only by a timer does not pass for a prompt abort).
PROMPT = 1.5
#: Grace on top of a timer before a connection it should have ended counts as held forever.
SLACK = 3.0
BIG_ROWS = 4096                  # 4096 x 4096 int16: a 32 MiB instance
FUZZ_CASES = 2000
FUZZ_SEED = 20261202
FUZZ_WORKERS = 3

APPLIANCE_SECTIONS = {
    "dicom": {"max_associations": MAX_ASSOCIATIONS, "network_timeout": NETWORK_TIMEOUT,
              "acse_timeout": ACSE_TIMEOUT, "max_pdu_size": MAX_PDU, "max_association_pdu": MAX_ASSOCIATION_PDU,
              # Large instances spill to disk while they arrive; a Deflated one may inflate to at most this.
              "memory_instance_bytes": 16 * 1024 * 1024, "max_instance_bytes": 128 * 1024 * 1024},
    "assemble": {"stable_seconds": 1.0},
}


# -- the module's appliance ---------------------------------------------------------------------------


class Hostile:
    """The module's appliance, its ledger of acknowledged instances, and whether it needs a restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.app = Appliance(root / "appliance", **APPLIANCE_SECTIONS).start()
        self.ledger = Ledger()
        self.dirty = False

    def restart(self) -> None:
        """A fresh process on the same data (SIGTERM, or SIGKILL if that hangs)."""
        try:
            if self.app.running:
                self.app.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                self.app.proc.wait(25)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pass
        if self.app.running or self.app.proc is not None:
            self.app.kill()
        self.app.start()
        self.ledger.log_offset = len(self.app.log_text())
        # A restart's recovery may index a complete file whose answer the client never saw.
        for uid in indexed_uids(self.app):
            if uid not in self.ledger.acked:
                self.ledger.might_have(uid)
        self.dirty = False

    def check(self, problems: list[str] | tuple[str, ...] = (), label: str = "") -> None:
        found = check_invariants(self.app, self.ledger, problems, label=label, max_associations=MAX_ASSOCIATIONS)
        if found:
            self.dirty = True
            pytest.fail("\n".join(found), pytrace=False)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    h = Hostile(tmp_path_factory.mktemp("hostile"))
    yield h
    if h.app.running:
        rc = h.app.terminate()
        assert rc == 0, f"exit code {rc} after SIGTERM\n{h.app.log_tail()}"


@pytest.fixture
def appliance(hostile: Hostile) -> Hostile:
    """The module's appliance, restarted first if the previous scenario left it broken."""
    if hostile.dirty or not hostile.app.running:
        hostile.restart()
    return hostile


# -- small helpers ----------------------------------------------------------------------------------------


def in_parallel(fn: Callable[..., Any], items: list[Any], problems: list[str], workers: int = 8) -> list[Any]:
    """``fn`` over ``items`` in threads; a case whose association was refused becomes a problem."""
    def guarded(item: Any) -> Any:
        try:
            return fn(item)
        except NotAccepted as exc:
            problems.append(f"{item!r:.80}: {exc}")
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(guarded, items))


def expect_end(conn: RawConn, within: float, what: str, problems: list[str],
               kinds: tuple[str, ...] = ("abort", "closed", "reset", "reject")) -> hc.Ending:
    """Read until the appliance ends ``conn``; a problem unless it did so within ``within`` s."""
    ending = conn.ending(within)
    if ending.kind not in kinds:
        problems.append(f"{what}: expected the appliance to end the connection within {within:.1f} s, "
                        f"got {ending}")
    return ending


class NotAccepted(Exception):
    """A well-formed A-ASSOCIATE-RQ was not accepted (a slot or thread still held by an earlier client)."""


#: Cases of one scenario that hold associations run at most this many at a time (< max_associations,
#: so a slot still being released by the previous case does not turn the next one away).
ASSOCIATED_WORKERS = MAX_ASSOCIATIONS - 1


def raw_associated(app: Appliance, retry_for: float = SLOT_RELEASE_S) -> RawConn:
    """A raw association; retried for a while on rejection, as a real sender would on a transient one."""
    deadline = time.monotonic() + retry_for
    while True:
        conn = RawConn(app.port)
        if conn.associate():
            return conn
        conn.close()
        if time.monotonic() > deadline:
            raise NotAccepted(f"the appliance did not accept a well-formed raw A-ASSOCIATE-RQ for {retry_for:.0f} s")
        time.sleep(0.2)


def must_associate(conn: RawConn) -> None:
    if not conn.associate():
        raise NotAccepted("the appliance did not accept a well-formed raw A-ASSOCIATE-RQ")


def recorded_outcome(app: Appliance, local_port: int, timeout: float = 5.0) -> str | None:
    deadline = time.monotonic() + timeout
    while True:
        outcome = association_outcome(app, local_port)
        if outcome is not None or time.monotonic() > deadline:
            return outcome
        time.sleep(0.05)


def expect_aborted_record(app: Appliance, local_port: int, what: str, problems: list[str]) -> None:
    """An association the peer broke must be recorded as aborted: "released" would let assembly
    complete a series on the release rule that the sender never finished."""
    outcome = recorded_outcome(app, local_port)
    if outcome is None:
        recorded = app.query("SELECT COUNT(*) AS n FROM associations WHERE peer = ?", (f"127.0.0.1:{local_port}",))
        state = "still open (no outcome) in the index" if recorded[0]["n"] else "not in the index at all"
        problems.append(f"{what}: the association is {state} 5 s after the connection ended, expected 'aborted'")
    elif outcome not in ("aborted", "lost"):
        problems.append(f"{what}: the index records the association as {outcome!r}, expected 'aborted'")


def junk(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


@pytest.fixture(scope="module")
def small_instance() -> tuple[str, bytes]:
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), rows=32, cols=32)
    return str(ds.SOPInstanceUID), encode(ds)


def fresh_instance(rows: int = 32) -> tuple[str, bytes]:
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), rows=rows, cols=rows)
    return str(ds.SOPInstanceUID), encode(ds)


@pytest.fixture(scope="module")
def big_instance_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, bytes]:
    """A 32 MiB CT instance: as a file (for storescu) and as dataset bytes (for raw senders)."""
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), rows=BIG_ROWS, cols=BIG_ROWS)
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    write_file(ds, path)
    return path, str(ds.SOPInstanceUID), encode(ds)


# -- 1. random bytes ---------------------------------------------------------------------------------------


def test_random_bytes(appliance: Hostile) -> None:
    """Seeded random blobs on fresh connections, left open: each must be ended, at the latest by the
    ACSE timer (a blob may start like a valid PDU header with a huge length)."""
    app, problems = appliance.app, []
    rng = random.Random(1)
    blobs = [junk(rng, rng.choice([1, 5, 6, 7, 100, 4096, 65536])) for _ in range(16)]

    def one(blob: bytes) -> None:
        conn = RawConn(app.port)
        conn.send(blob)
        expect_end(conn, ACSE_TIMEOUT + SLACK, f"{len(blob)} random bytes starting {blob[:6].hex()}", problems)
        conn.close()

    in_parallel(one, blobs, problems)
    appliance.check(problems, "random bytes")


# -- 2. absurd lengths -------------------------------------------------------------------------------------

PDU_TYPES = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x00, 0x08, 0x55, 0xFF]
#: How far over max_pdu_size a P-DATA-TF is sent: the appliance may allow a little slack for senders that count
#: the limit against the PDV rather than the PDU (it does: 64 bytes), not a kilobyte.
OVER = 1024
ABSURD = [MAX_ASSOCIATION_PDU + 1, MAX_PDU + OVER, 0x7FFFFFFF, 0xFFFFFFFF]


@pytest.mark.parametrize("pdu_type", PDU_TYPES, ids=[f"0x{t:02X}" for t in PDU_TYPES])
def test_absurd_length_before_association(appliance: Hostile, pdu_type: int) -> None:
    """A first PDU claiming more than ``max_association_pdu`` bytes (or short, malformed ones) is a
    violation visible at once: aborted without waiting for gigabytes that never come."""
    app, problems = appliance.app, []
    rng = random.Random(pdu_type)
    cases = [(length, junk(rng, 64)) for length in ABSURD] + [(0, b""), (6, junk(rng, 6)), (2, junk(rng, 2))]

    def one(case: tuple[int, bytes]) -> None:
        length, body = case
        conn = RawConn(app.port)
        conn.send(hc.pdu_header(pdu_type, length) + body)
        expect_end(conn, PROMPT, f"first PDU type 0x{pdu_type:02X} length 0x{length:X}", problems)
        conn.close()

    in_parallel(one, cases, problems)
    appliance.check(problems, f"absurd length before association, type 0x{pdu_type:02X}")


@pytest.mark.parametrize("pdu_type", PDU_TYPES, ids=[f"0x{t:02X}" for t in PDU_TYPES])
def test_absurd_length_after_association(appliance: Hostile, pdu_type: int) -> None:
    """Inside an established association: a P-DATA-TF longer than the ``max_pdu_size`` we advertised,
    or any other PDU longer than ``max_association_pdu``, is aborted at once and recorded as aborted."""
    app, problems = appliance.app, []
    rng = random.Random(pdu_type + 1000)
    lengths = [MAX_PDU + OVER, 0x7FFFFFFF, 0xFFFFFFFF] if pdu_type == hc.P_DATA_TF else \
        [MAX_ASSOCIATION_PDU + 1, 0x7FFFFFFF, 0xFFFFFFFF]

    def one(length: int) -> None:
        conn = raw_associated(app)
        port = conn.sock.getsockname()[1]
        conn.send(hc.pdu_header(pdu_type, length) + junk(rng, 64))
        what = f"PDU type 0x{pdu_type:02X} length 0x{length:X} after association"
        expect_end(conn, PROMPT, what, problems)
        conn.close()
        expect_aborted_record(app, port, what, problems)

    in_parallel(one, lengths, problems, workers=ASSOCIATED_WORKERS)
    appliance.check(problems, f"absurd length after association, type 0x{pdu_type:02X}")


def test_pdata_over_advertised_max_is_aborted_even_when_sent_in_full(appliance: Hostile) -> None:
    """A complete P-DATA-TF a kilobyte over what we advertised (a well-formed PDV inside): a protocol
    violation, not something to read into memory and process."""
    app, problems = appliance.app, []
    conn = raw_associated(app)
    assert conn.peer_max_pdu == MAX_PDU, f"the appliance advertised {conn.peer_max_pdu}, config says {MAX_PDU}"
    port = conn.sock.getsockname()[1]
    body = hc.pdv(3, hc.DATA_MORE, b"\0" * (MAX_PDU + OVER - 6))
    conn.send(hc.p_data(hc.pdv(3, hc.COMMAND_LAST, hc.c_store_rq(generate_uid()))))
    conn.send(hc.pdu(hc.P_DATA_TF, body))
    expect_end(conn, PROMPT, f"P-DATA-TF of {len(body)} bytes (advertised {MAX_PDU})", problems, ("abort",))
    conn.close()
    expect_aborted_record(app, port, "P-DATA-TF over max_pdu_size", problems)
    appliance.check(problems, "P-DATA over the advertised maximum")


# -- 3. truncated PDUs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["held", "half-closed", "closed"])
def test_truncated_pdus(appliance: Hostile, mode: str, small_instance: tuple[str, bytes]) -> None:
    """A-ASSOCIATE-RQ cut at several points, and a P-DATA-TF cut inside an established association.
    Held open: ended by the ACSE / network timer. Half-closed: ended at once. Closed: cleaned up."""
    app, problems = appliance.app, []
    rq = hc.a_associate_rq()
    uid, dataset = fresh_instance()
    cmd = hc.p_data(hc.pdv(3, hc.COMMAND_LAST, hc.c_store_rq(uid)))
    data = hc.p_data(hc.pdv(3, hc.DATA_LAST, dataset))
    cases: list[tuple[str, bool, bytes]] = [(f"A-ASSOCIATE-RQ cut at {n} of {len(rq)}", False, rq[:n])
                                            for n in (1, 5, 6, 10, 74, len(rq) - 1)]
    cases += [("P-DATA-TF header only", True, data[:6]),
              ("P-DATA-TF cut inside the PDV header", True, data[:9]),
              ("C-STORE command, dataset PDU cut in half", True, cmd + data[:len(data) // 2]),
              ("C-STORE dataset PDU missing its last byte", True, cmd + data[:-1]),
              ("A-RELEASE-RQ cut", True, hc.a_release_rq()[:7])]

    def one(case: tuple[str, bool, bytes]) -> None:
        what, associated, payload = case
        conn = raw_associated(app) if associated else RawConn(app.port)
        port = conn.sock.getsockname()[1]
        conn.send(payload)
        if mode == "held":
            expect_end(conn, (NETWORK_TIMEOUT if associated else ACSE_TIMEOUT) + SLACK, what, problems)
        elif mode == "half-closed":
            conn.shutdown_write()
            expect_end(conn, PROMPT, what + ", then SHUT_WR", problems)
        conn.close()
        if associated:
            expect_aborted_record(app, port, what, problems)

    in_parallel(one, [c for c in cases if not c[1]], problems, workers=len(cases))
    in_parallel(one, [c for c in cases if c[1]], problems, workers=ASSOCIATED_WORKERS)
    assert uid not in indexed_uids(app), "a truncated instance was indexed"
    appliance.check(problems, f"truncated PDUs ({mode})")


# -- 4. garbage P-DATA in a valid association ----------------------------------------------------------------


def test_garbage_pdata_in_raw_association(appliance: Hostile) -> None:
    app, problems = appliance.app, []
    rng = random.Random(4)
    bodies = [
        ("random PDU body", hc.pdu(hc.P_DATA_TF, junk(rng, 200))),
        ("PDV with control header 0xFF", hc.p_data(hc.pdv(3, 0xFF, junk(rng, 100)))),
        ("PDV for context id 0", hc.p_data(hc.pdv(0, hc.COMMAND_LAST, hc.c_echo_rq()))),
        ("PDV for a context never proposed", hc.p_data(hc.pdv(9, hc.COMMAND_LAST, hc.c_echo_rq()))),
        ("command set that is random bytes", hc.p_data(hc.pdv(1, hc.COMMAND_LAST, junk(rng, 300)))),
        ("command set with a huge element length", hc.p_data(hc.pdv(
            1, hc.COMMAND_LAST, struct.pack("<HHL", 0, 0, 0xFFFFFFF0) + junk(rng, 40)))),
        ("empty P-DATA-TF", hc.pdu(hc.P_DATA_TF, b"")),
        ("PDV of length 0", hc.p_data(struct.pack(">L", 0))),
        ("PDV of length 1", hc.p_data(struct.pack(">LB", 1, 3))),
    ]

    def one(case: tuple[str, bytes]) -> None:
        what, payload = case
        conn = raw_associated(app)
        port = conn.sock.getsockname()[1]
        conn.send(payload)
        ending = conn.ending(PROMPT)
        if ending.kind == "timeout":
            # Not aborted: then the association must still work (the PDU was ignored or refused).
            status = conn.echo(msg_id=7, timeout=PROMPT)
            if status != 0:
                problems.append(f"{what}: neither aborted within {PROMPT} s nor usable afterwards ({ending})")
            conn.release()
        else:
            conn.close()
            if ending.kind != "abort":
                problems.append(f"{what}: connection dropped without an A-ABORT ({ending})")
            expect_aborted_record(app, port, what, problems)

    in_parallel(one, bodies, problems, workers=ASSOCIATED_WORKERS)
    appliance.check(problems, "garbage P-DATA in a raw association")


def test_garbage_after_pynetdicom_association(appliance: Hostile) -> None:
    """A real SCU associates, then raw garbage goes down its socket: the appliance aborts it."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    app, problems = appliance.app, []
    rng = random.Random(5)
    for i in range(4):
        ae = pynetdicom_ae("GARBAGE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        port = sock.getsockname()[1]
        payload = [hc.pdu(hc.P_DATA_TF, junk(rng, 500)), junk(rng, 300),
                   hc.p_data(hc.pdv(1, hc.COMMAND_LAST, junk(rng, 64))),
                   hc.pdu_header(hc.P_DATA_TF, 0xFFFFFFFF) + junk(rng, 32)][i]
        sock.sendall(payload)
        deadline = time.monotonic() + PROMPT
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.02)
        if assoc.is_established:
            problems.append(f"garbage #{i} after a pynetdicom association: still established after {PROMPT} s")
            assoc.abort()
        expect_aborted_record(app, port, f"garbage #{i} after a pynetdicom association", problems)
    appliance.check(problems, "garbage after a pynetdicom association")


# -- 5. PDVs longer than their PDU ------------------------------------------------------------------------


def test_pdv_longer_than_its_pdu(appliance: Hostile) -> None:
    app, problems = appliance.app, []
    uid, dataset = fresh_instance()
    data = dataset[:2000]
    cases = [
        ("item length +1", hc.p_data(hc.pdv(3, hc.DATA_LAST, data, item_length=len(data) + 3))),
        ("item length +1000", hc.p_data(hc.pdv(3, hc.DATA_LAST, data, item_length=len(data) + 1002))),
        ("item length 0xFFFFFFFF", hc.p_data(hc.pdv(3, hc.DATA_LAST, data, item_length=0xFFFFFFFF))),
        ("second PDV overruns", hc.p_data(hc.pdv(3, hc.DATA_MORE, data[:100]),
                                          hc.pdv(3, hc.DATA_LAST, data[100:], item_length=len(data)))),
        ("item length shorter than its data", hc.p_data(hc.pdv(3, hc.DATA_LAST, data, item_length=100))),
    ]
    cmd = hc.p_data(hc.pdv(3, hc.COMMAND_LAST, hc.c_store_rq(uid)))

    def one(case: tuple[str, bytes]) -> None:
        what, payload = case
        conn = raw_associated(app)
        port = conn.sock.getsockname()[1]
        conn.send(cmd + payload)
        ending = expect_end(conn, PROMPT, what, problems, ("abort",))
        conn.close()
        if ending.ended:
            expect_aborted_record(app, port, what, problems)

    in_parallel(one, cases, problems, workers=ASSOCIATED_WORKERS)
    assert uid not in indexed_uids(app)
    appliance.check(problems, "PDV longer than its PDU")


# -- 6. fragments out of order ------------------------------------------------------------------------------


def _fragment_cases(uid: str, dataset: bytes) -> list[tuple[str, list[bytes]]]:
    cmd = hc.c_store_rq(uid)
    half = len(dataset) // 2
    P = hc.p_data
    V = hc.pdv
    return [
        ("data before any command", [P(V(3, hc.DATA_LAST, dataset))]),
        ("data, then its command", [P(V(3, hc.DATA_LAST, dataset)), P(V(3, hc.COMMAND_LAST, cmd))]),
        ("command fragment without last bit, then data, then the rest of the command",
         [P(V(3, hc.COMMAND_MORE, cmd[:20])), P(V(3, hc.DATA_LAST, dataset)), P(V(3, hc.COMMAND_LAST, cmd[20:]))]),
        ("two commands, then one dataset", [P(V(3, hc.COMMAND_LAST, cmd)),
                                            P(V(3, hc.COMMAND_LAST, hc.c_store_rq(generate_uid(), 2))),
                                            P(V(3, hc.DATA_LAST, dataset))]),
        ("dataset whose last fragment never comes, then a C-ECHO",
         [P(V(3, hc.COMMAND_LAST, cmd)), P(V(3, hc.DATA_MORE, dataset[:half])),
          P(V(1, hc.COMMAND_LAST, hc.c_echo_rq(5)))]),
        ("dataset whose last fragment never comes, then A-RELEASE-RQ",
         [P(V(3, hc.COMMAND_LAST, cmd)), P(V(3, hc.DATA_MORE, dataset[:half])), hc.a_release_rq()]),
        ("last bit on the first half, more bit on the second",
         [P(V(3, hc.COMMAND_LAST, cmd)), P(V(3, hc.DATA_LAST, dataset[:half])), P(V(3, hc.DATA_MORE, dataset[half:]))]),
        ("command on one context, dataset on another", [P(V(3, hc.COMMAND_LAST, cmd)), P(V(5, hc.DATA_LAST, dataset))]),
        ("C-STORE on the Verification context", [P(V(1, hc.COMMAND_LAST, cmd)), P(V(1, hc.DATA_LAST, dataset))]),
        ("command says no dataset, data follows",
         [P(V(3, hc.COMMAND_LAST, hc.c_echo_rq(3))), P(V(3, hc.DATA_LAST, dataset))]),
        ("command and data PDVs interleaved in one PDU",
         [P(V(3, hc.COMMAND_MORE, cmd[:30]), V(3, hc.DATA_MORE, dataset[:100]), V(3, hc.COMMAND_LAST, cmd[30:]),
            V(3, hc.DATA_LAST, dataset[100:]))]),
    ]


def test_fragments_out_of_order(appliance: Hostile) -> None:
    """Fragments in the wrong order or with wrong last-fragment bits: the appliance either aborts or
    keeps the association usable (it answers something within ``PROMPT``); it never hangs, never
    stores a dataset it did not acknowledge, and a broken association is recorded as aborted."""
    app, problems = appliance.app, []
    uids: list[str] = []

    def one(i: int) -> None:
        uid, dataset = fresh_instance()
        uids.append(uid)
        what, pdus = _fragment_cases(uid, dataset)[i]
        conn = raw_associated(app)
        port = conn.sock.getsockname()[1]
        for p in pdus:
            if not conn.send(p):
                break
        ending = conn.ending(PROMPT)
        answered = bool(ending.pdus)
        for t, body in ending.pdus:
            if t == hc.P_DATA_TF:
                rsp = hc.parse_command(b"".join(d for _, c, d in hc.pdvs_of(hc.pdu(t, body)) if c & 1))
                if rsp.get(0x0900) == b"\0\0" and 0x1000 in rsp:
                    appliance.ledger.ack(hc.response_uid(rsp))
        if ending.kind == "timeout":
            status = conn.echo(msg_id=9, timeout=PROMPT)
            if status is None and not answered:
                problems.append(f"{what}: no answer, no abort within {PROMPT} s, and a C-ECHO after it "
                                "went unanswered")
            conn.release()
        else:
            conn.close()
            if ending.pdus and ending.pdus[-1][0] == hc.A_RELEASE_RP:
                return
            expect_aborted_record(app, port, what, problems)

    in_parallel(one, list(range(len(_fragment_cases("1.2", b"")))), problems, workers=ASSOCIATED_WORKERS)
    appliance.check(problems, "fragments out of order")


# -- 7. idle sockets -------------------------------------------------------------------------------------


def test_idle_sockets_are_dropped(appliance: Hostile) -> None:
    """Connections that stop talking are ended by the ACSE timer (before the association is
    established) or the network timer (after), whatever they stopped in the middle of."""
    app, problems = appliance.app, []
    uid, dataset = fresh_instance(128)

    def nothing(conn: RawConn) -> None:
        pass

    def half_rq(conn: RawConn) -> None:
        conn.send(hc.a_associate_rq()[:40])

    def associated(conn: RawConn) -> None:
        must_associate(conn)

    def mid_store(conn: RawConn) -> None:
        must_associate(conn)
        conn.send(hc.p_data(hc.pdv(3, hc.COMMAND_LAST, hc.c_store_rq(uid))))
        conn.send(hc.p_data(hc.pdv(3, hc.DATA_MORE, dataset[: len(dataset) // 2])))

    def after_store(conn: RawConn) -> None:
        must_associate(conn)
        u, d = fresh_instance()
        if conn.store(u, d) == 0:
            appliance.ledger.ack(u)

    cases = [("connected, sent nothing", nothing, ACSE_TIMEOUT), ("half an A-ASSOCIATE-RQ", half_rq, ACSE_TIMEOUT),
             ("associated, then silent", associated, NETWORK_TIMEOUT),
             ("silent inside a C-STORE dataset", mid_store, NETWORK_TIMEOUT),
             ("silent after a C-STORE", after_store, NETWORK_TIMEOUT)]

    def one(case: tuple[str, Callable[[RawConn], None], float]) -> None:
        what, setup, timer = case
        conn = RawConn(app.port)
        start = time.monotonic()
        setup(conn)
        port = conn.sock.getsockname()[1]
        ending = expect_end(conn, timer + SLACK - (time.monotonic() - start), what, problems)
        conn.close()
        if ending.ended and ending.seconds < timer * 0.5:
            problems.append(f"{what}: ended after {ending.seconds:.2f} s, well before its {timer} s timer")
        if timer == NETWORK_TIMEOUT:
            expect_aborted_record(app, port, what, problems)

    # pynetdicom counts a connection that has not associated yet against a listener's capacity too, so
    # the two kinds run one after the other: 4 unassociated, then 3 associated (under max_associations).
    in_parallel(one, cases[:2] * 2, problems, workers=4)
    in_parallel(one, cases[2:], problems, workers=ASSOCIATED_WORKERS)
    assert uid not in indexed_uids(app)
    appliance.check(problems, "idle sockets")


# -- 8. half-closed sockets ----------------------------------------------------------------------------------


def test_half_closed_sockets(appliance: Hostile) -> None:
    """SHUT_WR at every stage: the appliance sees the end of the stream and ends the connection at once
    (answering what it already received in full, if it can)."""
    app, problems = appliance.app, []
    uid_mid, data_mid = fresh_instance(128)

    def stage(conn: RawConn, name: str) -> None:
        if name == "before anything":
            return
        if name == "inside the A-ASSOCIATE-RQ":
            conn.send(hc.a_associate_rq()[:50])
            return
        must_associate(conn)
        if name == "after a C-ECHO":
            assert conn.echo() == 0
        elif name == "inside a C-STORE dataset":
            conn.send(hc.p_data(hc.pdv(3, hc.COMMAND_LAST, hc.c_store_rq(uid_mid))))
            conn.send(hc.p_data(hc.pdv(3, hc.DATA_MORE, data_mid[:5000])))
        elif name == "right after a complete C-STORE":
            uid, dataset = fresh_instance()
            for m in hc.store_messages(uid, dataset):
                conn.send(m)
            conn.shutdown_write()
            rsp = conn.read_response(PROMPT)
            if rsp is not None and rsp.get(0x0900) == b"\0\0":
                appliance.ledger.ack(uid)
            else:
                appliance.ledger.might_have(uid)  # the answer may be lost with the connection; either is fine

    names = ["before anything", "inside the A-ASSOCIATE-RQ", "after association", "after a C-ECHO",
             "inside a C-STORE dataset", "right after a complete C-STORE"]

    def one(name: str) -> None:
        conn = RawConn(app.port)
        stage(conn, name)
        port = conn.sock.getsockname()[1]
        conn.shutdown_write()
        ending = expect_end(conn, PROMPT, f"SHUT_WR {name}", problems)
        conn.close()
        if name not in ("before anything", "inside the A-ASSOCIATE-RQ") and ending.ended:
            expect_aborted_record(app, port, f"SHUT_WR {name}", problems)

    in_parallel(one, names[:2] * 2, problems)
    in_parallel(one, names[2:] * 2, problems, workers=ASSOCIATED_WORKERS)
    assert uid_mid not in indexed_uids(app)
    appliance.check(problems, "half-closed sockets")


# -- 9. a sender killed inside a large instance ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.999])
def test_raw_sender_reset_inside_large_instance(appliance: Hostile, big_instance_file: tuple[Path, str, bytes],
                                                fraction: float) -> None:
    """RST (SO_LINGER 0) after ``fraction`` of a 32 MiB dataset: nothing stored, nothing left behind."""
    app, problems = appliance.app, []
    _, uid, dataset = big_instance_file  # never sent in full, so never stored
    conn = raw_associated(app)
    port = conn.sock.getsockname()[1]
    messages = hc.store_messages(uid, dataset, max_pdv=256 * 1024)
    stop_at = len(dataset) * fraction
    sent = 0
    for m in messages:
        if sent >= stop_at:
            break
        conn.send(m)
        sent += len(m)
    time.sleep(0.2)
    conn.kill()
    expect_aborted_record(app, port, f"RST after {sent} of {len(dataset)} bytes", problems)
    assert uid not in indexed_uids(app), "an instance whose sender died mid-dataset was indexed"
    appliance.check(problems, f"raw sender reset at {fraction:.0%} of a large instance")


@pytest.mark.slow
def test_pynetdicom_sender_reset_inside_large_instance(appliance: Hostile,
                                                       big_instance_file: tuple[Path, str, bytes]) -> None:
    """A real SCU sending a 32 MiB instance whose socket is reset under it."""
    from pydicom import dcmread
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    app, problems = appliance.app, []
    ds = dcmread(big_instance_file[0])
    ds.SOPInstanceUID = generate_uid()
    ae = pynetdicom_ae("KILLED")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    port = sock.getsockname()[1]
    result: list[Any] = []
    sender = threading.Thread(target=lambda: result.append(_try(lambda: assoc.send_c_store(ds))), daemon=True)
    sender.start()
    time.sleep(0.15)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    sender.join(30)
    assoc.abort()
    acked = bool(result) and getattr(result[0], "Status", None) == 0
    (appliance.ledger.ack if acked else appliance.ledger.might_have)(str(ds.SOPInstanceUID))
    if not acked:
        expect_aborted_record(app, port, "pynetdicom sender reset mid-instance", problems)
    appliance.check(problems, "pynetdicom sender reset inside a large instance")


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # the sender's own socket was pulled from under it
        return exc


@pytest.mark.slow
def test_storescu_killed_inside_large_instance(appliance: Hostile, tmp_path: Path,
                                               big_instance_file: tuple[Path, str, bytes]) -> None:
    """DCMTK storescu SIGKILLed while it sends 32 MiB instances."""
    from pydicom import dcmread

    app, problems = appliance.app, []
    src = dcmread(big_instance_file[0])
    uids = []
    for i in range(3):
        src.SOPInstanceUID = generate_uid()
        uids.append(str(src.SOPInstanceUID))
        src.save_as(tmp_path / f"big{i}.dcm")
    for delay in (0.05, 0.3):
        cmd = [need_tool("storescu"), "-v", "-aet", "KILLME", "-aec", "EDGE", "127.0.0.1", str(app.port),
               *(str(tmp_path / f"big{i}.dcm") for i in range(3))]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dcmtk_env(), text=True)
        time.sleep(delay)
        proc.kill()
        out, _ = proc.communicate(10)
        acked = parse_storescu(out)
        for i, uid in enumerate(uids):
            if acked.get(str(tmp_path / f"big{i}.dcm")) == "Success":
                appliance.ledger.ack(uid)
            else:
                appliance.ledger.might_have(uid)  # it may have been answered after storescu printed its last line
    appliance.check(problems, "storescu killed inside a large instance")


# -- 10. deflate bomb -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deflate_bomb_is_bounded(appliance: Hostile) -> None:
    """A Deflated Explicit VR dataset of a few hundred KiB that inflates to 512 MiB: refused, and the
    listener never holds the inflated bytes (its peak resident memory stays under the bound)."""
    app, problems = appliance.app, []
    uid, dataset = fresh_instance()
    head = dataset[: dataset.index(b"\xe0\x7f\x10\x00")]  # everything before Pixel Data
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = comp.compress(head + struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", 512 * 1024 * 1024))
    zeros = b"\0" * (16 * 1024 * 1024)
    for _ in range(32):
        bomb += comp.compress(zeros)
    bomb += comp.flush()
    conn = RawConn(app.port)
    assert conn.associate(contexts=((7, hc.CT_IMAGE_STORAGE, (hc.DEFLATED_EXPLICIT_VR_LE,)),))
    assert conn.accepted.get(7) == hc.DEFLATED_EXPLICIT_VR_LE, conn.accepted
    status = conn.store(uid, bomb, context_id=7, timeout=60)
    if status == 0:
        problems.append(f"a {len(bomb)}-byte deflate bomb (512 MiB inflated) was stored (max_instance_bytes "
                        "is 128 MiB)")
        appliance.ledger.ack(uid)
    conn.close()
    peaks = {pid: memory_mb(pid)[1] for pid in listener_pids(app)}
    appliance.check(problems, f"deflate bomb (status {status if status is None else hex(status)}, "
                              f"listener peaks {peaks} MB)")


# -- 11. mixtures and repetitions ---------------------------------------------------------------------------


@pytest.mark.slow
def test_hostile_mixture_with_real_senders(appliance: Hostile) -> None:
    """Hostile clients of every kind, at random, in parallel, while real senders store instances:
    every real instance is eventually acknowledged (a real sender may see a transient rejection while
    hostile clients hold slots, and retries), and the invariants hold afterwards."""
    app, problems = appliance.app, []
    stop = time.monotonic() + 15.0
    rng_lock = threading.Lock()
    master = random.Random(11)

    def hostile_action(rng: random.Random) -> None:
        kind = rng.randrange(8)
        conn = RawConn(app.port)
        try:
            if kind == 0:
                conn.send(junk(rng, rng.randrange(1, 3000)))
            elif kind == 1:
                conn.send(hc.pdu_header(rng.choice(PDU_TYPES), rng.choice(ABSURD)) + junk(rng, 20))
            elif kind == 2:
                rq = hc.a_associate_rq()
                conn.send(rq[: rng.randrange(1, len(rq))])
                conn.shutdown_write()
            else:
                if not conn.associate():
                    return
                uid, dataset = fresh_instance(rng.choice([16, 64, 256]))
                msgs = hc.store_messages(uid, dataset, max_pdv=rng.choice([100, 4000, 16000]))
                if kind == 3:
                    conn.send(hc.pdu(hc.P_DATA_TF, junk(rng, 300)))
                elif kind == 4:
                    for m in msgs[: rng.randrange(1, len(msgs))]:  # never the last fragment
                        conn.send(m)
                    conn.kill()
                    return
                elif kind == 5:
                    conn.send(msgs[0] + hc.p_data(hc.pdv(3, hc.DATA_LAST, dataset, item_length=len(dataset) + 99)))
                elif kind == 6:
                    for m in reversed(msgs):
                        conn.send(m)
                else:
                    for m in msgs[:-1]:
                        conn.send(m)
                    conn.shutdown_write()
                # Whatever the appliance made of it, an answer it sent counts; one lost with a reset may not.
                appliance.ledger.might_have(uid)
            _acks_in(conn.ending(PROMPT).pdus, appliance.ledger)
        finally:
            conn.close()

    def hostile_loop(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            hostile_action(rng)

    acked_here: list[str] = []
    failed: list[str] = []

    def real_sender(i: int) -> None:
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

        n = 0
        while time.monotonic() < stop:
            ds = storable(ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), rows=64, cols=64))
            for attempt in range(30):
                ae = pynetdicom_ae(f"REAL{i}")
                ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
                assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
                if assoc.is_established:
                    status = assoc.send_c_store(ds)
                    assoc.release()
                    if "Status" in status and status.Status == 0:
                        appliance.ledger.ack(str(ds.SOPInstanceUID))
                        acked_here.append(str(ds.SOPInstanceUID))
                        break
                time.sleep(0.1 * (attempt + 1))
            else:
                failed.append(str(ds.SOPInstanceUID))
            n += 1

    with rng_lock:
        seeds = [master.randrange(1 << 30) for _ in range(3)]
    threads = [threading.Thread(target=hostile_loop, args=(s,)) for s in seeds]
    threads += [threading.Thread(target=real_sender, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if failed:
        problems.append(f"{len(failed)} real instance(s) never acknowledged in 30 tries during the mixture")
    if not acked_here:
        problems.append("no real instance was acknowledged during the mixture")
    appliance.check(problems, f"mixture ({len(acked_here)} real instances stored)")


@pytest.mark.slow
def test_repeated_violations_on_one_listener_do_not_accumulate(appliance: Hostile) -> None:
    """200 quick aborting connections in a row: slots, threads and memory come back every time."""
    app, problems = appliance.app, []
    rng = random.Random(12)
    pids = listener_pids(app)
    before = {pid: memory_mb(pid)[0] for pid in pids}
    for i in range(200):
        try:
            conn = raw_associated(app) if i % 2 else RawConn(app.port)
        except NotAccepted as exc:
            problems.append(f"connection {i}: {exc}")
            break
        conn.send(hc.pdu(hc.P_DATA_TF, junk(rng, 64)) if i % 2 else junk(rng, 64))
        conn.ending(PROMPT)
        conn.close()
    quiesce(app)
    after = {pid: memory_mb(pid)[0] for pid in listener_pids(app)}
    for pid, mb in after.items():
        if pid in before and mb - before[pid] > 50:
            problems.append(f"listener {pid} grew from {before[pid]:.0f} to {mb:.0f} MB over 200 aborted connections")
    appliance.check(problems, "200 aborted connections")


# -- 12. the fuzzer ------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """What storescu sent on one association, cut into PDUs, and the instances in it."""

    pdus: list[bytes]
    stores: list[tuple[int, bytes, bytes, str]]  # (context id, command set, dataset, SOP Instance UID)


def _capture_storescu(app: Appliance, tmp: Path, ledger: Ledger) -> Capture:
    insts = make_series(tmp / "series", 2, rows=16, cols=16) + make_series(tmp / "series2", 1, rows=128, cols=128)
    with RecordingProxy(app.port) as proxy:
        res = subprocess.run([need_tool("storescu"), "-v", "-aet", "FUZZSRC", "-aec", "EDGE", "127.0.0.1",
                              str(proxy.port), *(str(i.path) for i in insts)],
                             capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    statuses = parse_storescu(res.stdout + res.stderr)
    assert list(statuses.values()) == ["Success"] * 3, res.stdout + res.stderr
    for inst in insts:
        ledger.ack(inst.sop_instance_uid)
    assert len(proxy.recordings) == 1
    pdus = hc.split_pdus(bytes(proxy.recordings[0].client))
    assert pdus[0][0] == hc.A_ASSOCIATE_RQ and pdus[-1][0] == hc.A_RELEASE_RQ, [p[0] for p in pdus]
    stores = []
    command, dataset, cx = b"", b"", 0
    for p in pdus:
        if p[0] != hc.P_DATA_TF:
            continue
        for cx_id, ctl, data in hc.pdvs_of(p):
            if ctl & 1:
                command += data
            else:
                dataset += data
                cx = cx_id
                if ctl & 2:
                    uid = hc.response_uid(hc.parse_command(command))
                    stores.append((cx, command, dataset, uid))
                    command, dataset = b"", b""
    assert len(stores) == 3
    return Capture(pdus, stores)


def _same_length_uid(rng: random.Random, like: str) -> str:
    root = "1.2.826.0.1.3680043.9.7433.3."
    digits = "".join(rng.choice("0123456789") for _ in range(max(1, len(like) - len(root))))
    uid = (root + ("1" + digits[1:] if digits[0] == "0" else digits))[: len(like)]
    return uid if not uid.endswith(".") else uid[:-1] + "1"


def _refresh_uids(blob: bytes, capture: Capture, rng: random.Random) -> tuple[bytes, list[str]]:
    """The captured bytes with every SOP Instance UID replaced by a fresh one of the same length."""
    fresh = []
    for _, _, _, uid in capture.stores:
        new = _same_length_uid(rng, uid)
        blob = blob.replace(uid.encode(), new.encode())
        fresh.append(new)
    return blob, fresh


def _top_level_elements(dataset: bytes) -> list[int]:
    """Offsets of the top-level Explicit VR LE element headers."""
    out, pos = [], 0
    while pos + 8 <= len(dataset):
        out.append(pos)
        vr = dataset[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"):
            (length,) = struct.unpack_from("<L", dataset, pos + 8)
            pos += 12 + (0 if length == 0xFFFFFFFF else length)
        else:
            (length,) = struct.unpack_from("<H", dataset, pos + 6)
            pos += 8 + length
    return out


def mutate_dataset(rng: random.Random, dataset: bytes) -> tuple[bytes, str]:
    """One content mutation of a dataset (the framing around it stays valid)."""
    data = bytearray(dataset)
    op = rng.randrange(7)
    offsets = _top_level_elements(dataset) or [0]
    if op == 0:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), "random bytes"
    if op == 1:
        off = rng.choice(offsets)
        long_vr = data[off + 4:off + 6] in (b"OB", b"OW", b"SQ", b"UT", b"UN")
        value = rng.choice([0, 1, 3, 0xFF, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)])
        if long_vr:
            struct.pack_into("<L", data, off + 8, value & 0xFFFFFFFF)
        else:
            struct.pack_into("<H", data, off + 6, value & 0xFFFF)
        return bytes(data), f"element at {off}: length {value:#x}"
    if op == 2:
        off = rng.choice(offsets)
        data[off + 4:off + 6] = rng.choice([b"SQ", b"UN", b"OB", b"XX", b"\0\0", b"UL", b"DS"])
        return bytes(data), f"element at {off}: VR changed"
    if op == 3:
        off = rng.choice(offsets)
        struct.pack_into("<HH", data, off, rng.randrange(1 << 16), rng.randrange(1 << 16))
        return bytes(data), f"element at {off}: tag changed"
    if op == 4:
        cut = rng.randrange(len(data))
        return bytes(data[:cut]), f"truncated at {cut}"
    if op == 5:
        pos = rng.randrange(len(data))
        return bytes(data[:pos]) + junk(rng, rng.randrange(1, 64)) + bytes(data[pos:]), f"bytes inserted at {pos}"
    off = rng.choice(offsets)
    seq = struct.pack("<HH2s2xL", 0x0008, 0x1115, b"SQ", 0xFFFFFFFF) + b"\xfe\xff\x00\xe0" + \
        struct.pack("<L", rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 12]))
    return bytes(data[:off]) + seq + bytes(data[off:]), f"unterminated sequence at {off}"


def mutate_framing(rng: random.Random, pdus: list[bytes]) -> tuple[list[bytes], str]:
    """1-3 mutations of the PDU stream itself: lengths, types, PDV headers, order, truncation."""
    pdus = list(pdus)
    done = []
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(10)
        i = rng.randrange(len(pdus))
        p = bytearray(pdus[i])
        if op == 0 and len(p) > 0:
            for _ in range(rng.randrange(1, 5)):
                p[rng.randrange(len(p))] = rng.randrange(256)
            done.append(f"bytes of PDU {i}")
        elif op == 1 and len(p) >= 6:
            value = rng.choice([0, 1, 4, len(p) - 7, len(p) - 5, len(p) + 100, MAX_PDU + 1, 0x7FFFFFFF, 0xFFFFFFFF,
                                rng.randrange(1 << 32)])
            struct.pack_into(">L", p, 2, value & 0xFFFFFFFF)
            done.append(f"length of PDU {i} -> {value & 0xFFFFFFFF:#x}")
        elif op == 2 and len(p) >= 1:
            p[0] = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x80, 0xFF])
            done.append(f"type of PDU {i} -> {p[0]:#x}")
        elif op == 3 and p[:1] == b"\x04" and len(p) >= 12:
            value = rng.choice([0, 1, 2, len(p) - 6 + 1, len(p), 0xFFFFFFFF, rng.randrange(1 << 32)])
            struct.pack_into(">L", p, 6, value & 0xFFFFFFFF)
            done.append(f"PDV length in PDU {i} -> {value:#x}")
        elif op == 4 and p[:1] == b"\x04" and len(p) >= 12:
            p[10] = rng.choice([0, 1, 2, 9, 127, 255])  # context id
            p[11] = rng.choice([0, 1, 2, 3, 0x04, 0xFF])  # control header
            done.append(f"PDV context/control in PDU {i} -> {p[10]}/{p[11]:#x}")
        elif op == 5:
            cut = rng.randrange(len(p) + 1)
            pdus = pdus[:i] + [bytes(p[:cut])]
            done.append(f"stream cut inside PDU {i} at {cut}")
            break
        elif op == 6:
            pdus.insert(i, pdus[i])
            done.append(f"PDU {i} duplicated")
            continue
        elif op == 7 and len(pdus) > 2:
            del pdus[i]
            done.append(f"PDU {i} dropped")
            continue
        elif op == 8 and len(pdus) > 2:
            j = rng.randrange(len(pdus))
            pdus[i], pdus[j] = pdus[j], pdus[i]
            done.append(f"PDUs {i} and {j} swapped")
            continue
        else:
            pdus.insert(i, junk(rng, rng.randrange(1, 40)))
            done.append(f"junk inserted before PDU {i}")
            continue
        pdus[i] = bytes(p)
    return pdus, "; ".join(done) or "none"


def _acks_in(pdus: list[tuple[int, bytes]], ledger: Ledger) -> None:
    for t, body in pdus:
        if t != hc.P_DATA_TF:
            continue
        command = b"".join(d for _, c, d in hc.pdvs_of(hc.pdu(t, body)) if c & 1)
        if command:
            rsp = hc.parse_command(command)
            if rsp.get(0x0900) == b"\0\0" and rsp.get(0x0100) == struct.pack("<H", 0x8001):
                ledger.ack(hc.response_uid(rsp))


def fuzz_framing_case(app: Appliance, capture: Capture, seed: int, case: int, ledger: Ledger) -> str | None:
    """One connection: the captured association with fresh UIDs and mutated framing, then SHUT_WR. The
    appliance must end it within ``SLACK`` s of the end of the stream. Returns a problem or None."""
    rng = random.Random(f"{seed}:framing:{case}")
    stream, fresh = _refresh_uids(b"".join(capture.pdus), capture, rng)
    pdus, how = mutate_framing(rng, hc.split_pdus(stream))
    conn = RawConn(app.port)
    try:
        # The answers are small (A-ASSOCIATE-AC, C-STORE-RSPs): they fit in the socket buffer unread.
        for p in pdus:
            if not conn.send(p):
                break
        conn.shutdown_write()
        ending = conn.ending(SLACK)
        _acks_in(ending.pdus, ledger)
        # A stored instance's answer can be lost when the appliance resets the connection after it
        # (unread pipelined PDUs make its close a RST): such an instance may be indexed unseen.
        for uid in fresh:
            if uid not in ledger.acked:
                ledger.might_have(uid)
        if not ending.ended:
            return f"framing case {case} ({how}): not ended {SLACK} s after SHUT_WR ({ending})"
        return None
    finally:
        conn.close()


def fuzz_content_batch(app: Appliance, capture: Capture, seed: int, batch: int, count: int,
                       ledger: Ledger) -> list[str]:
    """``count`` C-STOREs of mutated captured datasets on as few associations as possible (an abort
    means a new one). Every request must get a response or an abort within ``SLACK`` s."""
    rng = random.Random(f"{seed}:content:{batch}")
    problems: list[str] = []
    rq = capture.pdus[0]
    conn: RawConn | None = None
    for i in range(count):
        if conn is None:
            conn = RawConn(app.port)
            conn.send(rq)
            item = conn.read_pdu(10)
            if item is None or item[0] != hc.A_ASSOCIATE_AC:
                conn.close()
                conn = None
                time.sleep(0.05)  # slots may be full for a moment: the next case tries again
                continue
        cx, _, dataset, old_uid = capture.stores[rng.randrange(len(capture.stores))]
        uid = _same_length_uid(rng, old_uid)
        mutated, how = mutate_dataset(rng, dataset.replace(old_uid.encode(), uid.encode()))
        fragment = rng.choice([16, 1000, 16000, 64000, MAX_PDU - 12])
        msgs = [hc.p_data(hc.pdv(cx, hc.COMMAND_LAST, hc.c_store_rq(uid, msg_id=i % 65535 + 1)))]
        chunks = [mutated[j:j + fragment] for j in range(0, len(mutated), fragment)] or [b""]
        msgs += [hc.p_data(hc.pdv(cx, hc.DATA_LAST if k == len(chunks) - 1 else hc.DATA_MORE, c))
                 for k, c in enumerate(chunks)]
        ok = all(conn.send(m) for m in msgs)
        rsp = conn.read_response(SLACK) if ok else None
        if rsp is not None:
            status = rsp.get(0x0900)
            if status == b"\0\0":
                ledger.ack(hc.response_uid(rsp))
            continue
        ledger.might_have(uid)
        ending = conn.ending(0.5) if ok else hc.Ending("closed", 0)
        if ok and not ending.ended:
            problems.append(f"content batch {batch} case {i} ({how}): no response and no abort within {SLACK} s")
        conn.close()
        conn = None
    if conn is not None:
        conn.release()
    return problems


@pytest.mark.slow
def test_fuzz_storescu_capture(appliance: Hostile, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Seeded mutations of a real DCMTK storescu association (captured through a recording proxy):
    framing mutations one connection each, content mutations many per association."""
    app = appliance.app
    n = request.config.getoption("--fuzz-cases", default=None) or FUZZ_CASES
    seed = request.config.getoption("--fuzz-seed", default=None) or FUZZ_SEED
    capture = _capture_storescu(app, tmp_path, appliance.ledger)
    n_framing = n * 2 // 5
    n_content = n - n_framing
    problems: list[str] = []
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=FUZZ_WORKERS) as pool:
        framing = list(pool.map(lambda c: fuzz_framing_case(app, capture, seed, c, appliance.ledger),
                                range(n_framing)))
        batch = 50
        content = list(pool.map(lambda b: fuzz_content_batch(app, capture, seed, b, min(batch, n_content - b * batch),
                                                             appliance.ledger),
                                range((n_content + batch - 1) // batch)))
    problems += [p for p in framing if p]
    problems += [p for batch_problems in content for p in batch_problems]
    elapsed = time.monotonic() - start
    if len(problems) > 10:
        problems = problems[:10] + [f"... and {len(problems) - 10} more"]
    appliance.check(problems, f"fuzzer: {n} cases (seed {seed}, {n_framing} framing, {n_content} content) "
                              f"in {elapsed:.0f} s")


# -- 13. SIGTERM with hostile sockets open --------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_with_idle_hostile_sockets_open(appliance_factory: Any) -> None:
    """SIGTERM while idle, half-associated, associated and mid-C-STORE sockets are open: the appliance
    exits 0 within its drain time, leaves nothing in .incoming, no association open in the index, and
    its log has no traceback and no InvalidEventError."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    sections = {k: dict(v) for k, v in APPLIANCE_SECTIONS.items()}
    sections["dicom"]["network_timeout"] = 60.0  # the sockets must still be open when SIGTERM comes
    sections["dicom"]["acse_timeout"] = 60.0
    app = appliance_factory("sigterm", **sections)
    conns = [RawConn(app.port) for _ in range(3)]
    conns[1].send(hc.a_associate_rq()[:30])
    conns[2].send(hc.pdu_header(hc.A_ASSOCIATE_RQ, 0xFFFFFFFF) + b"x" * 10)
    for _ in range(2):
        c = RawConn(app.port)
        assert c.associate()
        conns.append(c)
    uid, dataset = fresh_instance(256)
    c = RawConn(app.port)
    assert c.associate()
    c.send(hc.p_data(hc.pdv(3, hc.COMMAND_LAST, hc.c_store_rq(uid))))
    c.send(hc.p_data(hc.pdv(3, hc.DATA_MORE, dataset[:3000])))
    conns.append(c)
    ae = pynetdicom_ae("IDLE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
    assert assoc.is_established
    time.sleep(0.5)
    start = time.monotonic()
    rc = app.terminate(timeout=25)
    took = time.monotonic() - start
    for conn in conns:
        conn.close()
    assoc.abort()
    problems = []
    if rc != 0:
        problems.append(f"exit code {rc} after SIGTERM")
    if took > 15:
        problems.append(f"took {took:.1f} s to stop")
    if incoming_files(app):
        problems.append(f"left in .incoming: {incoming_files(app)}")
    left_open = app.query("SELECT COUNT(*) AS n FROM associations WHERE outcome IS NULL")[0]["n"]
    if left_open:
        problems.append(f"{left_open} association(s) without an outcome after a clean stop")
    if app.query("SELECT COUNT(*) AS n FROM instances WHERE sop_instance_uid = ?", (uid,))[0]["n"]:
        problems.append("the half-sent instance was indexed")
    from appliance_invariants import forbidden_log_lines

    bad = forbidden_log_lines(app.log_text())
    if bad:
        problems.append("appliance log:\n" + "\n---\n".join(bad))
    assert not problems, "\n".join(problems)
