"""The SQLite index: instances, series state, assembly rules, migrations."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from appliance.errors import StoreError
from appliance.store import Index, InstanceRecord, Store
from appliance.store.states import SeriesState
from appliance.store.index import migrate
from appliance.store.schema import SCHEMA_VERSION

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def rec(n: int, series: str = SERIES, size: int = 1000) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{n}", sop_class_uid=CT, study_uid=STUDY, series_uid=series,
        transfer_syntax="1.2.840.10008.1.2.1", path=f"{STUDY}/{series}/{series}.{n}.dcm", size=size,
        patient_id="P1", modality="CT", description="abdomen",
    )


@pytest.fixture
def index(tmp_path: Path) -> Index:
    store = Store.open(tmp_path / "data")
    return store.index


def series_row(index: Index, uid: str = SERIES) -> dict[str, object]:
    rows = [r for r in index.list_series() if r["series_uid"] == uid]
    assert len(rows) == 1
    return rows[0]


# -- instances and series counts -------------------------------------------------------------------------


def test_add_instance_is_idempotent(index: Index) -> None:
    assert index.add_instance_idempotent(rec(1), None) is True
    assert index.add_instance_idempotent(rec(1), None) is False
    assert index.has_instance(rec(1).sop_instance_uid)
    assert len(index.series_instances(SERIES)) == 1
    row = series_row(index)
    assert row["instances"] == 1
    assert row["bytes"] == 1000


def test_duplicate_does_not_touch_the_series(index: Index) -> None:
    t0 = 1_000_000.0
    index.add_instance(rec(1), None, now=t0)
    assert index.complete_quiet_series(t0 + 10, stable_seconds=5, grace_seconds=1) == [SERIES]
    # The same instance again must neither count nor re-open the complete series.
    with pytest.raises(Exception):
        index.add_instance(rec(1), None, now=t0 + 20)
    row = series_row(index)
    assert row["state"] == SeriesState.COMPLETE
    assert row["instances"] == 1
    assert row["last_received"] == t0
    assert row["reopened"] == 0


def test_series_counts(index: Index) -> None:
    for n in range(1, 6):
        index.add_instance_idempotent(rec(n, size=100 * n), None)
    index.add_instance_idempotent(rec(1, series=SERIES + ".9"), None)
    row = series_row(index)
    assert row["instances"] == 5
    assert row["bytes"] == 100 * (1 + 2 + 3 + 4 + 5)
    assert row["state"] == SeriesState.RECEIVING
    assert row["modality"] == "CT" and row["patient_id"] == "P1" and row["description"] == "abdomen"
    assert series_row(index, SERIES + ".9")["instances"] == 1
    assert len(index.series_instances(SERIES)) == 5


def test_first_and_last_received(index: Index) -> None:
    index.add_instance(rec(1), None, now=100.0)
    index.add_instance(rec(2), None, now=105.0)
    row = series_row(index)
    assert (row["first_received"], row["last_received"]) == (100.0, 105.0)


def test_new_series_leaves_an_event(index: Index) -> None:
    index.add_instance(rec(1), None, now=100.0)
    events = index.series_events(SERIES)
    assert len(events) == 1
    assert events[0]["from_state"] is None and events[0]["to_state"] == SeriesState.RECEIVING


# -- assembly: the stable rule ---------------------------------------------------------------------------


def test_stable_rule(index: Index) -> None:
    t0 = 1_000_000.0
    index.add_instance(rec(1), None, now=t0)
    index.add_instance(rec(2), None, now=t0 + 3)
    assert index.complete_quiet_series(t0 + 3 + 4.9, stable_seconds=5, grace_seconds=1) == []
    assert series_row(index)["state"] == SeriesState.RECEIVING
    assert index.complete_quiet_series(t0 + 3 + 5.0, stable_seconds=5, grace_seconds=1) == [SERIES]
    row = series_row(index)
    assert row["state"] == SeriesState.COMPLETE
    assert "5" in str(row["state_reason"])
    # Completing is done once.
    assert index.complete_quiet_series(t0 + 100, stable_seconds=5, grace_seconds=1) == []


def test_late_instance_reopens_complete_series(index: Index) -> None:
    t0 = 1_000_000.0
    index.add_instance(rec(1), None, now=t0)
    index.complete_quiet_series(t0 + 10, stable_seconds=5, grace_seconds=1)
    assert series_row(index)["state"] == SeriesState.COMPLETE

    assert index.add_instance_idempotent(rec(2), None) is True
    row = series_row(index)
    assert row["state"] == SeriesState.RECEIVING
    assert row["instances"] == 2
    assert row["reopened"] == 1
    events = index.series_events(SERIES)
    assert [(e["from_state"], e["to_state"]) for e in events] == [
        (None, SeriesState.RECEIVING), (SeriesState.RECEIVING, SeriesState.COMPLETE), (SeriesState.COMPLETE, SeriesState.RECEIVING)]
    assert "late" in events[-1]["reason"]

    # ... and it completes again under the same rules.
    now = time.time()
    assert index.complete_quiet_series(now + 10, stable_seconds=5, grace_seconds=1) == [SERIES]
    assert series_row(index)["state"] == SeriesState.COMPLETE
    assert [e["to_state"] for e in index.series_events(SERIES)][-1] == SeriesState.COMPLETE


# -- assembly: the release rule ---------------------------------------------------------------------------


def deliver(index: Index, assoc: str, *numbers: int) -> None:
    for n in numbers:
        index.add_instance(rec(n), assoc)


def test_release_rule_needs_grace(index: Index) -> None:
    index.open_association("a1", "CT01", "127.0.0.1:1")
    deliver(index, "a1", 1, 2)
    index.close_association("a1", "released")
    now = time.time()
    assert index.complete_quiet_series(now, stable_seconds=1000, grace_seconds=5) == []
    assert index.complete_quiet_series(now + 5.5, stable_seconds=1000, grace_seconds=5) == [SERIES]
    row = series_row(index)
    assert row["state"] == SeriesState.COMPLETE
    assert "released" in str(row["state_reason"])


def test_release_rule_not_while_association_open(index: Index) -> None:
    index.open_association("a1", "CT01", "127.0.0.1:1")
    deliver(index, "a1", 1, 2)
    now = time.time()
    assert index.complete_quiet_series(now + 60, stable_seconds=1000, grace_seconds=0) == []
    assert series_row(index)["state"] == SeriesState.RECEIVING


def test_release_rule_needs_every_delivering_association_released(index: Index) -> None:
    index.open_association("a1", "CT01", "127.0.0.1:1")
    index.open_association("a2", "CT01", "127.0.0.1:2")
    deliver(index, "a1", 1, 2)
    deliver(index, "a2", 3, 4)
    index.close_association("a1", "released")
    now = time.time()
    assert index.complete_quiet_series(now + 60, stable_seconds=1000, grace_seconds=1) == []
    index.close_association("a2", "released")
    assert index.complete_quiet_series(time.time() + 0.5, stable_seconds=1000, grace_seconds=1) == []
    assert index.complete_quiet_series(time.time() + 1.5, stable_seconds=1000, grace_seconds=1) == [SERIES]


def test_associations_of_other_series_do_not_matter(index: Index) -> None:
    index.open_association("a1", "CT01", "127.0.0.1:1")
    index.open_association("other", "CT01", "127.0.0.1:2")
    deliver(index, "a1", 1)
    index.add_instance(rec(1, series=SERIES + ".7"), "other")
    index.close_association("a1", "released")
    done = index.complete_quiet_series(time.time() + 2, stable_seconds=1000, grace_seconds=1)
    assert done == [SERIES]


@pytest.mark.parametrize("outcome", ["aborted", "lost"])
def test_aborted_association_does_not_trigger_release_rule(index: Index, outcome: str) -> None:
    index.open_association("a1", "CT01", "127.0.0.1:1")
    deliver(index, "a1", 1, 2)
    if outcome == "lost":
        assert index.mark_lost_associations() == 1
    else:
        index.close_association("a1", "aborted")
    now = time.time()
    assert index.complete_quiet_series(now + 60, stable_seconds=1000, grace_seconds=1) == []
    assert series_row(index)["state"] == SeriesState.RECEIVING
    # The stable rule still completes it.
    assert index.complete_quiet_series(now + 1001, stable_seconds=1000, grace_seconds=1) == [SERIES]


def test_one_aborted_among_released_blocks_release_rule(index: Index) -> None:
    index.open_association("a1", "CT01", "127.0.0.1:1")
    index.open_association("a2", "CT01", "127.0.0.1:2")
    deliver(index, "a1", 1)
    deliver(index, "a2", 2)
    index.close_association("a1", "aborted")
    index.close_association("a2", "released")
    assert index.complete_quiet_series(time.time() + 60, stable_seconds=1000, grace_seconds=1) == []


def test_release_before_late_instance_does_not_complete(index: Index) -> None:
    """A release that happened before the series' last instance says nothing about that instance."""
    index.open_association("a1", "CT01", "127.0.0.1:1")
    deliver(index, "a1", 1)
    index.close_association("a1", "released")
    time.sleep(0.01)
    index.add_instance(rec(2), None)  # arrives afterwards, from no recorded association
    assert index.complete_quiet_series(time.time() + 60, stable_seconds=1000, grace_seconds=1) == []


def test_close_association_records_outcome_once(index: Index) -> None:
    index.open_association("a1", "CT01", "127.0.0.1:1")
    index.close_association("a1", "released")
    index.close_association("a1", "aborted")  # e.g. the connection closing after the release
    row = index.conn.execute("SELECT outcome, closed_at FROM associations WHERE id = 'a1'").fetchone()
    assert row["outcome"] == "released"
    assert row["closed_at"] is not None


# -- migrations ---------------------------------------------------------------------------------------


def test_migration_sets_user_version(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite3"
    assert migrate(db) == 0
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"series", "instances", "associations", "series_associations", "series_events",
                "counters"} <= tables
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    # A second run finds it current and changes nothing.
    assert migrate(db) == SCHEMA_VERSION


def test_store_open_migrates(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "data")
    assert store.index.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        migrate(db)


def test_open_without_create_needs_existing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no appliance data"):
        Store.open(tmp_path / "missing", create=False)


def test_counters(index: Index) -> None:
    index.count("ingest_rejected_instances", "missing_uid")
    index.count("ingest_rejected_instances", "missing_uid", 2)
    index.count("ingest_duplicate_instances")
    assert index.counters() == {("ingest_rejected_instances", "missing_uid"): 3,
                                ("ingest_duplicate_instances", ""): 1}
