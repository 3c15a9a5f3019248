"""Results back to PACS, end to end with real peers: DCMTK storescu as the modality, the appliance with a
model whose right answer is known, Orthanc or DCMTK storescp as the PACS. The PACS going down, the
appliance being killed with results unsent, and a PACS that refuses us all end without losing a result
and without sending one twice."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from conftest import Appliance
from appliance_dev.dicom_factory import blob_phantom, write_ct_volume
from appliance_dev.model_factory import hu_threshold_labels, write_package
from peers import Orthanc, StoreSCP
from test_worker import FAST, send, series_uid_of, wait_series

pytestmark = pytest.mark.slow

ROUTE = {"name": "ct", "match": {"Modality": "CT"}, "models": ["threshold-test"], "destinations": ["pacs"]}
#: Retries compressed from minutes to a fraction of a second.
QUICK_EXPORT = {"backoff_seconds": 0.3, "backoff_max_seconds": 1.0, "poll_seconds": 0.1, "timeout_seconds": 5}


def make(appliance_factory: Any, tmp_path: Path, dest: dict[str, Any], **export: Any) -> Appliance:
    models = tmp_path / "models"
    write_package(models, spacing=1.0)
    return appliance_factory(routes=[ROUTE], destinations=[{"name": "pacs", **dest}], assemble=FAST,
                             inference={"models_dir": str(models), "backend": "onnxruntime", "poll_seconds": 0.1},
                             export={**QUICK_EXPORT, **export})


def ct_series(tmp_path: Path, seed: int = 3) -> tuple[Path, np.ndarray]:
    hu = blob_phantom(10, 64, seed=seed)
    write_ct_volume(tmp_path / "ct", hu, spacing=(1.0, 1.0), thickness=2.0)
    return tmp_path / "ct", hu


def objects_of(app: Appliance, uid: str) -> dict[str, dict[str, Any]]:
    return {r["sop_instance_uid"]: dict(r) for r in app.query("SELECT * FROM result_objects WHERE series_uid = ?", (uid,))}


def dciodvfy_errors(data: bytes, tmp: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy is not installed (apt-get install dicom3tools)")
    f = tmp / "check.dcm"
    f.write_bytes(data)
    res = subprocess.run([exe, str(f)], capture_output=True, text=True, timeout=60)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


def test_series_results_reach_orthanc(appliance_factory: Any, tmp_path: Path, orthanc: Orthanc) -> None:
    import highdicom as hd

    app = make(appliance_factory, tmp_path, {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.port})
    folder, hu = ct_series(tmp_path)
    send(app, folder)
    uid = series_uid_of(folder)
    s = wait_series(app, uid, {"done", "failed", "export_failed"}, within=60)
    assert s["state"] == "done", s
    assert "3 delivery(ies) acknowledged" in s["state_reason"]

    made = objects_of(app, uid)
    assert sorted(o["kind"] for o in made.values()) == ["SC", "SEG", "SR"]
    stored = {i["SOPInstanceUID"]: i for i in orthanc.instances()}
    assert set(stored) == set(made), (stored.keys(), made.keys())
    assert sorted(i["Modality"] for i in stored.values()) == ["OT", "SEG", "SR"]
    source = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    for inst in stored.values():
        assert inst["StudyInstanceUID"] == source.StudyInstanceUID
        assert inst["PatientID"] == source.PatientID
        assert inst["SeriesInstanceUID"] != source.SeriesInstanceUID

    # What the PACS holds is valid DICOM, and the SEG it holds is the model's answer, slice for slice.
    ids = {orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]: i for i in orthanc.get("/instances")}
    labels = hu_threshold_labels(hu.astype(np.float32))
    slice_of = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID):
                int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) - 1 for f in folder.iterdir()}
    for sop, oid in ids.items():
        data = orthanc.file(oid)
        assert dciodvfy_errors(data, tmp_path) == [], made[sop]["kind"]
        if made[sop]["kind"] != "SEG":
            continue
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(data)))
        for number, value in ((1, 1), (2, 2)):
            got = np.zeros_like(labels, dtype=bool)
            for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
                if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != number:
                    continue
                ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                got[slice_of[str(ref)]] = seg.pixel_array[f] if seg.pixel_array.ndim == 3 else seg.pixel_array
            np.testing.assert_array_equal(got, labels == value, err_msg=f"segment {number}")

    states = [r["to_state"] for r in app.query("SELECT to_state FROM series_events WHERE series_uid = ? ORDER BY id", (uid,))]
    assert states[-3:] == ["processing", "exporting", "done"], states
    sent = app.query("SELECT state, attempts, last_status FROM outbox WHERE series_uid = ?", (uid,))
    assert [(r["state"], r["attempts"], r["last_status"]) for r in sent] == [("sent", 1, "0x0000")] * 3


def results_waiting_for_pacs(appliance_factory: Any, tmp_path: Path) -> tuple[StoreSCP, Any, str]:
    """A series processed while its PACS (a storescp, not started) is down: its results wait in the outbox."""
    pacs = StoreSCP(tmp_path / "pacs")
    app = make(appliance_factory, tmp_path, {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
               max_attempts=1000)
    folder, _ = ct_series(tmp_path)
    send(app, folder)
    uid = series_uid_of(folder)
    wait_series(app, uid, {"exporting"}, within=60)
    return pacs, app, uid


def delivered_once(app: Any, pacs: StoreSCP, uid: str) -> None:
    """The series ends ``done`` and the PACS got each result object exactly once."""
    s = wait_series(app, uid, {"done", "export_failed"}, within=30)
    assert s["state"] == "done", s
    time.sleep(1.0)  # anything sent twice would arrive now
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in pacs.files()}
    assert got == set(objects_of(app, uid))
    assert pacs.received_requests() == 3, "an object was sent more than once"


def test_pacs_down_then_up_delivers_everything_once(appliance_factory: Any, tmp_path: Path) -> None:
    pacs, app, uid = results_waiting_for_pacs(appliance_factory, tmp_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = app.query("SELECT attempts, last_error FROM outbox WHERE series_uid = ?", (uid,))
        if rows and min(r["attempts"] for r in rows) >= 3:
            break
        time.sleep(0.2)
    assert rows and min(r["attempts"] for r in rows) >= 3, [dict(r) for r in rows]
    assert all("cannot connect" in r["last_error"] for r in rows), [r["last_error"] for r in rows]
    listed = json.loads(app.cli("outbox", "list", "--json", "--state", "pending").stdout)
    assert len(listed) == 3 and all(r["attempts"] >= 3 for r in listed)

    pacs.start()
    try:
        delivered_once(app, pacs, uid)
    finally:
        pacs.stop()


def test_appliance_killed_with_results_unsent_delivers_after_restart(appliance_factory: Any, tmp_path: Path) -> None:
    pacs, app, uid = results_waiting_for_pacs(appliance_factory, tmp_path)
    app.kill()  # SIGKILL to the whole process group: a power cut with three results in the outbox
    pacs.start()
    try:
        app.start()
        delivered_once(app, pacs, uid)
        jobs = app.query("SELECT state, attempts FROM jobs WHERE series_uid = ?", (uid,))
        assert [(j["state"], j["attempts"]) for j in jobs] == [("done", 1)]  # the model did not run again
    finally:
        pacs.stop()


def test_destination_that_rejects_us_is_retried_then_dead_lettered(appliance_factory: Any, tmp_path: Path,
                                                                  orthanc: Orthanc) -> None:
    # Orthanc checks the called AE title: addressed as "NOTPACS" it rejects the association.
    app = make(appliance_factory, tmp_path, {"ae_title": "NOTPACS", "host": "127.0.0.1", "port": orthanc.port},
               max_attempts=3)
    folder, _ = ct_series(tmp_path)
    send(app, folder)
    uid = series_uid_of(folder)
    s = wait_series(app, uid, {"export_failed", "done"}, within=60)
    assert s["state"] == "export_failed", s
    assert "rejected" in s["state_reason"] and "outbox retry" in s["state_reason"]
    rows = app.query("SELECT id, state, attempts, last_error, last_status FROM outbox WHERE series_uid = ?", (uid,))
    assert [(r["state"], r["attempts"]) for r in rows] == [("dead", 3)] * 3
    for r in rows:
        assert "association rejected by NOTPACS@127.0.0.1" in r["last_error"]
        assert "Called AE title not recognised" in r["last_error"], r["last_error"]
        assert r["last_status"].startswith("A-ASSOCIATE-RJ")
        tries = app.query("SELECT ok, status FROM outbox_attempts WHERE outbox_id = ?", (r["id"],))
        assert len(tries) == 3 and not any(t["ok"] for t in tries)
    assert orthanc.get("/instances") == []
    assert "dead letter" in app.log_text()

    listed = app.cli("outbox", "list", "--state", "dead")
    assert listed.returncode == 0 and "Called AE title not recognised" in listed.stdout and "3 dead" in listed.stdout
    retry = app.cli("outbox", "retry", str(rows[0]["id"]))
    assert retry.returncode == 0 and "1 dead letter(s) queued again" in retry.stdout
    # Still refused, so it dies again after max_attempts more tries.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = app.query("SELECT state, attempts FROM outbox WHERE id = ?", (rows[0]["id"],))[0]
        if r["state"] == "dead" and r["attempts"] == 3:
            break
        time.sleep(0.2)
    assert (r["state"], r["attempts"]) == ("dead", 3)
    assert len(app.query("SELECT 1 FROM outbox_attempts WHERE outbox_id = ?", (rows[0]["id"],))) == 6
    assert app.cli("outbox", "retry").returncode == 2  # neither ids nor --all-dead


def test_delivered_series_is_purged_after_retention(appliance_factory: Any, tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        app = make(appliance_factory, tmp_path, {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port})
        app.terminate()
        # 2 s of retention (compressed from days); restart with it.
        text = app.config_path.read_text().replace("min_free_bytes = 0", "min_free_bytes = 0\nretention_days = 2.5e-5")
        app.config_path.write_text(text)
        app.start()
        folder, _ = ct_series(tmp_path)
        send(app, folder)
        uid = series_uid_of(folder)
        wait_series(app, uid, {"done"}, within=60)
        assert app.spool_files()
        s = wait_series(app, uid, {"purged"}, within=30)
        assert "deleted" in s["state_reason"]
        assert app.spool_files() == []
        assert not (app.data_dir / "results" / uid).exists()
        assert len(pacs.files()) == 3  # delivered before it was purged
    finally:
        pacs.stop()
