//! Alert delivery: generic webhook (JSON signed with HMAC-SHA256), Slack incoming webhook and
//! email over SMTP, with per-channel minimum severity, a rate limit that turns a fleet-wide
//! drift into one digest per channel per window, retries with exponential backoff, and a
//! delivery log in the store.
//!
//! Shape (like `lockstep-mirror`): the rules are pure ([`plan`], [`render`]); one writer
//! task does all I/O, on the leader only; nobody awaits a channel — the drift detector only
//! writes alerts (and their events) to the store and [`Notifier::wake`]s the writer.
//!
//! **Neither lost nor sent twice, across restarts and leader changes.** Every step is a
//! store transaction fenced by the leader lease: (1) the `alert_*` events after the
//! notification cursor become queued notifications, one per (channel, event), in the
//! transaction that moves the cursor; (2) a channel's queued notifications become one
//! delivery in the transaction that assigns them; (3) each attempt's result is recorded on
//! the delivery. A new leader resumes from what is stored. The one window left is a crash
//! between a channel accepting a message and the record of it: that delivery is sent again
//! (at least once), with the same `X-Lockstep-Delivery` id so a receiver can drop it.

pub mod plan;
pub mod render;
pub mod send;

use lockstep_api::ChannelConfig;
use lockstep_store::{Delivery, DeliveryOutcome, Notification, Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use plan::RetryPolicy;
pub use render::Item;

/// Events read per planning round.
const EVENT_BATCH: u32 = 5000;

/// Tunables of delivery.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Each channel sends at most one message per this window (0: no limit).
    pub rate_limit: Duration,
    /// Retries.
    pub retry: RetryPolicy,
    /// How often the writer looks for due work when nothing wakes it.
    pub poll: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            rate_limit: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            poll: Duration::from_millis(500),
        }
    }
}

/// Counters of one channel, since this process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Messages the channel accepted.
    pub sent: u64,
    /// Alert changes those messages carried.
    pub alerts_sent: u64,
    /// Attempts that failed (each retry counts).
    pub failed_attempts: u64,
    /// Deliveries given up after their last attempt.
    pub failed: u64,
}

/// Whether this process may act (the leader), asked before every round.
pub type IsLeader = Arc<dyn Fn() -> bool + Send + Sync>;

struct Shared {
    store: Arc<dyn Store>,
    holder: String,
    is_leader: IsLeader,
    config: NotifyConfig,
    http: reqwest::Client,
    wake: Notify,
    stats: Mutex<BTreeMap<String, ChannelStats>>,
}

/// The handle of the delivery writer. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
}

/// Why the notifier could not start.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The HTTP client could not be built (TLS setup).
    #[error("HTTP client: {0}")]
    Http(String),
}

impl Notifier {
    /// A notifier acting as `holder` of the leader lease while `is_leader()` says so. Call
    /// [`Notifier::spawn`] to run it.
    pub fn new(
        store: Arc<dyn Store>,
        holder: String,
        is_leader: IsLeader,
        config: NotifyConfig,
    ) -> Result<Notifier, NotifyError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("lockstep/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| NotifyError::Http(e.to_string()))?;
        Ok(Notifier {
            shared: Arc::new(Shared {
                store,
                holder,
                is_leader,
                config,
                http,
                wake: Notify::new(),
                stats: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// Runs the writer until `shutdown` flips: a round whenever woken (the store's feed, a
    /// [`Notifier::wake`]) or every `poll`, while leading.
    pub fn spawn(&self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut feed = me.shared.store.feed();
            loop {
                if (me.shared.is_leader)()
                    && let Err(e) = me.round().await
                {
                    match e {
                        StoreError::NotLeader => {}
                        e => tracing::warn!(error = %e, "alert delivery round failed; will retry"),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(me.shared.config.poll) => {}
                    _ = me.shared.wake.notified() => {}
                    r = feed.changed() => { if r.is_err() { tokio::time::sleep(me.shared.config.poll).await; } }
                    _ = shutdown.changed() => return,
                }
            }
        })
    }

    /// Asks the writer for a round now (after alerts were written).
    pub fn wake(&self) {
        self.shared.wake.notify_one();
    }

    /// Counters per channel.
    pub fn stats(&self) -> BTreeMap<String, ChannelStats> {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count(&self, channel: &str, f: impl FnOnce(&mut ChannelStats)) {
        let mut g = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(g.entry(channel.to_string()).or_default());
    }

    /// One round: queue new alert changes per channel, batch what each channel may send,
    /// send what is due and record the outcome. Public for tests that drive it step by
    /// step.
    pub async fn round(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        self.queue().await?;
        let now = OffsetDateTime::now_utc();
        let channels: HashMap<String, ChannelConfig> = s
            .store
            .alert_channels()
            .await?
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        let pending = s.store.pending_notifications().await?;
        if !pending.is_empty() {
            let last: HashMap<String, OffsetDateTime> =
                s.store.last_deliveries().await?.into_iter().collect();
            let mut by_channel: BTreeMap<&str, Vec<&Notification>> = BTreeMap::new();
            for n in &pending {
                by_channel.entry(n.channel.as_str()).or_default().push(n);
            }
            for (channel, notes) in by_channel {
                let window = s.config.rate_limit;
                if let Some(plan::Batch::Send(ids)) =
                    plan::batch(now, window, last.get(channel).copied(), &notes)
                {
                    let items: Vec<Item> = notes
                        .iter()
                        .map(|n| Item {
                            kind: n.kind.clone(),
                            alert: n.alert.clone(),
                        })
                        .collect();
                    let kind = if items.len() == 1 { "alert" } else { "digest" };
                    let body = serde_json::to_string(&items)?;
                    if s.store
                        .create_delivery(&s.holder, channel, kind, &body, &ids)
                        .await?
                        .is_some()
                    {
                        tracing::info!(channel, kind, alerts = ids.len(), "alert delivery queued");
                    }
                }
            }
        }
        let due = s.store.due_deliveries(OffsetDateTime::now_utc()).await?;
        let results = futures_util::future::join_all(
            due.iter()
                .map(|d| self.attempt(d, channels.get(&d.channel))),
        )
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Step 1: the alert events after the cursor become notifications.
    async fn queue(&self) -> Result<(), StoreError> {
        let s = &self.shared;
        loop {
            let cursor = s.store.notify_cursor().await?;
            let evs = s.store.events_since(cursor, EVENT_BATCH).await?;
            let Some(last) = evs.last().map(|e| e.id) else {
                return Ok(());
            };
            let items = if evs
                .iter()
                .any(|e| plan::NOTIFYING_KINDS.contains(&e.kind.as_str()))
            {
                plan::route(&evs, &s.store.alert_channels().await?)
            } else {
                Vec::new()
            };
            if !s
                .store
                .enqueue_notifications(&s.holder, cursor, last, items)
                .await?
                || evs.len() < EVENT_BATCH as usize
            {
                return Ok(());
            }
        }
    }

    /// Step 3: one attempt of one due delivery, and its record.
    async fn attempt(
        &self,
        d: &Delivery,
        channel: Option<&ChannelConfig>,
    ) -> Result<(), StoreError> {
        let s = &self.shared;
        let items: Vec<Item> = serde_json::from_str(&d.body)?;
        let result = match channel {
            Some(c) => send::send(&s.http, c, d.id, &items, OffsetDateTime::now_utc()).await,
            None => Err(format!("no channel named {:?} any more", d.channel)),
        };
        let outcome = plan::outcome(
            &s.config.retry,
            OffsetDateTime::now_utc(),
            d.attempts,
            result,
        );
        // Recorded first, counted after: the counters say what the store says.
        s.store
            .record_delivery(&s.holder, d.id, outcome.clone())
            .await?;
        match &outcome {
            DeliveryOutcome::Sent => {
                tracing::info!(channel = %d.channel, delivery = d.id, alerts = d.alerts, "alert delivered");
                self.count(&d.channel, |c| {
                    c.sent += 1;
                    c.alerts_sent += u64::from(d.alerts);
                });
            }
            DeliveryOutcome::Retry { error, at } => {
                tracing::warn!(channel = %d.channel, delivery = d.id, attempt = d.attempts + 1,
                    error = %error, retry_at = %at, "alert delivery failed; will retry");
                self.count(&d.channel, |c| c.failed_attempts += 1);
            }
            DeliveryOutcome::Failed { error } => {
                tracing::error!(channel = %d.channel, delivery = d.id, attempts = d.attempts + 1,
                    error = %error, "alert delivery failed for good; the alerts stay in the store");
                self.count(&d.channel, |c| {
                    c.failed_attempts += 1;
                    c.failed += 1;
                });
            }
        }
        Ok(())
    }
}
