"""What the running appliance's processes are doing now, for ``appliance status`` and health checks.

The open-association count lives in the supervisor's shared memory (one slot per listener process);
other processes cannot read that, so the supervisor publishes a small snapshot file every half
second. It is ephemeral state, not a record: written atomically but not fsynced, and judged stale
when its writer is gone or it stopped being refreshed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUS_NAME = "status.json"
RUN_DIR = "run"
#: A snapshot older than this is from an appliance that is not running (or is hung).
STALE_SECONDS = 5.0


@dataclass
class ListenerStatus:
    slot: int
    pid: int | None
    alive: bool
    open_associations: int


@dataclass
class Snapshot:
    pid: int
    version: str
    started: float
    updated: float
    max_associations: int
    listeners: list[ListenerStatus] = field(default_factory=list)
    worker_pid: int | None = None
    worker_alive: bool = False

    @property
    def open_associations(self) -> int:
        return sum(max(0, ls.open_associations) for ls in self.listeners)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["open_associations"] = self.open_associations
        return d


def status_path(data_dir: Path) -> Path:
    return Path(data_dir) / RUN_DIR / STATUS_NAME


def write_snapshot(data_dir: Path, snap: Snapshot) -> None:
    path = status_path(data_dir)
    path.parent.mkdir(mode=0o750, exist_ok=True)
    tmp = path.with_name(f".{STATUS_NAME}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    with os.fdopen(fd, "w") as f:
        json.dump(snap.as_dict(), f)
    os.replace(tmp, path)


class NotRunningError(Exception):
    """No live appliance is publishing its status for this data directory."""


def read_snapshot(data_dir: Path, now: float | None = None) -> Snapshot:
    path = status_path(data_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotRunningError(f"no appliance is running on {data_dir} (no {path})") from None
    except (OSError, ValueError) as exc:
        raise NotRunningError(f"cannot read {path}: {exc}") from None
    raw.pop("open_associations", None)
    listeners = [ListenerStatus(**ls) for ls in raw.pop("listeners", [])]
    snap = Snapshot(listeners=listeners, **raw)
    now = time.time() if now is None else now
    if not _pid_alive(snap.pid):
        raise NotRunningError(f"the appliance that wrote {path} (pid {snap.pid}) is not running")
    if now - snap.updated > STALE_SECONDS:
        raise NotRunningError(
            f"the appliance (pid {snap.pid}) has not refreshed {path} for {now - snap.updated:.0f} s: hung or stopping"
        )
    return snap


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
