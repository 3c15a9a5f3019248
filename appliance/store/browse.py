"""Read-only queries for the technician panel and its JSON API: series search and paging, one series'
whole trail, the dashboard's aggregates, the queue and the outbox, and the destinations on hold.

Every list is bounded (``LIMIT``) and filtered on indexed columns where the filter allows it, so the pages
stay fast with 100,000 series in the store. Rows come back as plain dicts; the panel's query layer shapes
them for pages and API alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from appliance.store.index import Index
from appliance.store.states import JobState, OutboxState, SeriesState

_SERIES_COLUMNS = (
    "series_uid, study_uid, patient_id, patient_name, accession, study_date, series_number, modality,"
    " description, instances, bytes, state, state_reason, state_changed, first_received, last_received, reopened"
)
MAX_PAGE = 200


@dataclass(frozen=True)
class SeriesFilter:
    """What the series list is searched by; empty fields match everything."""

    text: str = ""  # patient name, patient ID or accession number (substring, case-insensitive)
    modality: str = ""
    state: str = ""
    received_from: float | None = None  # epoch seconds, inclusive
    received_to: float | None = None  # epoch seconds, exclusive

    def where(self) -> tuple[str, list[object]]:
        conds: list[str] = []
        args: list[object] = []
        if self.text:
            like = "%" + self.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            conds.append(
                "(patient_name LIKE ? ESCAPE '\\' OR patient_id LIKE ? ESCAPE '\\' OR accession LIKE ? ESCAPE '\\')"
            )
            args += [like, like, like]
        if self.modality:
            conds.append("modality = ?")
            args.append(self.modality)
        if self.state:
            conds.append("state = ?")
            args.append(self.state)
        if self.received_from is not None:
            conds.append("first_received >= ?")
            args.append(self.received_from)
        if self.received_to is not None:
            conds.append("first_received < ?")
            args.append(self.received_to)
        return (" WHERE " + " AND ".join(conds)) if conds else "", args


class Browse:
    def __init__(self, index: Index) -> None:
        self.conn = index.conn

    # -- series -------------------------------------------------------------------------------------

    def series_page(self, flt: SeriesFilter, *, limit: int = 50, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """(matching series, one page of them, newest first)."""
        limit, offset = max(1, min(limit, MAX_PAGE)), max(0, offset)
        where, args = flt.where()
        total = self.conn.execute(f"SELECT count(*) FROM series{where}", args).fetchone()[0]
        if offset >= total:
            # Nothing on this page: skip the second pass, which for a text search that matches nothing would
            # walk every series in first_received order (~4x the count's plain scan at 100,000 series).
            return int(total), []
        rows = self.conn.execute(
            f"SELECT {_SERIES_COLUMNS} FROM series{where} ORDER BY first_received DESC, series_uid LIMIT ? OFFSET ?",
            (*args, limit, offset),
        ).fetchall()
        return int(total), [dict(r) for r in rows]

    def modalities(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT modality FROM series WHERE modality IS NOT NULL")]

    def series(self, series_uid: str) -> dict[str, Any] | None:
        r = self.conn.execute(f"SELECT {_SERIES_COLUMNS} FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return dict(r) if r else None

    def series_events(self, series_uid: str) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.conn.execute(
                "SELECT at, from_state, to_state, reason FROM series_events WHERE series_uid = ? ORDER BY id",
                (series_uid,),
            )
        ]

    def jobs(self, series_uid: str) -> list[dict[str, Any]]:
        out = []
        for r in self.conn.execute(
            "SELECT id, series_uid, model, state, priority, attempts, generation, queued_at, started_at, finished_at,"
            " reason, backend, device, precision, timings, result_dir FROM jobs WHERE series_uid = ? ORDER BY id",
            (series_uid,),
        ):
            d = dict(r)
            d["timings"] = json.loads(d["timings"]) if d["timings"] else None
            out.append(d)
        return out

    def job_events(self, job_ids: list[int]) -> list[dict[str, Any]]:
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))
        return [
            dict(r)
            for r in self.conn.execute(
                f"SELECT job_id, at, from_state, to_state, reason FROM job_events WHERE job_id IN ({marks}) ORDER BY id",
                job_ids,
            )
        ]

    def result_objects(self, series_uid: str) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.conn.execute(
                "SELECT id, job_id, generation, kind, sop_instance_uid, path, created_at FROM result_objects"
                " WHERE series_uid = ? ORDER BY id",
                (series_uid,),
            )
        ]

    def outbox_for_series(self, series_uid: str) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.conn.execute(
                "SELECT o.id, o.destination, o.state, o.attempts, o.next_attempt_at, o.created_at, o.sent_at,"
                " o.last_status, o.last_error, r.kind, r.job_id FROM outbox o JOIN result_objects r ON r.id = o.object_id"
                " WHERE o.series_uid = ? ORDER BY o.id",
                (series_uid,),
            )
        ]

    def outbox_trail(self, outbox_ids: list[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(state moves, send attempts) of the given outbox rows, oldest first."""
        if not outbox_ids:
            return [], []
        marks = ",".join("?" * len(outbox_ids))
        events = [
            dict(r)
            for r in self.conn.execute(
                f"SELECT outbox_id, at, from_state, to_state, reason FROM outbox_events WHERE outbox_id IN ({marks})"
                " ORDER BY id",
                outbox_ids,
            )
        ]
        attempts = [
            dict(r)
            for r in self.conn.execute(
                f"SELECT outbox_id, at, ok, status, detail FROM outbox_attempts WHERE outbox_id IN ({marks}) ORDER BY id",
                outbox_ids,
            )
        ]
        return events, attempts

    # -- dashboard ----------------------------------------------------------------------------------

    def states_since(self, since: float) -> dict[str, int]:
        return {
            r[0]: r[1]
            for r in self.conn.execute(
                # ``+state``: group in a temporary b-tree, so SQLite searches the first_received index for
                # today's rows instead of walking all of series_state to group in index order.
                "SELECT state, count(*) FROM series WHERE first_received >= ? GROUP BY +state",
                (since,),
            )
        }

    def queue_depth(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM jobs WHERE state = ?", (JobState.QUEUED,)).fetchone()[0])

    def running_jobs(self) -> list[dict[str, Any]]:
        return [
            dict(r)
            for r in self.conn.execute(
                "SELECT j.id, j.series_uid, j.model, j.started_at, j.backend, j.device, s.patient_name, s.modality,"
                " s.description FROM jobs j JOIN series s ON s.series_uid = j.series_uid WHERE j.state = ?"
                " ORDER BY j.started_at LIMIT 20",
                (JobState.PROCESSING,),
            )
        ]

    def needing_action(self, limit: int = 20) -> tuple[int, list[dict[str, Any]]]:
        """Series that failed inference or export: what a technician must look at."""
        states = (SeriesState.FAILED, SeriesState.EXPORT_FAILED)
        total = self.conn.execute("SELECT count(*) FROM series WHERE state IN (?, ?)", states).fetchone()[0]
        rows = self.conn.execute(
            f"SELECT {_SERIES_COLUMNS} FROM series WHERE state IN (?, ?) ORDER BY state_changed DESC LIMIT ?",
            (*states, limit),
        ).fetchall()
        return int(total), [dict(r) for r in rows]

    def received_per_hour(self, since: float) -> list[tuple[int, int, int]]:
        """(hour start, series, instances) for series first received since ``since``, by the hour they began."""
        return [
            (int(r[0]) * 3600, r[1], r[2] or 0)
            for r in self.conn.execute(
                "SELECT CAST(first_received / 3600 AS INTEGER) AS h, count(*), sum(instances) FROM series"
                " WHERE first_received >= ? GROUP BY h ORDER BY h",
                (since,),
            )
        ]

    def results_since(self, since: float) -> list[tuple[float, float]]:
        """(finished at, seconds from the series' last instance to its job's results) for jobs done since."""
        return [
            (r[0], r[1])
            for r in self.conn.execute(
                "SELECT j.finished_at, j.finished_at - s.last_received FROM jobs j"
                " JOIN series s ON s.series_uid = j.series_uid"
                " WHERE j.state = ? AND j.finished_at >= ? ORDER BY j.finished_at LIMIT 100000",
                (JobState.DONE, since),
            )
        ]

    def backends(self) -> list[dict[str, Any]]:
        """The backend, precision and device each model last ran on: one index probe per model (jobs_model)."""
        out = []
        for (model,) in self.conn.execute("SELECT DISTINCT model FROM jobs").fetchall():
            r = self.conn.execute(
                "SELECT model, backend, precision, device, finished_at FROM jobs"
                " WHERE model = ? AND backend IS NOT NULL ORDER BY id DESC LIMIT 1",
                (model,),
            ).fetchone()
            if r is not None:
                out.append(dict(r))
        return out

    # -- queue and outbox ---------------------------------------------------------------------------

    def jobs_by_state(self, states: tuple[str, ...], limit: int = 100) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(states))
        return [
            dict(r)
            for r in self.conn.execute(
                "SELECT j.id, j.series_uid, j.model, j.state, j.priority, j.attempts, j.queued_at, j.started_at,"
                " j.finished_at, j.reason, s.patient_name, s.modality, s.description FROM jobs j"
                f" JOIN series s ON s.series_uid = j.series_uid WHERE j.state IN ({marks})"
                " ORDER BY j.priority, j.queued_at LIMIT ?",
                (*states, limit),
            )
        ]

    def outbox_rows(self, state: str, limit: int = 200) -> tuple[int, list[dict[str, Any]]]:
        total = self.conn.execute("SELECT count(*) FROM outbox WHERE state = ?", (state,)).fetchone()[0]
        rows = self.conn.execute(
            "SELECT o.id, o.series_uid, o.destination, o.state, o.attempts, o.next_attempt_at, o.created_at,"
            " o.last_status, o.last_error, r.kind, s.patient_name, s.modality, s.description FROM outbox o"
            " JOIN result_objects r ON r.id = o.object_id JOIN series s ON s.series_uid = o.series_uid"
            " WHERE o.state = ? ORDER BY o.created_at DESC LIMIT ?",
            (state, limit),
        ).fetchall()
        return int(total), [dict(r) for r in rows]

    def outbox_counts(self) -> dict[tuple[str, str], int]:
        return {
            (r[0], r[1]): r[2]
            for r in self.conn.execute(
                "SELECT destination, state, count(*) FROM outbox WHERE state IN (?, ?) GROUP BY destination, state",
                (OutboxState.PENDING, OutboxState.DEAD),
            )
        }

    def holds(self) -> dict[str, dict[str, Any]]:
        return {
            r["destination"]: dict(r)
            for r in self.conn.execute("SELECT destination, since, by_user, reason FROM destination_holds")
        }


def day_start(now: float | None = None) -> float:
    """Local midnight today, as epoch seconds: "today's scans" follow the clinic's clock."""
    t = time.localtime(time.time() if now is None else now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))
