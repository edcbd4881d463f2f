//! `GET /v1/status`: every environment, service, expected release and instance with its
//! status and drift, computed from the in-memory state at the moment of the call; and
//! `GET /v1/services`, the names alone, readable with a worker token.

use axum::Json;
use axum::extract::{Query, State};
use lockstep_api::{
    EnvServices, EnvStatus, ErrorBody, InstanceStatus, RegistryInfo, ServiceIndex, ServiceStatus,
    StatusReport,
};
use lockstep_core::{StatusCounts, drift_secs, instance_status, validate_name};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use time::OffsetDateTime;

use crate::auth::{self, Auth};
use crate::error::ApiError;
use crate::service::Poisoned;
use crate::state::AppState;

/// Filters of `/v1/status`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
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
}

/// Builds the report. A filter reads only the services it names (the per-service index),
/// so one service's status costs what that service holds, whatever the fleet's size. Each
/// instance's rollout mark comes from the marks last read ([`crate::service::rollout::Rollouts::cached_marks`]);
/// the status handler refreshes them first.
pub fn report(st: &AppState, q: &StatusQuery) -> Result<StatusReport, Poisoned> {
    let now = OffsetDateTime::now_utc();
    let marks = st.service.rollouts().cached_marks();
    let projection = st.service.projection();
    let ttl = projection.instance_ttl();
    let ttl_secs = ttl.as_secs();
    let keep = |env: &str, svc: &str| {
        q.env.as_deref().is_none_or(|e| e == env) && q.service.as_deref().is_none_or(|s| s == svc)
    };
    let mut tree: BTreeMap<String, BTreeMap<String, ServiceStatus>> = BTreeMap::new();
    let new_service = |name: &str, expected| ServiceStatus {
        name: name.to_string(),
        expected,
        instances: Vec::new(),
        counts: StatusCounts::default(),
    };
    for change in projection.all_expected()? {
        let (env, svc) = (&change.release.env, &change.release.service);
        if keep(env, svc) {
            tree.entry(env.clone())
                .or_default()
                .insert(svc.clone(), new_service(svc, Some(change.release.clone())));
        }
    }
    projection.with_fleet(|fleet| {
        let mut scopes: Vec<_> = fleet
            .scopes()
            .filter(|(e, s)| keep(e, s))
            .cloned()
            .collect();
        scopes.sort();
        for (env, name) in scopes {
            let svc = tree
                .entry(env.clone())
                .or_default()
                .entry(name.clone())
                .or_insert_with(|| new_service(&name, None));
            let expected = svc.expected.as_ref();
            let marks = marks.service(&env, &name);
            for inst in fleet.of_service(&env, &name) {
                let missing = now - inst.last_seen > ttl;
                let status = instance_status(
                    expected.map(|e| &e.release),
                    &inst.version_id,
                    &inst.components,
                    missing,
                );
                let drift = drift_secs(
                    status,
                    now,
                    inst,
                    expected.map(|e| e.registered_at),
                    ttl_secs,
                );
                svc.counts.add(status);
                svc.instances.push(InstanceStatus {
                    instance: inst.clone(),
                    status,
                    drift_secs: drift,
                    rollout: marks.and_then(|m| m.of(inst)),
                });
            }
        }
    })?;
    let lead = st.service.leadership();
    Ok(StatusReport {
        registry: Some(RegistryInfo {
            replica: lead.replica().to_string(),
            leader: lead.leader(),
            backend: st.service.store().backend().to_string(),
        }),
        environments: tree
            .into_iter()
            .map(|(name, services)| EnvStatus {
                name,
                services: services.into_values().collect(),
            })
            .collect(),
    })
}

/// Checks the optional `env` and `service` filters of a query (a 400 naming the bad one).
pub fn check_filters(env: Option<&str>, service: Option<&str>) -> Result<(), ApiError> {
    if let Some(e) = env {
        validate_name("environment", e)?;
    }
    if let Some(s) = service {
        validate_name("service", s)?;
    }
    Ok(())
}

/// Every environment, service, expected release and instance with its status.
#[utoipa::path(get, path = "/v1/status", tag = "status", params(StatusQuery),
    responses(
        (status = 200, description = "the fleet's status", body = StatusReport),
        (status = 400, description = "`bad_request`: a filter is not a valid name", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the registry cannot answer now", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn status(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<StatusReport>, ApiError> {
    crate::status::check_filters(q.env.as_deref(), q.service.as_deref())?;
    // At most one store read, and none while no event was applied since the last one.
    st.service.rollout_marks().await;
    Ok(Json(report(&st, &q)?))
}

/// The services with an expected release, per environment (names only: any token).
#[utoipa::path(get, path = "/v1/services", tag = "status",
    responses(
        (status = 200, description = "the environments and their services' names", body = ServiceIndex),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the registry cannot answer now", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn services(
    Auth(_who, _): Auth<auth::Worker>,
    State(st): State<Arc<AppState>>,
) -> Result<Json<ServiceIndex>, ApiError> {
    let mut tree: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for change in st.service.projection().all_expected()? {
        tree.entry(change.release.env.clone())
            .or_default()
            .push(change.release.service.clone());
    }
    Ok(Json(ServiceIndex {
        environments: tree
            .into_iter()
            .map(|(name, mut services)| {
                services.sort();
                EnvServices { name, services }
            })
            .collect(),
    }))
}
