//! Instances: heartbeats (soft state kept in memory and flushed to the store in batches),
//! deregistration, and the background task that turns silent instances `missing`.
//!
//! Heartbeats are the highest-volume call, so the handler only touches memory: it updates
//! the instance, marks it dirty, and answers with the cached expected release. The flusher
//! writes dirty instances at least every second; after a crash at most that much heartbeat
//! state is lost, and the next heartbeat restores it.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use lockstep_api::{ErrorBody, Heartbeat, HeartbeatAnswer, codes};
use lockstep_core::{Instance, Status, instance_status, short_id, validate_version_id};
use lockstep_store::NewEvent;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use time::OffsetDateTime;

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::releases::check_path;
use crate::state::{AppState, Tracked};

fn check_instance_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > 128
        || id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(ApiError::BadRequest(
            "instance_id must be 1-128 characters without whitespace or '/'".into(),
        ));
    }
    Ok(())
}

/// Whether an instance last seen at `last_seen` is missing at `now`.
pub(crate) fn is_missing(st: &AppState, last_seen: OffsetDateTime, now: OffsetDateTime) -> bool {
    now - last_seen > st.config.instance_ttl
}

/// Registers or refreshes an instance; answers with its status and the expected release.
#[utoipa::path(post, path = "/v1/instances", tag = "instances", request_body = Heartbeat,
    responses((status = 200, body = HeartbeatAnswer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn heartbeat(
    Auth(_who, _): Auth<auth::Worker>,
    State(st): State<Arc<AppState>>,
    JsonBody(hb): JsonBody<Heartbeat>,
) -> Result<Response, ApiError> {
    check_path(&hb.env, &hb.service)?;
    check_instance_id(&hb.instance_id)?;
    validate_version_id(&hb.version_id)?;
    let now = OffsetDateTime::now_utc();
    let expected = st.expected(&hb.env, &hb.service);
    let status = instance_status(
        expected.as_ref().map(|c| &c.release.release),
        &hb.version_id,
        &hb.components,
        false,
    );
    // Kept for the log line after `hb` moves into the map.
    let (instance_id, service, version_id) = (
        hb.instance_id.clone(),
        hb.service.clone(),
        hb.version_id.clone(),
    );
    let (is_new, was_missing) = {
        let mut map = st.instances.lock().map_err(|_| ApiError::Internal)?;
        match map.get_mut(&hb.instance_id) {
            Some(t) => {
                let i = &mut t.instance;
                let was_missing = is_missing(&st, i.last_seen, now);
                if i.version_id != hb.version_id || i.service != hb.service || i.env != hb.env {
                    i.first_seen = now;
                }
                update(i, hb, now);
                t.reported_missing = false;
                st.mark_dirty(&i.instance_id);
                (false, was_missing)
            }
            None => {
                let id = hb.instance_id.clone();
                let mut i = Instance {
                    instance_id: id.clone(),
                    env: String::new(),
                    service: String::new(),
                    version_id: String::new(),
                    git_sha: None,
                    build_date: None,
                    components: Default::default(),
                    host: None,
                    pid: None,
                    started_at: None,
                    first_seen: now,
                    last_seen: now,
                    endpoint: None,
                    health: None,
                };
                update(&mut i, hb, now);
                st.mark_dirty(&id);
                map.insert(
                    id,
                    Tracked {
                        instance: i,
                        reported_missing: false,
                    },
                );
                (true, false)
            }
        }
    };
    st.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
    if is_new || was_missing {
        tracing::info!(instance = %instance_id, service = %service, status = status.as_str(),
            version = %short_id(&version_id), "instance {}", if is_new { "registered" } else { "is back" });
    }
    let answer = answer_json(&st, status, expected.as_deref().map(|c| &c.json[..]));
    Ok(([(header::CONTENT_TYPE, "application/json")], answer).into_response())
}

fn update(i: &mut Instance, hb: Heartbeat, now: OffsetDateTime) {
    i.env = hb.env;
    i.service = hb.service;
    i.version_id = hb.version_id;
    i.git_sha = hb.git_sha;
    i.build_date = hb.build_date;
    i.components = hb.components;
    i.host = hb.host;
    i.pid = hb.pid;
    i.started_at = hb.started_at;
    i.endpoint = hb.endpoint;
    i.health = hb.health;
    i.last_seen = now;
}

/// The heartbeat answer, assembled around the expected release's cached JSON so the hot
/// path serialises only a few numbers.
fn answer_json(st: &AppState, status: Status, expected: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + expected.map_or(4, <[u8]>::len));
    out.extend_from_slice(b"{\"status\":\"");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b"\",\"expected\":");
    out.extend_from_slice(expected.unwrap_or(b"null"));
    out.extend_from_slice(
        format!(
            ",\"heartbeat_secs\":{},\"ttl_secs\":{}}}",
            st.config.heartbeat_interval.as_secs(),
            st.config.instance_ttl.as_secs()
        )
        .as_bytes(),
    );
    out
}

/// Deregisters an instance on clean shutdown.
#[utoipa::path(delete, path = "/v1/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "instance id")),
    responses((status = 204, description = "forgotten"), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn deregister(
    Auth(who, _): Auth<auth::Worker>,
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_instance_id(&id)?;
    let removed = st
        .instances
        .lock()
        .map_err(|_| ApiError::Internal)?
        .remove(&id);
    let Some(t) = removed else {
        return Err(ApiError::NotFound(
            codes::NOT_FOUND,
            format!("no instance {id:?} is registered"),
        ));
    };
    st.mark_dirty_removed(&id);
    st.store.delete_instances(std::slice::from_ref(&id)).await?;
    let ev = st
        .store
        .append_event(NewEvent {
            kind: "instance_deregistered".into(),
            env: Some(t.instance.env.clone()),
            service: Some(t.instance.service.clone()),
            actor: Some(who.name),
            reason: None,
            data: serde_json::json!({ "instance_id": id, "version": short_id(&t.instance.version_id) }),
        })
        .await?;
    st.publish_events([ev]);
    tracing::info!(instance = %id, service = %t.instance.service, "instance deregistered");
    Ok(StatusCode::NO_CONTENT)
}

/// Writes dirty instances to the store. Returns how many were written.
pub async fn flush(st: &AppState) -> usize {
    let ids: Vec<String> = match st.dirty.lock() {
        Ok(mut d) => d.drain().collect(),
        Err(_) => return 0,
    };
    if ids.is_empty() {
        return 0;
    }
    let batch: Vec<Instance> = match st.instances.lock() {
        Ok(map) => ids
            .iter()
            .filter_map(|id| map.get(id).map(|t| t.instance.clone()))
            .collect(),
        Err(_) => return 0,
    };
    match st.store.save_instances(&batch).await {
        Ok(()) => batch.len(),
        Err(e) => {
            tracing::error!(error = %e, count = batch.len(), "flushing heartbeats failed; will retry");
            if let Ok(mut d) = st.dirty.lock() {
                d.extend(ids);
            }
            0
        }
    }
}

/// Reports instances whose TTL ran out (one `instance_missing` event each) and forgets
/// those missing for longer than the retention.
pub async fn scan_missing(st: &AppState) {
    let now = OffsetDateTime::now_utc();
    let mut newly_missing = Vec::new();
    let mut expired = Vec::new();
    if let Ok(mut map) = st.instances.lock() {
        for t in map.values_mut() {
            if !is_missing(st, t.instance.last_seen, now) {
                continue;
            }
            if now - t.instance.last_seen > st.config.instance_ttl + st.config.instance_retention {
                expired.push(t.instance.instance_id.clone());
            } else if !t.reported_missing {
                t.reported_missing = true;
                newly_missing.push(t.instance.clone());
            }
        }
        for id in &expired {
            map.remove(id);
        }
    }
    if !expired.is_empty()
        && let Err(e) = st.store.delete_instances(&expired).await
    {
        tracing::error!(error = %e, "forgetting expired instances failed");
    }
    if newly_missing.is_empty() {
        return;
    }
    let events = newly_missing
        .iter()
        .map(|i| {
            tracing::warn!(instance = %i.instance_id, env = %i.env, service = %i.service,
                version = %short_id(&i.version_id), "instance missing: no heartbeat within its TTL");
            NewEvent {
                kind: "instance_missing".into(),
                env: Some(i.env.clone()),
                service: Some(i.service.clone()),
                actor: None,
                reason: None,
                data: serde_json::json!({
                    "instance_id": i.instance_id,
                    "version": short_id(&i.version_id),
                    "last_seen": i.last_seen.unix_timestamp(),
                }),
            }
        })
        .collect();
    match st.store.append_events(events).await {
        Ok(evs) => st.publish_events(evs),
        Err(e) => tracing::error!(error = %e, "recording missing instances failed"),
    }
}

/// The background loop: flush heartbeats and scan for missing instances until shutdown.
pub async fn run_background(st: Arc<AppState>) {
    let mut shutdown = st.shutdown.clone();
    let mut tick = tokio::time::interval(st.config.flush_interval.min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                flush(&st).await;
                scan_missing(&st).await;
            }
            _ = shutdown.changed() => break,
        }
    }
}
