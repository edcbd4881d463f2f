//! Schema migrations, applied in order at start-up and recorded in `schema_migrations`.
//! Append new steps; never edit a released one.

/// SQLite schema steps: (version, SQL).
pub const SQLITE: &[(i64, &str)] = &[(
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
)];
