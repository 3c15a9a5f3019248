"""Read-only aggregates over the index for the metrics and the panel: counts by state, trails, attempts.

Every query is a grouped count on an indexed column, so a scrape of a box with 100,000 series stays cheap.
"""

from __future__ import annotations

from typing import Any

from appliance.store.index import Index
from appliance.store.states import JobState, OutboxState


class Stats:
    def __init__(self, index: Index) -> None:
        self.conn = index.conn

    def series_by_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT state, count(*) FROM series GROUP BY state")}

    def queued_by_priority(self) -> dict[int, int]:
        return {
            int(r[0]): r[1]
            for r in self.conn.execute(
                "SELECT priority, count(*) FROM jobs WHERE state = ? GROUP BY priority", (JobState.QUEUED,)
            )
        }

    def jobs_finished(self) -> dict[tuple[str, str], int]:
        """(model, done|failed) -> how many times a job of that model ended so (from the append-only trail)."""
        return {
            (r[0], r[1]): r[2]
            for r in self.conn.execute(
                "SELECT j.model, e.to_state, count(*) FROM job_events e JOIN jobs j ON j.id = e.job_id"
                " WHERE e.to_state IN (?, ?) GROUP BY j.model, e.to_state",
                (JobState.DONE, JobState.FAILED),
            )
        }

    def last_backend_per_model(self) -> dict[str, dict[str, Any]]:
        """One index probe per model (jobs_model), not a scan of every job."""
        out: dict[str, dict[str, Any]] = {}
        for (model,) in self.conn.execute("SELECT DISTINCT model FROM jobs").fetchall():
            r = self.conn.execute(
                "SELECT model, backend, precision, device FROM jobs WHERE model = ? AND backend IS NOT NULL"
                " ORDER BY id DESC LIMIT 1",
                (model,),
            ).fetchone()
            if r is not None:
                out[model] = dict(r)
        return out

    def associations(self) -> dict[str, int]:
        """Accepted associations by how they ended (``open`` while they last)."""
        return {
            r[0] or "open": r[1]
            for r in self.conn.execute("SELECT outcome, count(*) FROM associations GROUP BY outcome")
        }

    def export_attempts(self) -> dict[tuple[str, bool], int]:
        """(destination, ok) -> attempts."""
        return {
            (r[0], bool(r[1])): r[2]
            for r in self.conn.execute(
                "SELECT o.destination, a.ok, count(*) FROM outbox_attempts a JOIN outbox o ON o.id = a.outbox_id"
                " GROUP BY o.destination, a.ok"
            )
        }

    def outbox_waiting(self) -> dict[tuple[str, str], tuple[int, float | None]]:
        """(destination, pending|dead) -> (rows, oldest created_at)."""
        return {
            (r[0], r[1]): (r[2], r[3])
            for r in self.conn.execute(
                "SELECT destination, state, count(*), min(created_at) FROM outbox WHERE state IN (?, ?)"
                " GROUP BY destination, state",
                (OutboxState.PENDING, OutboxState.DEAD),
            )
        }
