//! The source system's VersionManager API (`serve --compat authrim`), mapped onto the
//! registry so its deploy script and Worker middleware work unchanged.
//!
//! | route | role | lockstep |
//! |---|---|---|
//! | `POST /api/internal/version/{worker}`, `POST /api/internal/versions/{worker}` | deployer | register `uuid` as the expected release of `worker` in the compat environment |
//! | `GET /api/internal/version-manager/status` | viewer | every expected release of that environment |
//! | `GET /version/{worker}` | worker | the expected release of `worker` |
//!
//! Only the HTTP shape lives here: writes go through [`RegistryService::register`] (so a
//! compat registration is a normal release: history, events, watch, rollback, `verify`),
//! reads come from the projection like `GET …/release`. The shape is the source system's,
//! not lockstep's: errors are `{"error": "Unauthorized"}` (with
//! `WWW-Authenticate: Bearer realm="VersionManager"`) and `{"error": "Bad Request"}`, and
//! `registeredAt` is milliseconds since the epoch. Its deploy script counts only 200/201 as
//! success and fails the whole deploy on 400/404/409, so the register route never answers
//! 409 for what the source system accepted: re-posting the expected release is a 200
//! (unchanged), and a registration lockstep would refuse as a downgrade is forced, because
//! re-registering a worker overwrote it there.
//!
//! [`RegistryService::register`]: crate::service::RegistryService::register

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lockstep_api::PutRelease;
use lockstep_core::{CoreError, Release, Role, StoredRelease, short_id};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::ApiError;
use crate::service::RegistryError;
use crate::state::AppState;

/// The one compatibility profile there is: the VersionManager API of the source system.
pub const AUTHRIM: &str = "authrim";

/// Metadata key keeping the `deployTime` string exactly as the deploy script sent it, so the
/// read routes give back what was written (not a reformatted timestamp).
const DEPLOY_TIME_KEY: &str = "deployTime";

/// What `serve --compat authrim` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompatConfig {
    /// The environment the source system's single namespace maps to (`--compat-env`).
    pub env: String,
}

impl Default for CompatConfig {
    fn default() -> Self {
        CompatConfig {
            env: lockstep_core::DEFAULT_ENV.to_string(),
        }
    }
}

struct CompatState {
    app: Arc<AppState>,
    env: String,
}

/// The compat routes, to merge into the registry's router.
pub(crate) fn router<S>(config: &CompatConfig, app: Arc<AppState>) -> Router<S> {
    let state = Arc::new(CompatState {
        app,
        env: config.env.clone(),
    });
    Router::new()
        .route("/api/internal/version/{worker}", post(register))
        .route("/api/internal/versions/{worker}", post(register))
        .route("/api/internal/version-manager/status", get(status))
        .route("/version/{worker}", get(version))
        .with_state(state)
}

/// An answer in the source system's error shape: `{"error": "<text>"}`.
fn error(status: StatusCode, text: &str) -> Response {
    let mut resp = (status, Json(json!({ "error": text }))).into_response();
    match status {
        StatusCode::UNAUTHORIZED => {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"VersionManager\""),
            );
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        _ => {}
    }
    resp
}

fn bad_request() -> Response {
    error(StatusCode::BAD_REQUEST, "Bad Request")
}

/// Why a token was not accepted; answered in the source system's shape by [`denied`].
enum Denied {
    Unauthorized,
    Forbidden,
}

fn denied(d: Denied) -> Response {
    match d {
        Denied::Unauthorized => error(StatusCode::UNAUTHORIZED, "Unauthorized"),
        Denied::Forbidden => error(StatusCode::FORBIDDEN, "Forbidden"),
    }
}

/// Checks the bearer token for `role`; the token's name is the actor of a registration.
fn authorize(
    st: &CompatState,
    method: &Method,
    headers: &HeaderMap,
    role: Role,
) -> Result<String, Denied> {
    let tokens = &st.app.service.projection().tokens;
    match crate::auth::authorize(tokens, method, headers, role) {
        Ok(p) => Ok(p.name),
        Err(ApiError::Forbidden(_) | ApiError::Csrf) => Err(Denied::Forbidden),
        Err(_) => Err(Denied::Unauthorized),
    }
}

/// Maps a registry failure: what the caller sent is a 400, a store that is away a
/// retryable 503 (the deploy script retries it), anything else a 500.
fn failure(e: RegistryError) -> Response {
    match e {
        RegistryError::Rule(CoreError::InvalidName { .. } | CoreError::InvalidVersionId(_))
        | RegistryError::BadRequest(_) => bad_request(),
        other => match ApiError::from(other) {
            ApiError::Unavailable => error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable"),
            ApiError::BadRequest(_) => bad_request(),
            _ => error(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error"),
        },
    }
}

/// A non-empty string field of the body.
fn field<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    body.get(name)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// `POST /api/internal/version/{worker}` (and `/versions/`): registers `uuid`, deployed at
/// `deployTime`, as the expected release of `worker`.
async fn register(
    State(st): State<Arc<CompatState>>,
    Path(worker): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let actor = match authorize(&st, &method, &headers, Role::Deployer) {
        Ok(a) => a,
        Err(d) => return denied(d),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return bad_request();
    };
    let (Some(uuid), Some(deploy_time)) = (field(&body, "uuid"), field(&body, "deployTime")) else {
        return bad_request();
    };
    let Ok(deployed_at) = OffsetDateTime::parse(deploy_time, &Rfc3339) else {
        return bad_request();
    };
    let mut release = Release::new(uuid);
    release.deployed_at = Some(deployed_at);
    release.reason = Some(format!(
        "registered through the {AUTHRIM} compatibility route"
    ));
    release.metadata = BTreeMap::from([(DEPLOY_TIME_KEY.to_string(), json!(deploy_time))]);
    let service = &st.app.service;
    let mut put = PutRelease {
        release,
        force: false,
    };
    let mut outcome = service
        .register(&st.env, &worker, put.clone(), &actor)
        .await;
    if let Err(RegistryError::Rule(CoreError::Downgrade { .. })) = &outcome {
        // The source system overwrote a worker's version on every registration; its deploy
        // script fails the whole deploy on a 409. Do what it did, and say so.
        tracing::warn!(worker = %worker, version = %short_id(uuid), actor = %actor,
            "compat registration older than the expected release: forced, as the source system overwrote");
        put.force = true;
        outcome = service.register(&st.env, &worker, put, &actor).await;
    }
    match outcome {
        Ok(stored) => {
            tracing::info!(worker = %worker, version = %short_id(&stored.release.version_id),
                revision = stored.revision, "compat registration");
            Json(json!({
                "success": true,
                "workerName": worker,
                "uuid": stored.release.version_id,
            }))
            .into_response()
        }
        Err(e) => failure(e),
    }
}

/// One worker as the source system described it.
fn entry(r: &StoredRelease) -> Value {
    let deploy_time = r
        .release
        .metadata
        .get(DEPLOY_TIME_KEY)
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| r.release.deployed_at.and_then(|t| t.format(&Rfc3339).ok()))
        .unwrap_or_default();
    json!({
        "uuid": r.release.version_id,
        "deployTime": deploy_time,
        "registeredAt": epoch_millis(r.registered_at),
    })
}

fn epoch_millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// `GET /api/internal/version-manager/status`: every worker of the compat environment.
async fn status(
    State(st): State<Arc<CompatState>>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if let Err(d) = authorize(&st, &method, &headers, Role::Viewer) {
        return denied(d);
    }
    let Ok(all) = st.app.service.projection().all_expected() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable");
    };
    let versions: serde_json::Map<String, Value> = all
        .iter()
        .filter(|c| c.release.env == st.env)
        .map(|c| (c.release.service.clone(), entry(&c.release)))
        .collect();
    let now = OffsetDateTime::now_utc();
    Json(json!({
        "workerCount": versions.len(),
        "versions": versions,
        "timestamp": now.format(&Rfc3339).unwrap_or_default(),
    }))
    .into_response()
}

/// `GET /version/{worker}`: the expected release of one worker, or 404.
async fn version(
    State(st): State<Arc<CompatState>>,
    Path(worker): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if let Err(d) = authorize(&st, &method, &headers, Role::Worker) {
        return denied(d);
    }
    match st.app.service.projection().expected(&st.env, &worker) {
        Ok(Some(change)) => Json(entry(&change.release)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "Version not found"),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_at_is_whole_milliseconds_since_the_epoch() {
        let t = time::macros::datetime!(2026-11-30 12:00:00.123456 UTC);
        assert_eq!(epoch_millis(t), 1_796_040_000_123);
    }

    #[test]
    fn the_deploy_time_is_given_back_as_it_was_sent() {
        let mut release = Release::new("0b7a1e4c-3f6d-4e55-9d1a-2c9b0e8f7a61");
        release.deployed_at = Some(time::macros::datetime!(2026-11-30 12:00:00 UTC));
        release.metadata = BTreeMap::from([(
            DEPLOY_TIME_KEY.to_string(),
            json!("2026-11-30T12:00:00.000Z"),
        )]);
        let stored = StoredRelease {
            env: "production".into(),
            service: "op-auth".into(),
            revision: 7,
            kind: lockstep_core::RegistrationKind::Register,
            registered_at: time::macros::datetime!(2026-11-30 12:00:01 UTC),
            release,
        };
        let e = entry(&stored);
        assert_eq!(e["deployTime"], "2026-11-30T12:00:00.000Z");
        assert_eq!(e["registeredAt"], 1_796_040_001_000_i64);
        assert_eq!(e["uuid"], "0b7a1e4c-3f6d-4e55-9d1a-2c9b0e8f7a61");
    }
}
