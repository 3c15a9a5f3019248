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

from appliance.store import histograms
from appliance.store.index import Index
from appliance.store.states import JOBS, OUTBOX, SERIES, SETTLED, JobState, OutboxState, SeriesState, Sql, move

#: The worker's stages, as its job timings name them (and the stage histogram labels them).
STAGES = ("decode", "preprocess", "infer", "postprocess", "measure", "results")


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
    if JobState.PROCESSING in states:
        return
    new: SeriesState
    if JobState.QUEUED in states:
        new, reason = SeriesState.QUEUED, "waiting for the worker"
    elif JobState.FAILED in states:
        failed = c.execute(
            "SELECT model, reason FROM jobs WHERE series_uid = ? AND state = ?", (series_uid, JobState.FAILED)
        ).fetchall()
        new, reason = SeriesState.FAILED, "; ".join(f"{m}: {r}" for m, r in failed)
    else:
        counts = dict(
            c.execute(
                "SELECT state, count(*) FROM outbox WHERE series_uid = ? GROUP BY state", (series_uid,)
            ).fetchall()
        )
        if counts.get(OutboxState.PENDING):
            new, reason = (
                SeriesState.EXPORTING,
                f"{counts[OutboxState.PENDING]} delivery(ies) to send (one per result object and destination)",
            )
        elif counts.get(OutboxState.DEAD):
            last = c.execute(
                "SELECT destination, last_error FROM outbox WHERE series_uid = ? AND state = ?"
                " ORDER BY id DESC LIMIT 1",
                (series_uid, OutboxState.DEAD),
            ).fetchone()
            new, reason = (
                SeriesState.EXPORT_FAILED,
                (f"{counts[OutboxState.DEAD]} delivery(ies) failed; {last[0]}: {last[1]} (appliance outbox retry)"),
            )
        elif counts.get(OutboxState.SENT):
            new, reason = (
                SeriesState.DONE,
                f"all models ran; {counts[OutboxState.SENT]} delivery(ies) acknowledged (result objects x destinations)",
            )
        else:
            new, reason = SeriesState.DONE, "all models ran (no destination configured)"
    move(
        c, SERIES, new, where={"series_uid": series_uid}, reason=reason, changed_at=now, only_from=SETTLED, refresh=True
    )


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
            " FROM series s WHERE s.state = ? ORDER BY s.state_changed LIMIT ?",
            (SeriesState.COMPLETE, limit),
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
            if state is None or state[0] != SeriesState.COMPLETE:
                return 0  # re-opened meanwhile: route it when it completes again
            for model, priority, routes, dests in jobs:
                cols = {
                    "routes": json.dumps(routes),
                    "destinations": json.dumps(dests),
                    "priority": priority,
                    "queued_at": now,
                }
                row = c.execute(
                    "SELECT id FROM jobs WHERE series_uid = ? AND model = ?", (series_uid, model)
                ).fetchone()
                if row is None:
                    c.execute(
                        "INSERT INTO jobs(series_uid, model, routes, destinations, priority, state, queued_at,"
                        " reason) VALUES (?, ?, ?, ?, ?, ?, ?, 'routed')",
                        (
                            series_uid,
                            model,
                            cols["routes"],
                            cols["destinations"],
                            priority,
                            JOBS.initial(JobState.QUEUED),
                            now,
                        ),
                    )
                else:  # processed before: a new generation, so a worker still on the old data cannot finish it
                    move(
                        c,
                        JOBS,
                        JobState.QUEUED,
                        where={"id": row["id"]},
                        reason="series changed: processing again",
                        refresh=True,
                        also={
                            **cols,
                            "generation": Sql("generation + 1"),
                            "attempts": 0,
                            "started_at": None,
                            "finished_at": None,
                            "worker_pid": None,
                        },
                    )
            # Results of the series as it was before a late instance re-opened it are not sent any more.
            move(
                c,
                OUTBOX,
                OutboxState.SUPERSEDED,
                where={"series_uid": series_uid},
                reason="series changed; newer results replace these",
            )
            if jobs:
                reason, new_state = "routed to " + ", ".join(j[0] for j in jobs), SeriesState.QUEUED
            else:
                reason, new_state = "no routing rule matches", SeriesState.NO_MODEL
            move(c, SERIES, new_state, where={"series_uid": series_uid}, reason=reason, changed_at=now)
        return len(jobs)

    def mark_series_failed(self, series_uid: str, reason: str) -> None:
        """The router cannot route a complete series (its header is unreadable): a person must look."""
        with self.index.transaction() as c:
            move(
                c,
                SERIES,
                SeriesState.FAILED,
                where={"series_uid": series_uid},
                reason=reason,
                changed_at=time.time(),
                only_from=[SeriesState.COMPLETE],
            )

    # -- worker ---------------------------------------------------------------------------------------

    def claim(self, worker_pid: int) -> Job | None:
        """The next job by priority (then age) whose series is not receiving again; None if idle."""
        now = time.time()
        with self.index.transaction() as c:
            row = c.execute(
                "SELECT j.* FROM jobs j JOIN series s ON s.series_uid = j.series_uid"
                " WHERE j.state = ? AND s.state IN (?, ?)"
                " ORDER BY j.priority DESC, j.queued_at, j.id LIMIT 1",
                (JobState.QUEUED, SeriesState.QUEUED, SeriesState.PROCESSING),
            ).fetchone()
            if row is None:
                return None
            move(
                c,
                JOBS,
                JobState.PROCESSING,
                where={"id": row["id"]},
                reason=f"attempt {row['attempts'] + 1}",
                also={"attempts": Sql("attempts + 1"), "started_at": now, "worker_pid": worker_pid},
            )
            move(
                c,
                SERIES,
                SeriesState.PROCESSING,
                where={"series_uid": row["series_uid"]},
                reason=f"running {row['model']}",
                changed_at=now,
            )
            if row["attempts"] == 0:  # the first start of this generation: how long the series waited
                last = c.execute(
                    "SELECT last_received FROM series WHERE series_uid = ?", (row["series_uid"],)
                ).fetchone()
                if last is not None:
                    histograms.observe(c, "time_to_job_seconds", histograms.WAIT, now - last[0])
        return Job(
            id=row["id"],
            series_uid=row["series_uid"],
            model=row["model"],
            priority=row["priority"],
            generation=row["generation"],
            attempts=row["attempts"] + 1,
            destinations=json.loads(row["destinations"]),
        )

    def finish(
        self,
        job: Job,
        *,
        ok: bool,
        reason: str,
        backend: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        timings: dict[str, float] | None = None,
        result_dir: str | None = None,
        objects: list[NewObject] | None = None,
    ) -> bool:
        """Record the outcome; False when the job was re-queued meanwhile (its result is stale).

        The job's result objects and their outbox rows (one per destination) are recorded in the same
        transaction as ``done``: a crash before it leaves the job to run again, never half an outbox.
        """
        now = time.time()
        with self.index.transaction() as c:
            moved = move(
                c,
                JOBS,
                JobState.DONE if ok else JobState.FAILED,
                where={"id": job.id, "generation": job.generation},
                reason=reason,
                only_from=[JobState.PROCESSING],
                also={
                    "finished_at": now,
                    "backend": backend,
                    "device": device,
                    "precision": precision,
                    "timings": json.dumps(timings) if timings is not None else None,
                    "result_dir": result_dir,
                    "worker_pid": None,
                },
            )
            if moved == 0:
                return False
            if ok and timings:
                for stage in STAGES:
                    if stage in timings:
                        histograms.observe(c, "stage_duration_seconds", histograms.STAGE, timings[stage], stage)
            for obj in objects or []:
                oid = c.execute(
                    "INSERT INTO result_objects(job_id, generation, series_uid, kind, sop_class_uid,"
                    " sop_instance_uid, result_series_uid, path, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.id,
                        job.generation,
                        job.series_uid,
                        obj.kind,
                        obj.sop_class_uid,
                        obj.sop_instance_uid,
                        obj.result_series_uid,
                        obj.path,
                        now,
                    ),
                ).lastrowid
                for dest in job.destinations:
                    c.execute(
                        "INSERT INTO outbox(object_id, series_uid, destination, state, next_attempt_at,"
                        " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (oid, job.series_uid, dest, OUTBOX.initial(OutboxState.PENDING), now, now),
                    )
            settle_series(c, job.series_uid, now)
        return True

    def give_back(self, job: Job) -> None:
        """A clean stop mid-job: back to the queue without counting the attempt."""
        with self.index.transaction() as c:
            move(
                c,
                JOBS,
                JobState.QUEUED,
                where={"id": job.id, "generation": job.generation},
                reason="appliance stopped during the job",
                only_from=[JobState.PROCESSING],
                also={"attempts": Sql("attempts - 1"), "worker_pid": None},
            )
            settle_series(c, job.series_uid, time.time())

    def recover(self, live_pids: set[int], max_attempts: int) -> tuple[int, int]:
        """Jobs left ``processing`` by a worker that is gone: re-queue, or fail after ``max_attempts``."""
        now = time.time()
        requeued = failed = 0
        with self.index.transaction() as c:
            rows = c.execute(
                "SELECT id, series_uid, attempts, worker_pid FROM jobs WHERE state = ?", (JobState.PROCESSING,)
            ).fetchall()
            for r in rows:
                if r["worker_pid"] in live_pids:
                    continue
                if r["attempts"] >= max_attempts:
                    failed += move(
                        c,
                        JOBS,
                        JobState.FAILED,
                        where={"id": r["id"]},
                        only_from=[JobState.PROCESSING],
                        reason=f"the worker stopped during this job {r['attempts']} times "
                        "(crash, kill or out of memory); giving up",
                        also={"finished_at": now, "worker_pid": None},
                    )
                else:
                    requeued += move(
                        c,
                        JOBS,
                        JobState.QUEUED,
                        where={"id": r["id"]},
                        only_from=[JobState.PROCESSING],
                        reason=f"worker stopped during attempt {r['attempts']}; retrying",
                        also={"worker_pid": None},
                    )
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
