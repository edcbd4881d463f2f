//! Release endpoints: read the expected release (the hot path), register, history, rollback.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use lockstep_api::{ErrorBody, PutRelease, ReleaseHistory, RollbackRequest, codes};
use lockstep_core::StoredRelease;
use serde::Deserialize;
use std::sync::Arc;

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::service::check_scope;
use crate::state::AppState;

/// The expected release of a service.
#[utoipa::path(get, path = "/v1/envs/{env}/services/{svc}/release", tag = "releases",
    params(("env" = String, Path, description = "environment name", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64),
        ("svc" = String, Path, description = "service name", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64)),
    responses(
        (status = 200, description = "the expected release", body = StoredRelease),
        (status = 400, description = "`bad_request`: a name does not match the pattern", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 404, description = "`no_release`: nothing registered for this service", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the registry cannot answer now", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_release(
    Auth(_who, _): Auth<auth::Worker>,
    State(st): State<Arc<AppState>>,
    Path((env, svc)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_scope(&env, &svc)?;
    let change = st
        .service
        .projection()
        .expected(&env, &svc)?
        .ok_or_else(|| no_release(&env, &svc))?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        change.json.clone(),
    )
        .into_response())
}

fn no_release(env: &str, svc: &str) -> ApiError {
    ApiError::NotFound(
        codes::NO_RELEASE,
        format!("no release registered for {svc} in {env}"),
    )
}

/// Registers a release and makes it expected.
#[utoipa::path(put, path = "/v1/envs/{env}/services/{svc}/release", tag = "releases",
    params(("env" = String, Path, description = "environment name", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64),
        ("svc" = String, Path, description = "service name", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64)),
    request_body = PutRelease,
    responses(
        (status = 200, description = "the stored release, with its revision", body = StoredRelease),
        (status = 400, description = "`bad_request`: a bad name, version id or body", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the deployer role", body = ErrorBody),
        (status = 409, description = "`downgrade`: older than the expected release (send `force`)", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body exceeds 64 KiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_release(
    Auth(who, _): Auth<auth::Deployer>,
    State(st): State<Arc<AppState>>,
    Path((env, svc)): Path<(String, String)>,
    JsonBody(body): JsonBody<PutRelease>,
) -> Result<Json<StoredRelease>, ApiError> {
    let stored = st.service.register(&env, &svc, body, &who.name).await?;
    Ok(Json(stored))
}

/// Query of the history endpoint.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// At most this many releases: 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The largest page of history or events one request returns.
pub(crate) const MAX_LIMIT: u32 = 1000;

/// `limit`, or `default` when absent; outside 1..=[`MAX_LIMIT`] it is a 400, never
/// silently clamped (`limit=0` must not return one item).
pub(crate) fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(default),
        Some(n @ 1..=MAX_LIMIT) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {n}"
        ))),
    }
}

/// Release history, newest first.
#[utoipa::path(get, path = "/v1/envs/{env}/services/{svc}/releases", tag = "releases",
    params(("env" = String, Path, description = "environment name", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64),
        ("svc" = String, Path, description = "service name", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64), HistoryQuery),
    responses(
        (status = 200, description = "releases, newest first (empty for an unknown service)", body = ReleaseHistory),
        (status = 400, description = "`bad_request`: a bad name, or `limit` outside 1-1000", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn history(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Path((env, svc)): Path<(String, String)>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<ReleaseHistory>, ApiError> {
    check_scope(&env, &svc)?;
    let limit = page_limit(q.limit, 50)?;
    let releases = st.service.store().history(&env, &svc, limit).await?;
    Ok(Json(ReleaseHistory { releases }))
}

/// Makes the previous release (or the one named) expected again.
#[utoipa::path(post, path = "/v1/envs/{env}/services/{svc}/rollback", tag = "releases",
    params(("env" = String, Path, description = "environment name", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64),
        ("svc" = String, Path, description = "service name", pattern = "^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64)),
    request_body(content = Option<RollbackRequest>, description = "optional; no body (or `{}`) means the previous release"),
    responses(
        (status = 200, description = "the release now expected, with its revision", body = StoredRelease),
        (status = 400, description = "`bad_request`: a bad name, version id or body", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the deployer role", body = ErrorBody),
        (status = 404, description = "`no_release` or `not_found`: nothing registered, or no such version in the history", body = ErrorBody),
        (status = 409, description = "`not_rollback_safe` (send `force`) or `no_previous_release`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body exceeds 64 KiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rollback(
    Auth(who, _): Auth<auth::Deployer>,
    State(st): State<Arc<AppState>>,
    Path((env, svc)): Path<(String, String)>,
    JsonBody(body): JsonBody<RollbackRequest>,
) -> Result<Json<StoredRelease>, ApiError> {
    if let Some(c) = body.concurrency
        && !(1..=100_000).contains(&c)
    {
        return Err(ApiError::BadRequest(format!(
            "concurrency must be between 1 and 100000, got {c}"
        )));
    }
    if body.now {
        // `rollback --now` also stops a running rollout of the service (or rolls back the
        // nodes of the one that just completed), every node at once.
        st.service
            .emergency_rollback_rollout(&env, &svc, body.concurrency.map(|c| c as usize), &who.name)
            .await?;
    }
    let stored = st.service.rollback(&env, &svc, body, &who.name).await?;
    Ok(Json(stored))
}
