"""Locks on the data directory: one appliance per directory, and no recovery while a previous run lives.

``appliance.lock``: held exclusively by the supervisor; a second appliance on the same data is refused.
``processes.lock``: every process of a run holds it shared for its whole life. A process killed while
blocked in the kernel (an fsync on a busy disk) can live on for tens of seconds and still create a
file or hold the index's write lock, so a new start takes this lock exclusively, waiting for any
such process to be gone, before it recovers anything.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import IO

from appliance.errors import StoreError
from appliance.store.perms import create_private_file

log = logging.getLogger("appliance.store")

APPLIANCE_LOCK = "appliance.lock"
PROCESSES_LOCK = "processes.lock"
#: How long a start waits for processes of a killed run that are still exiting.
PREVIOUS_RUN_WAIT = 120.0


def lock_data_dir(data_dir: Path) -> IO[str]:
    create_private_file(data_dir / APPLIANCE_LOCK)
    f = open(data_dir / APPLIANCE_LOCK, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StoreError(f"another appliance is already running on data directory {data_dir}") from None
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def wait_for_previous_run(data_dir: Path, timeout: float = PREVIOUS_RUN_WAIT) -> IO[str]:
    """Hold ``processes.lock`` exclusively once no process of an earlier run is left.

    Convert it to shared (``fcntl.flock(f, LOCK_SH)``) when recovery is done.
    """
    create_private_file(data_dir / PROCESSES_LOCK)
    f = open(data_dir / PROCESSES_LOCK, "a")
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            if time.monotonic() > deadline:
                f.close()
                raise StoreError(
                    f"processes of an earlier appliance run on {data_dir} are still alive after "
                    f"{timeout:.0f} s (see `fuser {data_dir / PROCESSES_LOCK}`)"
                ) from None
            if not warned:
                log.warning("waiting for processes of the previous run to exit before recovery")
                warned = True
            time.sleep(0.2)


def hold_processes_lock(data_dir: Path) -> IO[str]:
    """Called by every child process; keep the returned file open for the life of the process."""
    create_private_file(data_dir / PROCESSES_LOCK)
    f = open(data_dir / PROCESSES_LOCK, "a")
    fcntl.flock(f, fcntl.LOCK_SH)
    return f
