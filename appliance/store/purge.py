"""The index side of retention: which series are due, and the purge's steps, each under the state check.

``appliance/retention.py`` owns the policy and the files; every read and write of the index it needs is
here, so a late instance that re-opens a series (``receiving``, in the transaction that indexes it) is
seen by each step: a batch either lands before it (nothing more is deleted) or after (its rows and counts
go together).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from appliance.store.index import Index
from appliance.store.states import PURGEABLE, SERIES, SeriesState, move

#: Instances deleted per transaction: the index's write lock is held while their files are unlinked.
PURGE_BATCH = 200


class PurgeLedger:
    def __init__(self, index: Index) -> None:
        self.index = index

    def due(self, cutoff: float, limit: int = 100) -> list[str]:
        """Series finished before ``cutoff``, and any a crash left ``purging``, oldest first."""
        marks = ",".join("?" * len(PURGEABLE))
        return [
            r[0]
            for r in self.index.conn.execute(
                f"SELECT series_uid FROM series WHERE (state IN ({marks}) AND state_changed <= ?) OR state = ?"
                " ORDER BY state_changed LIMIT ?",
                (*sorted(PURGEABLE), cutoff, SeriesState.PURGING, limit),
            )
        ]

    def begin(self, series_uid: str, cutoff: float, now: float) -> bool:
        """Mark a due series ``purging`` (a crash leaves it so; the next pass finishes); False if not due."""
        with self.index.transaction() as c:  # the write lock is held from here: the check and the move are one
            row = c.execute("SELECT state, state_changed FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None:
                return False
            if row["state"] == SeriesState.PURGING:
                return True
            if row["state_changed"] > cutoff:
                return False
            return (
                move(
                    c,
                    SERIES,
                    SeriesState.PURGING,
                    where={"series_uid": series_uid},
                    only_from=PURGEABLE,
                    reason="retention period over: deleting files",
                    changed_at=now,
                )
                > 0
            )

    def delete_batch(
        self, series_uid: str, unlink: Callable[[str], int], batch: int = PURGE_BATCH
    ) -> tuple[int, int] | None:
        """Up to ``batch`` instances: ``unlink(path)`` each (bytes freed), then their rows and counts.

        All in one transaction that first checks the series is still ``purging``; None when it is not.
        """
        with self.index.transaction() as c:
            if _state(c, series_uid) != SeriesState.PURGING:
                return None
            rows = c.execute(
                "SELECT sop_instance_uid, path, size FROM instances WHERE series_uid = ? LIMIT ?", (series_uid, batch)
            ).fetchall()
            freed = sum(unlink(r["path"]) for r in rows)
            c.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(r["sop_instance_uid"],) for r in rows])
            c.execute(
                "UPDATE series SET instances = max(0, instances - ?), bytes = max(0, bytes - ?) WHERE series_uid = ?",
                (len(rows), sum(int(r["size"]) for r in rows), series_uid),
            )
        return len(rows), freed

    def finish(self, series_uid: str, deleted: int, delete_results: Callable[[], int], now: float) -> int | None:
        """``delete_results()`` (bytes freed) and mark the series ``purged``, under the state check; None if
        the series was re-opened meanwhile (its next run writes new results)."""
        with self.index.transaction() as c:
            if _state(c, series_uid) != SeriesState.PURGING:
                return None
            freed = delete_results()
            move(
                c,
                SERIES,
                SeriesState.PURGED,
                where={"series_uid": series_uid},
                changed_at=now,
                reason=f"retention period over: {deleted} instance(s) and results deleted",
            )
        return freed


def _state(c: Any, series_uid: str) -> str | None:
    row = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
    return row[0] if row is not None else None
