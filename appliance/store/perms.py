"""File modes under the data directory: it holds patient data (names, IDs, images), so nothing there is
readable by other users of the box or writable by the group.

Files are 0640 and directories 0750, as the spool has always written its instance files. Every process
of ``appliance serve`` runs under :data:`DATA_UMASK` (the supervisor sets it; its children inherit it),
which covers what any stage writes (the SQLite index and its -wal/-shm files, locks, results, engines).
The store also creates its own files and directories with explicit modes, so a CLI command writing there
does not depend on the caller's umask, and :func:`secure_data_dir` tightens what an older version left.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("appliance.store")

#: No write for the group, nothing for others: files 0640 (0600 from mkstemp), directories 0750.
DATA_UMASK = 0o027
FILE_MODE = 0o640
DIR_MODE = 0o750


def restrict_umask() -> int:
    """Make this process (and every child it starts later) create files at most 0640, directories 0750.

    Only adds restrictions to the current umask; returns the previous one.
    """
    old = os.umask(DATA_UMASK)
    os.umask(old | DATA_UMASK)
    return old


def secure_data_dir(data_dir: Path) -> int:
    """Remove group-write and all "other" bits from the data directory and its direct entries.

    Not recursive (a spool holds millions of files): the data directory being 0750 already keeps other
    users out of everything below it, whatever older files' modes are. Returns how many modes changed.
    """
    changed = 0
    paths = [Path(data_dir)]
    try:
        paths += list(Path(data_dir).iterdir())
    except OSError:
        pass
    for p in paths:
        try:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if mode & DATA_UMASK:
                os.chmod(p, mode & ~DATA_UMASK)
                changed += 1
        except OSError as exc:  # not ours (another user's file): say so, do not fail the start
            log.warning("cannot restrict the mode of %s: %s", p, exc.strerror or exc)
    if changed:
        log.info("restricted the modes of %d path(s) in %s (no access for other users)", changed, data_dir)
    return changed


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with :data:`FILE_MODE` if it does not exist (before SQLite or a lock opens it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)
