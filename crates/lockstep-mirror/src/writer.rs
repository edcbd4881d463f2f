//! The background task that owns the Redis connection and writes queued batches.
//!
//! Callers only ever touch [`Shared`] (a short mutex section and atomics); everything that can
//! wait on the network happens here, under timeouts, so a dead or slow Redis delays the
//! mirror and nothing else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::plan::{self, Batch, Command, Model, Plan};
use crate::{MARKER_FIELD, MARKER_VALUE};

/// Deletes `KEYS[1]` only when it is a hash whose field `ARGV[1]` is `ARGV[2]`: a key of the
/// prefix that another writer set (any type, any fields) is left as it is.
const DEL_IF_OWNED: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] == 'hash'
   and redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Replaces `KEYS[1]` with the marker (`ARGV[1]` = `ARGV[2]`), the fields `ARGV[4..]` and an
/// expiry of `ARGV[3]` ms — when the key is missing or already the mirror's. The old hash is
/// deleted first so a field the instance stopped reporting does not linger.
const WRITE_IF_OWNED: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' then
  if kind ~= 'hash' or redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
    return 0
  end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Batches are written at most this often: heartbeats arriving together share one pipeline.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Without new operations the task still wakes this often to retire instances whose TTL ran
/// out without a `remove`.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Per request; a resync is one pipeline, so this leaves room for a large fleet.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// SCAN page size: large enough to list a prefix in few round trips, small enough that one
/// call never blocks Redis for long.
const SCAN_COUNT: u32 = 1000;

/// State shared between callers and the task.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pending: Mutex<Batch>,
    wake: Notify,
    pub(crate) writes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    /// Operations taken by the task and not yet written.
    pub(crate) in_flight: AtomicU64,
    pub(crate) up: AtomicBool,
}

impl Shared {
    /// The queue. A panic while holding it cannot leave it half-updated in a way that matters
    /// (the worst is one lost operation, repaired by the next heartbeat or resync), so a
    /// poisoned lock is used rather than propagated to callers.
    pub(crate) fn pending(&self) -> MutexGuard<'_, Batch> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `f`'s change to the queue and wakes the task, without waiting for anything.
    pub(crate) fn queue(&self, f: impl FnOnce(&mut Batch)) {
        f(&mut self.pending());
        self.wake.notify_one();
    }
}

/// Why a write attempt failed.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("timed out")]
    Timeout,
}

/// Outcome of one flush.
enum Flushed {
    Nothing,
    Written,
    Failed,
}

struct Writer {
    shared: Arc<Shared>,
    client: redis::Client,
    prefix: String,
    conn: Option<MultiplexedConnection>,
    model: Model,
}

/// Runs until `stop` says so (or its sender, owned by the last `Mirror` handle, is dropped),
/// then makes one last bounded attempt to write what is queued.
pub(crate) async fn run(
    shared: Arc<Shared>,
    client: redis::Client,
    prefix: String,
    mut stop: watch::Receiver<bool>,
    final_flush: Duration,
) {
    let mut writer = Writer {
        shared,
        client,
        prefix,
        conn: None,
        model: Model::default(),
    };
    let mut backoff = MIN_BACKOFF;
    let mut retry_now = false;
    let mut last_flush: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        if !retry_now {
            tokio::select! {
                () = writer.shared.wake.notified() => {}
                () = tokio::time::sleep(SWEEP_INTERVAL) => {}
                _ = stop.changed() => break,
            }
        }
        // Let the operations of the next few milliseconds join this batch.
        if let Some(due) = last_flush.map(|t| t + FLUSH_INTERVAL)
            && due > Instant::now()
        {
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                _ = stop.changed() => break,
            }
        }
        last_flush = Some(Instant::now());
        retry_now = false;
        match writer.flush().await {
            Flushed::Nothing | Flushed::Written => backoff = MIN_BACKOFF,
            Flushed::Failed => {
                // New operations do not cut the wait short: under load they arrive constantly
                // and would turn the backoff into a busy loop against a dead server.
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                retry_now = true;
            }
        }
    }
    if tokio::time::timeout(final_flush, writer.flush())
        .await
        .is_err()
    {
        tracing::warn!(
            pending = writer.shared.pending().len(),
            "redis mirror: final flush timed out; Redis keeps the previous state until the keys expire"
        );
    }
}

impl Writer {
    async fn flush(&mut self) -> Flushed {
        let now = OffsetDateTime::now_utc();
        let batch = {
            // `in_flight` changes under the queue's lock so `stats()` never counts a batch
            // twice or not at all while it moves between the queue and the task.
            let mut pending = self.shared.pending();
            let batch = std::mem::take(&mut *pending);
            let count = u64::try_from(batch.len()).unwrap_or(u64::MAX);
            self.shared.in_flight.store(count, Ordering::Relaxed);
            batch
        };
        if batch.is_empty() && !self.model.has_expired(now) {
            return Flushed::Nothing;
        }
        let result = self.write(&batch, now).await;
        let was_up = self.shared.up.load(Ordering::Relaxed);
        let outcome = match result {
            Ok(plan) => {
                let commands: u64 = plan.commands.iter().map(Command::redis_commands).sum();
                self.shared.writes.fetch_add(commands, Ordering::Relaxed);
                if plan.reset {
                    self.shared.resyncs.fetch_add(1, Ordering::Relaxed);
                }
                self.model.commit(plan);
                self.shared.up.store(true, Ordering::Relaxed);
                if !was_up {
                    tracing::info!(commands, "redis mirror: writing");
                }
                Flushed::Written
            }
            Err(error) => {
                // The connection may be half-dead; the next attempt starts from a fresh one.
                self.conn = None;
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
                self.shared.up.store(false, Ordering::Relaxed);
                let mut pending = self.shared.pending();
                pending.merge_older(batch);
                self.shared.in_flight.store(0, Ordering::Relaxed);
                let pending_len = pending.len();
                drop(pending);
                if was_up || self.shared.errors.load(Ordering::Relaxed) == 1 {
                    tracing::warn!(%error, pending = pending_len, "redis mirror: write failed; retrying with backoff");
                } else {
                    tracing::debug!(%error, pending = pending_len, "redis mirror: write failed again");
                }
                Flushed::Failed
            }
        };
        self.shared.in_flight.store(0, Ordering::Relaxed);
        outcome
    }

    /// One attempt: connect if needed, list the prefix for a resync, send the plan (one
    /// ownership-checking script per key) as one MULTI/EXEC pipeline so Redis applies all of it or none of it (a retry is then planned
    /// against the state Redis really holds).
    async fn write(&mut self, batch: &Batch, now: OffsetDateTime) -> Result<Plan, WriteError> {
        let mut conn = self.connection().await?;
        let scanned = match batch.resync {
            Some(_) => Some(self.scan(&mut conn).await?),
            None => None,
        };
        let plan = plan::plan(&self.model, batch, scanned.as_deref(), now, &self.prefix);
        if plan.commands.is_empty() {
            return Ok(plan);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for command in &plan.commands {
            match command {
                Command::Del(key) => {
                    pipe.cmd("EVAL")
                        .arg(DEL_IF_OWNED)
                        .arg(1)
                        .arg(key)
                        .arg(MARKER_FIELD)
                        .arg(MARKER_VALUE)
                        .ignore();
                }
                Command::Write {
                    key,
                    fields,
                    pexpire_ms,
                } => {
                    let eval = pipe
                        .cmd("EVAL")
                        .arg(WRITE_IF_OWNED)
                        .arg(1)
                        .arg(key)
                        .arg(MARKER_FIELD)
                        .arg(MARKER_VALUE)
                        .arg(*pexpire_ms);
                    for (field, value) in fields {
                        eval.arg(*field).arg(value);
                    }
                    eval.ignore();
                }
            }
        }
        bounded(pipe.query_async::<()>(&mut conn)).await?;
        Ok(plan)
    }

    async fn connection(&mut self) -> Result<MultiplexedConnection, WriteError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = bounded(
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Every key under the prefix, listed with SCAN: KEYS would block Redis for every other
    /// client while it walks the whole keyspace.
    async fn scan(&self, conn: &mut MultiplexedConnection) -> Result<Vec<String>, WriteError> {
        let pattern = plan::scan_pattern(&self.prefix);
        let mut keys = std::collections::BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, page): (u64, Vec<String>) = bounded(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(conn),
            )
            .await?;
            // SCAN may return a key more than once; the set keeps one.
            keys.extend(page);
            if next == 0 {
                return Ok(keys.into_iter().collect());
            }
            cursor = next;
        }
    }
}

/// A second bound over the client's own timeouts: whatever state the connection is in, no
/// single request holds the task longer than connect + response time.
async fn bounded<T>(fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, WriteError> {
    match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(WriteError::Timeout),
    }
}
