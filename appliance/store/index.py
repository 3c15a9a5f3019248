"""The SQLite index: the single source of truth for what was received and where each series stands.

WAL mode with ``synchronous=FULL``: a commit that returned is on the disk, so a C-STORE may be answered
Success right after it. Several processes (listeners, assembler, CLI) share the file; each thread
gets its own connection because sqlite3 connections are not thread-safe.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.dicomio import modality_label
from appliance.errors import StoreError
from appliance.store import histograms
from appliance.store.schema import MIGRATIONS, SCHEMA_VERSION
from appliance.store.states import SERIES, SeriesState, Sql, move

_BUSY_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: str
    size: int
    patient_id: str | None = None
    modality: str | None = None
    description: str | None = None
    patient_name: str | None = None
    accession: str | None = None
    study_date: str | None = None
    series_number: int | None = None


def connect(db_path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{db_path}?mode=ro",
            uri=True,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
    else:
        conn = sqlite3.connect(db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


def migrate(db_path: Path) -> int:
    """Bring the database to :data:`SCHEMA_VERSION`; returns the version it started at."""
    conn = connect(db_path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        start = conn.execute("PRAGMA user_version").fetchone()[0]
        if start > SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            raise StoreError(
                f"the index {db_path} has schema version {start}, newer than this software's "
                f"{SCHEMA_VERSION}: install the newer appliance version or restore a backup"
            )
        for version in range(start, SCHEMA_VERSION):
            for statement in _split_sql(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
        conn.execute("COMMIT")
        return start
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise StoreError(f"cannot prepare the index {db_path}: {exc}") from exc
    finally:
        conn.close()


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (``BEGIN ... END;``) whole."""
    statements, current = [], []
    for line in script.splitlines():
        current.append(line)
        candidate = "\n".join(current).strip()
        if candidate.endswith(";") and sqlite3.complete_statement(candidate):
            statements.append(candidate)
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return statements


class Index:
    """Typed operations on the index; one connection per thread, opened lazily."""

    def __init__(self, db_path: Path, *, readonly: bool = False) -> None:
        self.db_path = db_path
        self.readonly = readonly
        self._local = threading.local()
        #: (series, association) links already committed, so most instances skip that statement.
        self._linked: set[tuple[str, str | None]] = set()

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.db_path, readonly=self.readonly)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- ingest -------------------------------------------------------------------------------------

    def has_instance(self, sop_instance_uid: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        return row is not None

    def add_instance(
        self,
        rec: InstanceRecord,
        association_id: str | None,
        now: float | None = None,
        store_seconds: float | None = None,
    ) -> bool:
        """Index a durably written instance; raises ``_Duplicate`` when it was already there.

        One transaction: the series (created, counted, re-opened when it had been complete), the
        instance row and, once per association and series, the link that assembly uses. Three
        statements and one commit: this runs for every instance received.
        """
        now = time.time() if now is None else now
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            _touch_series(conn, rec, now, "late instance re-opened the series")
            cur = conn.execute(
                _INSERT_INSTANCE + " ON CONFLICT(sop_instance_uid) DO NOTHING",
                _instance_row(rec, now, association_id),
            )
            if cur.rowcount == 0:
                # Lost a race with the same instance on another association: undo the series touch.
                raise _Duplicate
            # What the metrics export as received totals: counted here, in the instance's own transaction,
            # so they never go backwards (rows are purged; these are not).
            conn.execute(
                "INSERT INTO counters(name, label, value) VALUES ('ingest_instances', ?, 1), ('ingest_bytes', '', ?)"
                " ON CONFLICT(name, label) DO UPDATE SET value = value + excluded.value",
                (modality_label(rec.modality), rec.size),
            )
            if store_seconds is not None:  # from the data set in memory to here (file durable, row about to commit)
                histograms.observe(conn, "store_seconds", histograms.STORE, store_seconds)
            link = (rec.series_uid, association_id)
            if association_id is not None and link not in self._linked:
                conn.execute(
                    "INSERT OR IGNORE INTO series_associations(series_uid, association_id) VALUES (?, ?)", link
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if association_id is not None:
            self._linked.add(link)
            if len(self._linked) > 10_000:  # a cache, not a record: the rows are in the table
                self._linked.clear()
        return True

    def add_instance_idempotent(
        self, rec: InstanceRecord, association_id: str | None, store_seconds: float | None = None
    ) -> bool:
        try:
            return self.add_instance(rec, association_id, store_seconds=store_seconds)
        except _Duplicate:
            return False

    def instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        return dict(row) if row is not None else None

    def replace_instance(
        self, rec: InstanceRecord, association_id: str | None, now: float | None = None
    ) -> dict[str, Any] | None:
        """Point an instance's row at a re-sent, different copy, and re-open its series like a late instance.

        One transaction: the old copy leaves its series' counts, the new one enters (the same series, or
        the one its header now names, both re-opened), the row takes the new path, size and transfer
        syntax. A re-opened series is routed and processed again; results from the old copy are discarded
        (``JobQueue.queue_jobs``). Returns the old row (None when it had gone meanwhile: then this is an
        ordinary new instance). The caller writes the new file so that it is in place when this returns,
        or right after (see ``Receiver``), and deletes the old file if its path differs.
        """
        now = time.time() if now is None else now
        reason = f"instance {rec.sop_instance_uid} replaced by a different copy: re-opened the series"
        with self.transaction() as conn:
            old = conn.execute("SELECT * FROM instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,)).fetchone()
            if old is not None:
                conn.execute(
                    "UPDATE series SET instances = instances - 1, bytes = max(0, bytes - ?) WHERE series_uid = ?",
                    (old["size"], old["series_uid"]),
                )
                if old["series_uid"] != rec.series_uid:
                    conn.execute("UPDATE series SET last_received = ? WHERE series_uid = ?", (now, old["series_uid"]))
                    reopen(
                        conn,
                        old["series_uid"],
                        now,
                        f"instance {rec.sop_instance_uid} moved to another series: re-opened the series",
                    )
            _touch_series(conn, rec, now, reason)
            conn.execute(
                _INSERT_INSTANCE
                + " ON CONFLICT(sop_instance_uid) DO UPDATE SET sop_class_uid = excluded.sop_class_uid,"
                "  series_uid = excluded.series_uid, study_uid = excluded.study_uid,"
                "  transfer_syntax = excluded.transfer_syntax, path = excluded.path, size = excluded.size,"
                "  received_at = excluded.received_at, association_id = excluded.association_id",
                _instance_row(rec, now, association_id),
            )
            if association_id is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO series_associations(series_uid, association_id) VALUES (?, ?)",
                    (rec.series_uid, association_id),
                )
        return dict(old) if old is not None else None

    def association_peer(self, association_id: str | None) -> str | None:
        """``host:port`` of an association's caller, as recorded when it was established."""
        if association_id is None:
            return None
        row = self.conn.execute("SELECT peer FROM associations WHERE id = ?", (association_id,)).fetchone()
        return row[0] if row is not None else None

    def open_association(self, association_id: str, calling_ae: str, peer: str) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO associations(id, calling_ae, peer, listener_pid, opened_at) VALUES (?, ?, ?, ?, ?)",
                (association_id, calling_ae, peer, os.getpid(), time.time()),
            )

    def close_association(self, association_id: str, outcome: str) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE associations SET closed_at = ?, outcome = ? WHERE id = ? AND outcome IS NULL",
                (time.time(), outcome, association_id),
            )

    def mark_lost_associations(self, listener_pid: int | None = None) -> int:
        """Associations still open in the index whose process died (all, or one listener's): they
        never released, so only the idle rule may complete their series."""
        with self.transaction() as c:
            if listener_pid is None:
                cur = c.execute(
                    "UPDATE associations SET outcome = 'lost', closed_at = ? WHERE outcome IS NULL", (time.time(),)
                )
            else:
                cur = c.execute(
                    "UPDATE associations SET outcome = 'lost', closed_at = ? WHERE outcome IS NULL AND listener_pid = ?",
                    (time.time(), listener_pid),
                )
            return cur.rowcount

    def count(self, name: str, label: str = "", n: int = 1) -> None:
        """Add to a counter (rejections, duplicates...): what the metrics stage will export."""
        with self.transaction() as c:
            c.execute(
                "INSERT INTO counters(name, label, value) VALUES (?, ?, ?)"
                " ON CONFLICT(name, label) DO UPDATE SET value = value + excluded.value",
                (name, label, n),
            )

    def counters(self) -> dict[tuple[str, str], int]:
        return {(r["name"], r["label"]): r["value"] for r in self.conn.execute("SELECT * FROM counters")}

    # -- assemble -----------------------------------------------------------------------------------

    def complete_quiet_series(self, now: float, stable_seconds: float, grace_seconds: float) -> list[str]:
        """Mark series complete that went quiet or whose every delivering association released.

        The release rule needs every association that delivered to the series to have released
        normally (an abort or a crash means the sender may not be finished) and the grace to have
        passed since the last of those releases.
        """
        with self.transaction() as c:
            quiet = [
                r[0]
                for r in c.execute(
                    "SELECT series_uid FROM series WHERE state = ? AND last_received <= ?",
                    (SeriesState.RECEIVING, now - stable_seconds),
                )
            ]
            released = [
                r[0]
                for r in c.execute(
                    "SELECT s.series_uid FROM series s"
                    " JOIN series_associations sa ON sa.series_uid = s.series_uid"
                    " JOIN associations a ON a.id = sa.association_id"
                    " WHERE s.state = ? AND s.last_received > ?"
                    " GROUP BY s.series_uid"
                    " HAVING SUM(a.outcome IS NOT 'released') = 0"
                    "    AND MAX(a.closed_at) <= ? AND MAX(a.closed_at) >= s.last_received",
                    (SeriesState.RECEIVING, now - stable_seconds, now - grace_seconds),
                )
            ]
            for uids, reason in (
                (quiet, f"no new instance for {stable_seconds:g} s"),
                (released, f"sender released the association {grace_seconds:g} s ago"),
            ):
                for u in uids:
                    move(c, SERIES, SeriesState.COMPLETE, where={"series_uid": u}, reason=reason, changed_at=now)
        return quiet + released

    # -- reading ------------------------------------------------------------------------------------

    def list_series(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT study_uid, series_uid, modality, instances, state, first_received, last_received,"
            " patient_id, description, bytes, reopened, state_reason FROM series ORDER BY first_received"
        ).fetchall()
        return [dict(r) for r in rows]

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM instances WHERE series_uid = ? ORDER BY received_at", (series_uid,)
        ).fetchall()
        return [dict(r) for r in rows]

    def series_instance_counts(self) -> dict[str, int]:
        """Instances indexed per series: start-up recovery compares them with the spool's file counts."""
        return {r[0]: r[1] for r in self.conn.execute("SELECT series_uid, instances FROM series")}

    def instance_uids(self, series_uid: str) -> set[str]:
        return {
            r[0]
            for r in self.conn.execute("SELECT sop_instance_uid FROM instances WHERE series_uid = ?", (series_uid,))
        }

    def series_events(self, series_uid: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT at, from_state, to_state, reason FROM series_events WHERE series_uid = ? ORDER BY id",
            (series_uid,),
        ).fetchall()
        return [dict(r) for r in rows]


#: An instance row; the caller adds what happens when the SOP Instance UID is indexed already.
_INSERT_INSTANCE = (
    "INSERT INTO instances(sop_instance_uid, sop_class_uid, series_uid, study_uid, transfer_syntax,"
    " path, size, received_at, association_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _instance_row(rec: InstanceRecord, now: float, association_id: str | None) -> tuple[object, ...]:
    return (
        rec.sop_instance_uid,
        rec.sop_class_uid,
        rec.series_uid,
        rec.study_uid,
        rec.transfer_syntax,
        rec.path,
        rec.size,
        now,
        association_id,
    )


def _touch_series(conn: sqlite3.Connection, rec: InstanceRecord, now: float, reopen_reason: str) -> None:
    """Count an instance into its series (created ``receiving`` on the first); re-open it if it had moved on."""
    state = conn.execute(
        "INSERT INTO series(series_uid, study_uid, patient_id, modality, description, state,"
        " instances, bytes, first_received, last_received, state_changed, state_reason,"
        " patient_name, accession, study_date, series_number)"
        " VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, 'first instance received', ?, ?, ?, ?)"
        " ON CONFLICT(series_uid) DO UPDATE SET"
        "  instances = instances + 1, bytes = bytes + excluded.bytes, last_received = excluded.last_received"
        " RETURNING state",
        (
            rec.series_uid,
            rec.study_uid,
            rec.patient_id,
            rec.modality,
            rec.description,
            SERIES.initial(SeriesState.RECEIVING),
            rec.size,
            now,
            now,
            now,
            rec.patient_name,
            rec.accession,
            rec.study_date,
            rec.series_number,
        ),
    ).fetchone()[0]
    if state != SeriesState.RECEIVING:
        reopen(conn, rec.series_uid, now, reopen_reason)


def reopen(conn: sqlite3.Connection, series_uid: str, now: float, reason: str) -> bool:
    """A series that had moved on (complete, processed, purging...) receives again: back to ``receiving``."""
    return (
        move(
            conn,
            SERIES,
            SeriesState.RECEIVING,
            where={"series_uid": series_uid},
            reason=reason,
            changed_at=now,
            also={"reopened": Sql("reopened + 1")},
        )
        > 0
    )


class _Duplicate(Exception):
    """Internal: the instance row already existed; rolls the transaction back."""
