//! Server-Sent Event streams that resume without gaps: `/v1/watch` (release changes, id =
//! revision) and `/v1/events/stream` (event log, id = event id).
//!
//! Both follow one recipe: subscribe to the broadcast hub first, then read the backlog
//! (`since` / `Last-Event-ID`) from the store, then forward live items whose id is above the
//! last one sent. Subscribing first means nothing committed in between is missed; the id
//! check means nothing is sent twice. A watcher that falls behind the hub (lag) re-reads
//! from the store instead of losing items.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use futures_util::future::BoxFuture;
use lockstep_api::{ErrorBody, Event, LAST_EVENT_ID};
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::{broadcast, watch};

use crate::auth::{self, Auth, Principal};
use crate::error::ApiError;
use crate::service::Change;
use crate::state::AppState;

/// How many backlog items one store read fetches.
const PAGE: u32 = 1000;

/// An item of a resumable stream.
trait Item: Send + Sync + 'static {
    fn seq(&self) -> i64;
    fn to_sse(&self) -> SseEvent;
}

impl Item for Change {
    fn seq(&self) -> i64 {
        self.release.revision
    }
    fn to_sse(&self) -> SseEvent {
        SseEvent::default()
            .id(self.release.revision.to_string())
            .event("release")
            .data(String::from_utf8_lossy(&self.json))
    }
}

impl Item for Event {
    fn seq(&self) -> i64 {
        self.id
    }
    fn to_sse(&self) -> SseEvent {
        SseEvent::default()
            .id(self.id.to_string())
            .event(self.kind.clone())
            .data(serde_json::to_string(self).unwrap_or_default())
    }
}

type Fetch<T> = Arc<dyn Fn(i64) -> BoxFuture<'static, Result<Vec<Arc<T>>, ApiError>> + Send + Sync>;
type Filter<T> = Arc<dyn Fn(&T) -> bool + Send + Sync>;

struct Resume<T> {
    backlog: VecDeque<Arc<T>>,
    rx: broadcast::Receiver<Arc<T>>,
    last: i64,
    fetch: Fetch<T>,
    filter: Filter<T>,
    shutdown: watch::Receiver<bool>,
    /// Changes whenever the token set does; the stream then re-checks its token.
    tokens: watch::Receiver<u64>,
    /// Whether the token that opened the stream is still valid.
    authorized: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Decremented when the stream is dropped.
    _gauge: Option<GaugeGuard>,
}

struct GaugeGuard(Arc<AppState>, fn(&AppState) -> &AtomicI64);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::Relaxed);
    }
}

/// The resumable stream: backlog first, then live items, ending on shutdown.
fn resumable<T: Item>(state: Resume<T>) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(item) = s.backlog.pop_front() {
                if item.seq() > s.last && (s.filter)(&item) {
                    s.last = item.seq();
                    return Some((Ok(item.to_sse()), s));
                }
                continue;
            }
            if *s.shutdown.borrow() {
                return None;
            }
            tokio::select! {
                r = s.rx.recv() => match r {
                    Ok(item) => s.backlog.push_back(item),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the hub: everything after the last id sent is in the
                        // store, page by page; items still in the hub are deduplicated by id.
                        match backlog(&s.fetch, s.last).await {
                            Ok(items) => s.backlog.extend(items),
                            Err(_) => return None,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = s.shutdown.changed() => return None,
                r = s.tokens.changed() => {
                    // A revoked token keeps no stream open, on any replica.
                    if r.is_err() || !(s.authorized)() {
                        return None;
                    }
                }
            }
        }
    })
}

/// Whether `who`'s token is still valid, as a check a stream can repeat.
fn authorized(st: &Arc<AppState>, who: &Principal) -> Arc<dyn Fn() -> bool + Send + Sync> {
    let st = st.clone();
    let hash = who.hash;
    Arc::new(move || st.service.projection().tokens.is_valid(&hash))
}

/// Reads everything after `since` from the store, page by page.
async fn backlog<T>(fetch: &Fetch<T>, since: i64) -> Result<VecDeque<Arc<T>>, ApiError>
where
    T: Item,
{
    let mut out = VecDeque::new();
    let mut cursor = since;
    loop {
        let page = fetch(cursor).await?;
        let n = page.len();
        if let Some(last) = page.last() {
            cursor = last.seq();
        }
        out.extend(page);
        if n < PAGE as usize {
            return Ok(out);
        }
    }
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    headers
        .get(LAST_EVENT_ID)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| ApiError::BadRequest("Last-Event-ID must be an integer".into()))
        })
        .transpose()
}

/// Query of `/v1/watch`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// Only this environment (default: every environment).
    #[param(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub env: Option<String>,
    /// Only this service (default: every service).
    #[param(
        pattern = "^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub service: Option<String>,
    /// Send every change with a revision above this first. Without it (and without
    /// `Last-Event-ID`) the current expected release(s) are sent first.
    pub since: Option<i64>,
}

/// Release changes as Server-Sent Events (`id: <revision>`, `event: release`).
#[utoipa::path(get, path = "/v1/watch", tag = "releases",
    params(WatchQuery, ("Last-Event-ID" = Option<i64>, Header, nullable = false,
        description = "the last id received; resumes after it (takes precedence over `since`)")),
    responses(
        (status = 200, description = "text/event-stream of releases; it stays open", content_type = "text/event-stream"),
        (status = 400, description = "`bad_request`: a bad filter, `since` or `Last-Event-ID`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the registry cannot answer now", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn watch(
    Auth(who, _): Auth<auth::Worker>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<WatchQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    crate::status::check_filters(q.env.as_deref(), q.service.as_deref())?;
    let since = match last_event_id(&headers)? {
        Some(id) => Some(id),
        None => q.since,
    };
    let rx = st.service.projection().subscribe_changes();
    let (env, service) = (q.env.clone(), q.service.clone());
    let filter: Filter<Change> = Arc::new(move |c: &Change| {
        env.as_deref().is_none_or(|e| e == c.release.env)
            && service.as_deref().is_none_or(|s| s == c.release.service)
    });
    let store = st.service.store().clone();
    let fetch: Fetch<Change> = Arc::new(move |since| {
        let store = store.clone();
        Box::pin(async move {
            let rows = store.changes_since(since, PAGE).await?;
            Ok(rows.into_iter().map(Change::new).collect())
        })
    });
    let (backlog, last) = match since {
        Some(since) => (backlog(&fetch, since).await?, since),
        None => {
            let current: Vec<Arc<Change>> = st
                .service
                .projection()
                .all_expected()?
                .into_iter()
                .filter(|c| filter(c))
                .collect();
            (current.into_iter().collect(), 0)
        }
    };
    st.counters.watchers.fetch_add(1, Ordering::Relaxed);
    let gauge = GaugeGuard(st.clone(), |s| &s.counters.watchers);
    let stream = resumable(Resume {
        backlog,
        rx,
        last,
        fetch,
        filter,
        shutdown: st.shutdown.clone(),
        tokens: st.service.projection().subscribe_tokens(),
        authorized: authorized(&st, &who),
        _gauge: Some(gauge),
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(st.config.keepalive)))
}

/// Query of `/v1/events/stream`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventStreamQuery {
    /// Send every event with an id above this first (or use `Last-Event-ID`).
    pub since: Option<i64>,
}

/// The event log as a live Server-Sent Event stream (`id: <event id>`, `event: <kind>`).
#[utoipa::path(get, path = "/v1/events/stream", tag = "events",
    params(EventStreamQuery, ("Last-Event-ID" = Option<i64>, Header, nullable = false,
        description = "the last id received; resumes after it (takes precedence over `since`)")),
    responses(
        (status = 200, description = "text/event-stream of events; it stays open", content_type = "text/event-stream"),
        (status = 400, description = "`bad_request`: a bad `since` or `Last-Event-ID`", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no token or an unknown one", body = ErrorBody),
        (status = 403, description = "`forbidden`: needs the viewer role", body = ErrorBody),
        (status = 503, description = "`service_unavailable`: the store is unavailable", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn event_stream(
    Auth(who, _): Auth<auth::Viewer>,
    State(st): State<Arc<AppState>>,
    Query(q): Query<EventStreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let since = match last_event_id(&headers)? {
        Some(id) => Some(id),
        None => q.since,
    };
    let rx = st.service.projection().subscribe_events();
    let store = st.service.store().clone();
    let fetch: Fetch<Event> = Arc::new(move |since| {
        let store = store.clone();
        Box::pin(async move {
            let rows = store.events_since(since, PAGE).await?;
            Ok(rows.into_iter().map(Arc::new).collect())
        })
    });
    let (backlog, last) = match since {
        Some(since) => (backlog(&fetch, since).await?, since),
        // Live only: start after whatever is in the log now.
        None => (VecDeque::new(), 0),
    };
    st.counters.event_streams.fetch_add(1, Ordering::Relaxed);
    let gauge = GaugeGuard(st.clone(), |s| &s.counters.event_streams);
    let stream = resumable(Resume {
        backlog,
        rx,
        last,
        fetch,
        filter: Arc::new(|_: &Event| true),
        shutdown: st.shutdown.clone(),
        tokens: st.service.projection().subscribe_tokens(),
        authorized: authorized(&st, &who),
        _gauge: Some(gauge),
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(st.config.keepalive)))
}
