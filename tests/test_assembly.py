"""Series assembly end to end: complete soon after the sender releases; a late instance re-opens it."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from conftest import CALLED_AE, Appliance, parse_storescu, pynetdicom_ae, run_storescu
from appliance_dev.dicom_factory import ct_dataset, make_series

pytestmark = pytest.mark.slow

SERIES_KEYS = {"study_uid", "series_uid", "modality", "instances", "state", "first_received", "last_received"}


def one_series(app: Appliance, series_uid: str) -> dict[str, Any]:
    rows = [s for s in app.series() if s["series_uid"] == series_uid]
    assert len(rows) == 1, rows
    return rows[0]


def wait_state(app: Appliance, series_uid: str, state: str, within: float, times: int = 1) -> tuple[dict[str, Any], float]:
    """Wait until the series has entered ``state`` ``times`` times (by its audit trail: with no routes,
    the router moves a complete series on to no_model at once)."""
    start = time.monotonic()
    while True:
        s = one_series(app, series_uid)
        elapsed = time.monotonic() - start
        if sum(1 for _, to, _ in events(app, series_uid) if to == state) >= times:
            return s, elapsed
        if elapsed > within:
            pytest.fail(f"series not {state!r} within {within} s: {s}\n{app.log_tail(20)}")
        time.sleep(0.1)


def events(app: Appliance, series_uid: str) -> list[tuple[str | None, str, str]]:
    """Receiver and assembler transitions (routing's complete -> no_model left out)."""
    rows = app.query("SELECT from_state, to_state, reason FROM series_events WHERE series_uid = ? ORDER BY id",
                     (series_uid,))
    return [(r["from_state"], r["to_state"], r["reason"]) for r in rows if r["to_state"] in ("receiving", "complete")]


def test_series_completes_after_release_and_reopens(appliance_factory: Any, tmp_path: Path) -> None:
    app = appliance_factory(assemble={"stable_seconds": 30, "release_grace_seconds": 0.5, "poll_seconds": 0.2})
    series = make_series(tmp_path / "series", 20)
    study_uid, series_uid = series[0].study_uid, series[0].series_uid
    t_send = time.time()

    res = run_storescu(app, tmp_path / "series")
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(parse_storescu(res.stdout + res.stderr).values()) == ["Success"] * 20
    s, elapsed = wait_state(app, series_uid, "complete", within=3.0)
    assert elapsed <= 3.0

    # The JSON shape operators and scripts rely on.
    assert SERIES_KEYS <= set(s)
    assert s["study_uid"] == study_uid and s["series_uid"] == series_uid
    assert s["modality"] == "CT"
    assert s["instances"] == 20
    first = datetime.fromisoformat(s["first_received"])
    last = datetime.fromisoformat(s["last_received"])
    assert first.tzinfo is not None and last.tzinfo is not None, "timestamps must carry their UTC offset"
    assert first <= last
    assert abs(first.timestamp() - t_send) < 30 and abs(last.timestamp() - time.time()) < 30
    assert [(f, t) for f, t, _ in events(app, series_uid)] == [(None, "receiving"), ("receiving", "complete")]
    assert "released" in events(app, series_uid)[-1][2]
    table = app.cli("series")
    assert table.returncode == 0, table.stderr
    assert series_uid in table.stdout and "no_model" in table.stdout  # no routes in the test config
    assert "1 series, 20 instances" in table.stdout

    # A late instance of the same series re-opens it; it completes again once that sender released.
    make_series(tmp_path / "late", 1, study_uid=study_uid, series_uid=series_uid, first_number=21)
    res = run_storescu(app, tmp_path / "late")
    assert list(parse_storescu(res.stdout + res.stderr).values()) == ["Success"], res.stdout + res.stderr
    s, _ = wait_state(app, series_uid, "complete", within=3.0, times=2)
    assert s["instances"] == 21
    ev = events(app, series_uid)
    assert [(f, t) for f, t, _ in ev] == [(None, "receiving"), ("receiving", "complete"),
                                          ("no_model", "receiving"), ("receiving", "complete")]
    assert "late" in ev[2][2]
    assert app.query("SELECT reopened FROM series WHERE series_uid = ?", (series_uid,))[0]["reopened"] == 1


def _send_and_hold(app: Appliance, ds: pydicom.Dataset) -> Any:
    ae = pynetdicom_ae("HOLDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", app.port, ae_title=CALLED_AE)
    assert assoc.is_established
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    rsp = assoc.send_c_store(ds)
    assert rsp.Status == 0x0000
    return assoc


def test_series_stays_receiving_while_sender_holds_association(appliance_factory: Any, tmp_path: Path) -> None:
    app = appliance_factory(assemble={"stable_seconds": 30, "release_grace_seconds": 0.5, "poll_seconds": 0.2})
    series = make_series(tmp_path / "series", 3)
    study_uid, series_uid = series[0].study_uid, series[0].series_uid
    res = run_storescu(app, tmp_path / "series")
    assert res.returncode == 0
    wait_state(app, series_uid, "complete", within=3.0)

    # A late instance on an association that stays open: re-opened, and not complete while open.
    assoc = _send_and_hold(app, ct_dataset(study_uid=study_uid, series_uid=series_uid, number=4))
    try:
        assert one_series(app, series_uid)["state"] == "receiving"
        time.sleep(2.0)  # well past grace + poll
        s = one_series(app, series_uid)
        assert s["state"] == "receiving" and s["instances"] == 4
    finally:
        assoc.release()
    wait_state(app, series_uid, "complete", within=3.0, times=2)

    # An aborted association is not a finished sender: the release rule must not complete the series.
    assoc = _send_and_hold(app, ct_dataset(study_uid=study_uid, series_uid=series_uid, number=5))
    assoc.abort()
    time.sleep(2.0)
    s = one_series(app, series_uid)
    assert s["state"] == "receiving", "an aborted association completed the series"
    assert s["instances"] == 5
    outcomes = [r["outcome"] for r in app.query("SELECT outcome FROM associations ORDER BY opened_at")]
    assert outcomes[-1] == "aborted"


def test_series_completes_by_stable_rule(appliance_factory: Any) -> None:
    """The sender aborts (so the release rule cannot apply); stable_seconds completes the series."""
    app = appliance_factory(assemble={"stable_seconds": 1.5, "release_grace_seconds": 0.5, "poll_seconds": 0.2})
    from pydicom.uid import generate_uid

    study_uid, series_uid = generate_uid(), generate_uid()
    t0 = time.monotonic()  # before the instance arrives, so completion cannot come before t0 + 1.5 s
    assoc = _send_and_hold(app, ct_dataset(study_uid=study_uid, series_uid=series_uid))
    assoc.abort()
    s, _ = wait_state(app, series_uid, "complete", within=6.0)
    assert time.monotonic() - t0 >= 1.5, "completed before stable_seconds passed"
    assert "no new instance" in events(app, series_uid)[-1][2]
