//! `GET /v1/dashboard`: the fleet summary the dashboard page draws (and that scripts written
//! for the source system's dashboard read), per env/service counts, recent deploys with
//! their convergence times, and one page of instances.

use lockstep_core::StatusCounts;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::InstanceStatus;

/// `GET /v1/dashboard`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DashboardReport {
    /// Every known instance (the source system's name for them is "workers").
    pub total_workers: u64,
    /// Instances on the expected release (`current`).
    pub up_to_date_workers: u64,
    /// Live instances on another release (`stale` + `draining`).
    pub outdated_workers: u64,
    /// Instances that stopped heartbeating (`missing`).
    pub unhealthy_workers: u64,
    /// Open alerts (0 when the registry runs no drift detector).
    pub active_alerts: u64,
    /// 0–100, one decimal; the formula is in docs/dashboard.md.
    pub health_score: f64,
    /// When the drift detector last ran, or null when it has not.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub last_drift_check: Option<OffsetDateTime>,
    /// Fleet-wide counts per status.
    pub counts: StatusCounts,
    /// Counts per environment and service, by env then service.
    pub services: Vec<ServiceCounts>,
    /// The most recent release changes, newest first, with their convergence.
    pub deploys: Vec<Deploy>,
    /// One page of instances matching the filters.
    pub instances: InstancePage,
    /// When this answer was computed.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub generated_at: OffsetDateTime,
}

/// Counts of one service in one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ServiceCounts {
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// First 8 characters of the expected release's version id, or null.
    pub expected_version: Option<String>,
    /// Counts per status.
    pub counts: StatusCounts,
}

/// A release change (registration or rollback) and how long the fleet took to follow it.
/// Only changes this replica saw while running are listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deploy {
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// First 8 characters of the version id.
    pub version: String,
    /// Registry revision of the change.
    pub revision: i64,
    /// When it was registered.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime, example = "2026-05-01T12:00:00Z")]
    pub registered_at: OffsetDateTime,
    /// When every live instance of the service was current, or null while not converged.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime, example = "2026-05-01T12:00:30Z")]
    pub converged_at: Option<OffsetDateTime>,
    /// `converged_at - registered_at` in seconds, or null while not converged.
    pub convergence_secs: Option<u64>,
    /// Replaced by a newer release before the fleet converged on it.
    pub superseded: bool,
}

/// One page of instances, worst status first (missing, stale, draining, unknown, current),
/// then longest drift, then instance id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstancePage {
    /// 1-based page number.
    pub page: u32,
    /// Page size.
    pub per_page: u32,
    /// Instances matching the filters (all pages).
    pub total: u64,
    /// This page.
    pub items: Vec<InstanceStatus>,
}

/// Body of `POST /login` (JSON; a form field `token` works too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoginRequest {
    /// A token with the viewer role or stronger.
    pub token: String,
}

/// Answer to `POST /login`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LoginAnswer {
    /// Send it as `X-CSRF-Token` with every non-GET request authenticated by the cookie.
    pub csrf_token: String,
    /// The token's name.
    pub name: String,
    /// The token's role.
    pub role: String,
}
