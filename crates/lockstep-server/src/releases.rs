//! Release endpoints: read the expected release (the hot path), register, history, rollback.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use lockstep_api::{ErrorBody, PutRelease, ReleaseHistory, RollbackRequest, codes};
use lockstep_core::{StoredRelease, short_id, validate_name, validate_version_id};
use lockstep_store::{Registration, Rollback};
use serde::Deserialize;
use std::sync::Arc;
use time::OffsetDateTime;

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::state::{AppState, Change};

/// Checks the `{env}` and `{svc}` path segments.
pub(crate) fn check_path(env: &str, service: &str) -> Result<(), ApiError> {
    validate_name("environment", env)?;
    validate_name("service", service)?;
    Ok(())
}

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
    check_path(&env, &svc)?;
    let change = st
        .expected(&env, &svc)
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
    check_path(&env, &svc)?;
    validate_version_id(&body.release.version_id)?;
    for a in &body.release.accepts {
        validate_version_id(a)?;
    }
    let mut release = body.release;
    if release.deployed_at.is_none() {
        release.deployed_at = Some(OffsetDateTime::now_utc());
    }
    let reason = release.reason.take();
    let _guard = st.write_lock.lock().await;
    let out = st
        .store
        .register(Registration {
            env: env.clone(),
            service: svc.clone(),
            release,
            force: body.force,
            actor: who.name.clone(),
            reason,
        })
        .await
        .inspect_err(|e| {
            tracing::warn!(env = %env, service = %svc, actor = %who.name, error = %e, "registration refused");
        })?;
    if out.changed {
        tracing::info!(env = %env, service = %svc, version = %short_id(&out.release.release.version_id),
            revision = out.release.revision, actor = %who.name, "release registered");
        st.publish(Change::new(out.release.clone()));
        st.publish_events(out.event);
    }
    Ok(Json(out.release))
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
    check_path(&env, &svc)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let releases = st.store.history(&env, &svc, limit).await?;
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
    check_path(&env, &svc)?;
    if let Some(v) = &body.version_id {
        validate_version_id(v)?;
    }
    let _guard = st.write_lock.lock().await;
    let out = st
        .store
        .rollback(Rollback {
            env: env.clone(),
            service: svc.clone(),
            to: body.version_id,
            force: body.force,
            actor: who.name.clone(),
            reason: body.reason,
            data: serde_json::json!({ "now": body.now, "force": body.force }),
        })
        .await
        .inspect_err(|e| {
            tracing::warn!(env = %env, service = %svc, actor = %who.name, error = %e, "rollback refused");
        })?;
    if out.changed {
        tracing::warn!(env = %env, service = %svc, version = %short_id(&out.release.release.version_id),
            revision = out.release.revision, actor = %who.name, "rolled back");
        st.publish(Change::new(out.release.clone()));
        st.publish_events(out.event);
    }
    Ok(Json(out.release))
}
