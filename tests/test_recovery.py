"""A crash between the rename and the index commit leaves a complete, unindexed file: the next start indexes it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from conftest import run_storescu
from appliance_dev.dicom_factory import make_series


@pytest.mark.slow
def test_unindexed_spool_file_is_indexed_at_start(appliance_factory: Any, tmp_path: Path) -> None:
    app = appliance_factory()
    first = make_series(tmp_path / "sent", 2)
    assert run_storescu(app, tmp_path / "sent").returncode == 0
    assert app.terminate() == 0
    # What a kill -9 right after os.rename() leaves: a complete file in place, no index row.
    late = make_series(tmp_path / "late", 1, study_uid=first[0].study_uid, series_uid=first[0].series_uid)[0]
    orphan = app.spool / late.study_uid / late.series_uid / f"{late.sop_instance_uid}.dcm"
    shutil.copyfile(late.path, orphan)
    # And one that is not DICOM at all: left in place, reported, never indexed.
    junk = app.spool / late.study_uid / late.series_uid / "1.2.3.4.dcm"
    junk.write_bytes(b"not dicom")

    app.start()
    rows = app.query("SELECT sop_instance_uid, path FROM instances WHERE series_uid = ?", (late.series_uid,))
    assert {r["sop_instance_uid"] for r in rows} == {i.sop_instance_uid for i in first} | {late.sop_instance_uid}
    [series] = app.series()
    assert series["instances"] == 3
    assert dcmread(app.spool / next(r["path"] for r in rows if r["sop_instance_uid"] == late.sop_instance_uid)
                   ).SOPInstanceUID == late.sop_instance_uid
    assert junk.exists()
    assert "cannot be recovered" in app.log_text()
