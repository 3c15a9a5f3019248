"""The spool: received instances as files, written so that a power cut never leaves a half file.

Every file is written under ``.incoming/`` on the same filesystem, flushed to the disk, renamed into
place and its directory flushed too; only then may the index say it exists. A crash before the
rename leaves a ``.part`` file that the next start removes; a crash after it leaves a complete file.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from appliance.errors import InvalidUIDError, MissingUIDError, StoreError
from appliance.fsio import fsync_dir, unlink_quietly

_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
UID_MAX_LENGTH = 64
INCOMING_DIR = ".incoming"
PART_SUFFIX = ".part"


def check_uid(value: object, what: str) -> str:
    """Return ``value`` as a UID string, or raise: digits and dots only, at most 64 characters.

    This is what lets a UID become a path part without any chance of ``..`` or ``/``.
    """
    uid = str(value).rstrip("\x00 ") if value is not None else ""
    if not uid:
        raise MissingUIDError(f"{what} is missing")
    if len(uid) > UID_MAX_LENGTH:
        raise InvalidUIDError(f"{what} {uid[:80]!r} is longer than {UID_MAX_LENGTH} characters")
    if not _UID_RE.fullmatch(uid):
        raise InvalidUIDError(f"{what} {uid[:80]!r} is not a DICOM UID (digits and dots only)")
    return uid


class DiskFullError(StoreError):
    """The filesystem ran out of space (or is below the configured reserve)."""


class Spool:
    """Durable file storage for instances under ``<data>/spool``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / INCOMING_DIR
        # The per-instance path work is done on str: pathlib cost ~10% of a listener's CPU.
        self._root = str(root)
        self._incoming = str(self.incoming)
        self._known_dirs: set[str] = set()
        self._dirs_lock = threading.Lock()
        self._seq = itertools.count()
        self.root.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.incoming.mkdir(mode=0o750, exist_ok=True)

    @staticmethod
    def instance_relpath(study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """Where an instance lives, relative to the spool; all three must have passed :func:`check_uid`."""
        return f"{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return self.root / self.instance_relpath(study_uid, series_uid, sop_instance_uid)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def write(self, relpath: str, chunks: Sequence[bytes | memoryview]) -> int:
        """Write ``chunks`` durably to ``relpath`` under the spool; returns the size.

        Nothing is left behind on failure.
        """
        tmp, size = self._write_part(chunks)
        self.adopt(tmp, relpath)
        return size

    def adopt(self, tmp: str, relpath: str) -> None:
        """Move a complete, already fsynced file from the incoming directory to ``relpath``, durably.

        For :meth:`write`, a :meth:`stage`d replacement, and data sets that arrived too large for
        memory and were written to the incoming directory as they came. On failure ``tmp`` is removed.
        """
        final = f"{self._root}/{relpath}"
        try:
            parent = final[: final.rindex("/")]
            self._ensure_dir(parent)
            os.rename(tmp, final)
            fsync_dir(parent)
        except OSError as exc:
            unlink_quietly(tmp)
            raise _store_error(exc, self.root, f"cannot store {final}") from exc
        except BaseException:
            unlink_quietly(tmp)
            raise

    def stage(self, chunks: Sequence[bytes | memoryview]) -> str:
        """Write ``chunks`` durably to a new ``.part`` file in the incoming directory; returns its path.

        For a file that must be complete on disk before the index changes but placed only after
        (a replacement, see ``Receiver``): :meth:`adopt` moves it into place, :meth:`discard` drops it.
        A crash leaves a ``.part`` file that the next start removes.
        """
        return self._write_part(chunks)[0]

    def _write_part(self, chunks: Sequence[bytes | memoryview]) -> tuple[str, int]:
        tmp = f"{self._incoming}/{os.getpid()}-{next(self._seq)}{PART_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                size = _write_all(fd, chunks)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            unlink_quietly(tmp)
            raise _store_error(exc, self.root, f"cannot write {tmp}") from exc
        except BaseException:
            unlink_quietly(tmp)
            raise
        return tmp, size

    @staticmethod
    def discard(tmp: str) -> None:
        """Drop a staged file that will not be placed."""
        unlink_quietly(tmp)

    def remove(self, relpath: str) -> None:
        """Delete a spool file durably (a write whose index row never committed)."""
        path = f"{self._root}/{relpath}"
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(path[: path.rindex("/")])

    def _ensure_dir(self, path: str) -> None:
        if path in self._known_dirs:
            return
        with self._dirs_lock:
            missing = []
            p = path
            while not os.path.isdir(p):
                missing.append(p)
                p = os.path.dirname(p)
            for d in reversed(missing):
                try:
                    os.mkdir(d, 0o750)
                except FileExistsError:
                    pass
                fsync_dir(os.path.dirname(d))  # the new directory entry itself must survive a power cut
            self._known_dirs.add(path)

    def remove_partials(self, pid: int | None = None) -> int:
        """Delete leftovers of interrupted writes (all, or those of one dead process)."""
        pattern = f"{pid}-*{PART_SUFFIX}" if pid is not None else f"*{PART_SUFFIX}"
        removed = 0
        for p in self.incoming.glob(pattern):
            unlink_quietly(p)
            removed += 1
        if removed:
            fsync_dir(self.incoming)
        return removed


def _store_error(exc: OSError, root: Path, what: str) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on the data filesystem at {root}")
    return StoreError(f"{what}: {exc.strerror or exc}")


def _write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> int:
    views = [memoryview(c) for c in chunks if len(c)]
    total = sum(len(v) for v in views)
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total
