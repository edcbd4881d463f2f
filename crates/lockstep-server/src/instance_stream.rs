//! `GET /v1/instances/watch`: the instances of a scope as Server-Sent Events, for routers
//! (the gateway) that must know at once which instance runs what.
//!
//! A snapshot first, then only what matters: an instance added or changed (version,
//! endpoint, health, components, back after silence), a status that changed because the
//! expected release changed (sent right after that change, for every instance of the
//! service), and instances gone. Plain heartbeats are not sent. There is no resume: a
//! client that reconnects, or that falls behind the hub, gets a fresh snapshot — cheaper
//! and simpler than a replay for state that is soft anyway.

use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use lockstep_api::{ErrorBody, InstanceRemoved, InstanceSnapshot, InstanceStatus};
use lockstep_core::{Instance, drift_secs, instance_status, validate_name};
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use time::OffsetDateTime;
use tokio::sync::{broadcast, watch};

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::service::{Change, InstanceUpdate, Poisoned};
use crate::state::AppState;

/// Query of `/v1/instances/watch`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InstanceWatchQuery {
    /// The environment (default `production`).
    #[param(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub env: Option<String>,
    /// Only this service (default: every service of the environment).
    #[param(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub service: Option<String>,
}

/// What a stream covers.
#[derive(Clone)]
struct Scope {
    env: String,
    service: Option<String>,
}

impl Scope {
    fn covers(&self, env: &str, service: &str) -> bool {
        self.env == env && self.service.as_deref().is_none_or(|s| s == service)
    }
}

/// An instance with its status at this moment.
fn with_status(
    st: &AppState,
    inst: &Instance,
    now: OffsetDateTime,
) -> Result<InstanceStatus, Poisoned> {
    let projection = st.service.projection();
    let ttl = projection.instance_ttl();
    let expected = projection.expected(&inst.env, &inst.service)?;
    let exp = expected.as_ref().map(|c| &c.release);
    let status = instance_status(
        exp.map(|e| &e.release),
        &inst.version_id,
        &inst.components,
        now - inst.last_seen > ttl,
    );
    Ok(InstanceStatus {
        instance: inst.clone(),
        rollout: st.service.rollouts().cached_marks().of(inst),
        status,
        drift_secs: drift_secs(
            status,
            now,
            inst,
            exp.map(|e| e.registered_at),
            ttl.as_secs(),
        ),
    })
}

fn snapshot(st: &AppState, scope: &Scope) -> Result<SseEvent, Poisoned> {
    let q = crate::status::StatusQuery {
        env: Some(scope.env.clone()),
        service: scope.service.clone(),
    };
    let report = crate::status::report(st, &q)?;
    let instances = report
        .environments
        .into_iter()
        .flat_map(|e| e.services)
        .flat_map(|s| s.instances)
        .collect();
    Ok(SseEvent::default()
        .event("snapshot")
        .data(serde_json::to_string(&InstanceSnapshot { instances }).unwrap_or_default()))
}

fn upserted(s: &InstanceStatus) -> SseEvent {
    SseEvent::default()
        .event("instance")
        .data(serde_json::to_string(s).unwrap_or_default())
}

struct StreamState {
    st: Arc<AppState>,
    scope: Scope,
    out: VecDeque<SseEvent>,
    instances: broadcast::Receiver<Arc<InstanceUpdate>>,
    releases: broadcast::Receiver<Arc<Change>>,
    shutdown: watch::Receiver<bool>,
    tokens: watch::Receiver<u64>,
    token_hash: [u8; 32],
    _gauge: Gauge,
}

struct Gauge(Arc<AppState>);

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.counters.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamState {
    /// Queues what one hub item means for this stream; `Err` ends the stream.
    fn on_instance(&mut self, u: &InstanceUpdate) -> Result<(), Poisoned> {
        let i = u.instance();
        if !self.scope.covers(&i.env, &i.service) {
            return Ok(());
        }
        let ev = match u {
            InstanceUpdate::Upserted(i) => {
                upserted(&with_status(&self.st, i, OffsetDateTime::now_utc())?)
            }
            InstanceUpdate::Removed { instance, reason } => {
                SseEvent::default().event("removed").data(
                    serde_json::to_string(&InstanceRemoved {
                        instance_id: instance.instance_id.clone(),
                        env: instance.env.clone(),
                        service: instance.service.clone(),
                        reason: (*reason).to_string(),
                    })
                    .unwrap_or_default(),
                )
            }
        };
        self.out.push_back(ev);
        Ok(())
    }

    fn on_release(&mut self, c: &Change) -> Result<(), Poisoned> {
        let (env, svc) = (&c.release.env, &c.release.service);
        if !self.scope.covers(env, svc) {
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        for inst in self.st.service.projection().instances_of(env, svc)? {
            let s = with_status(&self.st, &inst, now)?;
            self.out.push_back(upserted(&s));
        }
        Ok(())
    }
}

fn stream(s: StreamState) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(ev) = s.out.pop_front() {
                return Some((Ok(ev), s));
            }
            if *s.shutdown.borrow() {
                return None;
            }
            let step = tokio::select! {
                r = s.instances.recv() => match r {
                    Ok(u) => s.on_instance(&u),
                    // Fell behind: start over from a snapshot rather than guess.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        snapshot(&s.st, &s.scope).map(|ev| s.out.push_back(ev))
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                r = s.releases.recv() => match r {
                    Ok(c) => s.on_release(&c),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        snapshot(&s.st, &s.scope).map(|ev| s.out.push_back(ev))
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = s.shutdown.changed() => return None,
                r = s.tokens.changed() => {
                    // A revoked token keeps no stream open.
                    if r.is_err() || !s.st.service.projection().tokens.is_valid(&s.token_hash) {
                        return None;
                    }
                    Ok(())
                }
            };
            if step.is_err() {
                return None;
            }
        }
    })
}

/// The instances of a scope as Server-Sent Events: `snapshot`, then `instance` and
/// `removed` as they change.
#[utoipa::path(get, path = "/v1/instances/watch", tag = "instances",
    params(InstanceWatchQuery),
    responses(
        (status = 200, description = "text/event-stream: `snapshot` (InstanceSnapshot), then `instance` (InstanceStatus) and `removed` (InstanceRemoved); it stays open", content_type = "text/event-stream"),
        (status = 400, description = "`bad_request`: a bad filter", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the registry cannot answer now", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn watch_instances(
    Auth(who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<InstanceWatchQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let env = q.env.unwrap_or_else(|| "production".into());
    validate_name("environment", &env)?;
    if let Some(s) = &q.service {
        validate_name("service", s)?;
    }
    let scope = Scope {
        env,
        service: q.service,
    };
    let projection = st.service.projection();
    // Subscribe before the snapshot: a change in between is sent (again), never lost.
    let instances = projection.subscribe_instances();
    let releases = projection.subscribe_changes();
    let first = snapshot(&st, &scope)?;
    st.counters.watchers.fetch_add(1, Ordering::Relaxed);
    let s = StreamState {
        st: st.clone(),
        scope,
        out: VecDeque::from([first]),
        instances,
        releases,
        shutdown: st.shutdown.clone(),
        tokens: projection.subscribe_tokens(),
        token_hash: who.hash,
        _gauge: Gauge(st.clone()),
    };
    Ok(Sse::new(stream(s)).keep_alive(KeepAlive::new().interval(st.config.keepalive)))
}
