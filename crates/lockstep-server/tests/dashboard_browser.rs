//! The dashboard in a real browser against a real registry: headless Chromium (Debian's
//! `chromium` + `chromium-driver`) signs in, sees three instances, watches a new release
//! turn them stale without a reload, sees the drift alert and acknowledges it from the page,
//! and leaves screenshots under `target/`.
//!
//! Skips with a printed reason when the browser is not installed, unless `CI` or
//! `LOCKSTEP_TEST_BROWSER=1` is set: then it fails (`.ci/browser-deps.sh` installs it).

mod support;

use lockstep_core::Role;
use lockstep_testkit::{ADMIN_TOKEN, InProcessRegistry};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::browser::{self, Browser};

fn skip() -> bool {
    match browser::missing() {
        None => false,
        Some(why) if browser::required() => panic!("browser test required here, but it {why}"),
        Some(why) => {
            eprintln!("skipping the dashboard browser test: it {why}");
            true
        }
    }
}

/// The registry under test, with drift thresholds at zero and a check every 200 ms: the
/// alert step below expects an alert within 2 s of the release.
async fn start_registry() -> InProcessRegistry {
    let reg = InProcessRegistry::start_with(lockstep_server::Config::default()).await;
    let zero = Some(Duration::from_secs(0));
    reg.service
        .alerts()
        .configure(lockstep_server::service::alerts::AlertSettings {
            thresholds: lockstep_core::Thresholds {
                low: zero,
                medium: None,
                high: None,
                critical: None,
                ..lockstep_core::Thresholds::default()
            },
            check_interval: Duration::from_millis(200),
            ..Default::default()
        });
    reg
}

async fn put_release(reg: &InProcessRegistry, version: &str) {
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/v1/envs/production/services/api/release",
            reg.url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"version_id": version}))
        .send()
        .await
        .expect("send");
    assert!(resp.status().is_success(), "register: {}", resp.status());
}

async fn heartbeat(reg: &InProcessRegistry, token: &str, id: &str, version: &str) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/instances", reg.url))
        .bearer_auth(token)
        .json(
            &json!({"instance_id": id, "env": "production", "service": "api",
            "version_id": version, "host": "node-1"}),
        )
        .send()
        .await
        .expect("send");
    assert!(resp.status().is_success(), "heartbeat: {}", resp.status());
}

async fn screenshot(b: &Browser, name: &str) {
    let png = b.client.screenshot().await.expect("screenshot");
    let path = browser::target_dir().join(name);
    std::fs::write(&path, png).expect("write screenshot");
    eprintln!("screenshot: {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_release_shows_stale_instances_in_the_open_dashboard_within_two_seconds() {
    if skip() {
        return;
    }
    let reg = start_registry().await;
    let worker = reg.token("fleet", Role::Worker).await;
    let operator = reg.token("on-call", Role::Operator).await;
    put_release(&reg, "7f3a9c1e2b4d").await;
    for i in 1..=3 {
        heartbeat(&reg, &worker, &format!("api-{i}"), "7f3a9c1e2b4d").await;
    }

    let b = Browser::start(1280, 1000).await;
    b.client
        .goto(&format!("{}/", reg.url))
        .await
        .expect("open /");
    let field = b
        .client
        .wait()
        .for_element(fantoccini::Locator::Css("#token"))
        .await
        .expect("sign-in form");
    field.send_keys(&operator).await.expect("type token");
    b.client
        .find(fantoccini::Locator::Css("#sign-in"))
        .await
        .expect("button")
        .click()
        .await
        .expect("sign in");

    let three_current = r#"document.getElementById('v-total')?.textContent === '3'
        && document.querySelectorAll('#grid .cell[data-status="current"]').length === 3"#;
    assert!(
        b.until(three_current, Duration::from_secs(10))
            .await
            .is_some(),
        "three current instances after sign-in; page: {}",
        b.eval("document.body.innerText").await
    );
    assert!(
        b.until(
            "document.getElementById('live').textContent === 'live'",
            Duration::from_secs(5)
        )
        .await
        .is_some(),
        "the event stream connects with the session cookie"
    );
    // The session cookie is not readable by scripts.
    assert_eq!(
        b.eval("document.cookie").await,
        Value::String(String::new())
    );
    let before = b
        .eval("window.performance.getEntriesByType('navigation').length")
        .await;

    // A new release: the open page shows the three instances stale, without a reload.
    let registered = Instant::now();
    put_release(&reg, "c41d07e98a22").await;
    let stale = r#"document.getElementById('v-stale')?.textContent === '3'
        && document.querySelectorAll('#grid .cell[data-status="stale"]').length === 3"#;
    let shown = b.until(stale, Duration::from_secs(5)).await;
    let elapsed = registered.elapsed();
    assert!(
        shown.is_some(),
        "stale instances shown; page: {}",
        b.eval("document.body.innerText").await
    );
    assert!(elapsed < Duration::from_secs(2), "shown after {elapsed:?}");
    assert_eq!(
        b.eval("window.performance.getEntriesByType('navigation').length")
            .await,
        before,
        "no reload"
    );
    eprintln!("stale instances on the page {elapsed:?} after the release was registered");

    // The alert shows up too, and is acknowledged from the page.
    let alert_shown = b
        .until(
            "document.querySelectorAll('#alerts li.alert').length > 0",
            Duration::from_secs(2),
        )
        .await;
    assert!(alert_shown.is_some(), "an alert within 2 s of the release");
    screenshot(&b, "dashboard.png").await;
    // The live page may re-render the feed between finding the button and clicking it;
    // find it again then.
    let mut clicked = Err(String::new());
    for _ in 0..20 {
        clicked = match b
            .client
            .find(fantoccini::Locator::Css("#alerts li.alert button.ack"))
            .await
        {
            Ok(button) => button.click().await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if clicked.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    clicked.expect("click acknowledge");
    let acked = b
        .until(
            "document.querySelectorAll('#alerts li.alert .acked').length > 0",
            Duration::from_secs(5),
        )
        .await;
    assert!(acked.is_some(), "acknowledged on the page");
    let open: Value = reqwest::Client::new()
        .get(format!("{}/v1/alerts?state=open", reg.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let any_acked = open["alerts"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x["acknowledged"] == true && x["acknowledged_by"] == "on-call")
    });
    assert!(
        any_acked,
        "the registry recorded the acknowledgement: {open}"
    );

    // At phone width nothing overflows sideways.
    b.client.set_window_size(390, 844).await.expect("resize");
    let fits = b
        .until(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth",
            Duration::from_secs(2),
        )
        .await;
    assert!(
        fits.is_some(),
        "page {} px wide in a {} px window; too wide: {}",
        b.eval("document.documentElement.scrollWidth").await,
        b.eval("document.documentElement.clientWidth").await,
        b.eval("Array.from(document.querySelectorAll('body *')).filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth).map(e => e.tagName + '#' + e.id + '.' + e.className + ':' + Math.round(e.getBoundingClientRect().right)).slice(0, 12).join(' ')").await
    );
    screenshot(&b, "dashboard-phone.png").await;
    b.close().await;
}
