//! The alerts handle of the registry: settings (drift thresholds, delivery tunables), the
//! operations of the alert API (list, acknowledge, channels), the background tasks (drift
//! detector and delivery writer on the leader, open-alert counts on every replica) and the
//! alert metrics.
//!
//! Every replica keeps its counts of open alerts from the event log it already projects
//! (`alert_*` events carry the alert), so the counts are the same on every replica without
//! a query per scrape.

use lockstep_api::{Alert, AlertState, ChannelConfig, ChannelKind};
use lockstep_core::{Severity, Thresholds};
use lockstep_notify::{Notifier, NotifyConfig};
use lockstep_store::AlertFilter;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::{RegistryError, RegistryService};

/// How long an acknowledgement waits for this replica's projection.
const ACK_SETTLE: Duration = Duration::from_secs(5);

/// Most alerts one list returns.
pub const MAX_LIST: u32 = 1000;

/// What `[drift]` and the alert flags configure.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// Severities by drift.
    pub thresholds: Thresholds,
    /// How often the leader checks drift when nothing changed (a release change checks at
    /// once).
    pub check_interval: Duration,
    /// Delivery tunables (rate limit, retries).
    pub notify: NotifyConfig,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            thresholds: Thresholds::default(),
            check_interval: Duration::from_secs(1),
            notify: NotifyConfig::default(),
        }
    }
}

/// The alerts handle (`RegistryService::alerts()`).
pub struct Alerts {
    settings: RwLock<AlertSettings>,
    last_check: Mutex<Option<OffsetDateTime>>,
    /// Open alerts by id: severity and whether acknowledged (from the event log).
    open: Mutex<HashMap<String, (Severity, bool)>>,
    /// Alerts resolved since this process started, by severity.
    resolved: Mutex<[u64; 4]>,
    notifier: OnceLock<Notifier>,
    wake: Notify,
}

fn sev_index(s: Severity) -> usize {
    match s {
        Severity::Low => 0,
        Severity::Medium => 1,
        Severity::High => 2,
        Severity::Critical => 3,
    }
}

impl Alerts {
    pub(super) fn new() -> Alerts {
        Alerts {
            settings: RwLock::new(AlertSettings::default()),
            last_check: Mutex::new(None),
            open: Mutex::new(HashMap::new()),
            resolved: Mutex::new([0; 4]),
            notifier: OnceLock::new(),
            wake: Notify::new(),
        }
    }

    /// Replaces the settings; takes effect for the detector at its next check, for delivery
    /// when the background tasks start.
    pub fn configure(&self, settings: AlertSettings) {
        *self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = settings;
    }

    /// The settings now.
    pub fn settings(&self) -> AlertSettings {
        self.settings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Open alerts by severity (weakest first), on every replica.
    pub fn open_counts(&self) -> [(Severity, u64); 4] {
        let mut n = [0u64; 4];
        for (s, _) in self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            n[sev_index(*s)] += 1;
        }
        [
            (Severity::Low, n[0]),
            (Severity::Medium, n[1]),
            (Severity::High, n[2]),
            (Severity::Critical, n[3]),
        ]
    }

    /// Open alerts in all.
    pub fn open_total(&self) -> u64 {
        self.open_counts().iter().map(|(_, n)| n).sum()
    }

    /// When this replica last checked drift (as leader); `None` on a replica that has not
    /// led since it started.
    pub fn last_drift_check(&self) -> Option<OffsetDateTime> {
        *self
            .last_check
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn checked(&self, at: OffsetDateTime) {
        *self
            .last_check
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(at);
    }

    /// Asks the detector for a check now.
    pub fn wake_detector(&self) {
        self.wake.notify_one();
    }

    pub(super) async fn detector_woken(&self) {
        self.wake.notified().await;
    }

    /// Asks the delivery writer for a round now.
    pub fn wake_delivery(&self) {
        if let Some(n) = self.notifier.get() {
            n.wake();
        }
    }

    /// Applies one alert event to the open counts.
    fn observe(&self, kind: &str, data: &serde_json::Value) {
        if !kind.starts_with("alert_") || kind == "alert_channels_changed" {
            return;
        }
        let Ok(a) = serde_json::from_value::<Alert>(data.clone()) else {
            return;
        };
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        match a.state {
            AlertState::Open => {
                open.insert(a.alert_id, (a.severity, a.acknowledged));
            }
            AlertState::Resolved => {
                if open.remove(&a.alert_id).is_some() {
                    self.resolved.lock().unwrap_or_else(PoisonError::into_inner)
                        [sev_index(a.severity)] += 1;
                }
            }
        }
    }

    /// Prometheus text: open alerts by severity and acknowledgement, resolutions seen, the
    /// last drift check, and deliveries and failures per channel.
    pub fn write_metrics(&self, out: &mut String) {
        let open = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let _ = writeln!(
            out,
            "# HELP lockstep_alerts Alerts by severity and state (open, acknowledged = open and acknowledged).\n# TYPE lockstep_alerts gauge"
        );
        for s in Severity::ALL {
            let total = open.values().filter(|(v, _)| *v == s).count();
            let acked = open.values().filter(|(v, a)| *v == s && *a).count();
            let _ = writeln!(
                out,
                "lockstep_alerts{{severity=\"{s}\",state=\"open\"}} {total}\nlockstep_alerts{{severity=\"{s}\",state=\"acknowledged\"}} {acked}"
            );
        }
        let resolved = *self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writeln!(
            out,
            "# HELP lockstep_alerts_resolved_total Alerts resolved since this replica started.\n# TYPE lockstep_alerts_resolved_total counter"
        );
        for s in Severity::ALL {
            let _ = writeln!(
                out,
                "lockstep_alerts_resolved_total{{severity=\"{s}\"}} {}",
                resolved[sev_index(s)]
            );
        }
        if let Some(t) = self.last_drift_check() {
            let _ = writeln!(
                out,
                "# HELP lockstep_drift_check_timestamp_seconds Last drift check by this replica.\n# TYPE lockstep_drift_check_timestamp_seconds gauge\nlockstep_drift_check_timestamp_seconds {}",
                t.unix_timestamp()
            );
        }
        let stats = self.notifier.get().map(|n| n.stats()).unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP lockstep_alert_deliveries_total Messages a channel accepted (sent by this replica).\n# TYPE lockstep_alert_deliveries_total counter"
        );
        for (c, s) in &stats {
            let _ = writeln!(
                out,
                "lockstep_alert_deliveries_total{{channel=\"{}\"}} {}",
                label(c),
                s.sent
            );
        }
        let _ = writeln!(
            out,
            "# HELP lockstep_alert_delivery_failures_total Failed attempts per channel (each retry counts).\n# TYPE lockstep_alert_delivery_failures_total counter"
        );
        for (c, s) in &stats {
            let _ = writeln!(
                out,
                "lockstep_alert_delivery_failures_total{{channel=\"{}\"}} {}",
                label(c),
                s.failed_attempts
            );
        }
        let _ = writeln!(
            out,
            "# HELP lockstep_alert_deliveries_failed_total Deliveries given up after their last attempt.\n# TYPE lockstep_alert_deliveries_failed_total counter"
        );
        for (c, s) in &stats {
            let _ = writeln!(
                out,
                "lockstep_alert_deliveries_failed_total{{channel=\"{}\"}} {}",
                label(c),
                s.failed
            );
        }
    }
}

/// A label value escaped for the Prometheus text format.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Checks a set of channels: unique valid names and the fields each type needs.
pub fn validate_channels(channels: &[ChannelConfig]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for c in channels {
        lockstep_core::validate_name("channel", &c.name).map_err(|e| e.to_string())?;
        if !seen.insert(c.name.as_str()) {
            return Err(format!("channel {:?} is defined twice", c.name));
        }
        let need = |v: &Option<String>, field: &str| match v {
            Some(s) if !s.is_empty() => Ok(()),
            _ => Err(format!("channel {:?} ({:?}) needs {field}", c.name, c.kind)),
        };
        let http_url = |v: &Option<String>, field: &str| match v.as_deref() {
            Some(u)
                if u == lockstep_api::MASK
                    || ((u.starts_with("http://") || u.starts_with("https://"))
                        && u.split_once("://")
                            .is_some_and(|(_, rest)| !rest.is_empty())
                        && !u.chars().any(char::is_whitespace)) =>
            {
                Ok(())
            }
            _ => Err(format!(
                "channel {:?}: {field} must be an http:// or https:// URL",
                c.name
            )),
        };
        match c.kind {
            ChannelKind::Webhook => {
                need(&c.url, "url")?;
                http_url(&c.url, "url")?;
                if let Some(m) = &c.method
                    && !["POST", "PUT"].contains(&m.to_ascii_uppercase().as_str())
                {
                    return Err(format!("channel {:?}: method must be POST or PUT", c.name));
                }
            }
            ChannelKind::Slack => {
                need(&c.webhook_url, "webhook_url")?;
                http_url(&c.webhook_url, "webhook_url")?;
            }
            ChannelKind::Email => {
                need(&c.smtp_host, "smtp_host")?;
                need(&c.from_address, "from_address")?;
                if c.to_addresses.is_empty() {
                    return Err(format!("channel {:?} (email) needs to_addresses", c.name));
                }
                if let Some(s) = &c.smtp_security
                    && s != "starttls"
                    && s != "plain"
                {
                    return Err(format!(
                        "channel {:?}: smtp_security must be starttls or plain",
                        c.name
                    ));
                }
            }
        }
    }
    Ok(())
}

impl RegistryService {
    /// Alerts, newest first.
    pub async fn list_alerts(&self, filter: AlertFilter) -> Result<Vec<Alert>, RegistryError> {
        Ok(self.store.alerts(filter).await?)
    }

    /// Acknowledges an alert (idempotent); the answer is the alert.
    pub async fn ack_alert(
        &self,
        id: &str,
        actor: &str,
        reason: Option<String>,
    ) -> Result<Alert, RegistryError> {
        let n: i64 = id
            .parse()
            .map_err(|_| RegistryError::NotFound(format!("no alert {id:?}")))?;
        let (alert, ev) = self
            .store
            .ack_alert(n, actor, reason)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("no alert {id:?}")))?;
        if let Some(ev) = ev {
            tracing::info!(alert = %alert.alert_id, instance = %alert.instance_id, actor, "alert acknowledged");
            self.projection.wait_for(0, ev.id, ACK_SETTLE).await;
        }
        Ok(alert)
    }

    /// The alert channels with their secrets masked.
    pub async fn alert_channels_masked(&self) -> Result<Vec<ChannelConfig>, RegistryError> {
        Ok(self
            .store
            .alert_channels()
            .await?
            .iter()
            .map(ChannelConfig::masked)
            .collect())
    }

    /// Replaces the alert channels. A secret sent back masked keeps the stored one of the
    /// channel with the same name. Returns the channels masked.
    pub async fn put_alert_channels(
        &self,
        mut channels: Vec<ChannelConfig>,
        actor: &str,
    ) -> Result<Vec<ChannelConfig>, RegistryError> {
        let mut names = std::collections::HashSet::new();
        if let Some(dup) = channels.iter().find(|c| !names.insert(c.name.as_str())) {
            return Err(RegistryError::Store(lockstep_store::StoreError::Conflict(
                format!("channel {:?}", dup.name),
            )));
        }
        let stored = self.store.alert_channels().await?;
        for c in &mut channels {
            if let Some(old) = stored.iter().find(|o| o.name == c.name) {
                c.unmask_from(old);
            }
        }
        validate_channels(&channels).map_err(RegistryError::BadRequest)?;
        for c in &channels {
            for (field, v) in [
                ("secret", &c.secret),
                ("password", &c.password),
                ("webhook_url", &c.webhook_url),
            ] {
                if v.as_deref() == Some(lockstep_api::MASK) {
                    return Err(RegistryError::BadRequest(format!(
                        "channel {:?}: {field} is masked but no stored value to keep",
                        c.name
                    )));
                }
            }
        }
        let ev = self
            .store
            .put_alert_channels(channels.clone(), actor)
            .await?;
        self.projection.wait_for(0, ev.id, ACK_SETTLE).await;
        tracing::info!(actor, count = channels.len(), "alert channels replaced");
        Ok(channels.iter().map(ChannelConfig::masked).collect())
    }

    /// Writes `channels` from the configuration file when they differ from the stored ones.
    pub async fn seed_alert_channels(
        &self,
        channels: Vec<ChannelConfig>,
    ) -> Result<(), RegistryError> {
        validate_channels(&channels).map_err(RegistryError::BadRequest)?;
        if self.store.alert_channels().await? != channels {
            self.store.put_alert_channels(channels, "config").await?;
        }
        Ok(())
    }
}

/// Starts the alert tasks: open-count tracking (every replica), the drift detector and the
/// delivery writer (acting while this replica leads).
pub fn spawn(svc: &Arc<RegistryService>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    let settings = svc.alerts.settings();
    let lead = svc.leadership.clone();
    match Notifier::new(
        svc.store.clone(),
        lead.replica().to_string(),
        Arc::new(move || lead.is_leader()),
        settings.notify,
    ) {
        Ok(n) => {
            tasks.push(n.spawn(shutdown.clone()));
            let _ = svc.alerts.notifier.set(n);
        }
        Err(e) => {
            tracing::error!(error = %e, "alert delivery is off: the HTTP client could not start")
        }
    }
    tasks.push(tokio::spawn(super::drift::run(
        svc.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(track(svc.clone(), shutdown)));
    tasks
}

/// Keeps the open-alert counts from the store, then from the projected event log.
async fn track(svc: Arc<RegistryService>, mut shutdown: watch::Receiver<bool>) {
    let mut events = svc.projection.subscribe_events();
    let load = |svc: Arc<RegistryService>| async move {
        match svc
            .store
            .alerts(AlertFilter {
                state: Some(AlertState::Open),
                limit: u32::MAX,
                ..AlertFilter::default()
            })
            .await
        {
            Ok(list) => {
                let mut open = svc
                    .alerts
                    .open
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                *open = list
                    .into_iter()
                    .map(|a| (a.alert_id, (a.severity, a.acknowledged)))
                    .collect();
            }
            Err(e) => tracing::warn!(error = %e, "loading open alerts failed"),
        }
    };
    load(svc.clone()).await;
    loop {
        tokio::select! {
            r = events.recv() => match r {
                Ok(ev) => svc.alerts.observe(&ev.kind, &ev.data),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => load(svc.clone()).await,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}
