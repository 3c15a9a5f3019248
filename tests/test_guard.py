"""Bounds on what a peer can make the receiver hold: inflation, spilled data sets, PDU caps, status.

The raw-socket hostile scenarios live in test_hostile.py; these check each bound on its own, with
the smallest input that crosses it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         generate_uid)

from appliance.ingest.guard import SpilledDataset
from appliance.ingest.receiver import (INFLATE_IN_MEMORY, InflationLimitError, UnreadableDatasetError,
                                       file_meta, inflate_bounded, parse_header)
from conftest import pynetdicom_ae, raw_c_store

GIB = 1024 ** 3


def _dataset_bytes(rows: int = 64, frames_bytes: int | None = None, seed: int = 0) -> tuple[bytes, Dataset]:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "GUARD"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = 16
    ds.PixelData = np.random.default_rng(seed).integers(0, 4000, (rows, rows), dtype=np.uint16).tobytes() \
        if frames_bytes is None else bytes(frames_bytes)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue(), ds


def _zeros_bomb(size: int) -> tuple[bytes, str]:
    """A raw-deflate Explicit VR data set whose pixel data inflates to ``size`` zero bytes."""
    head, ds = _dataset_bytes(rows=8)
    head = head[: head.index(struct.pack("<HH", 0x7FE0, 0x0010))]
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(head + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", size))]
    zeros = bytes(4 * 1024 * 1024)
    for _ in range(size // len(zeros)):
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    return b"".join(parts), ds.SOPInstanceUID


# -- bounded inflation --------------------------------------------------------------------------------


def test_inflation_past_the_limit_is_refused_without_holding_it() -> None:
    bomb, _ = _zeros_bomb(256 * 1024 * 1024)  # ~256 KiB claiming 256 MiB
    tracemalloc.start()
    try:
        with pytest.raises(InflationLimitError, match="max_instance_bytes=67108864"):
            parse_header(bomb, DeflatedExplicitVRLittleEndian, max_inflated=64 * 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * INFLATE_IN_MEMORY, f"inflating a bomb held {peak / 1e6:.0f} MB"


def test_inflation_within_the_limit_counts_the_pixel_data_and_parses(tmp_path: Path) -> None:
    bomb, sop = _zeros_bomb(3 * INFLATE_IN_MEMORY)
    tracemalloc.start()
    try:
        values = parse_header(bomb, DeflatedExplicitVRLittleEndian, max_inflated=GIB, spill_dir=str(tmp_path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert values["SOPInstanceUID"] == sop
    assert peak < 2 * INFLATE_IN_MEMORY + len(bomb) * 2
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_inflate_bounded_returns_the_exact_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 50, 3 * INFLATE_IN_MEMORY, dtype=np.uint8).tobytes()
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(data) + comp.flush()
    stream, total = inflate_bounded(iter([deflated[i:i + 100_000] for i in range(0, len(deflated), 100_000)]),
                                    GIB, str(tmp_path))
    with stream:
        assert total == len(data) and stream.read() == data


@pytest.mark.timeout(30)
def test_bytes_after_the_deflate_stream_end_are_ignored(tmp_path: Path) -> None:
    """pydicom's image_dfl.dcm carries padding after the end of its deflate stream; zlib keeps such
    bytes in unconsumed_tail once eof is set, and inflating them in a loop once never ended."""
    data = bytes(range(256)) * 1024  # 256 KiB: several output steps
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(data) + comp.flush() + b"\x00" * 8
    for pieces in ([deflated], [deflated[:-4], deflated[-4:]]):
        stream, total = inflate_bounded(iter(pieces), GIB, str(tmp_path))
        with stream:
            assert total == len(data) and stream.read() == data


def test_corrupt_deflate_stream_is_unreadable() -> None:
    with pytest.raises(UnreadableDatasetError, match="cannot be inflated"):
        parse_header(b"\xff" * 100, DeflatedExplicitVRLittleEndian)


# -- spilled data sets ---------------------------------------------------------------------------------


def test_spilled_dataset_parses_like_the_same_bytes_in_memory(tmp_path: Path) -> None:
    raw, ds = _dataset_bytes()
    prefix = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "SCU")
    spilled = SpilledDataset(str(tmp_path), prefix, raw[:1000])
    spilled.write(raw[1000:])
    spilled.finish()
    assert parse_header(spilled, ExplicitVRLittleEndian) == parse_header(raw, ExplicitVRLittleEndian)
    assert Path(spilled.path).read_bytes() == prefix + raw
    truncated = SpilledDataset(str(tmp_path), prefix, raw[:-10])
    truncated.finish()
    with pytest.raises(UnreadableDatasetError, match="truncated"):
        parse_header(truncated, ExplicitVRLittleEndian)
    truncated.discard()
    assert not Path(truncated.path).exists()


@pytest.mark.slow
def test_instance_larger_than_memory_is_stored_byte_for_byte(appliance_factory: Any) -> None:
    app = appliance_factory(dicom={"memory_instance_bytes": 1024 * 1024})
    raw, ds = _dataset_bytes(rows=1024)  # 2 MiB of pixel data: spilled after the first MiB
    ae = pynetdicom_ae()
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
    assert assoc.is_established
    try:
        status = raw_c_store(assoc, raw, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    finally:
        assoc.release()
    assert status == 0x0000
    [stored] = app.spool_files()
    body = stored.read_bytes()
    assert body.endswith(raw) and body[128:132] == b"DICM"
    assert app.partials() == []
    [row] = app.query("SELECT size FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,))
    assert row["size"] == len(body)


# -- PDU caps -------------------------------------------------------------------------------------------


def _read_abort(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < 10:
            chunk = sock.recv(10 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data


@pytest.mark.slow
@pytest.mark.parametrize(("pdu_type", "length", "kind"), [
    (0x01, 300_000, "oversized_pdu"),        # an A-ASSOCIATE-RQ over max_association_pdu
    (0x01, 0xFFFFFFF0, "oversized_pdu"),     # one claiming ~4 GiB
    (0x04, 0xFFFFFFF0, "unexpected_pdu"),    # a P-DATA-TF (claiming ~4 GiB) before any association
    (0x09, 10, "unknown_pdu_type"),
])
def test_pdu_over_its_cap_gets_a_provider_abort_and_a_count(shared_appliance: Any, pdu_type: int,
                                                            length: int, kind: str) -> None:
    before = _counter(shared_appliance, "ingest_protocol_errors", kind)
    with socket.create_connection(("127.0.0.1", shared_appliance.port), timeout=5) as s:
        s.sendall(struct.pack(">BBL", pdu_type, 0, length) + b"\0" * 100)
        reply = _read_abort(s)
    # A-ABORT: type 7, length 4, source 2 (service provider), reason 1 (unrecognised) or 6 (invalid value)
    assert reply[:6] == b"\x07\x00\x00\x00\x00\x04" and reply[8] == 0x02, reply
    assert reply[9] == {"unknown_pdu_type": 0x01, "unexpected_pdu": 0x02, "oversized_pdu": 0x06}[kind]
    deadline = time.monotonic() + 5
    while _counter(shared_appliance, "ingest_protocol_errors", kind) <= before:
        assert time.monotonic() < deadline, "the violation was not counted"
        time.sleep(0.1)
    assert kind != "oversized_pdu" or f"announces {length} bytes" in shared_appliance.log_text()


def _counter(app: Any, name: str, label: str) -> int:
    rows = app.query("SELECT value FROM counters WHERE name = ? AND label = ?", (name, label))
    return rows[0]["value"] if rows else 0


@pytest.mark.slow
def test_pdata_longer_than_our_maximum_length_is_aborted(appliance_factory: Any) -> None:
    app = appliance_factory(dicom={"max_pdu_size": 16384})
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = pynetdicom_ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384  # what we advertise
    sock = assoc.dul.socket.socket
    # one PDV item of 20,000 bytes in a P-DATA-TF: longer than the 16,384 we said we accept
    item = struct.pack(">LB", 20_001, 1) + b"\x00" + b"\0" * 19_999
    sock.sendall(struct.pack(">BBL", 0x04, 0, len(item)) + item)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert f"P-DATA-TF announces {len(item)} bytes, over the 16448-byte limit" in app.log_text()


# -- the open-association count --------------------------------------------------------------------------


@pytest.mark.slow
def test_status_counts_open_associations_and_returns_to_zero(appliance_factory: Any) -> None:
    app = appliance_factory(dicom={"max_associations": 3})
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    held = []
    for _ in range(2):
        ae = pynetdicom_ae()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
        assert assoc.is_established
        held.append(assoc)
    assert _open_associations(app, want=2) == 2
    res = app.cli("status")
    assert res.returncode == 0 and "open associations: 2 of max_associations=3" in res.stdout, res.stdout
    held[0].release()
    held[1].dul.socket.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    held[1].dul.socket.socket.close()  # vanish with an RST
    assert _open_associations(app, want=0) == 0


@pytest.mark.slow
def test_status_of_a_stopped_appliance_says_so(appliance_factory: Any) -> None:
    app = appliance_factory(start=False)
    res = app.cli("status")
    assert res.returncode == 3 and "not running" in res.stdout
    app.start()
    app.terminate()
    res = app.cli("status", "--json")
    assert res.returncode == 3 and json.loads(res.stdout)["running"] is False


def _open_associations(app: Any, want: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        res = app.cli("status", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        n = json.loads(res.stdout)["open_associations"]
        if n == want or time.monotonic() > deadline:
            return int(n)
        time.sleep(0.2)


@pytest.mark.slow
def test_data_set_fragment_before_any_command_is_aborted(shared_appliance: Any) -> None:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = pynetdicom_ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", shared_appliance.port, ae_title="EDGE")
    assert assoc.is_established
    cid = assoc.accepted_contexts[0].context_id
    item = struct.pack(">LBB", 2 + 100, cid, 0x00) + b"\0" * 100  # a data set fragment, not last
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, len(item)) + item)
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    assert "data set fragment before its command set" in shared_appliance.log_text()


@pytest.mark.slow
def test_idle_and_garbage_connections_never_take_a_real_senders_place(appliance_factory: Any) -> None:
    """pynetdicom's own limit counts every connection's thread; ours counts associations only."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    app = appliance_factory(dicom={"max_associations": 2, "listeners": 2, "acse_timeout": 60.0})
    idle = [socket.create_connection(("127.0.0.1", app.port), timeout=5) for _ in range(10)]
    for _ in range(6):  # violations before any association: their threads must end at once
        with socket.create_connection(("127.0.0.1", app.port), timeout=5) as s:
            s.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0))
            _read_abort(s)
    try:
        held = []
        for _ in range(2):
            ae = pynetdicom_ae()
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
            held.append(assoc)
        assert all(a.is_established for a in held), "a real sender was refused while idle sockets were open"
        assert all(a.send_c_echo().Status == 0 for a in held)
        for a in held:
            a.release()
    finally:
        for s in idle:
            s.close()


@pytest.mark.slow
def test_a_flood_of_garbage_connections_leaves_no_threads_behind(appliance_factory: Any) -> None:
    """Connections that end before A-ASSOCIATE free their threads at once, so a flood larger than a
    listener's connection cap (max_associations + 64) never shuts out the real sender after it."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    app = appliance_factory(dicom={"max_associations": 2, "listeners": 1, "acse_timeout": 120.0})
    for i in range(150):
        with socket.create_connection(("127.0.0.1", app.port), timeout=5) as s:
            if i % 3 == 0:
                s.sendall(b"\x04\x00\xff\xff\xff\xf0")           # P-DATA before association
                _read_abort(s, timeout=2.0)
            elif i % 3 == 1:
                s.sendall(b"\x09" + os.urandom(63))              # an unknown PDU type
                _read_abort(s, timeout=2.0)
            # the third kind just connects and leaves
    ae = pynetdicom_ae()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", app.port, ae_title="EDGE")
    assert assoc.is_established, "the real sender was shut out after the flood:\n" + app.log_tail(20)
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert "already serves" not in app.log_text()
