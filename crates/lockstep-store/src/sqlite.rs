//! The embedded default: one SQLite file in WAL mode under `--data-dir`.
//!
//! Writes go through a single-connection pool so that transactions never race for the
//! write lock (SQLite allows one writer anyway) and `synchronous = FULL` makes every
//! acknowledged commit survive a `kill -9` and a power cut. Reads use a separate pool.

use async_trait::async_trait;
use lockstep_api::Event;
use lockstep_core::{
    Decision, HistoryEntry, Instance, RegistrationKind, Release, StoredRelease,
    decide_registration, rollback_target,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::path::Path;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{
    NewEvent, Registered, Registration, Rollback, Store, StoreError, StoredToken, migrations,
};

/// The SQLite backend.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "lockstep.db";

pub(crate) fn fmt_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

pub(crate) fn parse_time(s: &str) -> Result<OffsetDateTime, StoreError> {
    Ok(OffsetDateTime::parse(s, &Rfc3339)?)
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/lockstep.db` and runs pending migrations.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        Self::open_file(&dir.join(DB_FILE)).await
    }

    /// Opens a database file directly.
    pub async fn open_file(path: &Path) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let open_err = |e: sqlx::Error| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(open_err)?;
        let store_writer = writer.clone();
        migrate(&store_writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await
            .map_err(open_err)?;
        Ok(SqliteStore { writer, reader })
    }

    /// Closes both pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )
    .execute(pool)
    .await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(pool)
        .await?;
    for (version, sql) in migrations::SQLITE {
        if applied.contains(version) {
            continue;
        }
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)")
            .bind(version)
            .bind(fmt_time(OffsetDateTime::now_utc()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}

fn release_from_row(row: &SqliteRow) -> Result<StoredRelease, StoreError> {
    let body: String = row.try_get("body")?;
    let kind: String = row.try_get("kind")?;
    let registered_at: String = row.try_get("registered_at")?;
    Ok(StoredRelease {
        env: row.try_get("env")?,
        service: row.try_get("service")?,
        revision: row.try_get("revision")?,
        kind: RegistrationKind::parse(&kind),
        registered_at: parse_time(&registered_at)?,
        release: serde_json::from_str(&body)?,
    })
}

fn event_from_row(row: &SqliteRow) -> Result<Event, StoreError> {
    let at: String = row.try_get("at")?;
    let data: String = row.try_get("data")?;
    Ok(Event {
        id: row.try_get("id")?,
        at: parse_time(&at)?,
        kind: row.try_get("kind")?,
        env: row.try_get("env")?,
        service: row.try_get("service")?,
        actor: row.try_get("actor")?,
        reason: row.try_get("reason")?,
        data: serde_json::from_str(&data)?,
    })
}

async fn expected_in(
    tx: &mut Transaction<'_, Sqlite>,
    env: &str,
    service: &str,
) -> Result<Option<StoredRelease>, StoreError> {
    let row = sqlx::query(
        "SELECT r.revision, r.env, r.service, r.version_id, r.kind, r.registered_at, r.body \
         FROM expected e JOIN releases r ON r.revision = e.revision \
         WHERE e.env = ? AND e.service = ?",
    )
    .bind(env)
    .bind(service)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(release_from_row).transpose()
}

async fn insert_event(tx: &mut Transaction<'_, Sqlite>, ev: NewEvent) -> Result<Event, StoreError> {
    let at = OffsetDateTime::now_utc();
    let data = serde_json::to_string(&ev.data)?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (at, kind, env, service, actor, reason, data) \
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(fmt_time(at))
    .bind(&ev.kind)
    .bind(&ev.env)
    .bind(&ev.service)
    .bind(&ev.actor)
    .bind(&ev.reason)
    .bind(&data)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Event {
        id,
        at,
        kind: ev.kind,
        env: ev.env,
        service: ev.service,
        actor: ev.actor,
        reason: ev.reason,
        data: ev.data,
    })
}

/// Writes a new revision making `release` expected, plus its event, inside `tx`.
async fn apply(
    tx: &mut Transaction<'_, Sqlite>,
    env: &str,
    service: &str,
    release: Release,
    kind: RegistrationKind,
    previous: Option<&StoredRelease>,
    event_data: serde_json::Value,
) -> Result<(StoredRelease, Event), StoreError> {
    let now = OffsetDateTime::now_utc();
    let body = serde_json::to_string(&release)?;
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO releases (env, service, version_id, kind, registered_at, body) \
         VALUES (?, ?, ?, ?, ?, ?) RETURNING revision",
    )
    .bind(env)
    .bind(service)
    .bind(&release.version_id)
    .bind(kind.as_str())
    .bind(fmt_time(now))
    .bind(&body)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO expected (env, service, revision) VALUES (?, ?, ?) \
         ON CONFLICT (env, service) DO UPDATE SET revision = excluded.revision",
    )
    .bind(env)
    .bind(service)
    .bind(revision)
    .execute(&mut **tx)
    .await?;
    let stored = StoredRelease {
        env: env.to_string(),
        service: service.to_string(),
        revision,
        kind,
        registered_at: now,
        release,
    };
    let event = insert_event(tx, crate::registration_event(&stored, previous, event_data)).await?;
    Ok((stored, event))
}

#[async_trait]
impl Store for SqliteStore {
    async fn register(&self, reg: Registration) -> Result<Registered, StoreError> {
        let mut tx = self.writer.begin().await?;
        let current = expected_in(&mut tx, &reg.env, &reg.service).await?;
        let mut release = reg.release;
        release.actor = Some(reg.actor);
        release.reason = reg.reason;
        let decision = decide_registration(
            current.as_ref().map(|c| &c.release),
            &release,
            RegistrationKind::Register,
            reg.force,
        )?;
        if let (Decision::Unchanged, Some(current)) = (decision, current.clone()) {
            tx.rollback().await?;
            return Ok(Registered {
                release: current,
                changed: false,
                event: None,
            });
        }
        let data = serde_json::json!({ "force": reg.force });
        let (stored, event) = apply(
            &mut tx,
            &reg.env,
            &reg.service,
            release,
            RegistrationKind::Register,
            current.as_ref(),
            data,
        )
        .await?;
        tx.commit().await?;
        Ok(Registered {
            release: stored,
            changed: true,
            event: Some(event),
        })
    }

    async fn rollback(&self, rb: Rollback) -> Result<Registered, StoreError> {
        let mut tx = self.writer.begin().await?;
        let current = expected_in(&mut tx, &rb.env, &rb.service)
            .await?
            .ok_or_else(|| StoreError::NoRelease {
                env: rb.env.clone(),
                service: rb.service.clone(),
            })?;
        let rows = sqlx::query(
            "SELECT revision, version_id, kind FROM releases \
             WHERE env = ? AND service = ? ORDER BY revision DESC",
        )
        .bind(&rb.env)
        .bind(&rb.service)
        .fetch_all(&mut *tx)
        .await?;
        let history = rows
            .iter()
            .map(|r| {
                Ok(HistoryEntry {
                    revision: r.try_get("revision")?,
                    version_id: r.try_get("version_id")?,
                    kind: RegistrationKind::parse(&r.try_get::<String, _>("kind")?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let target = rollback_target(&history, &current.release.version_id, rb.to.as_deref())?;
        let row = sqlx::query(concat!(
            "SELECT revision, env, service, version_id, kind, registered_at, body FROM releases",
            " WHERE revision = ?"
        ))
        .bind(target.revision)
        .fetch_one(&mut *tx)
        .await?;
        let mut release = release_from_row(&row)?.release;
        if decide_registration(
            Some(&current.release),
            &release,
            RegistrationKind::Rollback,
            rb.force,
        )? == Decision::Unchanged
        {
            tx.rollback().await?;
            return Ok(Registered {
                release: current,
                changed: false,
                event: None,
            });
        }
        release.actor = Some(rb.actor);
        release.reason = rb.reason;
        let (stored, event) = apply(
            &mut tx,
            &rb.env,
            &rb.service,
            release,
            RegistrationKind::Rollback,
            Some(&current),
            rb.data,
        )
        .await?;
        tx.commit().await?;
        Ok(Registered {
            release: stored,
            changed: true,
            event: Some(event),
        })
    }

    async fn expected(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Option<StoredRelease>, StoreError> {
        let mut tx = self.reader.begin().await?;
        let r = expected_in(&mut tx, env, service).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn all_expected(&self) -> Result<Vec<StoredRelease>, StoreError> {
        sqlx::query(
            "SELECT r.revision, r.env, r.service, r.version_id, r.kind, r.registered_at, r.body \
             FROM expected e JOIN releases r ON r.revision = e.revision ORDER BY r.revision",
        )
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(release_from_row)
        .collect()
    }

    async fn history(
        &self,
        env: &str,
        service: &str,
        limit: u32,
    ) -> Result<Vec<StoredRelease>, StoreError> {
        sqlx::query(concat!(
            "SELECT revision, env, service, version_id, kind, registered_at, body FROM releases",
            " WHERE env = ? AND service = ? ORDER BY revision DESC LIMIT ?"
        ))
        .bind(env)
        .bind(service)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(release_from_row)
        .collect()
    }

    async fn changes_since(
        &self,
        since: i64,
        limit: u32,
    ) -> Result<Vec<StoredRelease>, StoreError> {
        sqlx::query(concat!(
            "SELECT revision, env, service, version_id, kind, registered_at, body FROM releases",
            " WHERE revision > ? ORDER BY revision LIMIT ?"
        ))
        .bind(since)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(release_from_row)
        .collect()
    }

    async fn append_events(&self, evs: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let mut out = Vec::with_capacity(evs.len());
        for ev in evs {
            out.push(insert_event(&mut tx, ev).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn events_since(&self, since: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        sqlx::query(
            "SELECT id, at, kind, env, service, actor, reason, data FROM events \
             WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(since)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(event_from_row)
        .collect()
    }

    async fn create_token(&self, t: StoredToken) -> Result<(), StoreError> {
        let res = sqlx::query(
            "INSERT INTO tokens (name, role, hash, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(&t.hash)
        .bind(fmt_time(t.created_at))
        .execute(&self.writer)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("a token named {:?}", t.name)));
        }
        Ok(())
    }

    async fn upsert_token(&self, t: StoredToken) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tokens (name, role, hash, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, hash = excluded.hash",
        )
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(&t.hash)
        .bind(fmt_time(t.created_at))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        sqlx::query("SELECT name, role, hash, created_at FROM tokens ORDER BY name")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|r| {
                let role: String = r.try_get("role")?;
                let created: String = r.try_get("created_at")?;
                Ok(StoredToken {
                    name: r.try_get("name")?,
                    role: role.parse().map_err(|e: lockstep_core::CoreError| {
                        StoreError::Corrupt(e.to_string())
                    })?,
                    hash: r.try_get("hash")?,
                    created_at: parse_time(&created)?,
                })
            })
            .collect()
    }

    async fn revoke_token(&self, name: &str) -> Result<bool, StoreError> {
        let res = sqlx::query("DELETE FROM tokens WHERE name = ?")
            .bind(name)
            .execute(&self.writer)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    async fn save_instances(&self, instances: &[Instance]) -> Result<(), StoreError> {
        if instances.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await?;
        for i in instances {
            sqlx::query(
                "INSERT INTO instances (instance_id, body) VALUES (?, ?) \
                 ON CONFLICT (instance_id) DO UPDATE SET body = excluded.body",
            )
            .bind(&i.instance_id)
            .bind(serde_json::to_string(i)?)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_instances(&self, ids: &[String]) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        for id in ids {
            sqlx::query("DELETE FROM instances WHERE instance_id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn load_instances(&self) -> Result<Vec<Instance>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar("SELECT body FROM instances")
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|b| serde_json::from_str(b).map_err(StoreError::from))
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}
