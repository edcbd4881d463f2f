//! The PostgreSQL backend against the conformance suite, plus what only a shared server can
//! show: replicas migrating at once, and a feed that survives losing its connection.
//!
//! Each test works in a fresh schema of the server named by `LOCKSTEP_TEST_PG` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`) and drops it at the end, pass or fail;
//! without that variable the tests say so and pass.

use lockstep_store::postgres::{drop_schema, fresh_schema_url};
use lockstep_store::{PgStore, Registration, Store};
use sqlx::Connection;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The server to test against, or `None` (after saying so) when none is configured.
fn base_url() -> Option<String> {
    match std::env::var("LOCKSTEP_TEST_PG") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipping: LOCKSTEP_TEST_PG is not set");
            None
        }
    }
}

/// Runs `body(base_url, schema_url)` in a fresh schema and drops the schema afterwards,
/// whether `body` passed or panicked (the panic is raised again after the cleanup).
async fn with_fresh_schema<F, Fut>(body: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(base) = base_url() else { return };
    let url = fresh_schema_url(&base).await.expect("fresh schema");
    let outcome = tokio::spawn(body(base, url.clone())).await;
    drop_schema(&url).await.expect("drop schema");
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test task failed: {e}"),
        }
    }
}

fn reg(service: &str, id: &str) -> Registration {
    Registration {
        env: "production".into(),
        service: service.into(),
        release: lockstep_core::Release::new(id),
        force: false,
        actor: "ci".into(),
        reason: None,
    }
}

/// The schema a URL from `fresh_schema_url` selects.
fn schema_of(url: &str) -> String {
    url.rsplit_once("search_path%3D")
        .map(|(_, s)| s.to_string())
        .expect("a fresh schema URL names its schema")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_passes_conformance() {
    with_fresh_schema(|_, url| async move {
        let store = PgStore::connect(&url).await.expect("connect");
        lockstep_store::conformance::run(&store).await;
        store.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_postgres_handles_pass_the_concurrency_cases() {
    with_fresh_schema(|_, url| async move {
        // Opened together: this also runs two migrations at once.
        let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
        let (a, b) = (a.expect("connect a"), b.expect("connect b"));
        lockstep_store::conformance::run_concurrent(Arc::new(a.clone()), Arc::new(b.clone())).await;
        a.close().await;
        b.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_safe_when_replicas_start_together() {
    with_fresh_schema(|_, url| async move {
        let (a, b, c, d) = tokio::join!(
            PgStore::connect(&url),
            PgStore::connect(&url),
            PgStore::connect(&url),
            PgStore::connect(&url)
        );
        let stores = [
            a.expect("connect a"),
            b.expect("connect b"),
            c.expect("connect c"),
            d.expect("connect d"),
        ];
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        let steps: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT version, COUNT(*) FROM schema_migrations GROUP BY version ORDER BY version",
        )
        .fetch_all(&mut conn)
        .await
        .expect("schema_migrations");
        assert!(!steps.is_empty(), "migrations ran");
        assert!(
            steps.iter().all(|(_, n)| *n == 1),
            "each step applied once: {steps:?}"
        );
        let versions: Vec<i64> = steps.iter().map(|s| s.0).collect();
        assert_eq!(
            versions,
            (1..=versions.len() as i64).collect::<Vec<_>>(),
            "every step, in order"
        );
        // All four see one schema: a write through one is read through another.
        let r = stores[0]
            .register(reg("mig", "m1"))
            .await
            .expect("register");
        let got = stores[3]
            .expected("production", "mig")
            .await
            .expect("read")
            .expect("the release");
        assert_eq!(got.revision, r.release.revision);
        // A replica starting later finds nothing left to do.
        let late = PgStore::connect(&url).await.expect("connect late");
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(count, versions.len() as i64);
        conn.close().await.expect("close");
        for s in stores.iter().chain([&late]) {
            s.close().await;
        }
    })
    .await;
}

/// The backends listening on `schema`'s feed channel, as the server sees them.
async fn listener_pids(conn: &mut sqlx::PgConnection, schema: &str) -> HashSet<i32> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %' AND strpos(query, $1) > 0",
    )
    .bind(schema)
    .fetch_all(conn)
    .await
    .expect("pg_stat_activity");
    pids.into_iter().collect()
}

/// Waits (by the feed only) until `store` shows a revision above `cursor`; returns it.
async fn wake_and_catch_up(
    store: &PgStore,
    feed: &mut tokio::sync::watch::Receiver<u64>,
    cursor: i64,
    want: i64,
) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut cursor = cursor;
    while cursor < want {
        tokio::select! {
            r = feed.changed() => r.expect("feed open"),
            _ = tokio::time::sleep_until(deadline) => panic!("no wake-up showed revision {want}"),
        }
        for r in store.changes_since(cursor, 1000).await.expect("changes") {
            cursor = r.revision;
        }
    }
    cursor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_recovers_after_the_listener_connection_is_killed() {
    with_fresh_schema(|base, url| async move {
        let schema = schema_of(&url);
        let a = PgStore::connect(&url).await.expect("connect a");
        let b = PgStore::connect(&url).await.expect("connect b");
        let mut admin = sqlx::PgConnection::connect(&base).await.expect("connect");
        let mut feed = a.feed();
        feed.borrow_and_update();
        let cursor = a.last_revision().await.expect("last");

        let killed = listener_pids(&mut admin, &schema).await;
        assert_eq!(killed.len(), 2, "one listener per handle: {killed:?}");
        for pid in &killed {
            let ok: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(&mut admin)
                .await
                .expect("terminate");
            assert!(ok, "terminated {pid}");
        }
        // Committed while the listeners are down: its notification may well be lost, and the
        // bump after the reconnect must make `a` catch up anyway.
        let during = b.register(reg("feed-kill", "k1")).await.expect("register");
        let cursor = wake_and_catch_up(&a, &mut feed, cursor, during.release.revision).await;

        // The listeners are back, on new backends...
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let now = listener_pids(&mut admin, &schema).await;
            if now.len() == 2 && now.is_disjoint(&killed) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "listeners did not come back: {now:?} (killed {killed:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // ...and notifications flow again.
        feed.borrow_and_update();
        let after = b.register(reg("feed-kill", "k2")).await.expect("register");
        wake_and_catch_up(&a, &mut feed, cursor, after.release.revision).await;

        // The listener stops with the last handle: its backend goes away.
        drop((a, b));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = listener_pids(&mut admin, &schema).await;
            if left.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "listeners still connected after the last handle was dropped: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin.close().await.expect("close");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_url_opens_postgres_and_names_no_password() {
    with_fresh_schema(|_, url| async move {
        let store = lockstep_store::open_url(&url).await.expect("open");
        assert_eq!(store.backend(), "postgres");
        store.ping().await.expect("ping");
        drop(store);
        // Nothing listens on port 1: the error names the server, never the password.
        let err = match PgStore::connect("postgres://lockstep:hunter2@127.0.0.1:1/x").await {
            Ok(_) => panic!("connected to port 1"),
            Err(e) => e.to_string(),
        };
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("127.0.0.1:1"), "{err}");
    })
    .await;
}
