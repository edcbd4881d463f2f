//! The shared backend: PostgreSQL, for several `serve` replicas on one database
//! (`--store postgres://…`). It mirrors the SQLite backend's semantics exactly; what differs
//! is how the guarantees are kept when many connections write at once.
//!
//! **Ordering by advisory locks.** Every transaction that allocates a revision or an event
//! id (registrations, rollbacks, events, tokens, deregistrations, `mark_missing`) first
//! takes one transaction-scoped advisory lock, the *log lock*, and only then allocates ids
//! (from the `counters` table) and commits; the lock is released after the commit is
//! visible. So ids become visible in the order they were allocated: once N is visible,
//! every id below N is too, and a reader resuming with "id > N" never skips a row that
//! commits later with a smaller id. The same lock makes "read the expected release, decide,
//! write" atomic across replicas (each statement after the lock sees every earlier commit,
//! as `READ COMMITTED` takes a fresh snapshot per statement). Heartbeat flushes and
//! expiry allocate instance-feed positions under a second key, the *instance lock*, so
//! flushes never wait for registrations; a transaction that needs both takes the log lock
//! first, then the instance lock, so two of them can never deadlock. The keys are derived
//! from the schema name, so stores in different schemas of one database do not serialise
//! each other.
//!
//! **The feed.** Write transactions that change releases, events or tokens call
//! `pg_notify` (delivered only if they commit); one background task per store holds a
//! `LISTEN` connection and bumps the wake-up channel on every notification and after every
//! (re)connect. Readers never trust the wake-up for content: they catch up by revision,
//! event id or instance seq, so a notification lost while the listener was reconnecting
//! only costs the time until the post-reconnect bump, and never a change. The task
//! reconnects by itself with backoff and stops when the last handle is dropped.
//!
//! **Migrations** run on one connection holding a session advisory lock, so replicas
//! starting together apply each step once (DDL is transactional: a step and its
//! `schema_migrations` row commit together). **Leases** use the database clock, so
//! replicas with skewed clocks agree on who holds one.
//!
//! The schema is the connection's current one: a URL may select another with
//! `?options=-c%20search_path%3D<schema>` ([`fresh_schema_url`] makes one for tests).

use async_trait::async_trait;
use lockstep_api::Event;
use lockstep_core::{
    Decision, HistoryEntry, Instance, RegistrationKind, Release, StoredRelease,
    decide_registration, rollback_target,
};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};

use crate::{
    InstanceChange, Lease, NewEvent, Registered, Registration, Rollback, Store, StoreError,
    StoredToken, migrations,
};

/// Connections per store handle (each replica opens one handle).
const MAX_CONNECTIONS: u32 = 16;
/// How long a call waits for a free connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows per upsert statement in a heartbeat flush (bounds one statement's size).
const FLUSH_CHUNK: usize = 10_000;
/// How long the server lets a session sit idle inside a transaction before ending it.
const IDLE_IN_TX_TIMEOUT: &str = "15s";
/// Longest pause between two reconnect attempts of the feed listener.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Prefix of the schemas [`fresh_schema_url`] creates (and the only ones
/// [`drop_schema`] drops).
const TEST_SCHEMA_PREFIX: &str = "lockstep_t_";

/// The PostgreSQL backend. Cloning is cheap and shares the pool and the feed; the feed
/// listener stops when the last clone is dropped.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    shared: Arc<Shared>,
}

/// What every clone of one store shares.
struct Shared {
    feed: watch::Sender<u64>,
    channel: String,
    log_key: i64,
    instance_key: i64,
    /// Never sent: dropping it (with the last handle) tells the listener task to stop.
    _stop: oneshot::Sender<()>,
}

/// FNV-1a 64: stable across processes and builds, unlike std's seeded hasher, so every
/// replica derives the same advisory-lock keys and channel names.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            // A separator, so ("ab", "c") and ("a", "bc") differ.
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for b in part.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The advisory-lock key for one purpose (`log`, `instances`, `migrate`) in one schema.
/// A collision with another application's key would only serialise more, never less.
fn lock_key(purpose: &str, schema: &str) -> i64 {
    fnv1a(&["lockstep", purpose, schema]) as i64
}

/// The notification channel of a schema: per schema so that stores in different schemas
/// (test databases, several registries on one server) do not wake each other. Channel
/// names are identifiers (at most 63 bytes), so a long schema name is hashed.
fn channel_for(schema: &str) -> String {
    if schema == "public" {
        return "lockstep_feed".into();
    }
    let name = format!("lockstep_feed.{schema}");
    if name.len() <= 63 {
        name
    } else {
        format!("lockstep_feed.{:016x}", fnv1a(&[schema]))
    }
}

/// `url` without its password, for errors and logs: the userinfo is dropped, and so is a
/// `password=` query parameter.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<postgres url>".into();
    };
    // The userinfo ends at the last '@' before the query: a password may hold '/' or '@'.
    let query_at = rest.find('?').unwrap_or(rest.len());
    let (before_query, query) = rest.split_at(query_at);
    let host_and_path = before_query
        .rsplit_once('@')
        .map_or(before_query, |(_, h)| h);
    let query = match query.strip_prefix('?') {
        Some(q) => {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|kv| {
                    !kv.split('=')
                        .next()
                        .is_some_and(|k| k.eq_ignore_ascii_case("password"))
                })
                .collect();
            if kept.is_empty() {
                String::new()
            } else {
                format!("?{}", kept.join("&"))
            }
        }
        None => String::new(),
    };
    format!("{scheme}://{host_and_path}{query}")
}

/// The error for a failed open, naming the server without its password.
fn open_error(url: &str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: redact_url(url),
        message: message.to_string(),
    }
}

/// `base_url` selecting `schema` through the startup `options` parameter, which sqlx
/// parses from the URL (and appends to any `options` already there).
fn with_search_path(base_url: &str, schema: &str) -> String {
    let (url, fragment) = match base_url.split_once('#') {
        Some((u, f)) => (u, format!("#{f}")),
        None => (base_url, String::new()),
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}{fragment}")
}

/// Creates a new, empty, uniquely named schema (`lockstep_t_<32 hex digits>`) on the server
/// at `base_url` and returns a URL that selects it, for tests and benchmarks: a store (or
/// `lockstep serve --store <url>`) opened with it creates its tables there.
pub async fn fresh_schema_url(base_url: &str) -> Result<String, StoreError> {
    let mut conn = PgConnection::connect(base_url)
        .await
        .map_err(|e| open_error(base_url, e))?;
    let schema: String =
        sqlx::query_scalar("SELECT 'lockstep_t_' || replace(gen_random_uuid()::text, '-', '')")
            .fetch_one(&mut conn)
            .await?;
    // Spliced into SQL: only the characters the query above can produce are allowed.
    if !schema
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(StoreError::Corrupt(format!(
            "unexpected schema name {schema:?}"
        )));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(with_search_path(base_url, &schema))
}

/// Drops the schema a URL from [`fresh_schema_url`] selects, with everything in it.
/// Refuses any schema that `fresh_schema_url` did not name, so a wrong URL cannot drop
/// real data.
pub async fn drop_schema(schema_url: &str) -> Result<(), StoreError> {
    let mut conn = PgConnection::connect(schema_url)
        .await
        .map_err(|e| open_error(schema_url, e))?;
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut conn)
        .await?;
    let schema = schema.unwrap_or_default();
    let generated = schema
        .strip_prefix(TEST_SCHEMA_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()));
    if !generated {
        return Err(open_error(
            schema_url,
            format!("refusing to drop schema {schema:?}: fresh_schema_url did not create it"),
        ));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(())
}

impl PgStore {
    /// Connects to the database `url` names (a `postgres://` or `postgresql://` URL; the
    /// schema is the connection's current one), runs pending migrations and starts the
    /// change-feed listener. Errors name the server without its password.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let mut opts: PgConnectOptions = url.parse().map_err(|e| open_error(url, e))?;
        if opts.get_application_name().is_none() {
            // Shows who holds a connection in pg_stat_activity.
            opts = opts.application_name("lockstep");
        }
        if !opts
            .get_options()
            .is_some_and(|o| o.contains("idle_in_transaction_session_timeout"))
        {
            // A replica frozen inside a transaction (SIGSTOP, a paused VM) would hold the
            // log lock, and stall every replica, for as long as its connection lives: the
            // server ends such a session instead. No transaction here waits on the client.
            opts = opts.options([("idle_in_transaction_session_timeout", IDLE_IN_TX_TIMEOUT)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts.clone())
            .await
            .map_err(|e| open_error(url, e))?;
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        let schema = schema.ok_or_else(|| {
            open_error(
                url,
                "the search_path names no existing schema to create tables in",
            )
        })?;
        migrate(&pool, &schema).await?;

        let channel = channel_for(&schema);
        // A pool of one that PgListener uses to reconnect; no lifetime limits, as the
        // connection is meant to stay open.
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(opts.application_name("lockstep-feed"));
        // Listen before returning, so the feed covers every commit after `connect`.
        let listener = listen(&listen_pool, &channel)
            .await
            .map_err(|e| open_error(url, e))?;
        let (stop, stopped) = oneshot::channel();
        let shared = Arc::new(Shared {
            feed: watch::channel(0).0,
            channel: channel.clone(),
            log_key: lock_key("log", &schema),
            instance_key: lock_key("instances", &schema),
            _stop: stop,
        });
        tokio::spawn(run_listener(
            listen_pool,
            listener,
            channel,
            Arc::downgrade(&shared),
            stopped,
        ));
        tracing::info!(schema = %schema, "store: postgres");
        Ok(PgStore { pool, shared })
    }

    /// Closes the pool (clean shutdown); the listener stops with the last handle.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A write transaction on the log: holds the log lock and queues a notification,
    /// which PostgreSQL delivers only if the transaction commits.
    async fn log_tx(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1), pg_notify($2, '')")
            .bind(self.shared.log_key)
            .bind(&self.shared.channel)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Takes the instance lock inside `tx` (after the log lock, when both are needed).
    async fn lock_instances(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(self.shared.instance_key)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Commits and wakes this handle's readers at once (other handles hear the NOTIFY).
    async fn commit(&self, tx: Transaction<'static, Postgres>) -> Result<(), StoreError> {
        tx.commit().await?;
        bump(&self.shared.feed);
        Ok(())
    }
}

fn bump(feed: &watch::Sender<u64>) {
    feed.send_modify(|n| *n = n.wrapping_add(1));
}

/// A listener subscribed to `channel`.
async fn listen(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

/// The feed task: bumps the watch on every notification and after every (re)connect, as
/// notifications sent while it was disconnected are lost and readers must catch up.
async fn run_listener(
    pool: PgPool,
    first: PgListener,
    channel: String,
    shared: Weak<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let wake = |shared: &Weak<Shared>| match shared.upgrade() {
        Some(s) => {
            bump(&s.feed);
            true
        }
        None => false,
    };
    let mut listener = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut current = match listener.take() {
            Some(l) => l,
            None => {
                let attempt = tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    r = listen(&pool, &channel) => r,
                };
                match attempt {
                    Ok(l) => {
                        tracing::info!("store feed: listening again");
                        backoff = Duration::from_millis(100);
                        if !wake(&shared) {
                            break;
                        }
                        l
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "store feed: cannot listen");
                        tokio::select! {
                            biased;
                            _ = &mut stopped => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
        };
        let received = tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = current.try_recv() => r,
        };
        match received {
            Ok(Some(_)) => {
                // Drain what is already buffered: one bump covers them all.
                while current.next_buffered().is_some() {}
                if !wake(&shared) {
                    break;
                }
                listener = Some(current);
            }
            Ok(None) => {
                // The connection dropped and PgListener re-listened on a new one; what
                // was sent in between is lost, so readers must catch up.
                tracing::info!("store feed: reconnected");
                if !wake(&shared) {
                    break;
                }
                listener = Some(current);
            }
            Err(e) => {
                // Dropping the listener gives its connection back; the next round
                // builds a new one (the pool tests it first and discards a dead one).
                tracing::warn!(error = %e, "store feed: listener failed; reconnecting");
                drop(current);
                tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    drop(listener);
    // Give the connection a moment to be returned (PgListener unlistens in a task).
    let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
}

/// Applies pending migrations while holding a session advisory lock on one connection, so
/// replicas starting together apply each step exactly once.
async fn migrate(pool: &PgPool, schema: &str) -> Result<(), StoreError> {
    let key = lock_key("migrate", schema);
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    let applied = apply_migrations(&mut conn).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await;
    if applied.is_err() || unlocked.is_err() {
        // A session lock lives as long as the session: end it rather than return a
        // connection to the pool that may still hold the lock.
        conn.close_on_drop();
    }
    applied?;
    unlocked?;
    Ok(())
}

async fn apply_migrations(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations \
         (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *conn)
    .await?;
    for (version, sql) in migrations::POSTGRES {
        let mut tx = conn.begin().await?;
        let done: Option<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            tx.rollback().await?;
            continue;
        }
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_migrations (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}

/// Reserves `n` consecutive values of a counter (`revision`, `event_id`, `instance_seq`);
/// returns the first and the database clock. Callers hold the lock that guards the
/// counter, so values commit in the order they were reserved.
async fn allocate(
    tx: &mut Transaction<'_, Postgres>,
    counter: &str,
    n: i64,
) -> Result<(i64, OffsetDateTime), StoreError> {
    let (last, now): (i64, OffsetDateTime) = sqlx::query_as(
        "UPDATE counters SET value = value + $2 WHERE name = $1 RETURNING value, clock_timestamp()",
    )
    .bind(counter)
    .bind(n)
    .fetch_one(&mut **tx)
    .await?;
    Ok((last - n + 1, now))
}

fn release_from_row(row: &PgRow) -> Result<StoredRelease, StoreError> {
    let body: String = row.try_get("body")?;
    let kind: String = row.try_get("kind")?;
    Ok(StoredRelease {
        env: row.try_get("env")?,
        service: row.try_get("service")?,
        revision: row.try_get("revision")?,
        kind: RegistrationKind::parse(&kind),
        registered_at: row.try_get("registered_at")?,
        release: serde_json::from_str(&body)?,
    })
}

fn event_from_row(row: &PgRow) -> Result<Event, StoreError> {
    let data: String = row.try_get("data")?;
    Ok(Event {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        kind: row.try_get("kind")?,
        env: row.try_get("env")?,
        service: row.try_get("service")?,
        actor: row.try_get("actor")?,
        reason: row.try_get("reason")?,
        data: serde_json::from_str(&data)?,
    })
}

async fn expected_in(
    tx: &mut Transaction<'_, Postgres>,
    env: &str,
    service: &str,
) -> Result<Option<StoredRelease>, StoreError> {
    let row = sqlx::query(
        "SELECT r.revision, r.env, r.service, r.version_id, r.kind, r.registered_at, r.body \
         FROM expected e JOIN releases r ON r.revision = e.revision \
         WHERE e.env = $1 AND e.service = $2",
    )
    .bind(env)
    .bind(service)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(release_from_row).transpose()
}

/// Appends events in order with one id reservation and one insert, whatever their number
/// (`mark_missing` may log thousands). The caller holds the log lock.
async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    evs: Vec<NewEvent>,
) -> Result<Vec<Event>, StoreError> {
    if evs.is_empty() {
        return Ok(Vec::new());
    }
    let (first, at) = allocate(tx, "event_id", evs.len() as i64).await?;
    let ids: Vec<i64> = (first..first + evs.len() as i64).collect();
    let data = evs
        .iter()
        .map(|e| serde_json::to_string(&e.data))
        .collect::<Result<Vec<_>, _>>()?;
    sqlx::query(
        "INSERT INTO events (id, at, kind, env, service, actor, reason, data) \
         SELECT u.id, $2, u.kind, u.env, u.service, u.actor, u.reason, u.data \
         FROM unnest($1::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[]) \
           AS u(id, kind, env, service, actor, reason, data)",
    )
    .bind(&ids)
    .bind(at)
    .bind(evs.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
    .bind(evs.iter().map(|e| e.env.as_deref()).collect::<Vec<_>>())
    .bind(evs.iter().map(|e| e.service.as_deref()).collect::<Vec<_>>())
    .bind(evs.iter().map(|e| e.actor.as_deref()).collect::<Vec<_>>())
    .bind(evs.iter().map(|e| e.reason.as_deref()).collect::<Vec<_>>())
    .bind(&data)
    .execute(&mut **tx)
    .await?;
    Ok(evs
        .into_iter()
        .zip(ids)
        .map(|(ev, id)| Event {
            id,
            at,
            kind: ev.kind,
            env: ev.env,
            service: ev.service,
            actor: ev.actor,
            reason: ev.reason,
            data: ev.data,
        })
        .collect())
}

async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    ev: NewEvent,
) -> Result<Event, StoreError> {
    insert_events(tx, vec![ev])
        .await?
        .pop()
        .ok_or_else(|| StoreError::Corrupt("no event written".into()))
}

/// Writes a new revision making `release` expected, plus its event, inside `tx` (which
/// holds the log lock).
async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    env: &str,
    service: &str,
    release: Release,
    kind: RegistrationKind,
    previous: Option<&StoredRelease>,
    event_data: serde_json::Value,
) -> Result<(StoredRelease, Event), StoreError> {
    let (revision, now) = allocate(tx, "revision", 1).await?;
    let body = serde_json::to_string(&release)?;
    sqlx::query(
        "INSERT INTO releases (revision, env, service, version_id, kind, registered_at, body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(revision)
    .bind(env)
    .bind(service)
    .bind(&release.version_id)
    .bind(kind.as_str())
    .bind(now)
    .bind(&body)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO expected (env, service, revision) VALUES ($1, $2, $3) \
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

/// Fails with `NotLeader` unless `holder` holds an unexpired leader lease (database
/// clock). The row stays share-locked until the transaction ends, so the lease cannot
/// change hands while the leader-only write is under way.
async fn check_lease(tx: &mut Transaction<'_, Postgres>, holder: &str) -> Result<(), StoreError> {
    let ok: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND expires_at > clock_timestamp() \
         FOR SHARE",
    )
    .bind(crate::LEADER_LEASE)
    .bind(holder)
    .fetch_optional(&mut **tx)
    .await?;
    ok.map(|_| ()).ok_or(StoreError::NotLeader)
}

#[async_trait]
impl Store for PgStore {
    fn feed(&self) -> watch::Receiver<u64> {
        self.shared.feed.subscribe()
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn register(&self, reg: Registration) -> Result<Registered, StoreError> {
        let mut tx = self.log_tx().await?;
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
        let mut tx = self.log_tx().await?;
        let current = expected_in(&mut tx, &rb.env, &rb.service)
            .await?
            .ok_or_else(|| StoreError::NoRelease {
                env: rb.env.clone(),
                service: rb.service.clone(),
            })?;
        let rows = sqlx::query(
            "SELECT revision, version_id, kind FROM releases \
             WHERE env = $1 AND service = $2 ORDER BY revision DESC",
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
        let row = sqlx::query(
            "SELECT revision, env, service, version_id, kind, registered_at, body FROM releases \
             WHERE revision = $1",
        )
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
        let row = sqlx::query(
            "SELECT r.revision, r.env, r.service, r.version_id, r.kind, r.registered_at, r.body \
             FROM expected e JOIN releases r ON r.revision = e.revision \
             WHERE e.env = $1 AND e.service = $2",
        )
        .bind(env)
        .bind(service)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(release_from_row).transpose()
    }

    async fn all_expected(&self) -> Result<Vec<StoredRelease>, StoreError> {
        sqlx::query(
            "SELECT r.revision, r.env, r.service, r.version_id, r.kind, r.registered_at, r.body \
             FROM expected e JOIN releases r ON r.revision = e.revision ORDER BY r.revision",
        )
        .fetch_all(&self.pool)
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
        sqlx::query(
            "SELECT revision, env, service, version_id, kind, registered_at, body FROM releases \
             WHERE env = $1 AND service = $2 ORDER BY revision DESC LIMIT $3",
        )
        .bind(env)
        .bind(service)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        sqlx::query(
            "SELECT revision, env, service, version_id, kind, registered_at, body FROM releases \
             WHERE revision > $1 ORDER BY revision LIMIT $2",
        )
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(release_from_row)
        .collect()
    }

    async fn last_revision(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(revision) FROM releases")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn append_events(&self, evs: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        let mut tx = self.log_tx().await?;
        let out = insert_events(&mut tx, evs).await?;
        self.commit(tx).await?;
        Ok(out)
    }

    async fn events_since(&self, since: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        sqlx::query(
            "SELECT id, at, kind, env, service, actor, reason, data FROM events \
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(event_from_row)
        .collect()
    }

    async fn last_event_id(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn create_token(&self, t: StoredToken, actor: &str) -> Result<Event, StoreError> {
        let mut tx = self.log_tx().await?;
        let res = sqlx::query(
            "INSERT INTO tokens (name, role, hash, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(&t.hash)
        .bind(t.created_at)
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
        let mut tx = self.log_tx().await?;
        let same: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM tokens WHERE name = $1 AND role = $2 AND hash = $3")
                .bind(&t.name)
                .bind(t.role.as_str())
                .bind(&t.hash)
                .fetch_optional(&mut *tx)
                .await?;
        if same.is_some() {
            tx.rollback().await?;
            return Ok(None);
        }
        let revoked: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM revoked_tokens WHERE hash = $1")
                .bind(&t.hash)
                .fetch_optional(&mut *tx)
                .await?;
        if revoked.is_some() {
            tx.rollback().await?;
            return Err(StoreError::Revoked(t.name));
        }
        sqlx::query(
            "INSERT INTO tokens (name, role, hash, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET role = excluded.role, hash = excluded.hash",
        )
        .bind(&t.name)
        .bind(t.role.as_str())
        .bind(&t.hash)
        .bind(t.created_at)
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
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let role: String = r.try_get("role")?;
                Ok(StoredToken {
                    name: r.try_get("name")?,
                    role: role.parse().map_err(|e: lockstep_core::CoreError| {
                        StoreError::Corrupt(e.to_string())
                    })?,
                    hash: r.try_get("hash")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn revoke_token(&self, name: &str, actor: &str) -> Result<Option<Event>, StoreError> {
        let mut tx = self.log_tx().await?;
        let row: Option<(String, String)> =
            sqlx::query_as("DELETE FROM tokens WHERE name = $1 RETURNING role, hash")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((role, hash)) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let role: lockstep_core::Role = role
            .parse()
            .map_err(|e: lockstep_core::CoreError| StoreError::Corrupt(e.to_string()))?;
        // Under the log lock: two admins revoking each other at once cannot both succeed.
        if role == lockstep_core::Role::Admin {
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
            "INSERT INTO revoked_tokens (hash, name, revoked_at) VALUES ($1, $2, now()) \
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(&hash)
        .bind(name)
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
        // One row per id: an upsert statement may not touch a row twice. Keep what SQLite
        // would end with applying them in order: the first of the newest heartbeats.
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(instances.len());
        let mut kept: Vec<&Instance> = Vec::with_capacity(instances.len());
        for i in instances {
            match index.get(i.instance_id.as_str()) {
                Some(&at) => {
                    if i.last_seen > kept[at].last_seen {
                        kept[at] = i;
                    }
                }
                None => {
                    index.insert(&i.instance_id, kept.len());
                    kept.push(i);
                }
            }
        }
        // In key order: the primary-key index is walked in order (fewer page misses on a
        // large flush), and rows are locked in one global order. Positions within one
        // flush need no particular order: they all commit together.
        kept.sort_unstable_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let mut tx = self.pool.begin().await?;
        self.lock_instances(&mut tx).await?;
        let (mut seq, _) = allocate(&mut tx, "instance_seq", kept.len() as i64).await?;
        let first = seq;
        for chunk in kept.chunks(FLUSH_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|i| i.instance_id.as_str()).collect();
            let bodies = chunk
                .iter()
                .map(serde_json::to_string)
                .collect::<Result<Vec<_>, _>>()?;
            let last_seen: Vec<i64> = chunk.iter().map(|i| crate::millis(i.last_seen)).collect();
            // Only a newer heartbeat replaces a row, and a tombstone only yields to a
            // heartbeat newer than the deregistration; a rejected row burns its seq.
            sqlx::query(
                "INSERT INTO instances (instance_id, body, seq, last_seen_ms, deleted_at_ms, missing_reported) \
                 SELECT u.id, u.body, $4 + u.ord - 1, u.last_seen, NULL, FALSE \
                 FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS u(id, body, last_seen, ord) \
                 ON CONFLICT (instance_id) DO UPDATE SET body = excluded.body, seq = excluded.seq, \
                   last_seen_ms = excluded.last_seen_ms, deleted_at_ms = NULL, missing_reported = FALSE \
                 WHERE excluded.last_seen_ms > instances.last_seen_ms \
                   AND (instances.deleted_at_ms IS NULL OR excluded.last_seen_ms > instances.deleted_at_ms)",
            )
            .bind(&ids)
            .bind(&bodies)
            .bind(&last_seen)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            seq += chunk.len() as i64;
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
        let mut tx = self.log_tx().await?;
        self.lock_instances(&mut tx).await?;
        let body: Option<String> = sqlx::query_scalar(
            "SELECT body FROM instances WHERE instance_id = $1 AND deleted_at_ms IS NULL",
        )
        .bind(instance_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(body) = body else {
            tx.rollback().await?;
            return Ok(None);
        };
        let inst: Instance = serde_json::from_str(&body)?;
        let (seq, _) = allocate(&mut tx, "instance_seq", 1).await?;
        let now = crate::millis(OffsetDateTime::now_utc());
        sqlx::query("UPDATE instances SET deleted_at_ms = $1, seq = $2 WHERE instance_id = $3")
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
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        let mut tx = self.log_tx().await?;
        // Both locks (log first): the events need the log lock, and holding the instance
        // lock keeps a concurrent flush from locking the same rows in another order.
        self.lock_instances(&mut tx).await?;
        check_lease(&mut tx, holder).await?;
        let mut rows: Vec<(String, String, i64)> = sqlx::query_as(
            "UPDATE instances SET missing_reported = TRUE \
             WHERE deleted_at_ms IS NULL AND NOT missing_reported AND last_seen_ms < $1 \
             RETURNING instance_id, body, last_seen_ms",
        )
        .bind(crate::millis(cutoff))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(Vec::new());
        }
        // The order SQLite logs them in.
        rows.sort_by(|a, b| (a.2, &a.0).cmp(&(b.2, &b.0)));
        let evs = rows
            .iter()
            .map(|(_, body, _)| Ok(crate::missing_event(&serde_json::from_str(body)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let out = insert_events(&mut tx, evs).await?;
        self.commit(tx).await?;
        Ok(out)
    }

    async fn expire_instances(
        &self,
        holder: &str,
        cutoff: OffsetDateTime,
        purge_before: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        self.lock_instances(&mut tx).await?;
        check_lease(&mut tx, holder).await?;
        sqlx::query("DELETE FROM instances WHERE deleted_at_ms IS NOT NULL AND deleted_at_ms < $1")
            .bind(crate::millis(purge_before))
            .execute(&mut *tx)
            .await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT instance_id FROM instances WHERE deleted_at_ms IS NULL AND last_seen_ms < $1 \
             ORDER BY instance_id",
        )
        .bind(crate::millis(cutoff))
        .fetch_all(&mut *tx)
        .await?;
        if !ids.is_empty() {
            let now = crate::millis(OffsetDateTime::now_utc());
            let (first, _) = allocate(&mut tx, "instance_seq", ids.len() as i64).await?;
            let seqs: Vec<i64> = (first..first + ids.len() as i64).collect();
            sqlx::query(
                "UPDATE instances i SET deleted_at_ms = $1, seq = u.seq \
                 FROM unnest($2::text[], $3::int8[]) AS u(id, seq) WHERE i.instance_id = u.id",
            )
            .bind(now)
            .bind(&ids)
            .bind(&seqs)
            .execute(&mut *tx)
            .await?;
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
        let ttl_ms = ttl.as_millis() as f64;
        // Two statements, not one: when the upsert yields to a holder whose row committed
        // after this statement's snapshot, only a new statement can read that row.
        for _ in 0..3 {
            let taken: Option<(String, OffsetDateTime)> = sqlx::query_as(
                "INSERT INTO leases (name, holder, expires_at) \
                 VALUES ($1, $2, clock_timestamp() + $3::float8 * interval '1 millisecond') \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
                 WHERE leases.holder = excluded.holder OR leases.expires_at <= clock_timestamp() \
                 RETURNING holder, expires_at",
            )
            .bind(name)
            .bind(holder)
            .bind(ttl_ms)
            .fetch_optional(&self.pool)
            .await?;
            if let Some((h, exp)) = taken {
                return Ok(Lease {
                    held: h == holder,
                    holder: h,
                    expires_at: exp,
                });
            }
            let other: Option<(String, OffsetDateTime)> =
                sqlx::query_as("SELECT holder, expires_at FROM leases WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?;
            if let Some((h, exp)) = other {
                return Ok(Lease {
                    held: h == holder,
                    holder: h,
                    expires_at: exp,
                });
            }
            // Released between the two statements: try to take it again.
        }
        Err(StoreError::Conflict(format!(
            "lease {name:?} changed hands too fast to be read"
        )))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn apply_alerts(
        &self,
        holder: &str,
        writes: Vec<crate::AlertWrite>,
    ) -> Result<Vec<(lockstep_api::Alert, Event)>, StoreError> {
        let mut tx = self.log_tx().await?;
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
        ops::list_alerts(&self.pool, &filter).await
    }

    async fn ack_alert(
        &self,
        id: i64,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Option<(lockstep_api::Alert, Option<Event>)>, StoreError> {
        let mut tx = self.log_tx().await?;
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
             WHERE h.alert_id = $1 ORDER BY e.id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn alert_channels(&self) -> Result<Vec<lockstep_api::ChannelConfig>, StoreError> {
        ops::channels(&self.pool).await
    }

    async fn put_alert_channels(
        &self,
        channels: Vec<lockstep_api::ChannelConfig>,
        actor: &str,
    ) -> Result<Event, StoreError> {
        let mut tx = self.log_tx().await?;
        ops::put_channels(&mut tx, &channels).await?;
        let ev = insert_event(&mut tx, crate::channels_event(&channels, actor)).await?;
        self.commit(tx).await?;
        Ok(ev)
    }

    async fn notify_cursor(&self) -> Result<i64, StoreError> {
        ops::cursor(&self.pool).await
    }

    async fn enqueue_notifications(
        &self,
        holder: &str,
        from: i64,
        to: i64,
        items: Vec<crate::NewNotification>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        check_lease(&mut tx, holder).await?;
        if !ops::enqueue(&mut tx, from, to, &items).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn pending_notifications(&self) -> Result<Vec<crate::Notification>, StoreError> {
        ops::pending_notifications(&self.pool).await
    }

    async fn create_delivery(
        &self,
        holder: &str,
        channel: &str,
        kind: &str,
        body: &str,
        ids: &[i64],
    ) -> Result<Option<crate::Delivery>, StoreError> {
        let mut tx = self.pool.begin().await?;
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
        ops::due_deliveries(&self.pool, now).await
    }

    async fn record_delivery(
        &self,
        holder: &str,
        id: i64,
        outcome: crate::DeliveryOutcome,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        check_lease(&mut tx, holder).await?;
        let done = ops::record_delivery(&mut tx, id, &outcome).await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn deliveries(&self, limit: u32) -> Result<Vec<crate::Delivery>, StoreError> {
        ops::deliveries(&self.pool, limit).await
    }

    async fn last_deliveries(&self) -> Result<Vec<(String, OffsetDateTime)>, StoreError> {
        ops::last_deliveries(&self.pool).await
    }

    async fn create_rollout(&self, r: crate::NewRollout) -> Result<crate::Rollout, StoreError> {
        let mut tx = self.log_tx().await?;
        let id = rops::create(&mut tx, r).await?;
        self.commit(tx).await?;
        rops::get(&self.pool, id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("rollout {id} not readable")))
    }

    async fn rollout(&self, id: i64) -> Result<Option<crate::Rollout>, StoreError> {
        rops::get(&self.pool, id).await
    }

    async fn rollouts(
        &self,
        running_only: bool,
        limit: u32,
    ) -> Result<Vec<crate::Rollout>, StoreError> {
        rops::list(&self.pool, running_only, limit).await
    }

    async fn rollout_nodes(&self, id: i64) -> Result<Vec<crate::RolloutNode>, StoreError> {
        rops::nodes(&self.pool, id).await
    }

    async fn latest_rollout_nodes(&self) -> Result<Vec<crate::LatestRolloutNode>, StoreError> {
        rops::latest_nodes(&self.pool).await
    }

    async fn rollout_package(
        &self,
        id: i64,
    ) -> Result<Option<(Vec<u8>, Option<Vec<u8>>)>, StoreError> {
        rops::package(&self.pool, id).await
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
        let mut tx = self.log_tx().await?;
        check_lease(&mut tx, holder).await?;
        if !rops::set_step(&mut tx, id, idx, &step, attempt).await? {
            tx.rollback().await?;
            return Err(StoreError::Corrupt(format!(
                "rollout {id} has no node {idx}"
            )));
        }
        let evs = insert_events(&mut tx, events).await?;
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
        let mut tx = self.log_tx().await?;
        check_lease(&mut tx, holder).await?;
        rops::set_phase(&mut tx, id, phase, running, clear_request).await?;
        let evs = insert_events(&mut tx, events).await?;
        self.commit(tx).await?;
        Ok(evs)
    }

    async fn request_rollout(&self, id: i64, request: &str) -> Result<bool, StoreError> {
        let mut tx = self.log_tx().await?;
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
        let mut tx = self.log_tx().await?;
        let done = rops::restart(&mut tx, id, phase, &steps).await?;
        self.commit(tx).await?;
        Ok(done)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Alert, channel and delivery SQL, shared with the SQLite backend.
mod ops {
    crate::alerts::alert_ops!(sqlx::Postgres);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cr3t@db:5432/lockstep?sslmode=require"),
            "postgres://db:5432/lockstep?sslmode=require"
        );
        assert_eq!(
            redact_url("postgresql://app:pa/ss@w0rd@db/x"),
            "postgresql://db/x"
        );
        assert_eq!(
            redact_url("postgres://db/x?user=app&password=s3cr3t&application_name=a"),
            "postgres://db/x?user=app&application_name=a"
        );
        assert_eq!(redact_url("postgres://db/x?password=p"), "postgres://db/x");
        assert_eq!(redact_url("garbage"), "<postgres url>");
    }

    #[test]
    fn channels_and_keys_are_per_schema_and_stable() {
        assert_eq!(channel_for("public"), "lockstep_feed");
        assert_eq!(channel_for("lockstep_t_ab"), "lockstep_feed.lockstep_t_ab");
        assert!(channel_for(&"x".repeat(63)).len() <= 63);
        assert_ne!(lock_key("log", "a"), lock_key("instances", "a"));
        assert_ne!(lock_key("log", "a"), lock_key("log", "b"));
        assert_eq!(lock_key("log", "a"), lock_key("log", "a"));
    }

    #[test]
    fn a_search_path_is_added_to_any_url() {
        assert_eq!(
            with_search_path("postgres://h/db", "s"),
            "postgres://h/db?options=-c%20search_path%3Ds"
        );
        assert_eq!(
            with_search_path("postgres://h/db?sslmode=disable", "s"),
            "postgres://h/db?sslmode=disable&options=-c%20search_path%3Ds"
        );
    }
}

/// Rollout SQL, shared by both backends.
mod rops {
    crate::rollouts::rollout_ops!(sqlx::Postgres);
}
