"""The outbox and retention rules on a real SQLite store: result objects become one row per destination in
the job's own transaction; series states follow delivery; failures back off, then dead-letter; retry revives;
a re-opened series supersedes unsent results; retention purges only delivered work."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from appliance.retention import Purger
from appliance.store import InstanceRecord, Store
from appliance.store.jobs import JobQueue, NewObject
from appliance.store.outbox import Outbox, backoff


def _series(store: Store, uid: str, n: int = 1, now: float = 0.0, first: int = 0) -> None:
    for i in range(first, first + n):
        rel = f"s/{uid}/{i}.dcm"
        p = store.spool.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 10)
        store.index.add_instance(InstanceRecord(sop_instance_uid=f"{uid}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                                study_uid="1.2.3", series_uid=uid, transfer_syntax="1.2.840.10008.1.2.1",
                                                path=rel, size=10, modality="CT"), None, now=now)
    store.index.complete_quiet_series(now + 100.0, 5.0, 1.0)


def _state(store: Store, uid: str) -> tuple[str, str]:
    row = store.index.conn.execute("SELECT state, state_reason FROM series WHERE series_uid = ?", (uid,)).fetchone()
    return row[0], row[1]


def _objects(uid: str, tag: str = "a") -> list[NewObject]:
    return [NewObject(kind=k, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", sop_instance_uid=f"9.{uid}.{tag}.{i}",
                      result_series_uid=f"8.{uid}.{i}", path=f"results/{uid}/m/{k.lower()}.dcm")
            for i, k in enumerate(("SEG", "SR", "SC"))]


def _done_job(store: Store, uid: str, dests: list[str], tag: str = "a") -> None:
    q = JobQueue(store.index)
    q.queue_jobs(uid, [("m", 0, ["r"], dests)])
    job = q.claim(1)
    assert job is not None
    assert q.finish(job, ok=True, reason="done", objects=_objects(uid, tag))


FAIL = dict(max_attempts=3, base=0.01, cap=0.02)


def test_objects_become_rows_per_destination_and_delivery_settles_the_series(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ob = Outbox(store.index)
    _series(store, "1.1")
    _done_job(store, "1.1", ["pacs", "viewer"])
    assert _state(store, "1.1")[0] == "exporting"
    rows = ob.due()
    assert len(rows) == 6 and {r.destination for r in rows} == {"pacs", "viewer"}
    for r in rows[:-1]:
        ob.record_sent(r, "0x0000")
        assert _state(store, "1.1")[0] == "exporting"
    ob.record_sent(rows[-1], "0x0000")
    state, reason = _state(store, "1.1")
    assert state == "done" and "6 delivery(ies) acknowledged" in reason
    assert ob.due() == []
    # A second Success for the same row (a resend after a crash) changes nothing.
    ob.record_sent(rows[0], "0x0000")
    assert len(ob.list(state="sent")) == 6


def test_no_destination_means_done_at_once(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    _series(store, "2.1")
    _done_job(store, "2.1", [])
    assert _state(store, "2.1") == ("done", "all models ran (no destination configured)")
    assert Outbox(store.index).list() == []


def test_failures_back_off_then_dead_letter_then_retry(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ob = Outbox(store.index)
    _series(store, "3.1")
    _done_job(store, "3.1", ["pacs"])
    row = ob.due()[0]
    t0 = time.time()
    assert ob.record_failure(row, "cannot connect", None, **FAIL) == "pending"
    listed = ob.list(series_uid="3.1")
    first = next(r for r in listed if r["id"] == row.id)
    assert first["attempts"] == 1 and first["last_error"] == "cannot connect"
    assert first["next_attempt_at"] >= t0 + 0.005  # not due at once: backed off
    assert row.id not in [r.id for r in ob.due(now=t0)]
    assert ob.record_failure(row, "cannot connect", None, **FAIL) == "pending"
    assert ob.record_failure(row, "association rejected: Called AE title not recognised", "A-ASSOCIATE-RJ 1/1/7",
                             **FAIL) == "dead"
    for other in ob.due(now=time.time() + 1):
        ob.record_sent(other, "0x0000")
    state, reason = _state(store, "3.1")
    assert state == "export_failed" and "Called AE title not recognised" in reason
    attempts = ob.attempts(row.id)
    assert [a["ok"] for a in attempts] == [0, 0, 0] and attempts[-1]["status"] == "A-ASSOCIATE-RJ 1/1/7"
    assert ob.retry([row.id]) == 1
    assert _state(store, "3.1")[0] == "exporting"
    again = ob.due()
    assert [r.id for r in again] == [row.id] and again[0].attempts == 0
    ob.record_sent(again[0], "0x0000")
    assert _state(store, "3.1")[0] == "done"
    assert ob.retry([row.id]) == 0  # not dead any more


def test_permanent_failure_is_dead_at_once(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ob = Outbox(store.index)
    _series(store, "4.1")
    _done_job(store, "4.1", ["gone"])
    for r in ob.due():
        assert ob.record_failure(r, "destination 'gone' is not configured any more", None, permanent=True,
                                 **FAIL) == "dead"
    assert _state(store, "4.1")[0] == "export_failed"
    assert ob.retry(all_dead=True) == 3


def test_reopened_series_supersedes_unsent_results(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ob = Outbox(store.index)
    _series(store, "5.1")
    _done_job(store, "5.1", ["pacs"])
    sent = ob.due()[0]
    ob.record_sent(sent, "0x0000")
    # A late instance re-opens the series; it completes again and is routed again.
    _series(store, "5.1", n=1, now=200.0, first=1)
    _done_job(store, "5.1", ["pacs"], tag="b")
    rows = ob.list(series_uid="5.1")
    assert [r["state"] for r in rows].count("superseded") == 2
    assert [r["state"] for r in rows].count("sent") == 1
    assert {r.sop_instance_uid.split(".")[-2] for r in ob.due()} == {"b"}


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for n, nominal in ((1, 10), (2, 20), (3, 40), (4, 80), (10, 300)):
        for _ in range(50):
            d = backoff(n, 10.0, 300.0, rng)
            assert nominal / 2 <= d <= nominal
    assert len({round(backoff(3, 10.0, 300.0, rng), 6) for _ in range(20)}) > 10  # jittered


def test_retention_purges_only_delivered_work(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ob = Outbox(store.index)
    for uid in ("6.1", "6.2", "6.3", "6.4"):
        _series(store, uid, n=2)
    _done_job(store, "6.1", ["pacs"])
    for r in ob.due():
        if r.series_uid == "6.1":
            ob.record_sent(r, "0x0000")
    _done_job(store, "6.2", ["pacs"])  # still exporting
    _done_job(store, "6.3", ["pacs"])
    for r in ob.due():
        if r.series_uid == "6.3":
            ob.record_failure(r, "nope", None, permanent=True, **FAIL)  # dead letters
    JobQueue(store.index).queue_jobs("6.4", [])  # no_model
    results = tmp_path / "results" / "6.1" / "m"
    results.mkdir(parents=True)
    (results / "seg.dcm").write_bytes(b"x")
    renders = {u: tmp_path / "cache" / "slices" / u for u in ("6.1", "6.2")}  # the panel's slice cache
    for d in renders.values():
        d.mkdir(parents=True)
        (d / "0.png").write_bytes(b"png")
    assert {u: _state(store, u)[0] for u in ("6.1", "6.2", "6.3", "6.4")} == {
        "6.1": "done", "6.2": "exporting", "6.3": "export_failed", "6.4": "no_model"}

    purger = Purger(store, retention_days=1.0)
    assert purger.tick(now=time.time()) == 0  # not old enough yet
    assert purger.tick(now=time.time() + 2 * 86400) == 2
    states = {u: _state(store, u)[0] for u in ("6.1", "6.2", "6.3", "6.4")}
    assert states == {"6.1": "purged", "6.2": "exporting", "6.3": "export_failed", "6.4": "purged"}
    assert not results.exists()
    assert not renders["6.1"].exists() and renders["6.2"].exists()  # a purged series' renders go with it
    left = {p.parent.name for p in (store.spool.root / "s").rglob("*.dcm")}
    assert left == {"6.2", "6.3"}
    assert store.index.series_instances("6.1") == []
    assert len(store.index.series_instances("6.2")) == 2
    assert Purger(store, retention_days=0).tick(now=time.time() + 1e9) == 0  # 0 keeps everything


@pytest.mark.parametrize("days", [0.0, 1e-4, 30.0])
def test_purge_interval_is_bounded(tmp_path: Path, days: float) -> None:
    p = Purger(Store.open(tmp_path), days)
    assert 1.0 <= p.interval() <= 600.0


def test_every_move_of_an_outbox_row_is_in_its_trail(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    ob = Outbox(store.index)
    _series(store, "9.1")
    _done_job(store, "9.1", ["pacs"])
    row = ob.due()[0]
    assert ob.record_failure(row, "association rejected", None, **FAIL) == "pending"  # no move: no event
    assert ob.record_failure(row, "refused for good", "0xA900", **FAIL, permanent=True) == "dead"
    assert ob.retry([row.id]) == 1
    ob.record_sent(row, "0x0000")
    moves = [(e["from_state"], e["to_state"]) for e in ob.events(row.id)]
    assert moves == [(None, "pending"), ("pending", "dead"), ("dead", "pending"), ("pending", "sent")]
    assert ob.events(row.id)[1]["reason"] == "refused for good"
