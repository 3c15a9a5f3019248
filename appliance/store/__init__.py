"""The durable store: spool files plus the SQLite index, under one data directory.

Stages never share memory; they share this. The panel and metrics stages read it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import StoreError
from appliance.store.index import Index, InstanceRecord, migrate
from appliance.store.perms import DIR_MODE, create_private_file
from appliance.store.spool import DiskFullError, Spool, check_uid

__all__ = [
    "RESULTS_DIR",
    "SLICE_CACHE_DIR",
    "DiskFullError",
    "Index",
    "InstanceRecord",
    "Spool",
    "Store",
    "check_uid",
]

INDEX_NAME = "index.sqlite3"
#: Under the data directory: one folder per series and model with the job's outputs (worker writes, retention purges).
RESULTS_DIR = "results"
#: Under the data directory: the panel's rendered slices, one folder per series (panel writes, retention purges).
SLICE_CACHE_DIR = "cache/slices"


@dataclass
class Store:
    data_dir: Path
    spool: Spool
    index: Index

    @classmethod
    def open(cls, data_dir: Path, *, create: bool = True) -> Store:
        """Open (and on first use create and migrate) the store under ``data_dir``."""
        data_dir = Path(data_dir).absolute()
        db = data_dir / INDEX_NAME
        if not create and not db.exists():
            raise StoreError(f"no appliance data under {data_dir} (no {INDEX_NAME}); is data_dir right?")
        try:
            data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            spool = Spool(data_dir / "spool")
            if create:
                create_private_file(db)  # 0640 whatever the umask; SQLite gives -wal and -shm the same mode
        except OSError as exc:
            raise StoreError(f"cannot use data directory {data_dir}: {exc.strerror or exc}") from exc
        if not os.access(data_dir, os.W_OK):
            raise StoreError(f"data directory {data_dir} is not writable by this user")
        migrate(db)
        return cls(data_dir=data_dir, spool=spool, index=Index(db))
