//! Events, tokens, health, readiness and metrics.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use lockstep_api::{
    CreateToken, CreatedToken, ErrorBody, EventPage, Health, TokenInfo, TokenList, codes,
};
use lockstep_core::{Status, validate_name};
use lockstep_store::{NewEvent, StoredToken};
use serde::Deserialize;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use time::OffsetDateTime;

use crate::auth::{self, Auth};
use crate::auth::{Principal, generate_token, hash_token};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::state::AppState;

/// Query of `/v1/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct EventsQuery {
    /// Events with an id above this (default 0).
    pub since: Option<i64>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
}

/// The event log, oldest first from `since`.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, body = EventPage), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let events = st.store.events_since(q.since.unwrap_or(0), limit).await?;
    Ok(Json(EventPage { events }))
}

/// Creates a token; the secret is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    Auth(who, _): Auth<auth::Admin>,
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    validate_name("token", &req.name)?;
    let token = generate_token();
    let hash = hash_token(&token);
    st.store
        .create_token(StoredToken {
            name: req.name.clone(),
            role: req.role,
            hash: hex::encode(hash),
            created_at: OffsetDateTime::now_utc(),
        })
        .await?;
    st.tokens.insert(
        hash,
        Principal {
            name: req.name.clone(),
            role: req.role,
        },
    );
    log_event(
        &st,
        "token_created",
        &who.name,
        serde_json::json!({"name": req.name, "role": req.role}),
    )
    .await?;
    tracing::info!(name = %req.name, role = %req.role, actor = %who.name, "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            name: req.name,
            role: req.role,
            token,
        }),
    ))
}

async fn log_event(
    st: &AppState,
    kind: &str,
    actor: &str,
    data: serde_json::Value,
) -> Result<(), ApiError> {
    let ev = st
        .store
        .append_event(NewEvent {
            kind: kind.into(),
            actor: Some(actor.into()),
            data,
            ..NewEvent::default()
        })
        .await?;
    st.publish_events([ev]);
    Ok(())
}

/// Lists tokens (names and roles, never secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, body = TokenList), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tokens(
    Auth(_who, _): Auth<auth::Admin>,
    State(st): State<Arc<AppState>>,
) -> Result<Json<TokenList>, ApiError> {
    let tokens = st
        .store
        .tokens()
        .await?
        .into_iter()
        .map(|t| TokenInfo {
            name: t.name,
            role: t.role,
            created_at: t.created_at,
        })
        .collect();
    Ok(Json(TokenList { tokens }))
}

/// Revokes a token by name; it stops working at once.
#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "tokens", params(("name" = String, Path)),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_token(
    Auth(who, _): Auth<auth::Admin>,
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !st.store.revoke_token(&name).await? {
        return Err(ApiError::NotFound(
            codes::NOT_FOUND,
            format!("no token named {name:?}"),
        ));
    }
    st.tokens.remove(&name);
    log_event(
        &st,
        "token_revoked",
        &who.name,
        serde_json::json!({"name": name}),
    )
    .await?;
    tracing::info!(name = %name, actor = %who.name, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the store answers too.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(st): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    if *st.shutdown.borrow() {
        return Err(ApiError::Unavailable);
    }
    match st.store.ping().await {
        Ok(()) => Ok(Json(Health {
            status: "ok".into(),
        })),
        Err(e) => {
            tracing::error!(error = %e, "readiness: store does not answer");
            Err(ApiError::Unavailable)
        }
    }
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let c = &st.counters;
    let mut out = String::with_capacity(1024);
    let mut gauge = |name: &str, help: &str, kind: &str, v: i64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    gauge(
        "lockstep_heartbeats_total",
        "Heartbeats accepted.",
        "counter",
        c.heartbeats.load(Ordering::Relaxed) as i64,
    );
    gauge(
        "lockstep_release_changes_total",
        "Registrations and rollbacks that changed an expected release.",
        "counter",
        c.changes.load(Ordering::Relaxed) as i64,
    );
    gauge(
        "lockstep_watchers",
        "Open watch streams.",
        "gauge",
        c.watchers.load(Ordering::Relaxed),
    );
    gauge(
        "lockstep_event_streams",
        "Open event streams.",
        "gauge",
        c.event_streams.load(Ordering::Relaxed),
    );
    let report = crate::status::report(&st, &Default::default());
    let mut counts = [0i64; 5];
    for env in &report.environments {
        for svc in &env.services {
            for i in &svc.instances {
                counts[match i.status {
                    Status::Current => 0,
                    Status::Draining => 1,
                    Status::Stale => 2,
                    Status::Missing => 3,
                    Status::Unknown => 4,
                }] += 1;
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP lockstep_instances Instances by status.\n# TYPE lockstep_instances gauge"
    );
    for (i, s) in ["current", "draining", "stale", "missing", "unknown"]
        .iter()
        .enumerate()
    {
        let _ = writeln!(out, "lockstep_instances{{status=\"{s}\"}} {}", counts[i]);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
