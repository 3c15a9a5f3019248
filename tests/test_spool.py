"""The spool: UID checks before UIDs become paths, and durable writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from appliance.errors import InvalidUIDError, StoreError
from appliance.store import spool as spool_mod
from appliance.store.spool import DiskFullError, Spool, check_uid

# -- check_uid ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("uid", ["1", "1.2", "1.2.840.10008.5.1.4.1.1.2", "2.25." + "9" * 59, "0.0"])
def test_check_uid_accepts_uids(uid: str) -> None:
    assert check_uid(uid, "X") == uid


def test_check_uid_strips_padding() -> None:
    assert check_uid("1.2.3\x00", "X") == "1.2.3"
    assert check_uid("1.2.3 ", "X") == "1.2.3"


def test_check_uid_64_characters_is_the_limit() -> None:
    uid64 = "1." + "2" * 62
    assert len(uid64) == 64
    assert check_uid(uid64, "X") == uid64
    with pytest.raises(InvalidUIDError, match="longer than 64"):
        check_uid(uid64 + "3", "X")


@pytest.mark.parametrize("uid", [
    "1.2.3.abc/../../etc", "../../etc/passwd", "1.2/3", "1.2\\3", "/1.2.3", "1.2.3/", "..", ".",
    "1..2", ".1.2", "1.2.", "1.2.3 4", "1.2.3\n", "1,2,3", "１.２", "1.2.3\x00.4", "1.2-3", "abc",
])
def test_check_uid_refuses_path_characters_and_non_uids(uid: str) -> None:
    with pytest.raises(InvalidUIDError) as err:
        check_uid(uid, "SOP Instance UID")
    assert "SOP Instance UID" in str(err.value)
    assert "missing" not in str(err.value)


@pytest.mark.parametrize("value", [None, "", "\x00", "  ", "\x00 \x00"])
def test_check_uid_missing(value: object) -> None:
    with pytest.raises(InvalidUIDError, match="Series Instance UID is missing"):
        check_uid(value, "Series Instance UID")


def test_check_uid_accepts_pydicom_uid() -> None:
    from pydicom.uid import UID

    assert check_uid(UID("1.2.840.10008.1.2.1"), "X") == "1.2.840.10008.1.2.1"


# -- Spool.write ----------------------------------------------------------------------------------------


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def test_write_content_and_no_part_left(spool: Spool) -> None:
    rel = spool.instance_relpath("1.2", "1.2.3", "1.2.3.4")
    final = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    chunks = [b"\x00" * 128 + b"DICM", memoryview(b"meta-bytes"), b"", bytearray(b"x" * 100_000)]
    size = spool.write(rel, chunks)
    expected = b"".join(bytes(c) for c in chunks)
    assert size == len(expected)
    assert final == spool.root / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert final.read_bytes() == expected
    assert list(spool.incoming.iterdir()) == []


def test_write_large_chunks_fully(spool: Spool) -> None:
    # writev may write less than asked; the whole of every chunk must still land.
    chunks = [os.urandom(3_000_001), os.urandom(5_000_003), os.urandom(7)]
    final = spool.instance_path("1", "2", "3")
    assert spool.write(spool.instance_relpath("1", "2", "3"), chunks) == sum(map(len, chunks))
    assert final.read_bytes() == b"".join(chunks)


def test_write_replaces_atomically(spool: Spool) -> None:
    final = spool.instance_path("1", "2", "3")
    spool.write(spool.instance_relpath("1", "2", "3"), [b"first"])
    spool.write(spool.instance_relpath("1", "2", "3"), [b"second"])
    assert final.read_bytes() == b"second"
    assert list(spool.incoming.iterdir()) == []


def test_write_is_flushed_before_rename_and_directory_flushed_after(spool: Spool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The durability order: data fsynced in the temp file, renamed, then the directory fsynced."""
    events: list[tuple[str, str]] = []
    real_fdatasync, real_rename, real_fsync_dir = os.fdatasync, os.rename, spool_mod.fsync_dir

    def fdatasync(fd: int) -> None:
        events.append(("fdatasync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fdatasync(fd)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("rename", os.path.normpath(str(dst))))
        real_rename(src, dst)

    def fsync_dir(path: str | Path) -> None:
        events.append(("fsync_dir", os.path.normpath(str(path))))
        real_fsync_dir(path)

    monkeypatch.setattr(spool_mod.os, "fdatasync", fdatasync)
    monkeypatch.setattr(spool_mod.os, "rename", rename)
    monkeypatch.setattr(spool_mod, "fsync_dir", fsync_dir)

    final = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    spool.write(spool.instance_relpath("1.2", "1.2.3", "1.2.3.4"), [b"data"])

    kinds = [k for k, _ in events]
    assert kinds.count("fdatasync") == 1 and kinds.count("rename") == 1
    i_sync, i_rename = kinds.index("fdatasync"), kinds.index("rename")
    assert events[i_sync][1].endswith(".part") and str(spool.incoming) in events[i_sync][1]
    assert i_sync < i_rename
    assert events[i_rename][1] == str(final)
    # The new directories' entries are flushed in their parents before the rename ...
    before = [p for k, p in events[:i_rename] if k == "fsync_dir"]
    assert str(spool.root) in before and str(spool.root / "1.2") in before
    # ... and the file's own directory entry after it.
    assert ("fsync_dir", str(final.parent)) in events[i_rename + 1:]


def test_write_failure_leaves_no_part(spool: Spool) -> None:
    (spool.root / "1.2").write_bytes(b"a file where a directory should be")
    final = spool.instance_path("1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(StoreError):
        spool.write(spool.instance_relpath("1.2", "1.2.3", "1.2.3.4"), [b"data"])
    assert list(spool.incoming.iterdir()) == []
    assert not final.exists()


def test_disk_full_is_reported_as_such_and_leaves_no_part(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def writev(fd: int, buffers: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod.os, "writev", writev)
    final = spool.instance_path("1", "2", "3")
    with pytest.raises(DiskFullError):
        spool.write(spool.instance_relpath("1", "2", "3"), [b"data"])
    assert list(spool.incoming.iterdir()) == []
    assert not final.exists()


def test_remove_partials(spool: Spool) -> None:
    for name in ("100-0.part", "100-1.part", "200-0.part", "keep.dcm", "1000-0.part"):
        (spool.incoming / name).write_bytes(b"x")
    assert spool.remove_partials(pid=100) == 2
    assert sorted(p.name for p in spool.incoming.iterdir()) == ["1000-0.part", "200-0.part", "keep.dcm"]
    assert spool.remove_partials() == 2
    assert sorted(p.name for p in spool.incoming.iterdir()) == ["keep.dcm"]
    assert spool.remove_partials() == 0


def test_incoming_is_on_the_spool_filesystem(spool: Spool) -> None:
    # The rename that publishes a file is only atomic within one filesystem.
    assert spool.incoming.parent == spool.root
    assert os.stat(spool.incoming).st_dev == os.stat(spool.root).st_dev
