"""What the panel reads and writes in the store: header fields for search (from the receiver's own header
parse, bounded), destination holds that the sender honours, and the schema upgrade of an older index."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from appliance.ingest.receiver import checked_uids, instance_record, parse_header
from appliance.store import Store
from appliance.store.browse import Browse, SeriesFilter
from appliance.store.outbox import Outbox
from appliance.store.schema import MIGRATIONS
from appliance_dev.dicom_factory import ct_dataset, encode
from tests.test_outbox import _done_job, _series


def _record(ds, rel: str = "x.dcm"):  # type: ignore[no-untyped-def]
    values = parse_header(encode(ds), ExplicitVRLittleEndian)
    return instance_record(values, checked_uids(values), ExplicitVRLittleEndian, rel, 100)


def test_the_receiver_keeps_what_the_panel_searches_by(tmp_path: Path) -> None:
    ds = ct_dataset(study_uid="1.2.3", series_uid="1.2.3.4")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Nguyễn^Văn An"
    ds.AccessionNumber = "ACC-778"
    ds.StudyDate = "20261203"
    ds.SeriesNumber = 7
    rec = _record(ds)
    assert (rec.patient_name, rec.accession, rec.study_date, rec.series_number) == (
        "Nguyễn^Văn An", "ACC-778", "20261203", 7)
    store = Store.open(tmp_path)
    store.index.add_instance(rec, None)
    b = Browse(store.index)
    row = b.series("1.2.3.4")
    assert row is not None and row["patient_name"] == "Nguyễn^Văn An" and row["accession"] == "ACC-778"
    assert b.series_page(SeriesFilter(text="văn"))[0] == 1  # LIKE is case-insensitive for ASCII only; the substring matches
    assert b.series_page(SeriesFilter(text="ACC-7"))[0] == 1
    assert b.series_page(SeriesFilter(text="%"))[0] == 0  # wildcards are literal


def test_hostile_header_values_are_bounded_and_bad_dates_dropped(tmp_path: Path) -> None:
    ds = ct_dataset(study_uid="1.2.3", series_uid="1.2.3.5")
    ds.PatientName = "<script>alert(1)</script>" + "A" * 1000
    ds.StudyDate = "2026-12-03'; DROP TABLE series;--"
    ds.SeriesNumber = None
    rec = _record(ds)
    assert rec.patient_name is not None and len(rec.patient_name) == 256
    assert rec.patient_name.startswith("<script>")
    assert rec.study_date is None and rec.series_number is None
    # past the header parser's 4 KiB deferral a value is not read at all: nothing is kept rather than megabytes
    ds.PatientName = "B" * 5000
    assert _record(ds).patient_name is None


def test_a_suspended_destination_is_not_sent_to_until_resumed(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ob = Outbox(store.index)
    _series(store, "5.1")
    _done_job(store, "5.1", ["pacs", "viewer"])
    assert {r.destination for r in ob.due()} == {"pacs", "viewer"}
    assert ob.suspend("pacs", "chief", "PACS maintenance") is True
    assert ob.suspend("pacs", "chief") is False  # already on hold
    assert {r.destination for r in ob.due()} == {"viewer"}
    assert ob.held() == {"pacs"}
    assert Browse(store.index).holds()["pacs"]["reason"] == "PACS maintenance"
    assert ob.resume("pacs") is True and ob.resume("pacs") is False
    assert {r.destination for r in ob.due()} == {"pacs", "viewer"}


def test_an_index_of_schema_4_upgrades_in_place(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite3"
    conn = sqlite3.connect(db)
    from appliance.store.index import _split_sql

    for version in range(4):
        for statement in _split_sql(MIGRATIONS[version]):
            conn.execute(statement)
    conn.execute("PRAGMA user_version=4")
    conn.execute(
        "INSERT INTO series(series_uid, study_uid, state, first_received, last_received, state_changed, state_reason)"
        " VALUES ('1.9', '1.8', 'done', 1, 2, 2, 'old')"
    )
    conn.commit()
    conn.close()
    store = Store.open(tmp_path)
    row = Browse(store.index).series("1.9")
    assert row is not None and row["patient_name"] is None and row["state"] == "done"
    assert store.index.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
