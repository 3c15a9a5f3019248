"""The data directory holds patient data: after a run that received instances and ran a job, nothing under
it is writable by the group or accessible to other users, whatever the umask the appliance was started with."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from appliance.store import Store
from appliance.store.perms import restrict_umask, secure_data_dir
from appliance_dev.dicom_factory import blob_phantom, write_ct_volume
from test_worker import CT_ROUTE, make, send, series_uid_of, wait_series


def _too_open(root: Path) -> list[str]:
    bad = []
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if mode & 0o027:  # group write, or anything for others
            bad.append(f"{oct(mode)} {p.relative_to(root.parent)}")
    return bad


@pytest.fixture
def permissive_umask() -> Any:
    old = os.umask(0o002)  # the appliance inherits it: the most permissive umask in common use
    yield
    os.umask(old)


@pytest.mark.slow
def test_nothing_under_data_dir_is_open_to_others(appliance_factory: Any, tmp_path: Path,
                                                   permissive_umask: None) -> None:
    app = make(appliance_factory, tmp_path, [CT_ROUTE])
    write_ct_volume(tmp_path / "ct", blob_phantom(4, 32, seed=2), spacing=(1.0, 1.0))
    send(app, tmp_path / "ct")
    uid = series_uid_of(tmp_path / "ct")
    assert wait_series(app, uid, {"done", "failed"}, within=60)["state"] == "done"
    names = {p.name for p in app.data_dir.iterdir()}
    assert {"index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm", "appliance.lock", "processes.lock",
            "spool", "results"} <= names, names
    assert list((app.data_dir / "results").rglob("summary.json")), "the job wrote no results"
    assert app.spool_files(), "no instance stored"
    assert _too_open(app.data_dir) == []
    assert app.terminate() == 0
    assert _too_open(app.data_dir) == []


def test_store_creates_private_files_under_any_umask(tmp_path: Path, permissive_umask: None) -> None:
    store = Store.open(tmp_path / "data")
    store.index.count("x")
    store.spool.write("1.2/3.4/5.6.dcm", [b"x"])
    from appliance.store.locks import hold_processes_lock, lock_data_dir

    lock_data_dir(store.data_dir).close()
    hold_processes_lock(store.data_dir).close()
    assert _too_open(store.data_dir) == []


def test_existing_data_dir_is_tightened_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o777)
    os.chmod(data, 0o755)
    (data / "index.sqlite3").touch()
    os.chmod(data / "index.sqlite3", 0o664)
    (data / "results").mkdir()
    os.chmod(data / "results", 0o775)
    assert secure_data_dir(data) == 3
    assert stat.S_IMODE(data.stat().st_mode) == 0o750
    assert stat.S_IMODE((data / "index.sqlite3").stat().st_mode) == 0o640
    assert stat.S_IMODE((data / "results").stat().st_mode) == 0o750
    assert secure_data_dir(data) == 0


def test_restrict_umask_only_adds_restrictions() -> None:
    old = os.umask(0o077)
    try:
        restrict_umask()
        assert os.umask(0o022) == 0o077
        os.umask(0o002)
        restrict_umask()
        assert os.umask(0o022) == 0o027
    finally:
        os.umask(old)
