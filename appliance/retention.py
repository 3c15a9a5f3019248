"""Retention: frees disk from series whose work is finished, ``storage.retention_days`` after it finished.

Only series in ``done`` (every result delivered, or no destination) and ``no_model`` are purged; anything
receiving, waiting, processing, exporting, failed or with dead letters is never touched, so purging can
never lose undelivered work. A series is first marked ``purging``; then its instances go in batches, each
batch's files, rows and counts in one transaction that first checks the series is still ``purging``;
finally its result files are deleted and it becomes ``purged`` in the same way (the series row, its jobs and
outbox rows stay as the audit trail). A crash in between leaves ``purging``, which the next pass finishes.
A late instance during the purge re-opens the series as usual (state ``receiving``, in the transaction that
indexes it): from then on nothing of the series is deleted, and its counts match the rows that are left.

Spool directories are left in place: the ingest listeners cache which directories exist.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from appliance.store import RESULTS_DIR, SLICE_CACHE_DIR, Store
from appliance.store.purge import PURGE_BATCH, PurgeLedger

log = logging.getLogger("appliance.retention")


class Purger:
    def __init__(self, store: Store, retention_days: float) -> None:
        self.store = store
        self.ledger = PurgeLedger(store.index)
        self.retention_seconds = retention_days * 86400.0

    @property
    def enabled(self) -> bool:
        return self.retention_seconds > 0

    def interval(self) -> float:
        """How often to look: a tenth of the retention period, between 1 s and 10 min."""
        return min(600.0, max(1.0, self.retention_seconds / 10))

    def tick(self, now: float | None = None) -> int:
        if not self.enabled:
            return 0
        now = time.time() if now is None else now
        cutoff = now - self.retention_seconds
        return sum(self.purge_series(series_uid, cutoff) for series_uid in self.ledger.due(cutoff))

    def purge_series(self, series_uid: str, cutoff: float) -> int:
        """Purge one series; 1 when it ended ``purged``, 0 when it was not due or was re-opened meanwhile."""
        if not self.ledger.begin(series_uid, cutoff, time.time()):
            return 0
        deleted = freed = 0
        while True:
            step = self.ledger.delete_batch(series_uid, self._unlink, PURGE_BATCH)
            if step is None:  # re-opened by a late instance: what is left is the series' again
                log.info(
                    "series %s re-opened during its purge: %d old instance(s) had been deleted, the rest is kept",
                    series_uid,
                    deleted,
                )
                return 0
            n, size = step
            deleted, freed = deleted + n, freed + size
            if n < PURGE_BATCH:
                break
        done = self.ledger.finish(series_uid, deleted, lambda: self._delete_results(series_uid), time.time())
        if done is None:
            log.info(
                "series %s re-opened during its purge: %d old instance(s) had been deleted, results kept",
                series_uid,
                deleted,
            )
            return 0
        freed += done
        log.info(
            "series %s purged after the retention period: %d instance(s), %.1f MB freed",
            series_uid,
            deleted,
            freed / 1e6,
        )
        return 1

    def _unlink(self, relpath: str) -> int:
        path = self.store.spool.root / relpath
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:  # a crash after the unlink, before the commit
            return 0

    def _delete_results(self, series_uid: str) -> int:
        """The series' results, and the panel's renders of its slices (patient images too)."""
        freed = 0
        for folder in (
            Path(self.store.data_dir) / RESULTS_DIR / series_uid,
            Path(self.store.data_dir) / SLICE_CACHE_DIR / series_uid,
        ):
            if not folder.exists():
                continue
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
        return freed

    def run(self, stop: threading.Event) -> None:
        if not self.enabled:
            return
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # a purge pass that fails is retried; it never blocks receiving
                log.exception("retention pass failed")
            stop.wait(self.interval())
