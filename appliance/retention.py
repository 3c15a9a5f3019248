"""Retention: frees disk from series whose work is finished, ``storage.retention_days`` after it finished.

Only series in ``done`` (every result delivered, or no destination) and ``no_model`` are purged; anything
receiving, waiting, processing, exporting, failed or with dead letters is never touched, so purging can
never lose undelivered work. A series is first marked ``purging``; its instance files and result files are
deleted; then its instance rows go and it becomes ``purged`` (the series row, its jobs and outbox rows stay
as the audit trail). A crash in between leaves ``purging``, which the next pass finishes. A late instance
during the purge re-opens the series as usual (state ``receiving``) and keeps its own new file.

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
        index = self.store.index
        marks = ",".join("?" * len(PURGEABLE))
        with index.transaction() as c:
            c.execute(
                f"UPDATE series SET state = 'purging', state_changed = ?, state_reason = ?"
                f" WHERE series_uid = ? AND state IN ({marks}) AND state_changed <= ?",
                (time.time(), "retention period over: deleting files", series_uid, *PURGEABLE, cutoff))
            state = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if state is None or state[0] != "purging":
                return 0
            rows = c.execute("SELECT sop_instance_uid, path, size FROM instances WHERE series_uid = ?",
                             (series_uid,)).fetchall()
        root = self.store.spool.root
        freed = 0
        for r in rows:
            p = root / r["path"]
            try:
                p.unlink()
                freed += int(r["size"])
            except FileNotFoundError:
                pass
        results = Path(self.store.data_dir) / RESULTS_DIR / series_uid
        if results.exists():
            freed += sum(f.stat().st_size for f in results.rglob("*") if f.is_file())
            shutil.rmtree(results, ignore_errors=True)
        with index.transaction() as c:
            c.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(r["sop_instance_uid"],) for r in rows])
            c.execute("UPDATE series SET state = 'purged', state_changed = ?, instances = instances - ?,"
                      " bytes = max(0, bytes - ?), state_reason = ? WHERE series_uid = ? AND state = 'purging'",
                      (time.time(), len(rows), sum(int(r["size"]) for r in rows),
                       f"retention period over: {len(rows)} instance(s) and results deleted", series_uid))
        log.info("series %s purged after the retention period: %d instance(s), %.1f MB freed", series_uid,
                 len(rows), freed / 1e6)
        return 1

    def run(self, stop: threading.Event) -> None:
        if not self.enabled:
            return
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # a purge pass that fails is retried; it never blocks receiving
                log.exception("retention pass failed")
            stop.wait(self.interval())
