//! The dashboard's server side over real sockets, without a browser: the session cookie's
//! attributes, CSRF protection of cookie-authenticated writes, the embedded assets, the
//! paging and filters of `GET /v1/dashboard`, and its rollouts (a real rollout over real
//! agents on loopback).

mod support;

use lockstep_core::Role;
use lockstep_testkit::{ADMIN_TOKEN, InProcessRegistry};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use serde_json::{Value, json};
use std::time::Duration;

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn set_cookie(h: &HeaderMap) -> String {
    h.get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn register(reg: &InProcessRegistry, env: &str, svc: &str, version: &str) {
    let resp = http()
        .put(format!("{}/v1/envs/{env}/services/{svc}/release", reg.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"version_id": version}))
        .send()
        .await
        .expect("send");
    assert!(resp.status().is_success(), "register: {}", resp.status());
}

async fn heartbeat(reg: &InProcessRegistry, token: &str, id: &str, env: &str, svc: &str, v: &str) {
    let resp = http()
        .post(format!("{}/v1/instances", reg.url))
        .bearer_auth(token)
        .json(&json!({"instance_id": id, "env": env, "service": svc, "version_id": v}))
        .send()
        .await
        .expect("send");
    assert!(resp.status().is_success(), "heartbeat: {}", resp.status());
}

async fn dashboard(reg: &InProcessRegistry, token: &str, query: &str) -> (StatusCode, Value) {
    let resp = http()
        .get(format!("{}/v1/dashboard{query}", reg.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("send");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn signing_in_sets_an_httponly_strict_session_cookie_and_answers_the_csrf_token() {
    let reg = InProcessRegistry::start().await;
    let viewer = reg.token("wall", Role::Viewer).await;

    let resp = http()
        .post(format!("{}/login", reg.url))
        .json(&json!({"token": viewer}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let cookie = set_cookie(resp.headers());
    assert_eq!(
        cookie,
        format!("lockstep_session={viewer}; HttpOnly; SameSite=Strict; Path=/"),
        "plain HTTP: no Secure"
    );
    let body: Value = resp.json().await.expect("json");
    let csrf = body["csrf_token"].as_str().unwrap_or_default().to_string();
    assert_eq!(csrf.len(), 32);
    assert!(csrf.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(body["name"], "wall");
    assert_eq!(body["role"], "viewer");

    // Behind a TLS-terminating proxy the cookie is Secure.
    let resp = http()
        .post(format!("{}/login", reg.url))
        .header("x-forwarded-proto", "https")
        .json(&json!({"token": viewer}))
        .send()
        .await
        .expect("send");
    assert!(set_cookie(resp.headers()).ends_with("; Secure"));

    // A form post (no JavaScript) redirects to the page with the cookie set.
    let resp = http()
        .post(format!("{}/login", reg.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={viewer}"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        resp.headers().get(LOCATION).map(|v| v.as_bytes()),
        Some(&b"/"[..])
    );
    assert!(set_cookie(resp.headers()).starts_with("lockstep_session="));

    // Unknown tokens and worker tokens get no session.
    let worker = reg.token("edge", Role::Worker).await;
    for (token, status) in [
        ("lst_nope", StatusCode::UNAUTHORIZED),
        (worker.as_str(), StatusCode::FORBIDDEN),
    ] {
        let resp = http()
            .post(format!("{}/login", reg.url))
            .json(&json!({"token": token}))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), status);
        assert!(resp.headers().get(SET_COOKIE).is_none());
    }
    let resp = http()
        .post(format!("{}/login", reg.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", "lst_nope"))
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.headers().get(LOCATION).map(|v| v.as_bytes()),
        Some(&b"/?login=failed"[..])
    );

    // A sign-in posted from another origin is refused (login CSRF).
    let resp = http()
        .post(format!("{}/login", reg.url))
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={viewer}"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers().get(SET_COOKIE).is_none());
    let resp = http()
        .post(format!("{}/login", reg.url))
        .header("sec-fetch-site", "cross-site")
        .json(&json!({"token": viewer}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // The page: the dashboard with its CSRF token for a session, else the sign-in form.
    let page = |cookie: Option<String>| {
        let mut req = http().get(format!("{}/", reg.url));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send()
    };
    let resp = page(Some(format!("lockstep_session={viewer}")))
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = resp.text().await.expect("text");
    assert!(html.contains(&format!(r#"<meta name="csrf-token" content="{csrf}">"#)));
    for cookie in [
        None,
        Some("lockstep_session=lst_revoked_or_forged".to_string()),
    ] {
        let html = page(cookie)
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        assert!(html.contains(r#"action="/login""#));
        assert!(!html.contains("csrf-token"));
    }

    let resp = http()
        .post(format!("{}/logout", reg.url))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(set_cookie(resp.headers()).contains("Max-Age=0"));
}

#[tokio::test]
async fn a_post_authenticated_by_the_cookie_without_the_csrf_header_is_refused() {
    let reg = InProcessRegistry::start().await;
    let cookie = format!("lockstep_session={ADMIN_TOKEN}");
    let create = |csrf: Option<String>| {
        let mut req = http()
            .post(format!("{}/v1/tokens", reg.url))
            .header("cookie", cookie.clone())
            .json(&json!({"name": "made-by-cookie", "role": "viewer"}));
        if let Some(c) = csrf {
            req = req.header("x-csrf-token", c);
        }
        req.send()
    };
    let resp = create(None).await.expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "csrf");
    let resp = create(Some("0".repeat(32))).await.expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let login: Value = http()
        .post(format!("{}/login", reg.url))
        .json(&json!({"token": ADMIN_TOKEN}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let csrf = login["csrf_token"].as_str().map(str::to_string);
    let resp = create(csrf).await.expect("send");
    assert_eq!(resp.status(), StatusCode::CREATED);

    // Reads need no CSRF header.
    let resp = http()
        .get(format!("{}/v1/dashboard", reg.url))
        .header("cookie", cookie.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn dashboard_pages_and_filters_instances_worst_first() {
    let reg = InProcessRegistry::start().await;
    let worker = reg.token("fleet", Role::Worker).await;
    let viewer = reg.token("wall", Role::Viewer).await;
    register(&reg, "production", "api", "api-v1-aaaaaaaa").await;
    register(&reg, "production", "web", "web-v1-bbbbbbbb").await;
    register(&reg, "staging", "api", "api-v1-aaaaaaaa").await;
    for i in 0..5 {
        heartbeat(
            &reg,
            &worker,
            &format!("api-{i}"),
            "production",
            "api",
            "api-v1-aaaaaaaa",
        )
        .await;
    }
    // The stale one first: with web-0 alone, web would count as converged for a moment.
    heartbeat(&reg, &worker, "web-1", "production", "web", "web-v0-old").await;
    heartbeat(
        &reg,
        &worker,
        "web-0",
        "production",
        "web",
        "web-v1-bbbbbbbb",
    )
    .await;
    heartbeat(&reg, &worker, "stg-0", "staging", "api", "api-v1-aaaaaaaa").await;
    heartbeat(&reg, &worker, "orphan", "staging", "batch", "x1").await;

    let (status, d) = dashboard(&reg, &viewer, "").await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(d["total_workers"], 9);
    assert_eq!(d["up_to_date_workers"], 7);
    assert_eq!(d["outdated_workers"], 1);
    assert_eq!(d["unhealthy_workers"], 0);
    assert_eq!(d["active_alerts"], 0);
    assert_eq!(d["counts"]["unknown"], 1);
    // 7 current of 8 judged (the service without a release is left out).
    assert_eq!(d["health_score"], 87.5);
    assert!(d.get("last_drift_check").is_some());
    let services = d["services"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = services
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["env"].as_str().unwrap_or(""),
                s["service"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "production/api",
            "production/web",
            "staging/api",
            "staging/batch"
        ]
    );
    assert_eq!(services[1]["expected_version"], "web-v1-b");
    assert_eq!(services[1]["counts"]["stale"], 1);
    // Convergence is observed in the background: wait for staging/api's.
    let converged = lockstep_testkit::eventually(Duration::from_secs(5), || async {
        let (_, d) = dashboard(&reg, &viewer, "").await;
        let deploys = d["deploys"].as_array().cloned().unwrap_or_default();
        deploys[0]["convergence_secs"].is_u64().then_some(deploys)
    })
    .await;
    let (deploys, _) = converged.expect("staging/api converged");
    assert_eq!(deploys.len(), 3);
    assert_eq!(deploys[0]["env"], "staging", "newest first");
    assert_eq!(deploys[0]["version"], "api-v1-a");
    assert!(
        deploys[1]["converged_at"].is_null(),
        "production/web has a stale instance"
    );
    // Worst first: the stale instance leads the first page.
    let items = d["instances"]["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(d["instances"]["total"], 9);
    assert_eq!(items[0]["instance_id"], "web-1");
    assert_eq!(items[0]["status"], "stale");
    assert_eq!(items[1]["status"], "unknown");

    // Pages: 4 per page, 9 instances → 4, 4, 1, then empty.
    let mut seen = Vec::new();
    for page in 1..=4 {
        let (_, d) = dashboard(&reg, &viewer, &format!("?per_page=4&page={page}")).await;
        let items = d["instances"]["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(items.len(), [4, 4, 1, 0][page - 1], "page {page}");
        assert_eq!(d["instances"]["total"], 9);
        seen.extend(
            items
                .iter()
                .map(|i| i["instance_id"].as_str().unwrap_or("").to_string()),
        );
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 9, "every instance exactly once: {seen:?}");

    // Filters narrow the page, not the summary.
    let ids = |d: &Value| -> Vec<String> {
        d["instances"]["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| i["instance_id"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (_, d) = dashboard(&reg, &viewer, "?env=staging").await;
    assert_eq!(ids(&d), ["orphan", "stg-0"]);
    assert_eq!(d["total_workers"], 9);
    let (_, d) = dashboard(&reg, &viewer, "?env=production&service=web").await;
    assert_eq!(ids(&d), ["web-1", "web-0"]);
    let (_, d) = dashboard(&reg, &viewer, "?status=current&service=api&env=production").await;
    assert_eq!(ids(&d), ["api-0", "api-1", "api-2", "api-3", "api-4"]);

    for bad in [
        "?per_page=0",
        "?per_page=501",
        "?page=0",
        "?env=Bad!",
        "?status=sideways",
    ] {
        let (status, body) = dashboard(&reg, &viewer, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = dashboard(&reg, &worker, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let resp = http()
        .get(format!("{}/v1/dashboard", reg.url))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn every_dashboard_asset_is_served_from_the_binary_and_loads_nothing_from_elsewhere() {
    let reg = InProcessRegistry::start().await;
    let viewer = reg.token("wall", Role::Viewer).await;
    let index = http()
        .get(format!("{}/", reg.url))
        .header("cookie", format!("lockstep_session={viewer}"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    for (name, ty) in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
    ] {
        assert!(
            index.contains(&format!("/assets/{name}")),
            "{name} referenced"
        );
        let resp = http()
            .get(format!("{}/assets/{name}", reg.url))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(ct.starts_with(ty), "{name}: {ct}");
        let body = resp.text().await.expect("text");
        // The SVG namespace is a name, not a fetch; nothing else may name another host.
        let external = body
            .replace("http://www.w3.org/2000/svg", "")
            .contains("://");
        assert!(!external, "{name} refers to another host");
    }
    assert!(!index.contains("://"));
    let resp = http()
        .get(format!("{}/assets/../Cargo.toml", reg.url))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

type Marks = std::collections::BTreeMap<String, Value>;

/// The `rollout` mark of every instance on the dashboard's first page that has one, once
/// `pred` holds for them (within 5 s).
async fn rollout_marks(
    reg: &InProcessRegistry,
    token: &str,
    pred: impl Fn(&Marks) -> bool,
) -> Marks {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, doc) = dashboard(reg, token, "").await;
        assert_eq!(status, StatusCode::OK);
        let marks: Marks = doc["instances"]["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| !i["rollout"].is_null())
            .map(|i| {
                (
                    i["instance_id"].as_str().unwrap_or_default().to_string(),
                    i["rollout"].clone(),
                )
            })
            .collect();
        if pred(&marks) {
            return marks;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rollout marks: {marks:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The card of a rollout over four real agents, read through `/v1/dashboard` as it runs:
/// canary `api-1` updated, `api-2` failed its health check (with the agent's reason),
/// `api-3` held in its health check and worked on, `api-4` waiting for its batch; once
/// `api-3` is let go, the card is finished with its outcome, the summary line and the
/// counts the update success chart draws. A second rollout of a release that is not
/// rollback-safe freezes on a failure, and its card says a person must act.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_follows_a_rollout_from_progress_to_its_summary_and_flags_a_frozen_one() {
    use support::fleet::{
        AGENT_TOKEN, Fleet, V1, V2, registry_config, wait_for_card, wait_for_endpoints,
    };
    let reg = InProcessRegistry::start_with(registry_config()).await;
    reg.service
        .rollouts()
        .set_agent_token(Some(AGENT_TOKEN.into()));
    register(&reg, "production", "api", V1).await;
    let viewer = reg.token("wall", Role::Viewer).await;
    let (_, empty) = dashboard(&reg, &viewer, "").await;
    assert_eq!(empty["rollouts"], json!([]), "no rollout yet: {empty}");

    let ids = ["api-1", "api-2", "api-3", "api-4"];
    let fleet = Fleet::start(&reg.url, ADMIN_TOKEN, &ids, &["api-3"]).await;
    wait_for_endpoints(&reg.url, ADMIN_TOKEN, &ids).await;
    fleet.sicken("api-2", V2);
    fleet.hold("api-3", V2);
    let v2 = fleet.package(V2, "2.0.0");
    let started = fleet
        .start_rollout(
            &reg.url,
            ADMIN_TOKEN,
            V2,
            &v2,
            json!({"canary": 1, "concurrency": 1, "max_failures": 1}),
        )
        .await;
    let id = started["id"].as_i64().expect("rollout id");

    let card = wait_for_card(
        &reg.url,
        &viewer,
        id,
        Duration::from_secs(30),
        "api-3 worked on",
        |c| c["working_on"] == json!(["api-3"]),
    )
    .await;
    assert_eq!(card["running"], true, "{card}");
    assert_eq!(card["phase"], "batches", "{card}");
    assert_eq!(card["needs_person"], false, "{card}");
    assert_eq!(card["outcome"], Value::Null, "{card}");
    assert_eq!(card["version"], &V2[..8], "8 characters of the version id");
    assert_eq!(card["previous_version"], &V1[..8]);
    assert_eq!(
        card["counts"],
        json!({"total": 4, "pending": 1, "in_progress": 1, "updated": 1, "failed": 1,
               "skipped": 0, "rolled_back": 0}),
        "{card}"
    );
    let steps: Vec<&str> = card["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["step"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        steps,
        ["updated", "failed", "updating", "pending"],
        "{card}"
    );
    let reason = card["nodes"][1]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("health check failed"), "{card}");
    assert_eq!(
        card["nodes"][3]["reason"],
        Value::Null,
        "waiting has no reason"
    );
    assert_eq!(card["last_change"]["instance_id"], "api-3", "{card}");
    assert_eq!(card["last_change"]["step"], "updating", "{card}");
    // The page of instances carries each node's mark: waiting told from failed. (Polled:
    // api-2's instance re-registered after its rollback, see `registry_config`.)
    let marks = rollout_marks(&reg, &viewer, |m| m.len() == 4).await;
    assert_eq!(
        marks.get("api-4"),
        Some(&json!({"id": id, "step": "pending", "reason": null})),
        "{marks:?}"
    );
    assert_eq!(marks["api-2"]["step"], "failed", "{marks:?}");
    assert!(
        marks["api-2"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("health check failed")),
        "{marks:?}"
    );

    fleet.let_go("api-3", V2);
    let card = wait_for_card(
        &reg.url,
        &viewer,
        id,
        Duration::from_secs(30),
        "finished",
        |c| c["running"] == false,
    )
    .await;
    assert_eq!(card["phase"], "completed", "{card}");
    assert_eq!(card["outcome"], "succeeded", "{card}");
    assert_eq!(card["working_on"], json!([]));
    assert_eq!(
        card["counts"],
        json!({"total": 4, "pending": 0, "in_progress": 0, "updated": 3, "failed": 1,
               "skipped": 0, "rolled_back": 0}),
        "{card}"
    );
    let summary = card["summary"].as_str().unwrap_or_default();
    assert!(
        summary.starts_with("Rollout completed: 3/4 successful (75.0%), 1 failed, 0 skipped in "),
        "{summary}"
    );
    // Once it ended, only the node it failed on keeps a mark.
    rollout_marks(&reg, &viewer, |m| m.keys().eq(["api-2"])).await;

    // A release that is not rollback-safe, failing on the canary: frozen, needs a person.
    // (The agents are named: every one of them, whatever the registry lists this instant.)
    const V3: &str = "e5b2aa7c9d10";
    let v3 = fleet.package(V3, "3.0.0");
    fleet.sicken("api-1", V3);
    let agents: Vec<&str> = fleet.nodes.iter().map(|n| n.url.as_str()).collect();
    let frozen = fleet
        .start_rollout(
            &reg.url,
            ADMIN_TOKEN,
            V3,
            &v3,
            json!({"canary": 1, "rollback_safe": false, "agents": agents}),
        )
        .await;
    let frozen_id = frozen["id"].as_i64().expect("rollout id");
    let card = wait_for_card(
        &reg.url,
        &viewer,
        frozen_id,
        Duration::from_secs(30),
        "frozen",
        |c| c["phase"] == "frozen",
    )
    .await;
    assert_eq!(card["needs_person"], true, "{card}");
    assert_eq!(card["running"], false, "{card}");
    assert_eq!(
        card["counts"],
        json!({"total": 4, "pending": 0, "in_progress": 0, "updated": 0, "failed": 1,
               "skipped": 3, "rolled_back": 0}),
        "stopped: the nodes never reached are skipped, as in the summary line: {card}"
    );
    let summary = card["summary"].as_str().unwrap_or_default();
    assert!(
        summary.starts_with("Rollout frozen: 0/4 successful (0.0%), 1 failed, 3 skipped"),
        "{summary}"
    );
    let (_, doc) = dashboard(&reg, &viewer, "").await;
    let listed: Vec<i64> = doc["rollouts"]
        .as_array()
        .expect("rollouts")
        .iter()
        .filter_map(|c| c["id"].as_i64())
        .collect();
    assert_eq!(listed, [frozen_id, id], "newest first: {doc}");
}
