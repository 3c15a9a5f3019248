"""The job queue's rules on a real SQLite store: priority, retries after a dead worker, re-opened series."""

from __future__ import annotations

from pathlib import Path

from appliance.store import InstanceRecord, Store
from appliance.store.jobs import JobQueue

DEAD_PID = 2**22 + 12345  # above pid_max's default: never a live process


def _series(store: Store, uid: str) -> None:
    store.index.add_instance(InstanceRecord(sop_instance_uid=uid + ".1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                            study_uid="1.2.3", series_uid=uid, transfer_syntax="1.2.840.10008.1.2.1",
                                            path=f"x/{uid}.dcm", size=10, modality="CT"), None, now=0.0)
    store.index.complete_quiet_series(100.0, 5.0, 1.0)


def _state(store: Store, uid: str) -> str:
    return store.index.conn.execute("SELECT state FROM series WHERE series_uid = ?", (uid,)).fetchone()[0]


def test_priority_then_age(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    q = JobQueue(store.index)
    for uid in ("1.1", "1.2", "1.3"):
        _series(store, uid)
    assert [s for s, _ in q.complete_series_heads()] == ["1.1", "1.2", "1.3"]
    q.queue_jobs("1.1", [("m", 0, ["r"], [])])
    q.queue_jobs("1.2", [("m", 10, ["stat"], ["pacs"])])
    q.queue_jobs("1.3", [])
    assert _state(store, "1.3") == "no_model"
    assert _state(store, "1.1") == "queued"
    first = q.claim(1)
    assert first is not None and first.series_uid == "1.2" and first.destinations == ["pacs"]
    assert _state(store, "1.2") == "processing"
    second = q.claim(1)
    assert second is not None and second.series_uid == "1.1"
    assert q.claim(1) is None
    assert q.finish(first, ok=True, reason="done", timings={"infer": 1.0})
    assert _state(store, "1.2") == "done"
    assert q.finish(second, ok=False, reason="model exploded")
    assert _state(store, "1.1") == "failed"
    row = store.index.conn.execute("SELECT state_reason FROM series WHERE series_uid = '1.1'").fetchone()
    assert "model exploded" in row[0]


def test_dead_worker_retries_then_fails(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    q = JobQueue(store.index)
    _series(store, "2.1")
    q.queue_jobs("2.1", [("m", 0, ["r"], [])])
    for attempt in (1, 2):
        job = q.claim(DEAD_PID)
        assert job is not None and job.attempts == attempt
        assert q.recover({4321}, max_attempts=3) == (1, 0)
        assert _state(store, "2.1") == "queued"
    job = q.claim(DEAD_PID)
    assert job is not None and job.attempts == 3
    assert q.recover(set(), max_attempts=3) == (0, 1)
    jobs = q.list_jobs("2.1")
    assert jobs[0]["state"] == "failed" and "3 times" in jobs[0]["reason"]
    assert _state(store, "2.1") == "failed"
    # The audit trail has every transition.
    n = store.index.conn.execute("SELECT COUNT(*) FROM job_events WHERE job_id = ?", (jobs[0]["id"],)).fetchone()[0]
    assert n == 1 + 3 * 2  # queued, then (processing, queued|failed) per attempt


def test_live_worker_keeps_its_job(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    q = JobQueue(store.index)
    _series(store, "3.1")
    q.queue_jobs("3.1", [("m", 0, ["r"], [])])
    q.claim(777)
    assert q.recover({777}, max_attempts=3) == (0, 0)
    assert q.list_jobs()[0]["state"] == "processing"


def test_reopened_series_requeues_and_stale_result_is_dropped(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    q = JobQueue(store.index)
    _series(store, "4.1")
    q.queue_jobs("4.1", [("m", 0, ["r"], [])])
    job = q.claim(1)
    assert job is not None
    # A late instance arrives while the model runs: the series receives again, then completes again.
    store.index.add_instance(InstanceRecord(sop_instance_uid="4.1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                            study_uid="1.2.3", series_uid="4.1", transfer_syntax="1.2.840.10008.1.2.1",
                                            path="x/4.1.2.dcm", size=10), None, now=200.0)
    assert _state(store, "4.1") == "receiving"
    assert q.claim(1) is None  # nothing runs on a series that is receiving
    store.index.complete_quiet_series(300.0, 5.0, 1.0)
    q.queue_jobs("4.1", [("m", 0, ["r"], [])])
    assert not q.finish(job, ok=True, reason="done"), "a result of the old data must not count"
    again = q.claim(1)
    assert again is not None and again.generation == job.generation + 1 and again.attempts == 1
    assert q.finish(again, ok=True, reason="done")
    assert _state(store, "4.1") == "done"
