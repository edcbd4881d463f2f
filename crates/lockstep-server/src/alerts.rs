//! `GET /v1/alerts`, `POST /v1/alerts/{id}/ack`, `GET/PUT /v1/alert-channels`: the HTTP side
//! of drift alerts (the registry side is `service::alerts`).

use axum::Json;
use axum::extract::{Path, Query, State};
use lockstep_api::{AckRequest, Alert, AlertChannels, AlertList, AlertState, ErrorBody};
use serde::Deserialize;
use std::sync::Arc;

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::service::alerts::MAX_LIST;
use crate::state::AppState;

/// Query of `GET /v1/alerts`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertsQuery {
    /// `open` (default), `resolved` or `all`.
    #[param(pattern = "^(open|resolved|all)$")]
    pub state: Option<String>,
    /// Only this environment.
    #[param(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub env: Option<String>,
    /// Only this service.
    #[param(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub service: Option<String>,
    /// At most this many: 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// Drift alerts, newest first.
#[utoipa::path(get, path = "/v1/alerts", tag = "alerts", params(AlertsQuery),
    responses(
        (status = 200, description = "alerts, newest first (open ones by default)", body = AlertList),
        (status = 400, description = "`bad_request`: a bad `state`, name or `limit`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<AlertList>, ApiError> {
    let state = match q.state.as_deref() {
        None | Some("open") => Some(AlertState::Open),
        Some("resolved") => Some(AlertState::Resolved),
        Some("all") => None,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "state must be open, resolved or all, got {other:?}"
            )));
        }
    };
    for (what, v) in [("environment", &q.env), ("service", &q.service)] {
        if let Some(v) = v {
            lockstep_core::validate_name(what, v)?;
        }
    }
    let limit = match q.limit {
        None => 100,
        Some(n @ 1..=MAX_LIST) => n,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_LIST}, got {n}"
            )));
        }
    };
    let alerts = st
        .service
        .list_alerts(lockstep_store::AlertFilter {
            state,
            env: q.env,
            service: q.service,
            limit,
        })
        .await?;
    Ok(Json(AlertList { alerts }))
}

/// Acknowledges an alert (idempotent: acknowledging again changes nothing).
#[utoipa::path(post, path = "/v1/alerts/{id}/ack", tag = "alerts",
    params(("id" = String, Path, description = "the alert id")),
    request_body(content = Option<AckRequest>, description = "optional reason"),
    responses(
        (status = 200, description = "the alert, acknowledged", body = Alert),
        (status = 400, description = "`bad_request`: a malformed body", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the operator role (or `csrf` for a browser session without its header)", body = ErrorBody),
        (status = 404, description = "`not_found`: no such alert", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body exceeds 64 KiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn ack(
    Auth(who, _): Auth<auth::Operator>,
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<AckRequest>,
) -> Result<Json<Alert>, ApiError> {
    Ok(Json(
        st.service.ack_alert(&id, &who.name, req.reason).await?,
    ))
}

/// The alert channels, secrets masked.
#[utoipa::path(get, path = "/v1/alert-channels", tag = "alerts",
    responses(
        (status = 200, description = "every channel; `secret`, `password` and Slack `webhook_url` masked", body = AlertChannels),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the admin role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_channels(
    Auth(_who, _): Auth<auth::Admin>,
    State(st): State<Arc<AppState>>,
) -> Result<Json<AlertChannels>, ApiError> {
    Ok(Json(AlertChannels {
        channels: st.service.alert_channels_masked().await?,
    }))
}

/// Replaces the alert channels. A secret sent back as the mask keeps the stored one.
#[utoipa::path(put, path = "/v1/alert-channels", tag = "alerts", request_body = AlertChannels,
    responses(
        (status = 200, description = "the channels now, secrets masked", body = AlertChannels),
        (status = 400, description = "`bad_request`: a missing field, a bad name or URL, or a masked secret with no stored value", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the admin role", body = ErrorBody),
        (status = 409, description = "`conflict`: two channels with one name", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body exceeds 64 KiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the body is not JSON", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_channels(
    Auth(who, _): Auth<auth::Admin>,
    State(st): State<Arc<AppState>>,
    JsonBody(req): JsonBody<AlertChannels>,
) -> Result<Json<AlertChannels>, ApiError> {
    Ok(Json(AlertChannels {
        channels: st
            .service
            .put_alert_channels(req.channels, &who.name)
            .await?,
    }))
}
