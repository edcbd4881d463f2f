//! Alerts, their history, the alert channels and the delivery outbox: types, and the SQL both
//! backends run.
//!
//! The tables use only types SQLite and PostgreSQL share (text, 64-bit integers, times as
//! milliseconds) and `$N` parameters, which both accept, so one body of SQL serves both:
//! [`alert_ops!`] expands it once per backend. What differs — how a write transaction is
//! opened (SQLite's write lock, PostgreSQL's log lock), the lease check and how events are
//! appended — stays in each backend, which calls these functions inside its transaction.
//!
//! **Exactly one open alert per (instance, condition)**: writers are serialised (SQLite's
//! single writer, PostgreSQL's log lock) and a partial unique index backs it up.
//! **Notifications**: the leader reads the `alert_*` events after a cursor and queues one
//! notification per (channel, event) together with the cursor's new position, in one
//! transaction; a notification is assigned to exactly one delivery in the transaction that
//! creates it. So a leader change loses nothing and plans nothing twice.

use lockstep_api::{Alert, AlertState};
use time::OffsetDateTime;

/// An alert write of the drift detector.
#[derive(Debug, Clone)]
pub enum AlertWrite {
    /// Opens an alert for (instance, condition) — or, when one is open, raises its severity
    /// to the given one if that is higher (else nothing). `alert_id`, `state`, the
    /// acknowledgement and `resolved_at` of the given alert are ignored.
    Raise(Box<Alert>),
    /// Resolves the open alert of (instance, condition), if any.
    Resolve {
        /// The instance.
        instance_id: String,
        /// What was wrong.
        condition: lockstep_core::Condition,
        /// When.
        at: OffsetDateTime,
    },
}

/// Which alerts to list.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// `None`: every state.
    pub state: Option<AlertState>,
    /// Only this environment.
    pub env: Option<String>,
    /// Only this service.
    pub service: Option<String>,
    /// At most this many (newest first).
    pub limit: u32,
}

/// A notification to queue: one alert change for one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNotification {
    /// Channel name.
    pub channel: String,
    /// The `alert_*` event it comes from.
    pub event_id: i64,
    /// The event kind (`alert_opened`, …).
    pub kind: String,
    /// The alert as of the event.
    pub alert: Alert,
}

/// A queued notification.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// Id.
    pub id: i64,
    /// Channel name.
    pub channel: String,
    /// The event it comes from.
    pub event_id: i64,
    /// The event kind.
    pub kind: String,
    /// The alert as of the event.
    pub alert: Alert,
    /// When it was queued.
    pub created_at: OffsetDateTime,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Not sent yet (first attempt or a retry due at `next_attempt_at`).
    Pending,
    /// The channel accepted it.
    Sent,
    /// Every attempt failed; the alerts stay in the store.
    Failed,
}

impl DeliveryStatus {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Failed => "failed",
        }
    }

    fn parse(s: &str) -> DeliveryStatus {
        match s {
            "sent" => DeliveryStatus::Sent,
            "failed" => DeliveryStatus::Failed,
            _ => DeliveryStatus::Pending,
        }
    }
}

/// One message to one channel (a single alert or a digest), and its attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Id (sent as `X-Lockstep-Delivery`, so a receiver can drop a repeat).
    pub id: i64,
    /// Channel name.
    pub channel: String,
    /// `alert` (one notification) or `digest` (several).
    pub kind: String,
    /// The notifications it carries, as JSON (`[{"kind", "alert"}, …]`), fixed at creation
    /// so every attempt sends the same content.
    pub body: String,
    /// How many alerts it carries.
    pub alerts: u32,
    /// Status.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: OffsetDateTime,
    /// Created.
    pub created_at: OffsetDateTime,
    /// Last changed.
    pub updated_at: OffsetDateTime,
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// Accepted.
    Sent,
    /// Failed; try again at `at`.
    Retry {
        /// Why.
        error: String,
        /// When.
        at: OffsetDateTime,
    },
    /// Failed for good.
    Failed {
        /// Why.
        error: String,
    },
}

pub(crate) fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The event logged with an alert change: the alert itself is the data.
pub(crate) fn alert_event(
    kind: &str,
    alert: &Alert,
    actor: Option<&str>,
    reason: Option<String>,
) -> Result<crate::NewEvent, crate::StoreError> {
    Ok(crate::NewEvent {
        kind: kind.into(),
        env: Some(alert.env.clone()),
        service: Some(alert.service.clone()),
        actor: actor.map(str::to_string),
        reason,
        data: serde_json::to_value(alert)?,
    })
}

type DeliveryRow = (
    i64,
    String,
    String,
    String,
    i64,
    String,
    i64,
    Option<String>,
    i64,
    i64,
    i64,
);

pub(crate) fn delivery_from_row(r: DeliveryRow) -> Delivery {
    Delivery {
        id: r.0,
        channel: r.1,
        kind: r.2,
        body: r.3,
        alerts: r.4.max(0) as u32,
        status: DeliveryStatus::parse(&r.5),
        attempts: r.6.max(0) as u32,
        last_error: r.7,
        next_attempt_at: from_millis(r.8),
        created_at: from_millis(r.9),
        updated_at: from_millis(r.10),
    }
}

pub(crate) const DELIVERY_COLUMNS: &str = "id, channel, kind, body, alerts, status, attempts, \
     last_error, next_attempt_ms, created_ms, updated_ms";

pub(crate) fn alert_from_row(id: i64, body: &str) -> Result<Alert, crate::StoreError> {
    let mut a: Alert = serde_json::from_str(body)?;
    a.alert_id = id.to_string();
    Ok(a)
}

/// The SQL of alerts, channels and deliveries, for one backend's transaction and pool
/// types. Event rows are written by the caller (each backend allocates event ids its own
/// way): functions that change an alert return the events to append, and
/// `record_history` links them afterwards.
macro_rules! alert_ops {
    ($db:ty) => {
        use crate::alerts::{
            AlertFilter, AlertWrite, DELIVERY_COLUMNS, Delivery, DeliveryOutcome,
            NewNotification, Notification, alert_event, alert_from_row, delivery_from_row,
            from_millis,
        };
        use crate::{NewEvent, StoreError, millis};
        use lockstep_api::{Alert, AlertState, ChannelConfig};
        use sqlx::{Pool, Transaction};
        use time::OffsetDateTime;

        type Tx<'a> = Transaction<'a, $db>;

        async fn open_alert(
            tx: &mut Tx<'_>,
            instance_id: &str,
            condition: &str,
        ) -> Result<Option<Alert>, StoreError> {
            let row: Option<(i64, String)> = sqlx::query_as(
                "SELECT id, body FROM alerts WHERE instance_id = $1 AND condition = $2 \
                 AND state = 'open'",
            )
            .bind(instance_id)
            .bind(condition)
            .fetch_optional(&mut **tx)
            .await?;
            row.map(|(id, body)| alert_from_row(id, &body)).transpose()
        }

        async fn save_body(tx: &mut Tx<'_>, a: &Alert) -> Result<(), StoreError> {
            let id: i64 = a
                .alert_id
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("alert id {:?}", a.alert_id)))?;
            sqlx::query("UPDATE alerts SET state = $1, severity = $2, body = $3 WHERE id = $4")
                .bind(a.state.as_str())
                .bind(a.severity.as_str())
                .bind(serde_json::to_string(a)?)
                .bind(id)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        /// Applies the detector's writes; returns each changed alert with its event.
        pub(crate) async fn apply_alerts(
            tx: &mut Tx<'_>,
            writes: Vec<AlertWrite>,
        ) -> Result<Vec<(Alert, NewEvent)>, StoreError> {
            let mut out = Vec::new();
            for w in writes {
                match w {
                    AlertWrite::Raise(mut new) => {
                        match open_alert(tx, &new.instance_id, new.condition.as_str()).await? {
                            None => {
                                new.state = AlertState::Open;
                                new.resolved_at = None;
                                new.acknowledged = false;
                                new.acknowledged_by = None;
                                new.acknowledged_at = None;
                                new.alert_id = String::new();
                                let id: i64 = sqlx::query_scalar(
                                    "INSERT INTO alerts (instance_id, condition, env, service, \
                                     state, severity, body) VALUES ($1, $2, $3, $4, 'open', $5, $6) \
                                     RETURNING id",
                                )
                                .bind(&new.instance_id)
                                .bind(new.condition.as_str())
                                .bind(&new.env)
                                .bind(&new.service)
                                .bind(new.severity.as_str())
                                .bind(serde_json::to_string(&new)?)
                                .fetch_one(&mut **tx)
                                .await?;
                                new.alert_id = id.to_string();
                                let ev = alert_event("alert_opened", &new, None, None)?;
                                out.push((*new, ev));
                            }
                            Some(mut have) if new.severity > have.severity => {
                                have.severity = new.severity;
                                have.drift_secs = new.drift_secs;
                                have.drift_duration = new.drift_duration;
                                have.current_version = new.current_version;
                                have.expected_version = new.expected_version;
                                have.message = new.message;
                                have.updated_at = new.updated_at;
                                save_body(tx, &have).await?;
                                let ev = alert_event("alert_escalated", &have, None, None)?;
                                out.push((have, ev));
                            }
                            Some(_) => {}
                        }
                    }
                    AlertWrite::Resolve {
                        instance_id,
                        condition,
                        at,
                    } => {
                        if let Some(mut have) =
                            open_alert(tx, &instance_id, condition.as_str()).await?
                        {
                            have.state = AlertState::Resolved;
                            have.resolved_at = Some(at);
                            have.updated_at = at;
                            save_body(tx, &have).await?;
                            let ev = alert_event("alert_resolved", &have, None, None)?;
                            out.push((have, ev));
                        }
                    }
                }
            }
            Ok(out)
        }

        /// Links an alert to an event of its history.
        pub(crate) async fn record_history(
            tx: &mut Tx<'_>,
            alert: &Alert,
            event_id: i64,
            kind: &str,
        ) -> Result<(), StoreError> {
            let id: i64 = alert.alert_id.parse().unwrap_or_default();
            sqlx::query("INSERT INTO alert_history (alert_id, event_id, kind) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(event_id)
                .bind(kind)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        /// Acknowledges an alert: `None` when there is none; no event when it already was.
        pub(crate) async fn ack_alert(
            tx: &mut Tx<'_>,
            id: i64,
            actor: &str,
            reason: Option<String>,
        ) -> Result<Option<(Alert, Option<NewEvent>)>, StoreError> {
            let row: Option<String> = sqlx::query_scalar("SELECT body FROM alerts WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
            let Some(body) = row else { return Ok(None) };
            let mut a = alert_from_row(id, &body)?;
            if a.acknowledged {
                return Ok(Some((a, None)));
            }
            let now = OffsetDateTime::now_utc();
            a.acknowledged = true;
            a.acknowledged_by = Some(actor.to_string());
            a.acknowledged_at = Some(now);
            a.updated_at = now;
            save_body(tx, &a).await?;
            let ev = alert_event("alert_acknowledged", &a, Some(actor), reason)?;
            Ok(Some((a, Some(ev))))
        }

        pub(crate) async fn list_alerts(
            pool: &Pool<$db>,
            f: &AlertFilter,
        ) -> Result<Vec<Alert>, StoreError> {
            let state = f.state.map_or("all", |s| s.as_str());
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT id, body FROM alerts WHERE ($1 = 'all' OR state = $1) \
                 AND ($2 = '' OR env = $2) AND ($3 = '' OR service = $3) \
                 ORDER BY id DESC LIMIT $4",
            )
            .bind(state)
            .bind(f.env.clone().unwrap_or_default())
            .bind(f.service.clone().unwrap_or_default())
            .bind(i64::from(f.limit.max(1)))
            .fetch_all(pool)
            .await?;
            rows.iter().map(|(id, b)| alert_from_row(*id, b)).collect()
        }

        pub(crate) async fn channels(pool: &Pool<$db>) -> Result<Vec<ChannelConfig>, StoreError> {
            let rows: Vec<String> =
                sqlx::query_scalar("SELECT body FROM alert_channels ORDER BY position")
                    .fetch_all(pool)
                    .await?;
            rows.iter()
                .map(|b| Ok(serde_json::from_str(b)?))
                .collect()
        }

        pub(crate) async fn put_channels(
            tx: &mut Tx<'_>,
            channels: &[ChannelConfig],
        ) -> Result<(), StoreError> {
            sqlx::query("DELETE FROM alert_channels")
                .execute(&mut **tx)
                .await?;
            for (i, c) in channels.iter().enumerate() {
                sqlx::query("INSERT INTO alert_channels (name, position, body) VALUES ($1, $2, $3)")
                    .bind(&c.name)
                    .bind(i as i64)
                    .bind(serde_json::to_string(c)?)
                    .execute(&mut **tx)
                    .await?;
            }
            Ok(())
        }

        pub(crate) async fn cursor(pool: &Pool<$db>) -> Result<i64, StoreError> {
            let v: Option<i64> =
                sqlx::query_scalar("SELECT value FROM alert_cursor WHERE name = 'notify'")
                    .fetch_optional(pool)
                    .await?;
            Ok(v.unwrap_or(0))
        }

        /// Queues notifications and moves the cursor from `from` to `to`; false (and
        /// nothing written) when the cursor is no longer at `from`.
        pub(crate) async fn enqueue(
            tx: &mut Tx<'_>,
            from: i64,
            to: i64,
            items: &[NewNotification],
        ) -> Result<bool, StoreError> {
            let at: Option<i64> =
                sqlx::query_scalar("SELECT value FROM alert_cursor WHERE name = 'notify'")
                    .fetch_optional(&mut **tx)
                    .await?;
            if at.unwrap_or(0) != from {
                return Ok(false);
            }
            let now = millis(OffsetDateTime::now_utc());
            for n in items {
                sqlx::query(
                    "INSERT INTO alert_notifications (channel, event_id, kind, body, created_ms) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (channel, event_id) DO NOTHING",
                )
                .bind(&n.channel)
                .bind(n.event_id)
                .bind(&n.kind)
                .bind(serde_json::to_string(&n.alert)?)
                .bind(now)
                .execute(&mut **tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO alert_cursor (name, value) VALUES ('notify', $1) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(to)
            .execute(&mut **tx)
            .await?;
            Ok(true)
        }

        pub(crate) async fn pending_notifications(
            pool: &Pool<$db>,
        ) -> Result<Vec<Notification>, StoreError> {
            let rows: Vec<(i64, String, i64, String, String, i64)> = sqlx::query_as(
                "SELECT id, channel, event_id, kind, body, created_ms FROM alert_notifications \
                 WHERE delivery_id IS NULL ORDER BY id",
            )
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|(id, channel, event_id, kind, body, created)| {
                    Ok(Notification {
                        id,
                        channel,
                        event_id,
                        kind,
                        alert: serde_json::from_str(&body)?,
                        created_at: from_millis(created),
                    })
                })
                .collect()
        }

        /// Creates a delivery carrying `ids`; `None` (nothing written) when one of them is
        /// already assigned.
        pub(crate) async fn create_delivery(
            tx: &mut Tx<'_>,
            channel: &str,
            kind: &str,
            body: &str,
            ids: &[i64],
        ) -> Result<Option<Delivery>, StoreError> {
            let now = millis(OffsetDateTime::now_utc());
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO alert_deliveries (channel, kind, body, alerts, status, attempts, \
                 next_attempt_ms, created_ms, updated_ms) \
                 VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5, $5) RETURNING id",
            )
            .bind(channel)
            .bind(kind)
            .bind(body)
            .bind(ids.len() as i64)
            .bind(now)
            .fetch_one(&mut **tx)
            .await?;
            for n in ids {
                let done = sqlx::query(
                    "UPDATE alert_notifications SET delivery_id = $1 \
                     WHERE id = $2 AND delivery_id IS NULL AND channel = $3",
                )
                .bind(id)
                .bind(n)
                .bind(channel)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                if done != 1 {
                    return Ok(None);
                }
            }
            let row: crate::alerts::DeliveryRowAlias = sqlx::query_as(sqlx::AssertSqlSafe(
                format!("SELECT {DELIVERY_COLUMNS} FROM alert_deliveries WHERE id = $1"),
            ))
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
            Ok(Some(delivery_from_row(row)))
        }

        pub(crate) async fn due_deliveries(
            pool: &Pool<$db>,
            now: OffsetDateTime,
        ) -> Result<Vec<Delivery>, StoreError> {
            let rows: Vec<crate::alerts::DeliveryRowAlias> = sqlx::query_as(sqlx::AssertSqlSafe(
                format!(
                    "SELECT {DELIVERY_COLUMNS} FROM alert_deliveries \
                     WHERE status = 'pending' AND next_attempt_ms <= $1 ORDER BY id"
                ),
            ))
            .bind(millis(now))
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(delivery_from_row).collect())
        }

        pub(crate) async fn deliveries(
            pool: &Pool<$db>,
            limit: u32,
        ) -> Result<Vec<Delivery>, StoreError> {
            let rows: Vec<crate::alerts::DeliveryRowAlias> = sqlx::query_as(sqlx::AssertSqlSafe(
                format!("SELECT {DELIVERY_COLUMNS} FROM alert_deliveries ORDER BY id DESC LIMIT $1"),
            ))
            .bind(i64::from(limit.max(1)))
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(delivery_from_row).collect())
        }

        pub(crate) async fn last_deliveries(
            pool: &Pool<$db>,
        ) -> Result<Vec<(String, OffsetDateTime)>, StoreError> {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT channel, MAX(created_ms) FROM alert_deliveries GROUP BY channel",
            )
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(|(c, t)| (c, from_millis(t))).collect())
        }

        /// Records an attempt; false when the delivery is not pending (already settled).
        pub(crate) async fn record_delivery(
            tx: &mut Tx<'_>,
            id: i64,
            outcome: &DeliveryOutcome,
        ) -> Result<bool, StoreError> {
            let now = millis(OffsetDateTime::now_utc());
            let (status, error, next) = match outcome {
                DeliveryOutcome::Sent => ("sent", None, now),
                DeliveryOutcome::Retry { error, at } => ("pending", Some(error.clone()), millis(*at)),
                DeliveryOutcome::Failed { error } => ("failed", Some(error.clone()), now),
            };
            let n = sqlx::query(
                "UPDATE alert_deliveries SET status = $1, attempts = attempts + 1, \
                 last_error = COALESCE($2, last_error), next_attempt_ms = $3, updated_ms = $4 \
                 WHERE id = $5 AND status = 'pending'",
            )
            .bind(status)
            .bind(error)
            .bind(next)
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Ok(n == 1)
        }
    };
}

pub(crate) use alert_ops;

/// The row shape of a delivery (named so the macro can spell it).
pub(crate) type DeliveryRowAlias = DeliveryRow;
