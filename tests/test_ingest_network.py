"""The DICOM listener as modalities see it: association policy, statuses, what reaches the disk."""

from __future__ import annotations

import re
import struct
import subprocess
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from conftest import (CALLED_AE, Appliance, parse_storescu, pynetdicom_ae, raw_c_store, run_echoscu,
                      run_storescu)
from appliance_dev.dicom_factory import CT_IMAGE_STORAGE, ct_dataset, dataset_bytes_of_file, encode, make_series

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
              pytest.mark.filterwarnings("ignore:The value length")]


def associate(app: Appliance, calling_ae: str = "PYTEST") -> Any:
    ae = pynetdicom_ae(calling_ae)
    ae.add_requested_context(Verification)
    # One transfer syntax per context: the acceptor picks one per context.
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", app.port, ae_title=CALLED_AE)
    assert assoc.is_established, "association with the appliance was not established"
    return assoc


def echo_ok(app: Appliance) -> bool:
    assoc = associate(app)
    try:
        status = assoc.send_c_echo()
        return "Status" in status and status.Status == 0x0000
    finally:
        assoc.release()


# -- a. C-ECHO and the allow-list ------------------------------------------------------------------------


def test_echoscu(shared_appliance: Appliance) -> None:
    res = run_echoscu(shared_appliance)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Received Echo Response (Success)" in res.stdout + res.stderr


def test_wrong_called_ae_title_is_rejected(shared_appliance: Appliance) -> None:
    res = run_echoscu(shared_appliance, called_ae="NOT-EDGE")
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr


def test_allowed_callers(appliance_factory: Any) -> None:
    app = appliance_factory(dicom={"allowed_callers": [
        {"ae_title": "CT01", "host": "10.9.9.9"},
        {"ae_title": "MR01"},
        {"ae_title": "US01", "host": "127.0.0.1"},
    ]})
    # Listed without a host: accepted from anywhere.
    res = run_echoscu(app, calling_ae="MR01")
    assert res.returncode == 0, res.stdout + res.stderr
    # Listed and pinned to this host: accepted.
    res = run_echoscu(app, calling_ae="US01")
    assert res.returncode == 0, res.stdout + res.stderr
    # Not listed: rejected when the association is requested.
    res = run_echoscu(app, calling_ae="UNKNOWN")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Association Rejected" in out
    assert "Echo Response" not in out
    # Listed but pinned to another host: rejected from 127.0.0.1.
    res = run_echoscu(app, calling_ae="CT01")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Association Rejected" in out
    assert "Calling AE Title Not Recognized" in out
    # The rejections are in the log with their reason, and counted.
    rejected = [line for line in app.log_text().splitlines() if "rejected" in line]
    assert any("UNKNOWN" in line for line in rejected), rejected
    assert any("CT01" in line and "127.0.0.1" in line for line in rejected), rejected
    assert not any("MR01" in line or "US01" in line for line in rejected), rejected
    rows = app.query("SELECT value FROM counters WHERE name = 'ingest_rejected_associations'")
    assert sum(r["value"] for r in rows) == 2


def test_rejected_caller_cannot_store(appliance_factory: Any, tmp_path: Path) -> None:
    app = appliance_factory(dicom={"allowed_callers": [{"ae_title": "CT01"}]})
    make_series(tmp_path / "s", 2)
    res = run_storescu(app, tmp_path / "s", calling_ae="INTRUDER")
    assert res.returncode != 0
    assert "Association Rejected" in res.stdout + res.stderr
    assert app.spool_files() == []
    res = run_storescu(app, tmp_path / "s", calling_ae="CT01")
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(app.spool_files()) == 2


def test_max_associations_rejects_extra(appliance_factory: Any) -> None:
    app = appliance_factory(dicom={"max_associations": 1})
    held = associate(app)
    try:
        res = run_echoscu(app)
        out = res.stdout + res.stderr
        assert res.returncode != 0, out
        assert "Association Rejected" in out and "Local Limit Exceeded" in out, out
    finally:
        held.release()
    # The slot is free again once the held association released.
    deadline = time.monotonic() + 5
    while True:
        res = run_echoscu(app)
        if res.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert res.returncode == 0, res.stdout + res.stderr


# -- c. a raw sender: what a broken modality may send ------------------------------------------------------


def _raw_store(app: Appliance, payload: bytes, sop_instance: str, ts: str = ExplicitVRLittleEndian) -> int | None:
    assoc = associate(app)
    try:
        return raw_c_store(assoc, payload, CT_IMAGE_STORAGE, sop_instance, ts)
    finally:
        if assoc.is_established:
            assoc.release()


def _assert_nothing_new(app: Appliance, before: list[Path]) -> None:
    assert app.spool_files() == before, "a refused instance reached the spool"
    assert app.partials() == []


@pytest.mark.parametrize("garbage", [
    b"\xff" * 300,
    b"This is not a DICOM dataset.\n" * 40,
], ids=["ff-bytes", "text"])
def test_raw_garbage_cannot_be_understood(shared_appliance: Appliance, garbage: bytes) -> None:
    before = shared_appliance.spool_files()
    status = _raw_store(shared_appliance, garbage, generate_uid())
    assert status == 0xC000, f"got {status!r}"
    _assert_nothing_new(shared_appliance, before)
    assert echo_ok(shared_appliance)


def test_raw_truncated_cannot_be_understood(shared_appliance: Appliance) -> None:
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), rows=32, cols=32)
    payload = encode(ds)
    before = shared_appliance.spool_files()
    status = _raw_store(shared_appliance, payload[: len(payload) - 700], ds.SOPInstanceUID)
    assert status == 0xC000, f"got {status!r}"
    _assert_nothing_new(shared_appliance, before)
    assert echo_ok(shared_appliance)


def test_raw_unterminated_sequence_cannot_be_understood(shared_appliance: Appliance) -> None:
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    # Valid header, then a sequence of undefined length whose item never ends.
    head = encode(ct_dataset(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                             sop_instance_uid=ds.SOPInstanceUID))
    cut = head.index(b"\x08\x00\x18\x00")  # up to SOP Instance UID
    payload = head[:cut] + struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF) + \
        b"\xfe\xff\x00\xe0" + struct.pack("<I", 0xFFFFFFFF)
    before = shared_appliance.spool_files()
    status = _raw_store(shared_appliance, payload, ds.SOPInstanceUID)
    assert status == 0xC000, f"got {status!r}"
    _assert_nothing_new(shared_appliance, before)


def test_raw_path_traversal_uid_is_invalid(shared_appliance: Appliance) -> None:
    bad = "1.2.3.abc/../../etc"
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), sop_instance_uid=bad)
    before = shared_appliance.spool_files()
    # A consistent (broken) sender: the request names the same UID the dataset carries.
    status = _raw_store(shared_appliance, encode(ds), bad)
    assert status == 0xC002, f"got {status!r}"
    _assert_nothing_new(shared_appliance, before)
    data = shared_appliance.data_dir
    assert not (data / "etc").exists() and not (data / "spool" / "etc").exists()
    assert not list(data.parent.rglob("etc.dcm"))
    assert echo_ok(shared_appliance)


def test_raw_over_long_uid_is_invalid(shared_appliance: Appliance) -> None:
    long_uid = "1.2." + "3" * 70
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), sop_instance_uid=long_uid)
    before = shared_appliance.spool_files()
    # pynetdicom cannot carry a >64-character UID in the request; the dataset can.
    status = _raw_store(shared_appliance, encode(ds), generate_uid())
    assert status == 0xC002, f"got {status!r}"
    _assert_nothing_new(shared_appliance, before)


def test_raw_missing_sop_instance_uid(shared_appliance: Appliance) -> None:
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    before = shared_appliance.spool_files()
    status = _raw_store(shared_appliance, encode(ds), uid)
    assert status == 0xC001, f"got {status!r}"
    _assert_nothing_new(shared_appliance, before)
    assert echo_ok(shared_appliance)


def test_raw_uid_mismatch(shared_appliance: Appliance) -> None:
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    before = shared_appliance.spool_files()
    status = _raw_store(shared_appliance, encode(ds), generate_uid())
    assert status == 0xC003, f"got {status!r}"
    _assert_nothing_new(shared_appliance, before)


def test_bad_instances_in_one_association_then_good_one(shared_appliance: Appliance) -> None:
    """Refusals do not end the association: the next good instance on it is stored."""
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    no_uid = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    del no_uid.SOPInstanceUID
    assoc = associate(shared_appliance)
    try:
        assert raw_c_store(assoc, b"\xff" * 100, CT_IMAGE_STORAGE, generate_uid(), ExplicitVRLittleEndian, 1) \
            not in (None, 0x0000)
        assert raw_c_store(assoc, encode(no_uid), CT_IMAGE_STORAGE, generate_uid(), ExplicitVRLittleEndian,
                           2) == 0xC001
        assert raw_c_store(assoc, encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian,
                           3) == 0x0000
        assert assoc.send_c_echo(msg_id=4).Status == 0x0000
    finally:
        assoc.release()
    path = shared_appliance.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert dataset_bytes_of_file(path.read_bytes()) == encode(ds)


# -- e. the disk reserve ------------------------------------------------------------------------------------


def test_disk_reserve_refuses_with_a700(appliance_factory: Any, tmp_path: Path) -> None:
    app = appliance_factory(storage={"min_free_bytes": 10**18})
    series = make_series(tmp_path / "series", 3)
    res = run_storescu(app, tmp_path / "series", extra=("-nh",))  # -nh: go on after a failure
    out = res.stdout + res.stderr
    statuses = parse_storescu(out)
    assert len(statuses) == len(series), out
    for status in statuses.values():
        # DCMTK 3.6.7 prints "Refused: OutOfResources" for 0xA700.
        assert re.sub(r"[^a-z]", "", status.lower()).endswith("outofresources"), out
    assert app.spool_files() == []
    assert app.partials() == []
    assert app.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0
    assert app.series() == []
    # The listener stays up and answers.
    assert run_echoscu(app).returncode == 0


# -- h. duplicates ------------------------------------------------------------------------------------------


def test_duplicate_resend_is_success_and_indexed_once(appliance_factory: Any, tmp_path: Path) -> None:
    app = appliance_factory()
    [inst] = make_series(tmp_path / "one", 1)
    for attempt in range(3):
        res = run_storescu(app, inst.path)
        statuses = parse_storescu(res.stdout + res.stderr)
        assert statuses == {str(inst.path): "Success"}, (attempt, res.stdout + res.stderr)
    rows = app.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (inst.sop_instance_uid,))
    assert len(rows) == 1
    [series] = app.series()
    assert series["instances"] == 1
    files = app.spool_files()
    assert files == [app.spool / inst.study_uid / inst.series_uid / f"{inst.sop_instance_uid}.dcm"]
    counters = {(r["name"], r["label"]): r["value"] for r in app.query("SELECT * FROM counters")}
    assert counters.get(("ingest_duplicate_instances", "")) == 2


def test_duplicate_on_parallel_associations(appliance_factory: Any) -> None:
    """The same instance on two associations at once: both Success, one copy, one row."""
    import threading

    app = appliance_factory()
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid(), rows=256, cols=256)
    payload = encode(ds)
    results: list[int | None] = []

    def send() -> None:
        assoc = associate(app)
        try:
            for i in range(5):
                results.append(raw_c_store(assoc, payload, CT_IMAGE_STORAGE, ds.SOPInstanceUID,
                                           ExplicitVRLittleEndian, i + 1))
        finally:
            assoc.release()

    threads = [threading.Thread(target=send) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [0x0000] * 10
    assert app.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
    assert len(app.spool_files()) == 1
    assert app.series()[0]["instances"] == 1
    assert dataset_bytes_of_file(app.spool_files()[0].read_bytes()) == payload


# -- transfer syntax negotiation ------------------------------------------------------------------------------


def test_sender_first_choice_explicit_vr_is_accepted(shared_appliance: Appliance, tmp_path: Path) -> None:
    """storescu proposes Explicit VR Little Endian first; accepting Implicit VR instead makes it
    transcode every file, and private attributes lose their VR (they come back as UN)."""
    import pydicom

    from appliance_dev.dicom_factory import write_file

    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "DS", "1.5")
    write_file(ds, tmp_path / "private.dcm", ExplicitVRLittleEndian)
    res = run_storescu(shared_appliance, tmp_path / "private.dcm")
    out = res.stdout + res.stderr
    assert list(parse_storescu(out).values()) == ["Success"], out
    path = shared_appliance.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, \
        f"stored as {back.file_meta.TransferSyntaxUID.name}; storescu said: " + \
        " | ".join(line for line in out.splitlines() if "Converting" in line)
    assert back.private_block(0x0009, "ACME 1.0")[0x01].VR == "DS"


# -- full disk (a real ENOSPC, not the configured reserve) ------------------------------------------------


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: the only honest way to make the disk really fill up in a test."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_full_disk_refuses_with_a700_and_keeps_what_it_acknowledged(
    appliance_factory: Any, tmp_path: Path, tiny_filesystem: Path
) -> None:
    app = appliance_factory(storage={"data_dir": str(tiny_filesystem / "data"), "min_free_bytes": 0})
    app.data_dir = tiny_filesystem / "data"
    series = make_series(tmp_path / "big", 24, rows=512, cols=512)  # 24 x 512 KiB: more than 4 MiB
    res = run_storescu(app, tmp_path / "big", extra=("-nh",))
    out = res.stdout + res.stderr
    statuses = parse_storescu(out)
    assert len(statuses) == len(series), out
    ok = [p for p, st in statuses.items() if st == "Success"]
    refused = [st for st in statuses.values() if st != "Success"]
    assert ok and refused, out  # some fitted, the rest did not
    for status in refused:
        assert re.sub(r"[^a-z]", "", status.lower()).endswith("outofresources"), out
    # Everything acknowledged is indexed and on disk; nothing else is; no partial files.
    indexed = {r["sop_instance_uid"] for r in app.query("SELECT sop_instance_uid FROM instances")}
    acked = {inst.sop_instance_uid for inst in series if str(inst.path) in ok}
    assert indexed == acked
    assert len(app.spool_files()) == len(acked)
    assert app.partials() == []
    assert run_echoscu(app).returncode == 0
