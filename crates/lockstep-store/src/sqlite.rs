//! The embedded default: one SQLite file in WAL mode under `--data-dir`.
//!
//! Writes go through a single-connection pool so that transactions never race for the
//! write lock (SQLite allows one writer anyway) and `synchronous = FULL` makes every
//! acknowledged commit survive a `kill -9` and a power cut. Reads use a separate pool.

use async_trait::async_trait;
use lockstep_api::Event;
use lockstep_core::{
    Decision, HistoryEntry, Instance, RegistrationKind, Release, Role, StoredRelease,
    decide_registration, rollback_target,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::watch;

use crate::{
    InstanceChange, Lease, NewEvent, Registered, Registration, Rollback, Store, StoreError,
    StoredToken, migrations,
};

/// The SQLite backend.
#[derive(Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    feed: watch::Sender<u64>,
}

/// One wake-up channel per database file, shared by every handle in the process, so two
/// handles on one file see each other's commits (SQLite has no cross-process
/// notification; one file has one `serve`).
fn feed_for(path: &Path) -> watch::Sender<u64> {
    static FEEDS: OnceLock<Mutex<HashMap<PathBuf, watch::Sender<u64>>>> = OnceLock::new();
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let feeds = FEEDS.get_or_init(Default::default);
    match feeds.lock() {
        Ok(mut map) => map
            .entry(key)
            .or_insert_with(|| watch::channel(0).0)
            .clone(),
        // A poisoned map only loses cross-handle sharing, never a change: readers poll.
        Err(_) => watch::channel(0).0,
    }
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
        // Switching a new file to WAL takes a lock that `busy_timeout` does not cover (it
        // is set on the connection after the journal mode), so a handle opening the same
        // file at the same moment can see "database is locked": retry that briefly.
        let mut attempt = 0;
        let writer = loop {
            match SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(opts.clone())
                .await
            {
                Ok(pool) => break pool,
                Err(e) if attempt < 50 && is_busy(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt.min(10))).await;
                }
                Err(e) => return Err(open_err(e)),
            }
        };
        let store_writer = writer.clone();
        migrate(&store_writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await
            .map_err(open_err)?;
        Ok(SqliteStore {
            writer,
            reader,
            feed: feed_for(path),
        })
    }

    /// A write transaction that takes SQLite's write lock up front, so two handles on one
    /// file never fail upgrading a read transaction (and "decide, then write" is atomic).
    async fn write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Commits and wakes every projection of this file.
    async fn commit(&self, tx: Transaction<'static, Sqlite>) -> Result<(), StoreError> {
        tx.commit().await?;
        self.feed.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Closes both pools, checkpointing the WAL.
    pub async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }
}

/// SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock right now.
fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("5") | Some("6")),
        _ => false,
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )
    .execute(pool)
    .await?;
    for (version, sql) in migrations::SQLITE {
        // Checked again inside the write lock: two handles opening one file at once apply
        // each step exactly once.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let done: Option<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            tx.rollback().await?;
            continue;
        }
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
    fn feed(&self) -> watch::Receiver<u64> {
        self.feed.subscribe()
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn register(&self, reg: Registration) -> Result<Registered, StoreError> {
        let mut tx = self.write_tx().await?;
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
        self.commit(tx).await?;
        Ok(Registered {
            release: stored,
            changed: true,
            event: Some(event),
        })
    }

    async fn rollback(&self, rb: Rollback) -> Result<Registered, StoreError> {
        let mut tx = self.write_tx().await?;
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
        self.commit(tx).await?;
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

    async fn last_revision(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(revision) FROM releases")
            .fetch_one(&self.reader)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn append_events(&self, evs: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut out = Vec::with_capacity(evs.len());
        for ev in evs {
            out.push(insert_event(&mut tx, ev).await?);
        }
        self.commit(tx).await?;
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

    async fn last_event_id(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM events")
            .fetch_one(&self.reader)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn create_token(&self, t: StoredToken, actor: &str) -> Result<Event, StoreError> {
        let mut tx = self.write_tx().await?;
        let res = sqlx::query(
            "INSERT INTO tokens (name, role, hash, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(&t.hash)
        .bind(fmt_time(t.created_at))
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!("a token named {:?}", t.name)));
        }
        let ev = insert_event(
            &mut tx,
            crate::token_event("token_created", &t.name, t.role, actor),
        )
        .await?;
        self.commit(tx).await?;
        Ok(ev)
    }

    async fn upsert_token(&self, t: StoredToken) -> Result<Option<Event>, StoreError> {
        let mut tx = self.write_tx().await?;
        let same: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM tokens WHERE name = ? AND role = ? AND hash = ?")
                .bind(&t.name)
                .bind(t.role.as_str())
                .bind(&t.hash)
                .fetch_optional(&mut *tx)
                .await?;
        if same.is_some() {
            tx.rollback().await?;
            return Ok(None);
        }
        let revoked: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM revoked_tokens WHERE hash = ?")
                .bind(&t.hash)
                .fetch_optional(&mut *tx)
                .await?;
        if revoked.is_some() {
            tx.rollback().await?;
            return Err(StoreError::Revoked(t.name));
        }
        sqlx::query(
            "INSERT INTO tokens (name, role, hash, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, hash = excluded.hash",
        )
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(&t.hash)
        .bind(fmt_time(t.created_at))
        .execute(&mut *tx)
        .await?;
        let ev = insert_event(
            &mut tx,
            crate::token_event("token_bootstrapped", &t.name, t.role, "lockstep"),
        )
        .await?;
        self.commit(tx).await?;
        Ok(Some(ev))
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

    async fn revoke_token(&self, name: &str, actor: &str) -> Result<Option<Event>, StoreError> {
        let mut tx = self.write_tx().await?;
        let row: Option<(String, String)> =
            sqlx::query_as("DELETE FROM tokens WHERE name = ? RETURNING role, hash")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((role, hash)) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let role: Role = role
            .parse()
            .map_err(|e: lockstep_core::CoreError| StoreError::Corrupt(e.to_string()))?;
        if role == Role::Admin {
            let admins: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE role = 'admin'")
                    .fetch_one(&mut *tx)
                    .await?;
            if admins == 0 {
                tx.rollback().await?;
                return Err(StoreError::LastAdmin);
            }
        }
        sqlx::query(
            "INSERT INTO revoked_tokens (hash, name, revoked_at) VALUES (?, ?, ?) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(&hash)
        .bind(name)
        .bind(fmt_time(OffsetDateTime::now_utc()))
        .execute(&mut *tx)
        .await?;
        let ev = insert_event(
            &mut tx,
            crate::token_event("token_revoked", name, role, actor),
        )
        .await?;
        self.commit(tx).await?;
        Ok(Some(ev))
    }

    async fn save_instances(
        &self,
        instances: &[Instance],
    ) -> Result<Option<(i64, i64)>, StoreError> {
        if instances.is_empty() {
            return Ok(None);
        }
        let mut tx = self.write_tx().await?;
        let first = next_seq(&mut tx, instances.len() as i64).await?;
        let mut seq = first;
        for i in instances {
            let last_seen = crate::millis(i.last_seen);
            // Only a newer heartbeat replaces a row, and a tombstone only yields to a
            // heartbeat newer than the deregistration.
            sqlx::query(
                "INSERT INTO instances (instance_id, body, seq, last_seen_ms, deleted_at_ms, missing_reported) \
                 VALUES (?, ?, ?, ?, NULL, 0) \
                 ON CONFLICT (instance_id) DO UPDATE SET body = excluded.body, seq = excluded.seq, \
                   last_seen_ms = excluded.last_seen_ms, deleted_at_ms = NULL, missing_reported = 0 \
                 WHERE excluded.last_seen_ms > instances.last_seen_ms \
                   AND (instances.deleted_at_ms IS NULL OR excluded.last_seen_ms > instances.deleted_at_ms)",
            )
            .bind(&i.instance_id)
            .bind(serde_json::to_string(i)?)
            .bind(seq)
            .bind(last_seen)
            .execute(&mut *tx)
            .await?;
            seq += 1;
        }
        // Heartbeats are soft state: no wake-up, projections poll the instance feed.
        tx.commit().await?;
        Ok(Some((first, seq - 1)))
    }

    async fn deregister_instance(
        &self,
        instance_id: &str,
        actor: &str,
    ) -> Result<Option<(Instance, Event)>, StoreError> {
        let mut tx = self.write_tx().await?;
        let body: Option<String> = sqlx::query_scalar(
            "SELECT body FROM instances WHERE instance_id = ? AND deleted_at_ms IS NULL",
        )
        .bind(instance_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(body) = body else {
            tx.rollback().await?;
            return Ok(None);
        };
        let inst: Instance = serde_json::from_str(&body)?;
        let seq = next_seq(&mut tx, 1).await?;
        let now = crate::millis(OffsetDateTime::now_utc());
        sqlx::query("UPDATE instances SET deleted_at_ms = ?, seq = ? WHERE instance_id = ?")
            .bind(now.max(crate::millis(inst.last_seen)))
            .bind(seq)
            .bind(instance_id)
            .execute(&mut *tx)
            .await?;
        let ev = insert_event(&mut tx, crate::deregistered_event(&inst, actor)).await?;
        self.commit(tx).await?;
        Ok(Some((inst, ev)))
    }

    async fn instances_since(
        &self,
        since: i64,
        limit: u32,
    ) -> Result<Vec<InstanceChange>, StoreError> {
        sqlx::query(
            "SELECT instance_id, body, seq, deleted_at_ms FROM instances \
             WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(since)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(|r| {
            let deleted: Option<i64> = r.try_get("deleted_at_ms")?;
            let instance = match deleted {
                Some(_) => None,
                None => Some(serde_json::from_str(&r.try_get::<String, _>("body")?)?),
            };
            Ok(InstanceChange {
                seq: r.try_get("seq")?,
                instance_id: r.try_get("instance_id")?,
                instance,
            })
        })
        .collect()
    }

    async fn mark_missing(
        &self,
        holder: &str,
        cutoff: OffsetDateTime,
    ) -> Result<Vec<Event>, StoreError> {
        let mut tx = self.write_tx().await?;
        check_lease(&mut tx, holder).await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT instance_id, body FROM instances \
             WHERE deleted_at_ms IS NULL AND missing_reported = 0 AND last_seen_ms < ? \
             ORDER BY last_seen_ms, instance_id",
        )
        .bind(crate::millis(cutoff))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(rows.len());
        for (id, body) in rows {
            let inst: Instance = serde_json::from_str(&body)?;
            sqlx::query("UPDATE instances SET missing_reported = 1 WHERE instance_id = ?")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            out.push(insert_event(&mut tx, crate::missing_event(&inst)).await?);
        }
        self.commit(tx).await?;
        Ok(out)
    }

    async fn expire_instances(
        &self,
        holder: &str,
        cutoff: OffsetDateTime,
        purge_before: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.write_tx().await?;
        check_lease(&mut tx, holder).await?;
        sqlx::query("DELETE FROM instances WHERE deleted_at_ms IS NOT NULL AND deleted_at_ms < ?")
            .bind(crate::millis(purge_before))
            .execute(&mut *tx)
            .await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT instance_id FROM instances WHERE deleted_at_ms IS NULL AND last_seen_ms < ? \
             ORDER BY instance_id",
        )
        .bind(crate::millis(cutoff))
        .fetch_all(&mut *tx)
        .await?;
        let now = crate::millis(OffsetDateTime::now_utc());
        let mut seq = next_seq(&mut tx, ids.len() as i64).await?;
        for id in &ids {
            sqlx::query("UPDATE instances SET deleted_at_ms = ?, seq = ? WHERE instance_id = ?")
                .bind(now)
                .bind(seq)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            seq += 1;
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        let mut tx = self.write_tx().await?;
        let now = crate::millis(OffsetDateTime::now_utc());
        let until = now + ttl.as_millis() as i64;
        sqlx::query(
            "INSERT INTO leases (name, holder, expires_at_ms) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms \
             WHERE leases.holder = excluded.holder OR leases.expires_at_ms <= ?",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let (h, exp): (String, i64) =
            sqlx::query_as("SELECT holder, expires_at_ms FROM leases WHERE name = ?")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(Lease {
            held: h == holder,
            holder: h,
            expires_at: from_millis(exp),
        })
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE name = ? AND holder = ?")
            .bind(name)
            .bind(holder)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn apply_alerts(
        &self,
        holder: &str,
        writes: Vec<crate::AlertWrite>,
    ) -> Result<Vec<(lockstep_api::Alert, Event)>, StoreError> {
        let mut tx = self.write_tx().await?;
        check_lease(&mut tx, holder).await?;
        let changed = ops::apply_alerts(&mut tx, writes).await?;
        if changed.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(changed.len());
        for (alert, ev) in changed {
            let ev = insert_event(&mut tx, ev).await?;
            ops::record_history(&mut tx, &alert, ev.id, &ev.kind).await?;
            out.push((alert, ev));
        }
        self.commit(tx).await?;
        Ok(out)
    }

    async fn alerts(
        &self,
        filter: crate::AlertFilter,
    ) -> Result<Vec<lockstep_api::Alert>, StoreError> {
        ops::list_alerts(&self.reader, &filter).await
    }

    async fn ack_alert(
        &self,
        id: i64,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Option<(lockstep_api::Alert, Option<Event>)>, StoreError> {
        let mut tx = self.write_tx().await?;
        match ops::ack_alert(&mut tx, id, actor, reason).await? {
            None => {
                tx.rollback().await?;
                Ok(None)
            }
            Some((a, None)) => {
                tx.rollback().await?;
                Ok(Some((a, None)))
            }
            Some((a, Some(ev))) => {
                let ev = insert_event(&mut tx, ev).await?;
                ops::record_history(&mut tx, &a, ev.id, &ev.kind).await?;
                self.commit(tx).await?;
                Ok(Some((a, Some(ev))))
            }
        }
    }

    async fn alert_history(&self, id: i64) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.id, e.at, e.kind, e.env, e.service, e.actor, e.reason, e.data \
             FROM events e JOIN alert_history h ON h.event_id = e.id \
             WHERE h.alert_id = ? ORDER BY e.id",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn alert_channels(&self) -> Result<Vec<lockstep_api::ChannelConfig>, StoreError> {
        ops::channels(&self.reader).await
    }

    async fn put_alert_channels(
        &self,
        channels: Vec<lockstep_api::ChannelConfig>,
        actor: &str,
    ) -> Result<Event, StoreError> {
        let mut tx = self.write_tx().await?;
        ops::put_channels(&mut tx, &channels).await?;
        let ev = insert_event(&mut tx, crate::channels_event(&channels, actor)).await?;
        self.commit(tx).await?;
        Ok(ev)
    }

    async fn notify_cursor(&self) -> Result<i64, StoreError> {
        ops::cursor(&self.reader).await
    }

    async fn enqueue_notifications(
        &self,
        holder: &str,
        from: i64,
        to: i64,
        items: Vec<crate::NewNotification>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        check_lease(&mut tx, holder).await?;
        if !ops::enqueue(&mut tx, from, to, &items).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn pending_notifications(&self) -> Result<Vec<crate::Notification>, StoreError> {
        ops::pending_notifications(&self.reader).await
    }

    async fn create_delivery(
        &self,
        holder: &str,
        channel: &str,
        kind: &str,
        body: &str,
        ids: &[i64],
    ) -> Result<Option<crate::Delivery>, StoreError> {
        let mut tx = self.write_tx().await?;
        check_lease(&mut tx, holder).await?;
        match ops::create_delivery(&mut tx, channel, kind, body, ids).await? {
            Some(d) => {
                tx.commit().await?;
                Ok(Some(d))
            }
            None => {
                tx.rollback().await?;
                Ok(None)
            }
        }
    }

    async fn due_deliveries(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<crate::Delivery>, StoreError> {
        ops::due_deliveries(&self.reader, now).await
    }

    async fn record_delivery(
        &self,
        holder: &str,
        id: i64,
        outcome: crate::DeliveryOutcome,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        check_lease(&mut tx, holder).await?;
        let done = ops::record_delivery(&mut tx, id, &outcome).await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn deliveries(&self, limit: u32) -> Result<Vec<crate::Delivery>, StoreError> {
        ops::deliveries(&self.reader, limit).await
    }

    async fn last_deliveries(&self) -> Result<Vec<(String, OffsetDateTime)>, StoreError> {
        ops::last_deliveries(&self.reader).await
    }

    async fn create_rollout(&self, r: crate::NewRollout) -> Result<crate::Rollout, StoreError> {
        let mut tx = self.write_tx().await?;
        let id = rops::create(&mut tx, r).await?;
        self.commit(tx).await?;
        rops::get(&self.reader, id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("rollout {id} not readable")))
    }

    async fn rollout(&self, id: i64) -> Result<Option<crate::Rollout>, StoreError> {
        rops::get(&self.reader, id).await
    }

    async fn rollouts(
        &self,
        running_only: bool,
        limit: u32,
    ) -> Result<Vec<crate::Rollout>, StoreError> {
        rops::list(&self.reader, running_only, limit).await
    }

    async fn rollout_nodes(&self, id: i64) -> Result<Vec<crate::RolloutNode>, StoreError> {
        rops::nodes(&self.reader, id).await
    }

    async fn latest_rollout_nodes(&self) -> Result<Vec<crate::LatestRolloutNode>, StoreError> {
        rops::latest_nodes(&self.reader).await
    }

    async fn rollout_package(
        &self,
        id: i64,
    ) -> Result<Option<(Vec<u8>, Option<Vec<u8>>)>, StoreError> {
        rops::package(&self.reader, id).await
    }

    async fn set_rollout_step(
        &self,
        holder: &str,
        id: i64,
        idx: i64,
        step: serde_json::Value,
        attempt: bool,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Event>, StoreError> {
        let mut tx = self.write_tx().await?;
        check_lease(&mut tx, holder).await?;
        if !rops::set_step(&mut tx, id, idx, &step, attempt).await? {
            tx.rollback().await?;
            return Err(StoreError::Corrupt(format!(
                "rollout {id} has no node {idx}"
            )));
        }
        let evs = {
            let mut out = Vec::with_capacity(events.len());
            for ev in events {
                out.push(insert_event(&mut tx, ev).await?);
            }
            out
        };
        self.commit(tx).await?;
        Ok(evs)
    }

    async fn set_rollout_phase(
        &self,
        holder: &str,
        id: i64,
        phase: &str,
        running: bool,
        clear_request: bool,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Event>, StoreError> {
        let mut tx = self.write_tx().await?;
        check_lease(&mut tx, holder).await?;
        rops::set_phase(&mut tx, id, phase, running, clear_request).await?;
        let evs = {
            let mut out = Vec::with_capacity(events.len());
            for ev in events {
                out.push(insert_event(&mut tx, ev).await?);
            }
            out
        };
        self.commit(tx).await?;
        Ok(evs)
    }

    async fn request_rollout(&self, id: i64, request: &str) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = rops::request(&mut tx, id, request).await?;
        self.commit(tx).await?;
        Ok(done)
    }

    async fn restart_rollout(
        &self,
        id: i64,
        phase: &str,
        steps: Vec<(i64, serde_json::Value)>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let done = rops::restart(&mut tx, id, phase, &steps).await?;
        self.commit(tx).await?;
        Ok(done)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

/// Reserves `n` positions of the instance feed; returns the first.
async fn next_seq(tx: &mut Transaction<'_, Sqlite>, n: i64) -> Result<i64, StoreError> {
    let last: i64 = sqlx::query_scalar(
        "UPDATE counters SET value = value + ? WHERE name = 'instance_seq' RETURNING value",
    )
    .bind(n)
    .fetch_one(&mut **tx)
    .await?;
    Ok(last - n + 1)
}

/// Fails with `NotLeader` unless `holder` holds an unexpired leader lease.
async fn check_lease(tx: &mut Transaction<'_, Sqlite>, holder: &str) -> Result<(), StoreError> {
    let ok: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM leases WHERE name = ? AND holder = ? AND expires_at_ms > ?",
    )
    .bind(crate::LEADER_LEASE)
    .bind(holder)
    .bind(crate::millis(OffsetDateTime::now_utc()))
    .fetch_optional(&mut **tx)
    .await?;
    ok.map(|_| ()).ok_or(StoreError::NotLeader)
}

fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Alert, channel and delivery SQL, shared with the PostgreSQL backend.
mod ops {
    crate::alerts::alert_ops!(sqlx::Sqlite);
}

/// Rollout SQL, shared by both backends.
mod rops {
    crate::rollouts::rollout_ops!(sqlx::Sqlite);
}
