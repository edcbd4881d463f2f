//! Instances: heartbeats (soft state, see the registry service) and deregistration.
//!
//! Heartbeats are the highest-volume call, so the handler only touches memory: the
//! service updates the instance and answers with the projection's pre-serialised expected
//! release; the service's flusher writes them to the store in batches.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use lockstep_api::{ErrorBody, Heartbeat, HeartbeatAnswer};
use lockstep_core::Status;
use std::sync::Arc;

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::state::AppState;

/// Registers or refreshes an instance; answers with its status and the expected release.
#[utoipa::path(post, path = "/v1/instances", tag = "instances", request_body = Heartbeat,
    responses(
        (status = 200, description = "the instance's status and the expected release", body = HeartbeatAnswer),
        (status = 400, description = "`bad_request`: a bad name, instance id, version id or body", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body exceeds 64 KiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the registry cannot answer now", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn heartbeat(
    Auth(_who, _): Auth<auth::Worker>,
    State(st): State<Arc<AppState>>,
    JsonBody(hb): JsonBody<Heartbeat>,
) -> Result<Response, ApiError> {
    let out = st.service.heartbeat(hb)?;
    let answer = answer_json(
        &st,
        out.status,
        out.expected.as_deref().map(|c| &c.json[..]),
    );
    Ok(([(header::CONTENT_TYPE, "application/json")], answer).into_response())
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
    params(("id" = String, Path, description = "instance id: 1-128 characters, no whitespace, control characters or '/'",
        pattern = "^[^\\u0000-\\u0020\\u007f-\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000/]{1,128}$",
        min_length = 1, max_length = 128)),
    responses(
        (status = 204, description = "forgotten"),
        (status = 400, description = "`bad_request`: a malformed instance id", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 404, description = "`not_found`: no such instance is registered", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn deregister(
    Auth(who, _): Auth<auth::Worker>,
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    st.service.deregister(&id, &who.name).await?;
    Ok(StatusCode::NO_CONTENT)
}
