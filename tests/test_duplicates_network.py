"""``[storage] on_duplicate`` reaches the listeners: a corrected re-send over DICOM is kept or replaced."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from conftest import parse_storescu, run_storescu
from appliance_dev.dicom_factory import ct_dataset, dataset_bytes_of_file, encode, write_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("policy", ["keep", "replace"])
def test_conflicting_resend_over_the_network(appliance_factory: Any, tmp_path: Path, policy: str) -> None:
    app = appliance_factory(storage={"on_duplicate": policy})
    ds = ct_dataset(study_uid=generate_uid(), series_uid=generate_uid())
    write_file(ds, tmp_path / "first" / "1.dcm")
    changed = deepcopy(ds)
    changed.PixelData = bytes(len(ds.PixelData))
    write_file(changed, tmp_path / "again" / "1.dcm")
    for folder in ("first", "again"):
        res = run_storescu(app, tmp_path / folder, calling_ae="CT01")
        assert set(parse_storescu(res.stdout + res.stderr).values()) == {"Success"}, res.stdout[-2000:]
    [stored] = app.spool_files()
    expect = ds if policy == "keep" else changed
    assert dataset_bytes_of_file(stored.read_bytes()) == encode(expect)
    counters = {(r["name"], r["label"]): r["value"] for r in app.query("SELECT * FROM counters")}
    assert counters.get(("ingest_conflicting_instances", "kept" if policy == "keep" else "replaced")) == 1
    log = app.log_text()
    assert "different from the stored copy" in log and "CT01 (127.0.0.1:" in log
