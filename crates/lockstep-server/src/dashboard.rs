//! The live dashboard: the page at `/` (a sign-in form without a valid session), the session
//! cookie (`POST /login`, `POST /logout`), its embedded assets (`/assets/*`), and its data
//! endpoint `GET /v1/dashboard` (the fleet report, plus the rollouts panel's data).
//!
//! The session is the token itself in an HttpOnly, SameSite=Strict cookie: nothing to store
//! server-side, and revoking the token ends the session. Every non-GET request the cookie
//! authenticates must carry `X-CSRF-Token` (derived from the token), so a page on another
//! origin cannot act with it even where SameSite is not enforced.
//!
//! Every asset is compiled into the binary (`include_str!`): the dashboard works on a host
//! with no internet access, and what the browser runs is what was reviewed. The charts are
//! small hand-written SVG (`dashboard/app.js`), no library.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lockstep_api::{
    DashboardReport, Deploy, ErrorBody, InstancePage, InstanceStatus, LoginAnswer, LoginRequest,
    ServiceCounts,
};
use lockstep_core::{Instance, Role, Status, StatusCounts, drift_secs, instance_status, short_id};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use crate::auth::{self, Auth, Principal, SESSION_COOKIE, csrf_token};
use crate::error::ApiError;
use crate::service::Poisoned;
use crate::service::fleet::Fleet;
use crate::service::projection::Change;
use crate::service::rollout::{self, NodeView, RolloutMarks, RolloutView};
use crate::state::AppState;

/// Largest page of instances `/v1/dashboard` returns.
pub const MAX_PER_PAGE: u32 = 500;
/// Default page size of `/v1/dashboard`.
pub const DEFAULT_PER_PAGE: u32 = 60;
/// How many recent deploys `/v1/dashboard` lists.
pub const DEPLOYS_SHOWN: usize = 20;
/// How many rollouts `/v1/dashboard` lists: every running one, and the most recent finished
/// ones up to this many in all (the update success chart draws them).
pub const ROLLOUTS_SHOWN: usize = 12;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const LOGIN_HTML: &str = include_str!("dashboard/login.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const ICON_SVG: &str = include_str!("dashboard/icon.svg");

/// Only our own files, no inline script or style: an injected string cannot run.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The principal of a valid session with at least the viewer role.
fn session(st: &AppState, headers: &HeaderMap) -> Option<(String, Principal)> {
    let token = auth::cookie(headers, SESSION_COOKIE)?;
    let p = st.service.projection().tokens.lookup(token)?;
    p.role.allows(Role::Viewer).then(|| (token.to_string(), p))
}

fn html(body: String) -> Response {
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

/// Escapes text for an HTML attribute or element.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Query of `GET /`.
#[derive(Debug, Default, Deserialize)]
pub struct IndexQuery {
    /// `failed` after a refused form sign-in.
    login: Option<String>,
}

/// `GET /`: the dashboard with a valid session, else the sign-in form.
pub async fn index(
    State(st): State<Arc<AppState>>,
    Query(q): Query<IndexQuery>,
    headers: HeaderMap,
) -> Response {
    match session(&st, &headers) {
        Some((token, p)) => html(
            INDEX_HTML
                .replace("{{CSRF}}", &csrf_token(&token))
                .replace("{{NAME}}", &escape(&p.name))
                .replace("{{ROLE}}", p.role.as_str()),
        ),
        None => {
            let msg = if q.login.as_deref() == Some("failed") {
                "That token is not valid here, or it lacks the viewer role."
            } else {
                ""
            };
            html(LOGIN_HTML.replace("{{ERROR}}", msg))
        }
    }
}

/// Whether the request came over HTTPS (directly or through a proxy that says so).
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value of a session (or, with `None`, of its removal).
pub fn session_cookie(token: Option<&str>, secure: bool) -> String {
    let mut c = match token {
        Some(t) => format!("{SESSION_COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/"),
        None => format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    };
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// A cross-origin sign-in (login CSRF: someone else's token planted in this browser) is
/// refused when the browser says where the form came from: `Sec-Fetch-Site` where it is
/// sent (every current browser), else `Origin`. Chromium sends `Origin: null` on some
/// same-origin form posts, so only a concrete other origin is refused by the fallback.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    let Some(origin) = text(header::ORIGIN.as_str()).filter(|o| *o != "null") else {
        return true;
    };
    let host = text(header::HOST.as_str()).unwrap_or_default();
    let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
    origin_host.eq_ignore_ascii_case(host)
}

/// `POST /login`: the token from a JSON body or a form field `token`; sets the session
/// cookie and answers the CSRF token (JSON), or redirects to `/` (form).
pub async fn login(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            Json(ErrorBody {
                error: lockstep_api::codes::FORBIDDEN.into(),
                message: "a sign-in posted from another origin is refused".into(),
            }),
        )
            .into_response();
    }
    let token = if is_json {
        match serde_json::from_slice::<LoginRequest>(&body) {
            Ok(r) => r.token,
            Err(e) => return ApiError::BadRequest(format!("login body: {e}")).into_response(),
        }
    } else {
        match serde_urlencoded::from_bytes::<LoginRequest>(&body) {
            Ok(r) => r.token,
            Err(_) => {
                return ApiError::BadRequest("send a form field `token` or JSON".into())
                    .into_response();
            }
        }
    };
    let token = token.trim();
    let principal = st.service.projection().tokens.lookup(token);
    let principal = match principal {
        Some(p) if p.role.allows(Role::Viewer) => p,
        other => {
            tracing::info!(known = other.is_some(), "dashboard sign-in refused");
            if !is_json {
                return redirect("/?login=failed");
            }
            return match other {
                Some(_) => ApiError::Forbidden("viewer").into_response(),
                None => ApiError::Unauthorized.into_response(),
            };
        }
    };
    tracing::info!(name = %principal.name, "dashboard sign-in");
    let cookie = session_cookie(Some(token), over_https(&headers));
    let mut resp = if is_json {
        Json(LoginAnswer {
            csrf_token: csrf_token(token),
            name: principal.name,
            role: principal.role.as_str().to_string(),
        })
        .into_response()
    } else {
        redirect("/")
    };
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

/// `POST /logout`: removes the session cookie (the token itself stays valid).
pub async fn logout(headers: HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&session_cookie(None, over_https(&headers))) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `GET /assets/{name}`: a file compiled into the binary.
pub async fn asset(Path(name): Path<String>) -> Response {
    let (ty, body) = match name.as_str() {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        "icon.svg" => ("image/svg+xml", ICON_SVG),
        _ => {
            return ApiError::NotFound(lockstep_api::codes::NOT_FOUND, "no such asset".into())
                .into_response();
        }
    };
    (
        [
            (header::CONTENT_TYPE, ty),
            // Revalidated on every load: a new binary's assets are picked up at once.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// Filters and paging of `GET /v1/dashboard`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DashboardQuery {
    /// Only instances of this environment (the summary stays fleet-wide).
    #[param(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub env: Option<String>,
    /// Only instances of this service.
    #[param(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub service: Option<String>,
    /// Only instances with this status.
    pub status: Option<Status>,
    /// 1-based page of instances (default 1).
    #[param(minimum = 1, maximum = 4294967295_u64)]
    pub page: Option<u32>,
    /// Instances per page (default 60, at most 500).
    #[param(minimum = 1, maximum = 500)]
    pub per_page: Option<u32>,
}

/// `GET /v1/dashboard`: the fleet report and, beside it, the rollouts the page's panel and
/// update success chart draw.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DashboardDocument {
    /// Summary, counts, deploys and the page of instances.
    #[serde(flatten)]
    pub report: DashboardReport,
    /// Every running rollout and the most recent finished ones (12 in all at most, fewer
    /// when fewer exist), newest first; `null` when the store did not answer (the rest of
    /// the document comes from memory and is still shown).
    pub rollouts: Option<Vec<RolloutCard>>,
}

/// A rollout as the dashboard draws it: where it is, how far, what it is doing now.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutCard {
    /// Rollout id.
    pub id: i64,
    /// Environment.
    pub env: String,
    /// Service.
    pub service: String,
    /// First 8 characters of the target release's version id.
    pub version: String,
    /// First 8 characters of the release before, if any.
    pub previous_version: Option<String>,
    /// `canary`, `batches`, `rolling_back`, `frozen`, `completed`, `rolled_back`, `aborted`.
    pub phase: String,
    /// Whether it still runs (a frozen rollout waits for a person and is not running).
    pub running: bool,
    /// Whether a person must act: frozen (failures in a release that is not rollback-safe;
    /// nothing happens until someone retries or aborts it).
    pub needs_person: bool,
    /// A request not yet acted on (`abort`, `emergency`).
    pub request: Option<String>,
    /// `succeeded`, `failed`, `aborted` once finished.
    pub outcome: Option<String>,
    /// The summary line (`Rollout completed: 3/4 successful (75.0%), 1 failed, 0 skipped in 9s`).
    pub summary: String,
    /// Who started it.
    pub actor: String,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Finished (RFC 3339).
    pub finished_at: Option<String>,
    /// Seconds from creation to the end (or now).
    pub elapsed_secs: f64,
    /// Nodes per step.
    pub counts: RolloutCounts,
    /// Nodes being updated or rolled back right now.
    pub working_on: Vec<String>,
    /// The node that changed step last.
    pub last_change: Option<RolloutNodeStep>,
    /// Every node and its step, in rollout order.
    pub nodes: Vec<RolloutNodeStep>,
}

/// Nodes of a rollout per step. `pending` is waiting for its batch while the rollout runs;
/// once it stopped, a node never reached counts as skipped, as in the summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutCounts {
    /// Every node.
    pub total: u32,
    /// Not touched yet, while the rollout runs (0 once it stopped).
    pub pending: u32,
    /// Being updated or rolled back.
    pub in_progress: u32,
    /// On the new release, healthy.
    pub updated: u32,
    /// Whose update (or rollback) failed.
    pub failed: u32,
    /// Left alone (already on the release, or the rollout stopped before its turn).
    pub skipped: u32,
    /// Back on the release before.
    pub rolled_back: u32,
}

/// One node's step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutNodeStep {
    /// Instance id (or the agent URL when the rollout was given agents).
    pub instance_id: String,
    /// `pending`, `updating`, `updated`, `failed`, `rolling_back`, `rolled_back`,
    /// `rollback_failed`, `skipped`.
    pub step: String,
    /// Why (failures, skips).
    pub reason: Option<String>,
    /// When it reached this step (RFC 3339).
    pub at: String,
}

/// Builds the card of a rollout from its API view.
pub fn rollout_card(v: &RolloutView) -> RolloutCard {
    let mut counts = RolloutCounts {
        total: u32::try_from(v.nodes.len()).unwrap_or(u32::MAX),
        ..RolloutCounts::default()
    };
    let mut working_on = Vec::new();
    for n in &v.nodes {
        match n.step.as_str() {
            "pending" => counts.pending += 1,
            "updating" | "rolling_back" => {
                counts.in_progress += 1;
                working_on.push(n.instance_id.clone());
            }
            "updated" => counts.updated += 1,
            "skipped" => counts.skipped += 1,
            "rolled_back" => counts.rolled_back += 1,
            // `failed`, `rollback_failed`, and a step this build does not know: shown as a
            // failure rather than hidden.
            _ => counts.failed += 1,
        }
    }
    if !v.running {
        // Stopped: a node never reached is skipped, as the summary line counts it.
        counts.skipped += counts.pending;
        counts.pending = 0;
    }
    let step = |n: &NodeView| RolloutNodeStep {
        instance_id: n.instance_id.clone(),
        step: n.step.clone(),
        reason: n.reason.clone(),
        at: n.updated_at.clone(),
    };
    // Compared as instants, not as strings: the formatter drops trailing zeros of the
    // fraction, so "…50.96Z" (50.960) sorts after "…50.964Z" as text. A node never touched
    // has not changed.
    let at = |n: &NodeView| {
        time::OffsetDateTime::parse(
            &n.updated_at,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()
    };
    let last_change = v
        .nodes
        .iter()
        .filter(|n| n.step != "pending")
        .max_by_key(|n| at(n))
        .map(step);
    RolloutCard {
        id: v.id,
        env: v.env.clone(),
        service: v.service.clone(),
        version: short_id(&v.version_id).to_string(),
        previous_version: v
            .previous_version_id
            .as_deref()
            .map(|p| short_id(p).to_string()),
        // Frozen is final for the coordinator: only a retry or an abort moves it on.
        needs_person: v.phase == "frozen",
        phase: v.phase.clone(),
        running: v.running,
        request: v.request.clone(),
        outcome: v.outcome.clone(),
        summary: v.summary.clone(),
        actor: v.actor.clone(),
        created_at: v.created_at.clone(),
        finished_at: v.finished_at.clone(),
        elapsed_secs: v.elapsed_secs,
        counts,
        working_on,
        last_change,
        nodes: v.nodes.iter().map(step).collect(),
    }
}

/// Every running rollout and the newest finished ones, up to [`ROLLOUTS_SHOWN`] in all,
/// newest first.
async fn rollout_cards(st: &AppState) -> Result<Vec<RolloutCard>, lockstep_store::StoreError> {
    let store = st.service.store();
    let mut rows = store.rollouts(true, 1000).await?;
    let running = rows.len();
    let recent = store
        .rollouts(false, u32::try_from(ROLLOUTS_SHOWN).unwrap_or(u32::MAX))
        .await?;
    let room = ROLLOUTS_SHOWN.saturating_sub(running);
    rows.extend(recent.into_iter().filter(|r| !r.running).take(room));
    rows.sort_by_key(|r| std::cmp::Reverse(r.id));
    // One that finished between the two reads is in both.
    rows.dedup_by_key(|r| r.id);
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let nodes = store.rollout_nodes(r.id).await?;
        out.push(rollout_card(&rollout::view(&r, &nodes)));
    }
    Ok(out)
}

/// The fleet's summary, its per-service counts and recent deploys, one page of instances,
/// and the running and recent rollouts.
#[utoipa::path(get, path = "/v1/dashboard", tag = "status", params(DashboardQuery),
    responses(
        (status = 200, description = "summary, counts, deploys, a page of instances and the rollouts", body = DashboardDocument),
        (status = 400, description = "`bad_request`: a bad filter, page or page size", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the registry cannot answer now", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn dashboard(
    Auth(_who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<DashboardQuery>,
) -> Result<Json<DashboardDocument>, ApiError> {
    crate::status::check_filters(q.env.as_deref(), q.service.as_deref())?;
    let page = q.page.unwrap_or(1);
    let per_page = q.per_page.unwrap_or(DEFAULT_PER_PAGE);
    if page == 0 {
        return Err(ApiError::BadRequest("page starts at 1".into()));
    }
    if per_page == 0 || per_page > MAX_PER_PAGE {
        return Err(ApiError::BadRequest(format!(
            "per_page must be between 1 and {MAX_PER_PAGE}"
        )));
    }
    // Each instance's place in its service's latest rollout, as `/v1/status` gives it: at
    // most one store read, none while no event was applied since the last.
    let marks = st.service.rollout_marks().await;
    let report = report(&st, &q, page, per_page, &marks)?;
    // The report comes from memory; the rollouts from the store. A store that does not
    // answer costs the panel (which then says so), not the whole page.
    let rollouts = match rollout_cards(&st).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: rollouts unreadable");
            None
        }
    };
    Ok(Json(DashboardDocument { report, rollouts }))
}

/// Builds the fleet report; each instance on the page carries its rollout mark from `marks`.
pub fn report(
    st: &AppState,
    q: &DashboardQuery,
    page: u32,
    per_page: u32,
    marks: &RolloutMarks,
) -> Result<DashboardReport, Poisoned> {
    let now = OffsetDateTime::now_utc();
    let projection = st.service.projection();
    let ttl = projection.instance_ttl();
    let expected = expected_map(st)?;
    let (services, instances) = projection.with_fleet(|fleet| {
        let services = service_counts(fleet, &expected, now, ttl);
        let page = instance_page(
            fleet, &expected, &services, q, now, ttl, page, per_page, marks,
        );
        (services, page)
    })?;
    let deploys = deploys(st)?;
    let (active_alerts, last_drift_check) = alert_summary(st);
    let mut t = StatusCounts::default();
    for s in &services {
        for status in ORDER {
            add(&mut t, status, count_of(&s.counts, status));
        }
    }
    let sum = |c: &StatusCounts| {
        u64::from(c.current)
            + u64::from(c.draining)
            + u64::from(c.stale)
            + u64::from(c.missing)
            + u64::from(c.unknown)
    };
    Ok(DashboardReport {
        total_workers: sum(&t),
        up_to_date_workers: u64::from(t.current),
        outdated_workers: u64::from(t.stale) + u64::from(t.draining),
        unhealthy_workers: u64::from(t.missing),
        active_alerts,
        health_score: health_score(&t),
        last_drift_check,
        counts: t,
        services,
        deploys,
        instances,
        generated_at: now,
    })
}

/// The health score, 0–100 with one decimal (docs/dashboard.md):
/// `100 × (current + ½·draining) / (current + draining + stale + missing)`, and 100 for a
/// fleet with no instance to judge. Instances of a service without an expected release
/// (`unknown`) are left out: there is nothing to be behind.
pub fn health_score(c: &StatusCounts) -> f64 {
    let judged =
        f64::from(c.current) + f64::from(c.draining) + f64::from(c.stale) + f64::from(c.missing);
    if judged == 0.0 {
        return 100.0;
    }
    let good = f64::from(c.current) + 0.5 * f64::from(c.draining);
    (1000.0 * good / judged).round() / 10.0
}

/// Open alerts and the drift detector's last run.
///
/// Open alerts (all severities) and when the leader last checked drift, from the alerts
/// handle.
pub fn alert_summary(st: &AppState) -> (u64, Option<OffsetDateTime>) {
    let a = st.service.alerts();
    (
        a.open_counts().iter().map(|(_, n)| n).sum(),
        a.last_drift_check(),
    )
}

/// Expected releases by env, then service.
type Expected = HashMap<String, HashMap<String, Arc<Change>>>;

fn expected_map(st: &AppState) -> Result<Expected, Poisoned> {
    let mut m: Expected = HashMap::new();
    for c in st.service.projection().all_expected()? {
        m.entry(c.release.env.clone())
            .or_default()
            .insert(c.release.service.clone(), c);
    }
    Ok(m)
}

fn expected_of<'a>(expected: &'a Expected, env: &str, service: &str) -> Option<&'a Arc<Change>> {
    expected.get(env).and_then(|m| m.get(service))
}

/// Worst first: what needs attention is on the first page.
const ORDER: [Status; 5] = [
    Status::Missing,
    Status::Stale,
    Status::Draining,
    Status::Unknown,
    Status::Current,
];

fn count_of(c: &StatusCounts, s: Status) -> u32 {
    match s {
        Status::Current => c.current,
        Status::Draining => c.draining,
        Status::Stale => c.stale,
        Status::Missing => c.missing,
        Status::Unknown => c.unknown,
    }
}

fn add(c: &mut StatusCounts, s: Status, n: u32) {
    match s {
        Status::Current => c.current += n,
        Status::Draining => c.draining += n,
        Status::Stale => c.stale += n,
        Status::Missing => c.missing += n,
        Status::Unknown => c.unknown += n,
    }
}

/// Counts per env/service from the projection's per-service index (cost: the number of
/// distinct versions per service, not the number of instances), plus the services that
/// have a release and no instance.
fn service_counts(
    fleet: &Fleet,
    expected: &Expected,
    now: OffsetDateTime,
    ttl: Duration,
) -> Vec<ServiceCounts> {
    let mut scopes: BTreeSet<(&str, &str)> = fleet
        .scopes()
        .map(|(e, s)| (e.as_str(), s.as_str()))
        .collect();
    for (env, m) in expected {
        for svc in m.keys() {
            scopes.insert((env.as_str(), svc.as_str()));
        }
    }
    scopes
        .into_iter()
        .map(|(env, service)| {
            let exp = expected_of(expected, env, service);
            let counts = fleet
                .counts(
                    env,
                    service,
                    exp.map(|c| (&c.release.release, c.release.registered_at)),
                    now,
                    ttl,
                )
                .counts;
            ServiceCounts {
                env: env.to_string(),
                service: service.to_string(),
                expected_version: exp.map(|c| short_id(&c.release.release.version_id).to_string()),
                counts,
            }
        })
        .collect()
}

/// The most recent release changes with their convergence, newest first.
fn deploys(st: &AppState) -> Result<Vec<Deploy>, Poisoned> {
    Ok(st
        .service
        .projection()
        .convergence()?
        .into_iter()
        .take(DEPLOYS_SHOWN)
        .map(|c| Deploy {
            version: short_id(&c.version_id).to_string(),
            revision: c.revision,
            registered_at: c.registered_at,
            converged_at: c.converged_at,
            convergence_secs: c
                .converged_at
                .map(|at| (at - c.registered_at).whole_seconds().max(0) as u64),
            superseded: c.superseded,
            env: c.env,
            service: c.service,
        })
        .collect())
}

/// One page of instances matching the filters, worst status first, then longest drift,
/// then instance id.
///
/// The per-service counts say how many instances each status has where, so only the
/// statuses that reach into the requested page are read, and only in the services that
/// have instances of that status; only the page itself is copied.
#[allow(clippy::too_many_arguments)]
fn instance_page(
    fleet: &Fleet,
    expected: &Expected,
    services: &[ServiceCounts],
    q: &DashboardQuery,
    now: OffsetDateTime,
    ttl: Duration,
    page: u32,
    per_page: u32,
    marks: &RolloutMarks,
) -> InstancePage {
    let scopes: Vec<&ServiceCounts> = services
        .iter()
        .filter(|s| {
            q.env.as_deref().is_none_or(|e| e == s.env)
                && q.service.as_deref().is_none_or(|v| v == s.service)
        })
        .collect();
    let classes: Vec<Status> = ORDER
        .into_iter()
        .filter(|s| q.status.is_none_or(|x| x == *s))
        .collect();
    let in_class = |s: Status| -> u64 {
        scopes
            .iter()
            .map(|c| u64::from(count_of(&c.counts, s)))
            .sum()
    };
    let total: u64 = classes.iter().map(|s| in_class(*s)).sum();
    let start = (u64::from(page) - 1) * u64::from(per_page);
    let end = start + u64::from(per_page);
    let mut before = 0u64;
    let mut items = Vec::new();
    for status in classes {
        let n = in_class(status);
        if before >= end {
            break;
        }
        if before + n <= start {
            before += n;
            continue;
        }
        let mut found: Vec<(u64, &Instance)> = Vec::new();
        for sc in scopes.iter().filter(|c| count_of(&c.counts, status) > 0) {
            let exp = expected_of(expected, &sc.env, &sc.service);
            for inst in fleet.of_service(&sc.env, &sc.service) {
                let missing = now - inst.last_seen > ttl;
                let st = instance_status(
                    exp.map(|c| &c.release.release),
                    &inst.version_id,
                    &inst.components,
                    missing,
                );
                if st == status {
                    let drift = drift_secs(
                        st,
                        now,
                        inst,
                        exp.map(|c| c.release.registered_at),
                        ttl.as_secs(),
                    );
                    found.push((drift, inst));
                }
            }
        }
        let cmp = |a: &(u64, &Instance), b: &(u64, &Instance)| {
            b.0.cmp(&a.0)
                .then_with(|| a.1.instance_id.cmp(&b.1.instance_id))
        };
        let lo = start.saturating_sub(before) as usize;
        let hi = (end.saturating_sub(before) as usize).min(found.len());
        // Only the part up to the page's end needs ordering: select, then sort that much.
        if hi < found.len() {
            found.select_nth_unstable_by(hi, cmp);
            found.truncate(hi);
        }
        found.sort_unstable_by(cmp);
        items.extend(
            found
                .into_iter()
                .skip(lo)
                .map(|(drift, inst)| InstanceStatus {
                    instance: inst.clone(),
                    status,
                    drift_secs: drift,
                    rollout: marks.of(inst),
                }),
        );
        before += n;
    }
    InstancePage {
        page,
        per_page,
        total,
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_change_is_the_latest_instant_even_when_its_fraction_is_longer() {
        let node = |id: &str, step: &str, at: &str| {
            serde_json::json!({"instance_id": id, "endpoint": "", "step": step,
                "reason": null, "attempts": 1, "updated_at": at})
        };
        let v: RolloutView = serde_json::from_value(serde_json::json!({
            "id": 1, "env": "production", "service": "api", "version_id": "v2",
            "previous_version_id": "v1", "phase": "batches", "running": true,
            "request": null, "settings": {}, "actor": "admin",
            "created_at": "2026-12-01T05:10:49.694Z", "finished_at": null,
            "elapsed_secs": 1.3, "outcome": null, "summary": "",
            "nodes": [
                node("api-1", "updated", "2026-12-01T05:10:49.822Z"),
                // 50.960 written as ".96": as text it sorts after ".964".
                node("api-2", "failed", "2026-12-01T05:10:50.96Z"),
                node("api-3", "updating", "2026-12-01T05:10:50.964Z"),
                node("api-4", "pending", "2026-12-01T05:10:51Z"),
            ]
        }))
        .expect("a rollout view");
        let card = rollout_card(&v);
        let last = card.last_change.expect("a last change");
        assert_eq!(last.instance_id, "api-3");
        assert_eq!(last.step, "updating");
    }
}
