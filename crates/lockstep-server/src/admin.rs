//! Events, tokens, health and readiness.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use lockstep_api::{CreateToken, CreatedToken, ErrorBody, EventPage, Health, TokenInfo, TokenList};
use lockstep_core::validate_name;
use serde::Deserialize;
use std::sync::Arc;

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::state::AppState;

/// Query of `/v1/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events with an id above this (default 0).
    pub since: Option<i64>,
    /// At most this many events: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The event log, oldest first from `since`.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses(
        (status = 200, description = "events with an id above `since`, oldest first", body = EventPage),
        (status = 400, description = "`bad_request`: a bad `since`, or `limit` outside 1-1000", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = crate::releases::page_limit(q.limit, 100)?;
    let events = st
        .service
        .store()
        .events_since(q.since.unwrap_or(0), limit)
        .await?;
    Ok(Json(EventPage { events }))
}

/// Creates a token; the secret is in this answer only.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses(
        (status = 201, description = "the token, with its secret (shown once)", body = CreatedToken),
        (status = 400, description = "`bad_request`: a bad name or role, or a malformed body", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the admin role", body = ErrorBody),
        (status = 409, description = "`conflict`: a token with this name exists", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body exceeds 64 KiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    Auth(who, _): Auth<auth::Admin>,
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let created = st
        .service
        .create_token(&req.name, req.role, &who.name)
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Lists tokens (names and roles, never secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses(
        (status = 200, description = "every active token", body = TokenList),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the admin role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tokens(
    Auth(_who, _): Auth<auth::Admin>,
    State(st): State<Arc<AppState>>,
) -> Result<Json<TokenList>, ApiError> {
    let tokens = st
        .service
        .store()
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
#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "tokens",
    params(("name" = String, Path, description = "token name",
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64)),
    responses(
        (status = 204, description = "revoked"),
        (status = 400, description = "`bad_request`: not a valid token name", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the admin role", body = ErrorBody),
        (status = 404, description = "`not_found`: no token with this name", body = ErrorBody),
        (status = 409, description = "`last_admin`: it is the last admin token", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_token(
    Auth(who, _): Auth<auth::Admin>,
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    validate_name("token", &name)?;
    st.service.revoke_token(&name, &who.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "the process answers", body = Health)))]
pub async fn healthz(State(st): State<Arc<AppState>>) -> Json<Health> {
    let lead = st.service.leadership();
    Json(Health {
        status: "ok".into(),
        registry: Some(lockstep_api::RegistryInfo {
            replica: lead.replica().to_string(),
            leader: lead.leader(),
            backend: st.service.store().backend().to_string(),
        }),
    })
}

/// Readiness: the store answers too.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "ready: the store answers", body = Health),
        (status = 503, description = "`service_unavailable`: the store does not answer, or shutting down", body = ErrorBody)))]
pub async fn readyz(State(st): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    if *st.shutdown.borrow() {
        return Err(ApiError::Unavailable);
    }
    match st.service.store().ping().await {
        Ok(()) => Ok(Json(Health {
            status: "ok".into(),
            registry: None,
        })),
        Err(e) => {
            tracing::error!(error = %e, "readiness: store does not answer");
            Err(ApiError::Unavailable)
        }
    }
}
