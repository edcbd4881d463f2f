//! `POST/GET /v1/rollouts`, `GET /v1/rollouts/{id}`, `POST /v1/rollouts/{id}/abort|retry`:
//! the HTTP side of fleet rollouts (the coordinator is `service::rollout`).
//!
//! `POST /v1/rollouts` is multipart: a `request` field (JSON, [`StartRollout`]), the
//! `package` file and, optionally, its `signature`. Its body cap is the package cap
//! (`serve --max-package-size`), not the API's 64 KiB.

use axum::Json;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::StatusCode;
use lockstep_api::{ErrorBody, codes};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::service::rollout::{RolloutView, StartRollout};
use crate::state::AppState;
use lockstep_rollout::plan::Stop;

/// `GET /v1/rollouts`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutList {
    /// Newest first.
    pub rollouts: Vec<RolloutView>,
}

/// Query of `GET /v1/rollouts`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many: 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The multipart form of `POST /v1/rollouts` (for the OpenAPI document; `deny_unknown_fields`
/// makes it say `additionalProperties: false`, which is what the handler means: it reads
/// these three parts and no others). The two files are described the OpenAPI 3.1 way,
/// `contentMediaType`, not with 3.0's `format: binary`: a format nothing validates gives
/// negative-testing tools nothing real to break (schemathesis "negates" it and then sends a
/// valid form, reporting the 201 as invalid input accepted).
#[derive(utoipa::ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct StartRolloutForm {
    /// JSON of the rollout request.
    request: StartRollout,
    /// The package (`.tar.gz`).
    #[schema(value_type = String, content_media_type = "application/gzip", min_length = 1)]
    package: Vec<u8>,
    /// Its detached signature.
    #[schema(value_type = Option<String>, content_media_type = "application/octet-stream")]
    signature: Option<Vec<u8>>,
}

/// Query of `POST /v1/rollouts/{id}/abort`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AbortQuery {
    /// `true`: stop without rolling back — the updated nodes stay on the new release, which
    /// stays expected with the previous one accepted; `rollout retry` then updates only
    /// the rest. Default `false`: roll back every node the rollout touched.
    pub keep: Option<bool>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// Starts a rollout: stores the package, makes the release expected with the previous one
/// accepted, and lets the leader drive the agents.
#[utoipa::path(post, path = "/v1/rollouts", tag = "rollouts", operation_id = "start_rollout",
    request_body(content = StartRolloutForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "the rollout, with its nodes", body = RolloutView),
        (status = 400, description = "`bad_request`: a missing field, a bad name or version id", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the deployer role", body = ErrorBody),
        (status = 404, description = "`not_found`: no agents to update (no live instance of the service has an endpoint)", body = ErrorBody),
        (status = 409, description = "`conflict`: a rollout of the service is running; `downgrade`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the package exceeds `--max-package-size`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not `multipart/form-data`", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start(
    Auth(who, _): Auth<auth::Deployer>,
    State(st): State<Arc<AppState>>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let mut form = form.map_err(|_| ApiError::UnsupportedMediaType)?;
    let mut request: Option<StartRollout> = None;
    let mut package: Option<Vec<u8>> = None;
    let mut signature: Option<Vec<u8>> = None;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| bad(format!("multipart: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                bad(format!("multipart field {name}: {e}"))
            }
        })?;
        match name.as_str() {
            "request" => {
                request =
                    Some(serde_json::from_slice(&bytes).map_err(|e| bad(format!("request: {e}")))?)
            }
            "package" | "update_package" => package = Some(bytes.to_vec()),
            "signature" => signature = Some(bytes.to_vec()),
            // A misspelled part would otherwise be dropped silently (a rollout without the
            // signature it was meant to carry).
            other => {
                return Err(bad(format!(
                    "unknown multipart field {other:?}: send `request`, `package` and `signature`"
                )));
            }
        }
    }
    let request = request.ok_or_else(|| bad("the multipart field `request` is missing"))?;
    let package = package.ok_or_else(|| bad("the multipart field `package` is missing"))?;
    let view = st
        .service
        .start_rollout(request, package, signature, &who.name)
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Recent rollouts, newest first.
#[utoipa::path(get, path = "/v1/rollouts", tag = "rollouts", operation_id = "list_rollouts", params(ListQuery),
    responses(
        (status = 200, description = "rollouts, newest first", body = RolloutList),
        (status = 400, description = "`bad_request`: a bad `limit`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<RolloutList>, ApiError> {
    let limit = match q.limit {
        None => 50,
        Some(n @ 1..=1000) => n,
        Some(n) => return Err(bad(format!("limit must be between 1 and 1000, got {n}"))),
    };
    Ok(Json(RolloutList {
        rollouts: st.service.list_rollouts(limit).await?,
    }))
}

fn not_found(id: i64) -> ApiError {
    ApiError::NotFound(codes::NOT_FOUND, format!("no rollout {id}"))
}

/// One rollout: phase, nodes with their steps, the summary line.
#[utoipa::path(get, path = "/v1/rollouts/{id}", tag = "rollouts", operation_id = "get_rollout",
    params(("id" = i64, Path, description = "the rollout id")),
    responses(
        (status = 200, description = "the rollout", body = RolloutView),
        (status = 400, description = "`bad_request`: the id is not a number", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 404, description = "`not_found`: no such rollout", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Path(id): Path<i64>,
) -> Result<Json<RolloutView>, ApiError> {
    st.service
        .rollout_view(id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(id))
}

/// Stops a running rollout and rolls back every node it touched (`?keep=true`: stops
/// without rolling anything back).
#[utoipa::path(post, path = "/v1/rollouts/{id}/abort", tag = "rollouts", operation_id = "abort_rollout",
    params(("id" = i64, Path, description = "the rollout id"), AbortQuery),
    responses(
        (status = 200, description = "the rollout, its abort requested", body = RolloutView),
        (status = 400, description = "`bad_request`: the id is not a number, or `keep` not a boolean", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the deployer role", body = ErrorBody),
        (status = 404, description = "`not_found`: no such rollout", body = ErrorBody),
        (status = 409, description = "`conflict`: it is not running (or, with `keep`, already rolling back)", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn abort(
    Auth(who, _): Auth<auth::Deployer>,
    State(st): State<Arc<AppState>>,
    Path(id): Path<i64>,
    Query(q): Query<AbortQuery>,
) -> Result<Json<RolloutView>, ApiError> {
    let how = if q.keep.unwrap_or(false) {
        Stop::Keep
    } else {
        Stop::Abort
    };
    st.service
        .abort_rollout(id, how, &who.name)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(id))
}

/// Runs an aborted, failed or frozen rollout again: only the nodes not on its release.
#[utoipa::path(post, path = "/v1/rollouts/{id}/retry", tag = "rollouts", operation_id = "retry_rollout",
    params(("id" = i64, Path, description = "the rollout id")),
    responses(
        (status = 200, description = "the rollout, running again", body = RolloutView),
        (status = 400, description = "`bad_request`: the id is not a number", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the deployer role", body = ErrorBody),
        (status = 404, description = "`not_found`: no such rollout", body = ErrorBody),
        (status = 409, description = "`conflict`: it is still running or completed, or another rollout of the service runs", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn retry(
    Auth(who, _): Auth<auth::Deployer>,
    State(st): State<Arc<AppState>>,
    Path(id): Path<i64>,
) -> Result<Json<RolloutView>, ApiError> {
    st.service
        .retry_rollout(id, &who.name)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(id))
}
