"""The outbox: one row per (result object, destination), the only way results leave the box.

Rows are written in the transaction that marks their job done (``JobQueue.finish``), so an object is
either not made yet or waiting here; nothing in memory. The sender takes rows that are due, records every
attempt, and on failure pushes ``next_attempt_at`` back exponentially with jitter until ``max_attempts``
makes the row a dead letter. A row is marked sent right after the peer's Success: a crash between the two
re-sends one object after restart (the PACS sees the same SOP Instance UID again), never loses one.
"""

from __future__ import annotations

import builtins
import random
import time
from dataclasses import dataclass
from typing import Any

from appliance.store import histograms
from appliance.store.index import Index
from appliance.store.jobs import settle_series
from appliance.store.states import OUTBOX, OutboxState, Sql, move


@dataclass(frozen=True)
class OutboxRow:
    id: int
    series_uid: str
    destination: str
    attempts: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to the data directory


def backoff(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before the next try after ``attempts`` failures: base * 2^(n-1), capped, "equal jitter".

    Half the delay is fixed and half random, so boxes that lost the same PACS do not all return at once,
    yet none retries sooner than half the nominal delay.
    """
    d = min(cap, base * (2 ** max(0, attempts - 1)))
    r = (rng or random).random()
    return d / 2 + r * d / 2


def _observe_delivered(c: Any, outbox_id: int, now: float) -> None:
    """When this row was the last of its job's results to be acknowledged: last instance -> delivered."""
    job = c.execute(
        "SELECT r.job_id, r.generation, j.model, s.last_received FROM outbox o JOIN result_objects r ON r.id = o.object_id"
        " JOIN jobs j ON j.id = r.job_id JOIN series s ON s.series_uid = j.series_uid WHERE o.id = ?",
        (outbox_id,),
    ).fetchone()
    if job is None:
        return
    left = c.execute(
        "SELECT count(*) FROM outbox o JOIN result_objects r ON r.id = o.object_id"
        " WHERE r.job_id = ? AND r.generation = ? AND o.state <> ?",
        (job["job_id"], job["generation"], OutboxState.SENT),
    ).fetchone()[0]
    if left == 0:
        histograms.observe(c, "time_to_result_seconds", histograms.WAIT, now - job["last_received"], job["model"])


class Outbox:
    def __init__(self, index: Index) -> None:
        self.index = index

    def due(self, now: float | None = None, limit: int = 100) -> list[OutboxRow]:
        """Pending rows whose next attempt is due, oldest first."""
        now = time.time() if now is None else now
        rows = self.index.conn.execute(
            "SELECT o.id, o.series_uid, o.destination, o.attempts, r.kind, r.sop_class_uid, r.sop_instance_uid,"
            " r.path FROM outbox o JOIN result_objects r ON r.id = o.object_id"
            " WHERE o.state = ? AND o.next_attempt_at <= ?"
            " AND o.destination NOT IN (SELECT destination FROM destination_holds)"
            " ORDER BY o.next_attempt_at, o.id LIMIT ?",
            (OutboxState.PENDING, now, limit),
        ).fetchall()
        return [OutboxRow(*tuple(r)) for r in rows]

    def next_due_at(self) -> float | None:
        row = self.index.conn.execute(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = ?"
            " AND destination NOT IN (SELECT destination FROM destination_holds)",
            (OutboxState.PENDING,),
        ).fetchone()
        return row[0]

    def record_sent(self, row: OutboxRow, status: str) -> None:
        now = time.time()
        with self.index.transaction() as c:
            c.execute(
                "INSERT INTO outbox_attempts(outbox_id, at, ok, status, detail) VALUES (?, ?, 1, ?, NULL)",
                (row.id, now, status),
            )
            if move(
                c,
                OUTBOX,
                OutboxState.SENT,
                where={"id": row.id},
                also={"attempts": Sql("attempts + 1"), "sent_at": now, "last_status": status, "last_error": None},
            ):
                _observe_delivered(c, row.id, now)
                settle_series(c, row.series_uid, now)

    def record_failure(
        self,
        row: OutboxRow,
        detail: str,
        status: str | None,
        *,
        max_attempts: int,
        base: float,
        cap: float,
        permanent: bool = False,
    ) -> str:
        """Count a failed attempt; the row's new state (``pending`` again, or ``dead``)."""
        now = time.time()
        with self.index.transaction() as c:
            c.execute(
                "INSERT INTO outbox_attempts(outbox_id, at, ok, status, detail) VALUES (?, ?, 0, ?, ?)",
                (row.id, now, status, detail),
            )
            cur = c.execute("SELECT attempts, state FROM outbox WHERE id = ?", (row.id,)).fetchone()
            if cur is None or cur["state"] != OutboxState.PENDING:
                return OutboxState(cur["state"]) if cur else OutboxState.DEAD
            attempts = cur["attempts"] + 1
            state = OutboxState.DEAD if permanent or attempts >= max_attempts else OutboxState.PENDING
            move(
                c,
                OUTBOX,
                state,
                where={"id": row.id},
                reason=detail,
                refresh=True,
                also={
                    "attempts": attempts,
                    "next_attempt_at": now + backoff(attempts, base, cap),
                    "last_status": status,
                },
            )
            settle_series(c, row.series_uid, now)
        return state

    def retry(self, ids: list[int] | None = None, *, all_dead: bool = False) -> int:
        """Dead letters (the given ids, or all) back to pending, due now, with a fresh attempt count."""
        if not ids and not all_dead:
            return 0
        now = time.time()
        with self.index.transaction() as c:
            if all_dead:
                rows = c.execute("SELECT id, series_uid FROM outbox WHERE state = ?", (OutboxState.DEAD,)).fetchall()
            else:
                marks = ",".join("?" * len(ids or []))
                rows = c.execute(
                    f"SELECT id, series_uid FROM outbox WHERE state = ? AND id IN ({marks})",
                    (OutboxState.DEAD, *(ids or [])),
                ).fetchall()
            for r in rows:
                move(
                    c,
                    OUTBOX,
                    OutboxState.PENDING,
                    where={"id": r["id"]},
                    reason="retry requested",
                    also={"attempts": 0, "next_attempt_at": now},
                )
            for series_uid in {r["series_uid"] for r in rows}:
                settle_series(c, series_uid, now)
        return len(rows)

    def suspend(self, destination: str, by_user: str | None, reason: str | None = None) -> bool:
        """Hold sending to ``destination`` (its PACS is down for maintenance, say): rows stay pending, untried,
        and their attempts are not spent. False when it was on hold already."""
        with self.index.transaction() as c:
            cur = c.execute(
                "INSERT INTO destination_holds(destination, since, by_user, reason) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(destination) DO NOTHING",
                (destination, time.time(), by_user, reason),
            )
            return cur.rowcount > 0

    def resume(self, destination: str) -> bool:
        """Send to ``destination`` again; what waited is due at once. False when it was not on hold."""
        now = time.time()
        with self.index.transaction() as c:
            if c.execute("DELETE FROM destination_holds WHERE destination = ?", (destination,)).rowcount == 0:
                return False
            c.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE destination = ? AND state = ? AND next_attempt_at > ?",
                (now, destination, OutboxState.PENDING, now),
            )
            return True

    def held(self) -> set[str]:
        return {r[0] for r in self.index.conn.execute("SELECT destination FROM destination_holds")}

    def list(self, state: OutboxState | str | None = None, series_uid: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT o.id, o.series_uid, o.destination, o.state, o.attempts, o.next_attempt_at, o.created_at,"
            " o.sent_at, o.last_status, o.last_error, r.kind, r.sop_instance_uid, r.path, j.model"
            " FROM outbox o JOIN result_objects r ON r.id = o.object_id JOIN jobs j ON j.id = r.job_id"
        )
        where, args = [], []
        if state:
            where.append("o.state = ?")
            args.append(state)
        if series_uid:
            where.append("o.series_uid = ?")
            args.append(series_uid)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [dict(r) for r in self.index.conn.execute(sql + " ORDER BY o.id", args).fetchall()]

    def events(self, outbox_id: int) -> builtins.list[dict[str, Any]]:  # ``list`` is a method here
        """The row's state trail: every move, oldest first."""
        return [
            dict(r)
            for r in self.index.conn.execute(
                "SELECT at, from_state, to_state, reason FROM outbox_events WHERE outbox_id = ? ORDER BY id",
                (outbox_id,),
            )
        ]

    def attempts(self, outbox_id: int) -> builtins.list[dict[str, Any]]:  # ``list`` is a method here
        return [
            dict(r)
            for r in self.index.conn.execute(
                "SELECT at, ok, status, detail FROM outbox_attempts WHERE outbox_id = ? ORDER BY id", (outbox_id,)
            )
        ]
