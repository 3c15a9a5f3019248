"""The worker waits (and says why) instead of failing jobs when the data disk is under half the reserve."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.store import InstanceRecord, Store
from appliance.store.jobs import JobQueue
from appliance.worker import Worker


def _queued_job(store: Store, uid: str = "1.1") -> None:
    rel = f"s/{uid}/0.dcm"
    (store.spool.root / rel).parent.mkdir(parents=True, exist_ok=True)
    (store.spool.root / rel).write_bytes(b"x")
    store.index.add_instance(InstanceRecord(sop_instance_uid=f"{uid}.0", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                            study_uid="1.2.3", series_uid=uid, transfer_syntax="1.2.840.10008.1.2.1",
                                            path=rel, size=1, modality="CT"), None, now=0.0)
    store.index.complete_quiet_series(100.0, 5.0, 1.0)
    JobQueue(store.index).queue_jobs(uid, [("no-such-model", 0, ["r"], [])])


def _job_state(store: Store) -> str:
    return store.index.conn.execute("SELECT state FROM jobs").fetchone()[0]


def test_low_disk_keeps_jobs_queued_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store.open(tmp_path)
    _queued_job(store)
    free = store.spool.free_bytes()
    worker = Worker(parse_config({"storage": {"data_dir": str(tmp_path), "min_free_bytes": 4 * free + 10**9}}), store)
    stop = threading.Event()
    with caplog.at_level(logging.WARNING, logger="appliance.worker"):
        t = threading.Thread(target=worker.run, args=(stop, 0.01))
        t.start()
        t.join(0.5)
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert _job_state(store) == "queued"  # not claimed, not failed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "under half the reserve" in warnings[0] and "wait" in warnings[0], warnings


def test_enough_disk_runs_the_job(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    _queued_job(store)
    worker = Worker(parse_config({"storage": {"data_dir": str(tmp_path), "min_free_bytes": 0}}), store)
    assert not worker.disk_too_low()
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop, 0.01))
    t.start()
    for _ in range(500):
        if _job_state(store) != "queued":
            break
        stop.wait(0.01)
    stop.set()
    t.join(10)
    # The model does not exist, so the job is claimed and fails with that reason: the loop did run it.
    row = store.index.conn.execute("SELECT state, reason FROM jobs").fetchone()
    assert row[0] == "failed" and "no-such-model" in row[1], tuple(row)
