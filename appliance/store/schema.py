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
    # 2: route and infer: one job per (series, model); series states queued/processing/done/failed/no_model.
    """
    CREATE TABLE jobs (
        id            INTEGER PRIMARY KEY,
        series_uid    TEXT NOT NULL REFERENCES series(series_uid),
        model         TEXT NOT NULL,
        routes        TEXT NOT NULL,            -- JSON list of the rules that asked for it
        destinations  TEXT NOT NULL,            -- JSON list of destination names
        priority      INTEGER NOT NULL,
        state         TEXT NOT NULL,            -- queued | processing | done | failed
        generation    INTEGER NOT NULL DEFAULT 1,  -- bumped when a re-opened series re-queues the job
        attempts      INTEGER NOT NULL DEFAULT 0,
        queued_at     REAL NOT NULL,
        started_at    REAL,
        finished_at   REAL,
        worker_pid    INTEGER,
        reason        TEXT,
        backend       TEXT,
        device        TEXT,
        precision     TEXT,
        timings       TEXT,                     -- JSON: seconds per stage
        result_dir    TEXT,                     -- relative to the data directory
        UNIQUE (series_uid, model)
    );
    CREATE INDEX jobs_state ON jobs(state, priority);

    CREATE TABLE job_events (
        id         INTEGER PRIMARY KEY,
        at         REAL NOT NULL,
        job_id     INTEGER NOT NULL,
        from_state TEXT,
        to_state   TEXT NOT NULL,
        reason     TEXT
    );
    CREATE INDEX job_events_job ON job_events(job_id);
    CREATE TRIGGER job_created AFTER INSERT ON jobs BEGIN
        INSERT INTO job_events(at, job_id, from_state, to_state, reason)
        VALUES (NEW.queued_at, NEW.id, NULL, NEW.state, NEW.reason);
    END;
    CREATE TRIGGER job_state_changed AFTER UPDATE OF state, generation ON jobs
    WHEN OLD.state IS NOT NEW.state OR OLD.generation IS NOT NEW.generation BEGIN
        INSERT INTO job_events(at, job_id, from_state, to_state, reason)
        VALUES ((julianday('now') - 2440587.5) * 86400.0, NEW.id, OLD.state, NEW.state, NEW.reason);
    END;
    """,
    # 3: results and export: the DICOM objects each job made, one outbox row per (object, destination),
    # every send attempt; series states exporting / export_failed / purged.
    """
    CREATE TABLE result_objects (
        id                INTEGER PRIMARY KEY,
        job_id            INTEGER NOT NULL REFERENCES jobs(id),
        generation        INTEGER NOT NULL,
        series_uid        TEXT NOT NULL,          -- the source series
        kind              TEXT NOT NULL,          -- SEG | SR | SC
        sop_class_uid     TEXT NOT NULL,
        sop_instance_uid  TEXT NOT NULL UNIQUE,
        result_series_uid TEXT NOT NULL,
        path              TEXT NOT NULL,          -- relative to the data directory
        created_at        REAL NOT NULL
    );
    CREATE INDEX result_objects_series ON result_objects(series_uid);

    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        object_id       INTEGER NOT NULL REFERENCES result_objects(id),
        series_uid      TEXT NOT NULL,
        destination     TEXT NOT NULL,            -- name from [[destinations]]
        state           TEXT NOT NULL,            -- pending | sent | dead | superseded
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        created_at      REAL NOT NULL,
        sent_at         REAL,
        last_status     TEXT,                     -- DICOM status of the last attempt, e.g. 0x0000
        last_error      TEXT,
        UNIQUE (object_id, destination)
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
    CREATE INDEX outbox_series ON outbox(series_uid);

    CREATE TABLE outbox_attempts (
        id         INTEGER PRIMARY KEY,
        outbox_id  INTEGER NOT NULL,
        at         REAL NOT NULL,
        ok         INTEGER NOT NULL,
        status     TEXT,
        detail     TEXT
    );
    CREATE INDEX outbox_attempts_row ON outbox_attempts(outbox_id);
    """,
    # 4: the outbox's state trail, like series_events and job_events: every move of an outbox row is a row
    # here (send attempts stay in outbox_attempts). Rows that existed before keep no history of their own.
    """
    CREATE TABLE outbox_events (
        id         INTEGER PRIMARY KEY,
        at         REAL NOT NULL,
        outbox_id  INTEGER NOT NULL,
        from_state TEXT,
        to_state   TEXT NOT NULL,
        reason     TEXT
    );
    CREATE INDEX outbox_events_row ON outbox_events(outbox_id);
    CREATE TRIGGER outbox_created AFTER INSERT ON outbox BEGIN
        INSERT INTO outbox_events(at, outbox_id, from_state, to_state, reason)
        VALUES (NEW.created_at, NEW.id, NULL, NEW.state, NULL);
    END;
    CREATE TRIGGER outbox_state_changed AFTER UPDATE OF state ON outbox
    WHEN OLD.state IS NOT NEW.state BEGIN
        INSERT INTO outbox_events(at, outbox_id, from_state, to_state, reason)
        VALUES ((julianday('now') - 2440587.5) * 86400.0, NEW.id, OLD.state, NEW.state, NEW.last_error);
    END;
    """,
    # 5: the panel: what a technician searches a series by (copied from the first instance's header), users
    # with their password hashes, the login trail that throttling counts, lockouts, the audit log, and the
    # destinations whose sending a technician suspended.
    """
    ALTER TABLE series ADD COLUMN patient_name TEXT;
    ALTER TABLE series ADD COLUMN accession TEXT;
    ALTER TABLE series ADD COLUMN study_date TEXT;
    ALTER TABLE series ADD COLUMN series_number INTEGER;
    CREATE INDEX series_first_received ON series(first_received);
    CREATE INDEX series_patient_id ON series(patient_id);
    CREATE INDEX series_accession ON series(accession);
    CREATE INDEX series_study_date ON series(study_date);

    CREATE TABLE users (
        name        TEXT PRIMARY KEY,
        role        TEXT NOT NULL,            -- admin | technician | viewer
        password    TEXT NOT NULL,            -- scrypt$n$r$p$salt$hash (hex)
        language    TEXT,                     -- en | vi | ko; NULL: the browser's Accept-Language
        created_at  REAL NOT NULL,
        changed_at  REAL NOT NULL,
        disabled    INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;

    CREATE TABLE login_attempts (
        id       INTEGER PRIMARY KEY,
        at       REAL NOT NULL,
        username TEXT NOT NULL,
        address  TEXT NOT NULL,
        ok       INTEGER NOT NULL
    );
    CREATE INDEX login_attempts_user ON login_attempts(username, at);
    CREATE INDEX login_attempts_address ON login_attempts(address, at);

    CREATE TABLE lockouts (
        kind    TEXT NOT NULL,                -- account | address
        key     TEXT NOT NULL,
        since   REAL NOT NULL,
        until   REAL NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;

    CREATE TABLE audit (
        id       INTEGER PRIMARY KEY,
        at       REAL NOT NULL,
        username TEXT,
        address  TEXT,
        action   TEXT NOT NULL,
        target   TEXT,
        detail   TEXT
    );
    CREATE INDEX audit_at ON audit(at);
    CREATE INDEX audit_action ON audit(action, at);

    CREATE TABLE destination_holds (
        destination TEXT PRIMARY KEY,
        since       REAL NOT NULL,
        by_user     TEXT,
        reason      TEXT
    ) WITHOUT ROWID;
    """,
    # 6: what the panel's dashboard asks with 100,000 series (scripts/bench_panel.py): results of the last
    # day, the backend each model last ran on, the modalities to filter by. Each index costs a write per job
    # or per series, never per instance.
    """
    CREATE INDEX jobs_finished ON jobs(state, finished_at);
    CREATE INDEX jobs_model ON jobs(model, id);
    CREATE INDEX series_modality ON series(modality);

    -- Keys the box makes once and keeps (the panel's session-signing key), in the store rather than in loose
    -- files, so they are as durable and as private as the index.
    CREATE TABLE secrets (
        name  TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
