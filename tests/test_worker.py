"""Route -> infer in the running appliance: series sent by storescu come out as label maps in the store;
unmatched series are no_model; a killed worker's job completes after restart."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Appliance, parse_storescu, run_storescu
from appliance_dev.dicom_factory import blob_phantom, write_ct_volume
from appliance_dev.model_factory import hu_threshold_labels, write_package

from appliance.infer.summary import Summary

pytestmark = pytest.mark.slow

FAST = {"stable_seconds": 3, "release_grace_seconds": 0.3, "poll_seconds": 0.1}
CT_ROUTE = {"name": "ct", "match": {"Modality": "CT"}, "models": ["threshold-test"]}


def make(appliance_factory: Any, tmp_path: Path, routes: list[dict[str, Any]], spacing: float = 1.0,
         **inference: Any) -> Appliance:
    models = tmp_path / "models"
    write_package(models, spacing=spacing)
    return appliance_factory(routes=routes, assemble=FAST,
                             inference={"models_dir": str(models), "backend": "onnxruntime", "poll_seconds": 0.1,
                                        **inference})


def wait_series(app: Appliance, uid: str, states: set[str], within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = [s for s in app.series() if s["series_uid"] == uid]
        if rows and rows[0]["state"] in states:
            return rows[0]
        time.sleep(0.1)
    pytest.fail(f"series {uid} not in {states} within {within} s: {app.series()}\n{app.log_tail(30)}")


def send(app: Appliance, folder: Path) -> None:
    res = run_storescu(app, folder)
    statuses = set(parse_storescu(res.stdout + res.stderr).values())
    assert res.returncode == 0 and statuses == {"Success"}, res.stdout[-2000:] + res.stderr[-2000:]


def series_uid_of(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def test_series_is_routed_inferred_and_stored(appliance_factory: Any, tmp_path: Path) -> None:
    app = make(appliance_factory, tmp_path, [CT_ROUTE, {"name": "mr", "match": {"Modality": "MR"}, "models": ["other"]}])
    hu = blob_phantom(12, 64, seed=3)
    uids = write_ct_volume(tmp_path / "ct", hu, spacing=(1.0, 1.0), thickness=2.0)
    send(app, tmp_path / "ct")
    uid = series_uid_of(tmp_path / "ct")
    s = wait_series(app, uid, {"done", "failed"}, within=30)
    assert s["state"] == "done", s

    job = app.query("SELECT * FROM jobs WHERE series_uid = ?", (uid,))[0]
    assert job["model"] == "threshold-test" and job["state"] == "done" and job["attempts"] == 1
    assert job["backend"] == "onnxruntime" and job["device"] == "cpu"
    timings = json.loads(job["timings"])
    assert {"decode", "preprocess", "infer", "postprocess", "total"} <= set(timings)
    lm = np.load(app.data_dir / job["result_dir"] / "labelmap.npz")
    assert [str(u) for u in lm["sop_instance_uids"]] == uids
    np.testing.assert_array_equal(lm["labels"], hu_threshold_labels(hu.astype(np.float32)))
    summary = Summary.read(app.data_dir / job["result_dir"] / "summary.json")  # what was written reads back typed
    assert summary.series.series_instance_uid == uid and summary.series.slices > 0

    states = [r["to_state"] for r in app.query(
        "SELECT to_state FROM series_events WHERE series_uid = ? ORDER BY id", (uid,))]
    assert states == ["receiving", "complete", "queued", "processing", "done"]


def test_unmatched_series_is_no_model_and_missing_model_fails(appliance_factory: Any, tmp_path: Path) -> None:
    app = make(appliance_factory, tmp_path, [
        {"name": "mr", "match": {"Modality": "MR"}, "models": ["threshold-test"]},
        {"name": "chest", "match": {"Modality": "CT", "BodyPartExamined": ["CHEST"]}, "models": ["not-installed"]},
    ])
    write_ct_volume(tmp_path / "abd", blob_phantom(3, 32), body_part="ABDOMEN")
    write_ct_volume(tmp_path / "chest", blob_phantom(3, 32), body_part="CHEST")
    send(app, tmp_path / "abd")
    send(app, tmp_path / "chest")
    s = wait_series(app, series_uid_of(tmp_path / "abd"), {"no_model"}, within=15)
    assert s["state_reason"] == "no routing rule matches"
    s = wait_series(app, series_uid_of(tmp_path / "chest"), {"failed"}, within=15)
    assert "not-installed" in s["state_reason"] and "not installed" in s["state_reason"]
    assert app.running


def _wait_processing(app: Appliance, uid: str, within: float = 30, not_pid: int | None = None) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = app.query("SELECT worker_pid FROM jobs WHERE series_uid = ? AND state = 'processing'", (uid,))
        if rows and rows[0]["worker_pid"] and rows[0]["worker_pid"] != not_pid:
            return int(rows[0]["worker_pid"])
        time.sleep(0.02)
    pytest.fail(f"job never seen processing\n{app.log_tail(30)}")


def test_worker_killed_mid_job_is_replaced_and_job_completes(appliance_factory: Any, tmp_path: Path) -> None:
    # A larger series with resampling so the job lasts long enough to be caught running.
    app = make(appliance_factory, tmp_path, [CT_ROUTE], spacing=0.6)
    write_ct_volume(tmp_path / "big", blob_phantom(160, 256, seed=4), spacing=(0.8, 0.8))
    uid = series_uid_of(tmp_path / "big")
    send(app, tmp_path / "big")
    pid = _wait_processing(app, uid)
    os.kill(pid, signal.SIGKILL)
    s = wait_series(app, uid, {"done", "failed"}, within=120)
    assert s["state"] == "done", s
    job = app.query("SELECT attempts, worker_pid FROM jobs WHERE series_uid = ?", (uid,))[0]
    assert job["attempts"] == 2
    assert "inference worker" in app.log_text() and "re-queued" in app.log_text()


def test_appliance_killed_mid_job_resumes_after_restart(appliance_factory: Any, tmp_path: Path) -> None:
    app = make(appliance_factory, tmp_path, [CT_ROUTE], spacing=0.6)
    write_ct_volume(tmp_path / "big", blob_phantom(160, 256, seed=5), spacing=(0.8, 0.8))
    uid = series_uid_of(tmp_path / "big")
    send(app, tmp_path / "big")
    _wait_processing(app, uid)
    app.kill()  # SIGKILL to every process of the appliance: a power cut
    app.start()
    s = wait_series(app, uid, {"done", "failed"}, within=120)
    assert s["state"] == "done", s
    assert app.query("SELECT attempts FROM jobs WHERE series_uid = ?", (uid,))[0]["attempts"] == 2
    assert "re-queued" in app.log_text()


def test_job_that_kills_the_worker_every_time_fails_after_max_attempts(appliance_factory: Any, tmp_path: Path) -> None:
    app = make(appliance_factory, tmp_path, [CT_ROUTE], spacing=0.6, max_attempts=2)
    write_ct_volume(tmp_path / "big", blob_phantom(160, 256, seed=6), spacing=(0.8, 0.8))
    uid = series_uid_of(tmp_path / "big")
    send(app, tmp_path / "big")
    pid = None
    for _ in range(2):
        pid = _wait_processing(app, uid, not_pid=pid)
        os.kill(pid, signal.SIGKILL)
    s = wait_series(app, uid, {"failed"}, within=30)
    assert "2 times" in s["state_reason"]
    assert app.running
