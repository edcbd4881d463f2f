//! The SQLite backend against the conformance suite, plus what only a file-backed store can show.

use lockstep_store::{Registration, SqliteStore, Store};
use std::sync::Arc;

#[tokio::test]
async fn sqlite_store_passes_conformance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).await.expect("open");
    lockstep_store::conformance::run(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sqlite_handles_on_one_file_pass_the_concurrency_cases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = tokio::join!(SqliteStore::open(dir.path()), SqliteStore::open(dir.path()));
    let a: Arc<dyn Store> = Arc::new(a.expect("open a"));
    let b: Arc<dyn Store> = Arc::new(b.expect("open b"));
    lockstep_store::conformance::run_concurrent(a, b).await;
}

#[tokio::test]
async fn sqlite_store_keeps_releases_across_reopen_and_migrates_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = SqliteStore::open(dir.path()).await.expect("open");
        store
            .register(Registration {
                env: "production".into(),
                service: "svc".into(),
                release: lockstep_core::Release::new("v1"),
                force: false,
                actor: "ci".into(),
                reason: None,
            })
            .await
            .expect("register");
        store.close().await;
    }
    let store = SqliteStore::open(dir.path()).await.expect("reopen");
    let got = store
        .expected("production", "svc")
        .await
        .expect("read")
        .expect("release kept");
    assert_eq!(got.release.version_id, "v1");
}
