"""Jobs: one row per (series, model), moved through its states by the router and the worker.

Series state follows its jobs and their results' delivery: ``queued`` once routed (or ``no_model``),
``processing`` while a job runs, ``exporting`` while results wait for their destinations, ``done`` when
every job ran and every result was delivered, ``export_failed`` when some result could not be delivered
(dead letters), ``failed`` when a job failed and none is left to run. A worker claims a
job by bumping ``attempts`` and writing its pid in one transaction, so a job held by a worker that died
is found (its pid is gone) and re-queued, until ``max_attempts`` says it is the job that kills workers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from appliance.store.index import Index

QUEUED, PROCESSING, DONE, FAILED, NO_MODEL = "queued", "processing", "done", "failed", "no_model"
EXPORTING, EXPORT_FAILED = "exporting", "export_failed"
#: Series states that follow from jobs and outbox rows (a series receiving or complete again is left alone).
SETTLED_STATES = (QUEUED, PROCESSING, EXPORTING, EXPORT_FAILED, DONE)


@dataclass(frozen=True)
class NewObject:
    """A result object a job wrote, to be recorded with the job's outcome and sent to its destinations."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    result_series_uid: str
    path: str  # relative to the data directory


def settle_series(c: Any, series_uid: str, now: float) -> None:
    """Series state from its jobs and outbox rows, unless the series is receiving again."""
    states = [r[0] for r in c.execute("SELECT state FROM jobs WHERE series_uid = ?", (series_uid,))]
    if PROCESSING in states:
        return
    if QUEUED in states:
        new, reason = QUEUED, "waiting for the worker"
    elif FAILED in states:
        failed = c.execute("SELECT model, reason FROM jobs WHERE series_uid = ? AND state = 'failed'",
                           (series_uid,)).fetchall()
        new, reason = FAILED, "; ".join(f"{m}: {r}" for m, r in failed)
    else:
        counts = dict(c.execute("SELECT state, count(*) FROM outbox WHERE series_uid = ? GROUP BY state",
                                (series_uid,)).fetchall())
        if counts.get("pending"):
            new, reason = EXPORTING, f"sending {counts['pending']} result object(s)"
        elif counts.get("dead"):
            last = c.execute("SELECT destination, last_error FROM outbox WHERE series_uid = ? AND state = 'dead'"
                             " ORDER BY id DESC LIMIT 1", (series_uid,)).fetchone()
            new, reason = EXPORT_FAILED, (f"{counts['dead']} result object(s) not delivered; "
                                          f"{last[0]}: {last[1]} (appliance outbox retry)")
        elif counts.get("sent"):
            new, reason = DONE, f"all models ran; {counts['sent']} result object(s) delivered"
        else:
            new, reason = DONE, "all models ran (no destination configured)"
    marks = ",".join("?" * len(SETTLED_STATES))
    c.execute(f"UPDATE series SET state = ?, state_changed = ?, state_reason = ?"
              f" WHERE series_uid = ? AND state IN ({marks}) AND (state <> ? OR state_reason <> ?)",
              (new, now, reason, series_uid, *SETTLED_STATES, new, reason))


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    model: str
    priority: int
    generation: int
    attempts: int
    destinations: list[str]


class JobQueue:
    def __init__(self, index: Index) -> None:
        self.index = index

    # -- router ---------------------------------------------------------------------------------------

    def complete_series_heads(self, limit: int = 50) -> list[tuple[str, str]]:
        """Complete series waiting to be routed, oldest first, with the spool path of one instance."""
        rows = self.index.conn.execute(
            "SELECT s.series_uid, (SELECT path FROM instances i WHERE i.series_uid = s.series_uid LIMIT 1)"
            " FROM series s WHERE s.state = 'complete' ORDER BY s.state_changed LIMIT ?", (limit,)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def queue_jobs(self, series_uid: str, jobs: list[tuple[str, int, list[str], list[str]]]) -> int:
        """Queue (model, priority, routes, destinations) for a complete series, or record ``no_model``.

        A series that was processed before and re-opened by a late instance re-queues its jobs under a new
        generation, so a worker still busy with the old data cannot mark the new work done.
        """
        now = time.time()
        with self.index.transaction() as c:
            state = c.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            if state is None or state[0] != "complete":
                return 0  # re-opened meanwhile: route it when it completes again
            for model, priority, routes, dests in jobs:
                c.execute(
                    "INSERT INTO jobs(series_uid, model, routes, destinations, priority, state, queued_at, reason)"
                    " VALUES (?, ?, ?, ?, ?, 'queued', ?, 'routed')"
                    " ON CONFLICT(series_uid, model) DO UPDATE SET state = 'queued', generation = generation + 1,"
                    "  attempts = 0, routes = excluded.routes, destinations = excluded.destinations,"
                    "  priority = excluded.priority, queued_at = excluded.queued_at, started_at = NULL,"
                    "  finished_at = NULL, worker_pid = NULL, reason = 'series changed: processing again'",
                    (series_uid, model, json.dumps(routes), json.dumps(dests), priority, now),
                )
            # Results of the series as it was before a late instance re-opened it are not sent any more.
            c.execute("UPDATE outbox SET state = 'superseded', last_error = 'series changed; newer results replace"
                      " these' WHERE series_uid = ? AND state IN ('pending', 'dead')", (series_uid,))
            if jobs:
                reason = "routed to " + ", ".join(j[0] for j in jobs)
                new_state = QUEUED
            else:
                reason, new_state = "no routing rule matches", NO_MODEL
            c.execute("UPDATE series SET state = ?, state_changed = ?, state_reason = ? WHERE series_uid = ?",
                      (new_state, now, reason, series_uid))
        return len(jobs)

    def mark_series_failed(self, series_uid: str, reason: str) -> None:
        with self.index.transaction() as c:
            c.execute("UPDATE series SET state = 'failed', state_changed = ?, state_reason = ? WHERE series_uid = ?",
                      (time.time(), reason, series_uid))

    # -- worker ---------------------------------------------------------------------------------------

    def claim(self, worker_pid: int) -> Job | None:
        """The next job by priority (then age) whose series is not receiving again; None if idle."""
        now = time.time()
        with self.index.transaction() as c:
            row = c.execute(
                "SELECT j.* FROM jobs j JOIN series s ON s.series_uid = j.series_uid"
                " WHERE j.state = 'queued' AND s.state IN ('queued', 'processing')"
                " ORDER BY j.priority DESC, j.queued_at, j.id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            c.execute("UPDATE jobs SET state = 'processing', attempts = attempts + 1, started_at = ?,"
                      " worker_pid = ?, reason = ? WHERE id = ?",
                      (now, worker_pid, f"attempt {row['attempts'] + 1}", row["id"]))
            c.execute("UPDATE series SET state = 'processing', state_changed = ?, state_reason = ?"
                      " WHERE series_uid = ? AND state <> 'processing'",
                      (now, f"running {row['model']}", row["series_uid"]))
        return Job(id=row["id"], series_uid=row["series_uid"], model=row["model"], priority=row["priority"],
                   generation=row["generation"], attempts=row["attempts"] + 1,
                   destinations=json.loads(row["destinations"]))

    def finish(self, job: Job, *, ok: bool, reason: str, backend: str | None = None, device: str | None = None,
               precision: str | None = None, timings: dict[str, float] | None = None,
               result_dir: str | None = None, objects: list[NewObject] | None = None) -> bool:
        """Record the outcome; False when the job was re-queued meanwhile (its result is stale).

        The job's result objects and their outbox rows (one per destination) are recorded in the same
        transaction as ``done``: a crash before it leaves the job to run again, never half an outbox.
        """
        now = time.time()
        with self.index.transaction() as c:
            cur = c.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, reason = ?, backend = ?, device = ?, precision = ?,"
                " timings = ?, result_dir = ?, worker_pid = NULL WHERE id = ? AND generation = ? AND state = 'processing'",
                (DONE if ok else FAILED, now, reason, backend, device, precision,
                 json.dumps(timings) if timings is not None else None, result_dir, job.id, job.generation),
            )
            if cur.rowcount == 0:
                return False
            for obj in objects or []:
                oid = c.execute(
                    "INSERT INTO result_objects(job_id, generation, series_uid, kind, sop_class_uid,"
                    " sop_instance_uid, result_series_uid, path, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.generation, job.series_uid, obj.kind, obj.sop_class_uid, obj.sop_instance_uid,
                     obj.result_series_uid, obj.path, now)).lastrowid
                for dest in job.destinations:
                    c.execute("INSERT INTO outbox(object_id, series_uid, destination, state, next_attempt_at,"
                              " created_at) VALUES (?, ?, ?, 'pending', ?, ?)", (oid, job.series_uid, dest, now, now))
            settle_series(c, job.series_uid, now)
        return True

    def give_back(self, job: Job) -> None:
        """A clean stop mid-job: back to the queue without counting the attempt."""
        with self.index.transaction() as c:
            c.execute("UPDATE jobs SET state = 'queued', attempts = attempts - 1, worker_pid = NULL,"
                      " reason = 'appliance stopped during the job' WHERE id = ? AND generation = ?"
                      " AND state = 'processing'", (job.id, job.generation))
            settle_series(c, job.series_uid, time.time())

    def recover(self, live_pids: set[int], max_attempts: int) -> tuple[int, int]:
        """Jobs left ``processing`` by a worker that is gone: re-queue, or fail after ``max_attempts``."""
        now = time.time()
        requeued = failed = 0
        with self.index.transaction() as c:
            rows = c.execute("SELECT id, series_uid, attempts, worker_pid FROM jobs WHERE state = 'processing'").fetchall()
            for r in rows:
                if r["worker_pid"] in live_pids:
                    continue
                if r["attempts"] >= max_attempts:
                    c.execute("UPDATE jobs SET state = 'failed', finished_at = ?, worker_pid = NULL, reason = ?"
                              " WHERE id = ?", (now, f"the worker stopped during this job {r['attempts']} times "
                                                     "(crash, kill or out of memory); giving up", r["id"]))
                    failed += 1
                else:
                    c.execute("UPDATE jobs SET state = 'queued', worker_pid = NULL, reason = ? WHERE id = ?",
                              (f"worker stopped during attempt {r['attempts']}; retrying", r["id"]))
                    requeued += 1
                settle_series(c, r["series_uid"], now)
        return requeued, failed

    # -- reading --------------------------------------------------------------------------------------

    def list_jobs(self, series_uid: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM jobs" + (" WHERE series_uid = ?" if series_uid else "") + " ORDER BY id"
        rows = self.index.conn.execute(sql, (series_uid,) if series_uid else ()).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for k in ("routes", "destinations", "timings"):
                d[k] = json.loads(d[k]) if d[k] else None
            out.append(d)
        return out
