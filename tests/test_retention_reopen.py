"""Retention racing a late instance: the purge never deletes rows or files of a series that was re-opened,
and a series' instance count always equals its instance rows, each with its file."""

from __future__ import annotations

import pathlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import appliance.retention as retention
from appliance.retention import Purger
from appliance.store import Index, InstanceRecord, Store
from appliance.store.jobs import JobQueue
from appliance.store.purge import PurgeLedger

UID = "7.1"


def _instance(store: Store, i: int, index: Index | None = None) -> None:
    rel = f"s/{UID}/{i}.dcm"
    p = store.spool.root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x" * 10)
    (index or store.index).add_instance(InstanceRecord(
        sop_instance_uid=f"{UID}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2.3", series_uid=UID,
        transfer_syntax="1.2.840.10008.1.2.1", path=rel, size=10, modality="CT"), None)


def _no_model_series(store: Store, n: int) -> None:
    for i in range(n):
        _instance(store, i)
    store.index.complete_quiet_series(time.time() + 100.0, 5.0, 1.0)
    JobQueue(store.index).queue_jobs(UID, [])  # no_model: purgeable
    results = store.data_dir / "results" / UID / "m"
    results.mkdir(parents=True)
    (results / "summary.json").write_text("{}")


def _assert_consistent(store: Store) -> dict[str, Any]:
    series = dict(store.index.conn.execute("SELECT * FROM series WHERE series_uid = ?", (UID,)).fetchone())
    rows = store.index.series_instances(UID)
    assert series["instances"] == len(rows), (series, rows)
    assert series["bytes"] == sum(r["size"] for r in rows)
    for r in rows:
        assert (store.spool.root / r["path"]).exists(), f"row {r['sop_instance_uid']} has lost its file"
    return series


def _late_instance_during_first_unlink(store: Store, monkeypatch: pytest.MonkeyPatch) -> threading.Thread:
    """At the purge's first file deletion, another process (here a thread with its own connection) indexes a
    late instance of the series; the purge gets half a second to let it in before it goes on."""
    other = Index(store.index.db_path)
    late = threading.Thread(target=_instance, args=(store, 99, other))
    real_unlink = pathlib.Path.unlink

    def unlink(self: pathlib.Path, *a: Any, **kw: Any) -> None:
        if not late.is_alive() and late.ident is None:
            late.start()
            late.join(0.5)
        real_unlink(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    return late


def test_late_instance_during_file_deletion_keeps_counts_and_files(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(tmp_path)
    _no_model_series(store, 3)
    late = _late_instance_during_first_unlink(store, monkeypatch)
    Purger(store, retention_days=1.0).tick(now=time.time() + 2 * 86400)
    late.join(30)
    assert not late.is_alive()
    series = _assert_consistent(store)
    rows = {r["sop_instance_uid"] for r in store.index.series_instances(UID)}
    assert f"{UID}.99" in rows, "the late instance must stay"
    assert series["state"] == "receiving", "the late instance re-opens the series (purged or not before it)"


def test_late_instance_across_batches_stops_the_purge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "PURGE_BATCH", 2)
    store = Store.open(tmp_path)
    _no_model_series(store, 7)
    late = _late_instance_during_first_unlink(store, monkeypatch)
    Purger(store, retention_days=1.0).tick(now=time.time() + 2 * 86400)
    late.join(30)
    _assert_consistent(store)
    assert f"{UID}.99" in {r["sop_instance_uid"] for r in store.index.series_instances(UID)}


def test_series_reopened_after_marking_loses_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    _no_model_series(store, 3)
    purger = Purger(store, retention_days=1.0)
    now = time.time() + 2 * 86400
    assert purger.ledger.begin(UID, cutoff=now - 86400, now=now)  # step 1 done (a crash here leaves 'purging')
    _instance(store, 99)  # a late instance re-opens the series
    assert purger.tick(now=now) == 0
    series = _assert_consistent(store)
    assert series["instances"] == 4 and series["state"] == "receiving"
    assert (store.data_dir / "results" / UID / "m" / "summary.json").exists()


def test_series_reopened_before_results_are_deleted_keeps_them(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(tmp_path)
    _no_model_series(store, 3)
    real_finish = PurgeLedger.finish

    def finish(self: PurgeLedger, series_uid: str, deleted: int, *args: Any) -> Any:
        _instance(store, 99)
        return real_finish(self, series_uid, deleted, *args)

    monkeypatch.setattr(PurgeLedger, "finish", finish)
    assert Purger(store, retention_days=1.0).tick(now=time.time() + 2 * 86400) == 0
    series = _assert_consistent(store)
    assert series["instances"] == 1 and series["state"] == "receiving"
    assert (store.data_dir / "results" / UID / "m" / "summary.json").exists(), \
        "results of a re-opened series are not the purge's any more"


def test_purge_in_batches_purges_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "PURGE_BATCH", 2)
    store = Store.open(tmp_path)
    _no_model_series(store, 5)
    assert Purger(store, retention_days=1.0).tick(now=time.time() + 2 * 86400) == 1
    series = _assert_consistent(store)
    assert (series["state"], series["instances"], series["bytes"]) == ("purged", 0, 0)
    assert "5 instance(s)" in series["state_reason"]
    assert not (store.data_dir / "results" / UID).exists()
    assert list((store.spool.root / "s" / UID).iterdir()) == []
