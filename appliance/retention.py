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

from appliance.store import Store

log = logging.getLogger("appliance.retention")

PURGEABLE = ("done", "no_model")
RESULTS_DIR = "results"
#: Instances deleted per transaction: the index's write lock is held while their files are unlinked.
PURGE_BATCH = 200


class Purger:
    def __init__(self, store: Store, retention_days: float) -> None:
        self.store = store
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
        conn = self.store.index.conn
        cutoff = now - self.retention_seconds
        marks = ",".join("?" * len(PURGEABLE))
        due = [r[0] for r in conn.execute(
            f"SELECT series_uid FROM series WHERE (state IN ({marks}) AND state_changed <= ?) OR state = 'purging'"
            " ORDER BY state_changed LIMIT 100", (*PURGEABLE, cutoff))]
        purged = 0
        for series_uid in due:
            purged += self.purge_series(series_uid, cutoff)
        return purged

    def purge_series(self, series_uid: str, cutoff: float) -> int:
        """Purge one series; 1 when it ended ``purged``, 0 when it was not due or was re-opened meanwhile."""
        if not self._begin(series_uid, cutoff):
            return 0
        deleted = freed = 0
        while True:
            step = self._delete_batch(series_uid)
            if step is None:  # re-opened by a late instance: what is left is the series' again
                log.info("series %s re-opened during its purge: %d old instance(s) had been deleted, the rest is "
                         "kept", series_uid, deleted)
                return 0
            n, size = step
            deleted, freed = deleted + n, freed + size
            if n < PURGE_BATCH:
                break
        done = self._finish(series_uid, deleted)
        if done is None:
            log.info("series %s re-opened during its purge: %d old instance(s) had been deleted, results kept",
                     series_uid, deleted)
            return 0
        freed += done
        log.info("series %s purged after the retention period: %d instance(s), %.1f MB freed", series_uid,
                 deleted, freed / 1e6)
        return 1

    def _begin(self, series_uid: str, cutoff: float) -> bool:
        """Mark a due series ``purging`` (a crash leaves it so; the next pass finishes); False if not due."""
        marks = ",".join("?" * len(PURGEABLE))
        with self.store.index.transaction() as c:
            c.execute(
                f"UPDATE series SET state = 'purging', state_changed = ?, state_reason = ?"
                f" WHERE series_uid = ? AND state IN ({marks}) AND state_changed <= ?",
                (time.time(), "retention period over: deleting files", series_uid, *PURGEABLE, cutoff))
            state = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return state is not None and state[0] == "purging"

    def _delete_batch(self, series_uid: str) -> tuple[int, int] | None:
        """Delete up to PURGE_BATCH instances (files, rows and their share of the counts) in one transaction.

        The files are unlinked while the transaction holds the index's write lock, after checking that the
        series is still ``purging``: a late instance (which re-opens the series in the transaction that
        indexes it) therefore lands either before (nothing more is deleted) or after the batch (whose rows
        and counts are then gone together). Returns (instances, bytes) deleted, or None when re-opened.
        """
        root = self.store.spool.root
        with self.store.index.transaction() as c:
            state = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if state is None or state[0] != "purging":
                return None
            rows = c.execute("SELECT sop_instance_uid, path, size FROM instances WHERE series_uid = ? LIMIT ?",
                             (series_uid, PURGE_BATCH)).fetchall()
            freed = 0
            for r in rows:
                try:
                    (root / r["path"]).unlink()
                    freed += int(r["size"])
                except FileNotFoundError:  # a crash after the unlink, before the commit
                    pass
            c.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(r["sop_instance_uid"],) for r in rows])
            c.execute("UPDATE series SET instances = max(0, instances - ?), bytes = max(0, bytes - ?)"
                      " WHERE series_uid = ?", (len(rows), sum(int(r["size"]) for r in rows), series_uid))
        return len(rows), freed

    def _finish(self, series_uid: str, deleted: int) -> int | None:
        """Delete the results and mark the series ``purged``, still under the state check; bytes freed or None."""
        results = Path(self.store.data_dir) / RESULTS_DIR / series_uid
        with self.store.index.transaction() as c:
            state = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if state is None or state[0] != "purging":
                return None  # re-opened: its next run writes new results there
            freed = 0
            if results.exists():
                freed = sum(f.stat().st_size for f in results.rglob("*") if f.is_file())
                shutil.rmtree(results, ignore_errors=True)
            c.execute("UPDATE series SET state = 'purged', state_changed = ?, state_reason = ? WHERE series_uid = ?",
                      (time.time(), f"retention period over: {deleted} instance(s) and results deleted", series_uid))
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
