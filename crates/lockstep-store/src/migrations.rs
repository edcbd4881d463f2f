//! Schema migrations, applied in order at start-up and recorded in `schema_migrations`.
//! Append new steps; never edit a released one.

/// The alert tables (alerts, history, channels, notification outbox, delivery log), the
/// same for both backends but for the auto-increment key `$id`.
macro_rules! alert_schema {
    ($id:literal) => {
        concat!(
            r#"
CREATE TABLE alerts (
    id          "#,
            $id,
            r#",
    instance_id TEXT NOT NULL,
    condition   TEXT NOT NULL,
    env         TEXT NOT NULL,
    service     TEXT NOT NULL,
    state       TEXT NOT NULL,
    severity    TEXT NOT NULL,
    body        TEXT NOT NULL
);
CREATE UNIQUE INDEX alerts_one_open ON alerts (instance_id, condition) WHERE state = 'open';
CREATE INDEX alerts_by_state ON alerts (state, id);
CREATE TABLE alert_history (
    alert_id BIGINT NOT NULL,
    event_id BIGINT NOT NULL,
    kind     TEXT NOT NULL,
    PRIMARY KEY (alert_id, event_id)
);
CREATE TABLE alert_channels (
    name     TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    body     TEXT NOT NULL
);
CREATE TABLE alert_notifications (
    id          "#,
            $id,
            r#",
    channel     TEXT NOT NULL,
    event_id    BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    delivery_id BIGINT,
    UNIQUE (channel, event_id)
);
CREATE INDEX alert_notifications_pending ON alert_notifications (delivery_id, id);
CREATE TABLE alert_deliveries (
    id              "#,
            $id,
            r#",
    channel         TEXT NOT NULL,
    kind            TEXT NOT NULL,
    body            TEXT NOT NULL,
    alerts          BIGINT NOT NULL,
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL,
    last_error      TEXT,
    next_attempt_ms BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (status, next_attempt_ms);
CREATE TABLE alert_cursor (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
"#
        )
    };
}

/// The rollout tables (rollouts, their nodes, their package), the same for both backends
/// but for the auto-increment key `$id` and the binary type `$blob`.
macro_rules! rollout_schema {
    ($id:literal, $blob:literal) => {
        concat!(
            r#"
CREATE TABLE rollouts (
    id                  "#,
            $id,
            r#",
    env                 TEXT NOT NULL,
    service             TEXT NOT NULL,
    version_id          TEXT NOT NULL,
    previous_version_id TEXT,
    settings            TEXT NOT NULL,
    phase               TEXT NOT NULL,
    running             BIGINT NOT NULL,
    request             TEXT,
    actor               TEXT NOT NULL,
    created_ms          BIGINT NOT NULL,
    updated_ms          BIGINT NOT NULL,
    finished_ms         BIGINT,
    package_size        BIGINT NOT NULL
);
CREATE UNIQUE INDEX rollouts_one_running ON rollouts (env, service) WHERE running = 1;
CREATE TABLE rollout_nodes (
    rollout_id  BIGINT NOT NULL,
    idx         BIGINT NOT NULL,
    instance_id TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    step        TEXT NOT NULL,
    attempts    BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, idx)
);
CREATE TABLE rollout_packages (
    rollout_id BIGINT PRIMARY KEY,
    package    "#,
            $blob,
            r#" NOT NULL,
    signature  "#,
            $blob,
            r#"
);
"#
        )
    };
}

/// SQLite schema steps: (version, SQL).
pub const SQLITE: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE releases (
    revision      INTEGER PRIMARY KEY AUTOINCREMENT,
    env           TEXT NOT NULL,
    service       TEXT NOT NULL,
    version_id    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    body          TEXT NOT NULL
);
CREATE INDEX releases_by_service ON releases (env, service, revision DESC);
CREATE TABLE expected (
    env      TEXT NOT NULL,
    service  TEXT NOT NULL,
    revision INTEGER NOT NULL REFERENCES releases (revision),
    PRIMARY KEY (env, service)
);
CREATE TABLE events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    kind    TEXT NOT NULL,
    env     TEXT,
    service TEXT,
    actor   TEXT,
    reason  TEXT,
    data    TEXT NOT NULL
);
CREATE TABLE tokens (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY,
    body        TEXT NOT NULL
);
"#,
    ),
    (
        2,
        r#"
ALTER TABLE instances ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN last_seen_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN deleted_at_ms INTEGER;
ALTER TABLE instances ADD COLUMN missing_reported INTEGER NOT NULL DEFAULT 0;
UPDATE instances SET seq = rowid,
    last_seen_ms = CAST(strftime('%s', json_extract(body, '$.last_seen')) AS INTEGER) * 1000;
CREATE INDEX instances_by_seq ON instances (seq);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters (name, value) SELECT 'instance_seq', COALESCE(MAX(seq), 0) FROM instances;
CREATE TABLE leases (
    name          TEXT PRIMARY KEY,
    holder        TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
"#,
    ),
    (
        3,
        r#"
CREATE TABLE revoked_tokens (
    hash       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    revoked_at TEXT NOT NULL
);
"#,
    ),
    (4, alert_schema!("INTEGER PRIMARY KEY AUTOINCREMENT")),
    (
        5,
        rollout_schema!("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"),
    ),
];

/// PostgreSQL schema steps: (version, SQL), applied in the connection's current schema
/// (the first existing schema of `search_path`). One step gives the same shape as SQLite's
/// final one; ids are allocated from `counters` under the store's advisory locks (see
/// `postgres.rs`), times are `TIMESTAMPTZ`, instance times are milliseconds like SQLite's
/// so the conditional upsert compares the same numbers. JSON is kept as text, as SQLite
/// keeps it: it round-trips byte for byte, costs no parsing on the heartbeat path, and
/// accepts `\u0000`, which `JSONB` refuses (cast `body::jsonb` to query it).
pub const POSTGRES: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE releases (
    revision      BIGINT PRIMARY KEY,
    env           TEXT NOT NULL,
    service       TEXT NOT NULL,
    version_id    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    registered_at TIMESTAMPTZ NOT NULL,
    body          TEXT NOT NULL
);
CREATE INDEX releases_by_service ON releases (env, service, revision DESC);
CREATE TABLE expected (
    env      TEXT NOT NULL,
    service  TEXT NOT NULL,
    revision BIGINT NOT NULL REFERENCES releases (revision),
    PRIMARY KEY (env, service)
);
CREATE TABLE events (
    id      BIGINT PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL,
    kind    TEXT NOT NULL,
    env     TEXT,
    service TEXT,
    actor   TEXT,
    reason  TEXT,
    data    TEXT NOT NULL
);
CREATE TABLE tokens (
    name       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE instances (
    instance_id      TEXT PRIMARY KEY,
    body             TEXT NOT NULL,
    seq              BIGINT NOT NULL,
    last_seen_ms     BIGINT NOT NULL,
    deleted_at_ms    BIGINT,
    missing_reported BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX instances_by_seq ON instances (seq);
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters (name, value) VALUES ('revision', 0), ('event_id', 0), ('instance_seq', 0);
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"#,
    ),
    (
        2,
        r#"
CREATE TABLE revoked_tokens (
    hash       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL
);
"#,
    ),
    (
        3,
        alert_schema!("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    ),
    (
        4,
        rollout_schema!(
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            "BYTEA"
        ),
    ),
];
