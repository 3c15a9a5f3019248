"""Versioned schema migrations of the SQLite index.

Each entry moves the schema from version ``n`` to ``n + 1`` and is applied once, in order, inside a
transaction; ``PRAGMA user_version`` records how far a database has come. Never edit a released step:
append a new one, so boxes in the field upgrade in place.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the receiver: instances, series with their assembly state, associations, audit trail, counters.
    """
    CREATE TABLE series (
        series_uid      TEXT PRIMARY KEY,
        study_uid       TEXT NOT NULL,
        patient_id      TEXT,
        modality        TEXT,
        description     TEXT,
        state           TEXT NOT NULL,
        instances       INTEGER NOT NULL DEFAULT 0,
        bytes           INTEGER NOT NULL DEFAULT 0,
        first_received  REAL NOT NULL,
        last_received   REAL NOT NULL,
        state_changed   REAL NOT NULL,
        state_reason    TEXT NOT NULL,
        reopened        INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX series_state ON series(state);

    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid    TEXT NOT NULL,
        series_uid       TEXT NOT NULL REFERENCES series(series_uid),
        study_uid        TEXT NOT NULL,
        transfer_syntax  TEXT NOT NULL,
        path             TEXT NOT NULL,
        size             INTEGER NOT NULL,
        received_at      REAL NOT NULL,
        association_id   TEXT
    );
    CREATE INDEX instances_series ON instances(series_uid);

    CREATE TABLE associations (
        id          TEXT PRIMARY KEY,
        calling_ae  TEXT NOT NULL,
        peer        TEXT NOT NULL,
        listener_pid INTEGER,
        opened_at   REAL NOT NULL,
        closed_at   REAL,
        outcome     TEXT            -- NULL while open; released | aborted | lost (process died)
    );

    CREATE TABLE series_associations (
        series_uid     TEXT NOT NULL,
        association_id TEXT NOT NULL,
        PRIMARY KEY (series_uid, association_id)
    ) WITHOUT ROWID;

    CREATE TABLE series_events (
        id          INTEGER PRIMARY KEY,
        at          REAL NOT NULL,
        series_uid  TEXT NOT NULL,
        from_state  TEXT,
        to_state    TEXT NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE INDEX series_events_series ON series_events(series_uid);

    -- Every state change leaves an audit row, whichever stage made it.
    CREATE TRIGGER series_created AFTER INSERT ON series BEGIN
        INSERT INTO series_events(at, series_uid, from_state, to_state, reason)
        VALUES (NEW.state_changed, NEW.series_uid, NULL, NEW.state, NEW.state_reason);
    END;
    CREATE TRIGGER series_state_changed AFTER UPDATE OF state ON series
    WHEN OLD.state IS NOT NEW.state BEGIN
        INSERT INTO series_events(at, series_uid, from_state, to_state, reason)
        VALUES (NEW.state_changed, NEW.series_uid, OLD.state, NEW.state, NEW.state_reason);
    END;

    CREATE TABLE counters (
        name   TEXT NOT NULL,
        label  TEXT NOT NULL DEFAULT '',
        value  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (name, label)
    ) WITHOUT ROWID;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
