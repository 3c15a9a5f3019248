"""The sender against an in-process pynetdicom PACS: every way a C-STORE can fail is a recorded attempt that
backs off and ends as a dead letter, never an exception that leaves the row due again at every poll."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.uid import generate_uid

from appliance.config import parse_config
from appliance.export.sender import Sender
from appliance.store import InstanceRecord, Store
from appliance.store.jobs import JobQueue, NewObject
from appliance.store.outbox import Outbox
from conftest import free_port
from appliance_dev.dicom_factory import CT_IMAGE_STORAGE, ct_dataset, write_file


class PeerLibraryBug(Exception):
    """Neither ValueError nor RuntimeError: what a socket, codec or pynetdicom fault may raise."""


@pytest.fixture
def pacs() -> Iterator[tuple[int, list[str]]]:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield port, received
    server.shutdown()


def _store_with_results(tmp_path: Path, n: int = 2) -> tuple[Store, str]:
    store = Store.open(tmp_path / "data")
    uid = generate_uid()
    store.index.add_instance(InstanceRecord(sop_instance_uid=generate_uid(), sop_class_uid=CT_IMAGE_STORAGE,
                                            study_uid="1.2.3", series_uid=uid, transfer_syntax="1.2.840.10008.1.2.1",
                                            path="x.dcm", size=1), None, now=0.0)
    store.index.complete_quiet_series(100.0, 5.0, 1.0)
    objects = []
    for i in range(n):
        ds = ct_dataset(study_uid="1.2.3", series_uid=generate_uid(), number=i + 1)
        rel = f"results/{uid}/m/obj{i}.dcm"
        write_file(ds, store.data_dir / rel)
        objects.append(NewObject(kind="SC", sop_class_uid=CT_IMAGE_STORAGE, sop_instance_uid=str(ds.SOPInstanceUID),
                                 result_series_uid=str(ds.SeriesInstanceUID), path=rel))
    q = JobQueue(store.index)
    q.queue_jobs(uid, [("m", 0, ["r"], ["pacs"])])
    job = q.claim(1)
    assert job is not None and q.finish(job, ok=True, reason="done", objects=objects)
    return store, uid


def _sender(store: Store, port: int, max_attempts: int = 3) -> Sender:
    cfg = parse_config({
        "storage": {"data_dir": str(store.data_dir)},
        "export": {"max_attempts": max_attempts, "backoff_seconds": 0.2, "backoff_max_seconds": 0.4,
                   "timeout_seconds": 5},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        "routes": [],
    })
    return Sender(cfg, store)


def test_any_exception_from_c_store_is_an_attempt_with_backoff_then_a_dead_letter(
        tmp_path: Path, pacs: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.association import Association

    def broken(self: Any, ds: Any, *a: Any, **kw: Any) -> Any:
        raise PeerLibraryBug("frame 3 went missing")

    monkeypatch.setattr(Association, "send_c_store", broken)
    port, received = pacs
    store, uid = _store_with_results(tmp_path)
    sender, outbox = _sender(store, port, max_attempts=2), Outbox(store.index)

    assert sender.tick() == 0  # the old code let PeerLibraryBug out of tick(), recording nothing
    rows = outbox.list(series_uid=uid)
    assert [(r["state"], r["attempts"]) for r in rows] == [("pending", 1), ("pending", 1)]
    for r in rows:
        assert r["next_attempt_at"] > time.time(), "a failed row must back off, not be due at the next poll"
        assert "PeerLibraryBug: frame 3 went missing" in r["last_error"]
        [attempt] = outbox.attempts(r["id"])
        assert attempt["ok"] == 0 and "PeerLibraryBug" in attempt["detail"]
    assert sender.tick() == 0 and [r["attempts"] for r in outbox.list(series_uid=uid)] == [1, 1]  # not due yet

    time.sleep(0.45)
    sender.tick()
    rows = outbox.list(series_uid=uid)
    assert [(r["state"], r["attempts"]) for r in rows] == [("dead", 2), ("dead", 2)]
    assert store.index.conn.execute("SELECT state FROM series WHERE series_uid = ?", (uid,)).fetchone()[0] == \
        "export_failed"
    assert received == []


def test_exception_that_ends_the_association_fails_the_rest_of_the_batch(
        tmp_path: Path, pacs: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.association import Association

    def drop(self: Any, ds: Any, *a: Any, **kw: Any) -> Any:
        self.abort()
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(Association, "send_c_store", drop)
    port, _ = pacs
    store, uid = _store_with_results(tmp_path, n=3)
    _sender(store, port).tick()
    rows = Outbox(store.index).list(series_uid=uid)
    assert [(r["state"], r["attempts"]) for r in rows] == [("pending", 1)] * 3
    assert "ConnectionResetError" in rows[0]["last_error"]
    assert all("ConnectionResetError" in r["last_error"] for r in rows[1:])


def test_unexpected_failure_while_associating_is_an_attempt(
        tmp_path: Path, pacs: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom import AE

    def broken(self: Any, *a: Any, **kw: Any) -> Any:
        raise PeerLibraryBug("resolver exploded")

    monkeypatch.setattr(AE, "associate", broken)
    store, uid = _store_with_results(tmp_path)
    _sender(store, pacs[0]).tick()
    rows = Outbox(store.index).list(series_uid=uid)
    assert [(r["state"], r["attempts"]) for r in rows] == [("pending", 1)] * 2
    assert "PeerLibraryBug: resolver exploded" in rows[0]["last_error"]


def test_result_file_pydicom_cannot_use_is_a_dead_letter(tmp_path: Path, pacs: tuple[int, list[str]]) -> None:
    store, uid = _store_with_results(tmp_path, n=2)
    rows = Outbox(store.index).list(series_uid=uid)
    broken = store.data_dir / rows[0]["path"]
    import pydicom

    ds = pydicom.dcmread(broken)
    del ds.SOPClassUID  # readable, but useless for a C-STORE: AttributeError before the fix
    ds.save_as(broken)
    assert _sender(store, pacs[0]).tick() == 1
    states = {r["path"]: (r["state"], r["last_error"]) for r in Outbox(store.index).list(series_uid=uid)}
    state, error = states[rows[0]["path"]]
    assert state == "dead" and "AttributeError" in error
    assert states[rows[1]["path"]][0] == "sent"
