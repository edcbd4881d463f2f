//! Cost of the per-request check: `Watcher::is_current()` (one relaxed atomic load), and of
//! the whole `VersionCheck` service around a no-op inner service, current and stale.
//! Run: `cargo bench -p lockstep-client --bench is_current`.

use criterion::{Criterion, criterion_group, criterion_main};
use lockstep_client::{VersionCheckLayer, Watcher, WatcherConfig};
use std::hint::black_box;
use tower::{Layer, Service, ServiceExt};

fn watcher(rt: &tokio::runtime::Runtime) -> Watcher {
    let _g = rt.enter();
    // The check is off so nothing connects; the load on the hot path is the same one.
    let mut c = WatcherConfig::new("http://127.0.0.1:9", "bench", "v1");
    c.enabled = false;
    Watcher::start(c).expect("watcher")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let w = watcher(&rt);
    c.bench_function("is_current", |b| b.iter(|| black_box(&w).is_current()));

    let svc = tower::service_fn(|_req: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    });
    let mut layered = VersionCheckLayer::new(w.clone())
        .exempt("/healthz")
        .layer(svc);
    c.bench_function("version_check_service_call", |b| {
        b.iter(|| {
            let req = http::Request::get("/work").body(()).expect("request");
            let fut = layered.call(req);
            rt.block_on(fut).expect("response")
        })
    });
    let mut plain = svc;
    c.bench_function("plain_service_call", |b| {
        b.iter(|| {
            let req = http::Request::get("/work").body(()).expect("request");
            rt.block_on(plain.ready()).expect("ready");
            rt.block_on(plain.call(req)).expect("response")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
