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
    params(("env" = String, Path, description = "environment"), ("svc" = String, Path, description = "service")),
    responses((status = 200, body = StoredRelease), (status = 404, description = "no_release", body = ErrorBody),
        (status = 401, body = ErrorBody)),
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
    params(("env" = String, Path), ("svc" = String, Path)),
    request_body = PutRelease,
    responses((status = 200, description = "the stored release, with its revision", body = StoredRelease),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "downgrade", body = ErrorBody), (status = 413, body = ErrorBody)),
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
pub struct HistoryQuery {
    /// At most this many (default 50, at most 1000).
    pub limit: Option<u32>,
}

/// Release history, newest first.
#[utoipa::path(get, path = "/v1/envs/{env}/services/{svc}/releases", tag = "releases",
    params(("env" = String, Path), ("svc" = String, Path), HistoryQuery),
    responses((status = 200, body = ReleaseHistory), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn history(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Path((env, svc)): Path<(String, String)>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<ReleaseHistory>, ApiError> {
    check_scope(&env, &svc)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let releases = st.service.store().history(&env, &svc, limit).await?;
    Ok(Json(ReleaseHistory { releases }))
}

/// Makes the previous release (or the one named) expected again.
#[utoipa::path(post, path = "/v1/envs/{env}/services/{svc}/rollback", tag = "releases",
    params(("env" = String, Path), ("svc" = String, Path)),
    request_body(content = RollbackRequest, description = "optional; empty means the previous release"),
    responses((status = 200, body = StoredRelease), (status = 404, body = ErrorBody),
        (status = 409, description = "not_rollback_safe or no_previous_release", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rollback(
    Auth(who, _): Auth<auth::Deployer>,
    State(st): State<Arc<AppState>>,
    Path((env, svc)): Path<(String, String)>,
    JsonBody(body): JsonBody<RollbackRequest>,
) -> Result<Json<StoredRelease>, ApiError> {
    let stored = st.service.rollback(&env, &svc, body, &who.name).await?;
    Ok(Json(stored))
}
