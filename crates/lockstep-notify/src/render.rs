//! What each channel receives: the webhook's JSON (and its signature), Slack's message
//! format, and an email's subject and text. A delivery carries one notification (`alert`) or
//! several (`digest`); rendering is a pure function of it, so every retry sends the same
//! bytes.

use hmac::{KeyInit, Mac};
use lockstep_api::Alert;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// One alert change inside a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// `alert_opened`, `alert_escalated` or `alert_resolved`.
    pub kind: String,
    /// The alert as of the change.
    pub alert: Alert,
}

/// Slack shows at most this many alerts of a digest as attachments (the rest are counted).
const SLACK_MAX_ATTACHMENTS: usize = 20;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

fn verb(kind: &str) -> &'static str {
    match kind {
        "alert_escalated" => "escalated",
        "alert_resolved" => "resolved",
        _ => "opened",
    }
}

/// The webhook payload of one alert change, with the source system's field names.
pub fn alert_payload(item: &Item) -> Value {
    let a = &item.alert;
    json!({
        "event": item.kind,
        "alert_id": a.alert_id,
        "worker_id": a.worker_id,
        "instance_id": a.instance_id,
        "service": a.service,
        "env": a.env,
        "condition": a.condition,
        "severity": a.severity,
        "state": a.state,
        "drift_secs": a.drift_secs,
        "drift_duration": a.drift_duration,
        "current_version": a.current_version,
        "expected_version": a.expected_version,
        "message": a.message,
        "timestamp": rfc3339(a.timestamp),
        "acknowledged": a.acknowledged,
    })
}

/// One line for a person: "[HIGH] opened: production/api i-1 stale for 12m (runs 1a2b3c4d, expected 5e6f7a8b)".
pub fn line(item: &Item) -> String {
    let a = &item.alert;
    format!(
        "[{}] {}: {}",
        a.severity.as_str().to_uppercase(),
        verb(&item.kind),
        a.message
    )
}

/// The webhook body: one alert's payload, or a digest wrapping several.
pub fn webhook_body(delivery_id: i64, items: &[Item], now: OffsetDateTime) -> Value {
    match items {
        [one] => {
            let mut v = alert_payload(one);
            if let Some(o) = v.as_object_mut() {
                o.insert("delivery_id".into(), json!(delivery_id.to_string()));
            }
            v
        }
        many => json!({
            "digest": true,
            "delivery_id": delivery_id.to_string(),
            "count": many.len(),
            "message": digest_title(many),
            "timestamp": rfc3339(now),
            "alerts": many.iter().map(alert_payload).collect::<Vec<_>>(),
        }),
    }
}

/// `sha256=<hex HMAC-SHA256 of body with secret>`, the `X-Lockstep-Signature` value.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this never fails; an empty key is still a key.
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn digest_title(items: &[Item]) -> String {
    let worst = items
        .iter()
        .map(|i| i.alert.severity)
        .max()
        .map_or("", |s| s.as_str());
    format!("lockstep: {} alert changes (worst: {worst})", items.len())
}

fn color(a: &Alert, kind: &str) -> &'static str {
    if kind == "alert_resolved" {
        return "good";
    }
    match a.severity {
        lockstep_core::Severity::Low => "#439FE0",
        lockstep_core::Severity::Medium => "warning",
        lockstep_core::Severity::High | lockstep_core::Severity::Critical => "danger",
    }
}

/// A Slack incoming-webhook message: `text`, and one attachment per alert (color by
/// severity, fields for service, instance, versions and drift).
pub fn slack_body(items: &[Item], channel: Option<&str>, username: Option<&str>) -> Value {
    let text = match items {
        [one] => line(one),
        many => digest_title(many),
    };
    let mut attachments: Vec<Value> = items
        .iter()
        .take(SLACK_MAX_ATTACHMENTS)
        .map(|i| {
            let a = &i.alert;
            json!({
                "color": color(a, &i.kind),
                "title": format!("{} {} {}", a.severity.as_str().to_uppercase(), verb(&i.kind), a.instance_id),
                "text": a.message,
                "fields": [
                    {"title": "Service", "value": format!("{}/{}", a.env, a.service), "short": true},
                    {"title": "Drift", "value": a.drift_duration, "short": true},
                    {"title": "Running", "value": a.current_version, "short": true},
                    {"title": "Expected", "value": a.expected_version.clone().unwrap_or_else(|| "-".into()), "short": true},
                ],
                "footer": format!("lockstep alert {}", a.alert_id),
                "ts": a.updated_at.unix_timestamp(),
            })
        })
        .collect();
    if items.len() > SLACK_MAX_ATTACHMENTS {
        attachments.push(json!({
            "text": format!("… and {} more", items.len() - SLACK_MAX_ATTACHMENTS),
        }));
    }
    let mut body = json!({ "text": text, "attachments": attachments });
    if let Some(o) = body.as_object_mut() {
        if let Some(c) = channel {
            o.insert("channel".into(), json!(c));
        }
        if let Some(u) = username {
            o.insert("username".into(), json!(u));
        }
    }
    body
}

/// An email's subject and plain-text body.
pub fn email(items: &[Item]) -> (String, String) {
    let subject = match items {
        [one] => line(one),
        many => digest_title(many),
    };
    let mut body = String::new();
    for i in items {
        let a = &i.alert;
        body.push_str(&line(i));
        body.push('\n');
        body.push_str(&format!(
            "  alert {}  {}/{}  instance {}  running {}  expected {}  drift {}  since {}\n\n",
            a.alert_id,
            a.env,
            a.service,
            a.instance_id,
            a.current_version,
            a.expected_version.as_deref().unwrap_or("-"),
            a.drift_duration,
            rfc3339(a.timestamp),
        ));
    }
    body.push_str("Acknowledge with: lockstep alerts ack <alert id>\n");
    (subject, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_core::{Condition, Severity};
    use lockstep_store::conformance::sample_alert;

    fn item(id: &str, sev: Severity) -> Item {
        let mut alert = sample_alert(id, Condition::Stale, sev);
        alert.alert_id = "7".into();
        Item {
            kind: "alert_opened".into(),
            alert,
        }
    }

    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn one_alert_is_sent_with_the_source_systems_fields() {
        let v = webhook_body(
            3,
            &[item("i-1", Severity::High)],
            OffsetDateTime::UNIX_EPOCH,
        );
        for k in [
            "alert_id",
            "worker_id",
            "instance_id",
            "service",
            "env",
            "severity",
            "drift_duration",
            "current_version",
            "expected_version",
            "message",
            "timestamp",
            "acknowledged",
        ] {
            assert!(v.get(k).is_some(), "{k} in {v}");
        }
        assert_eq!(v["severity"], "high");
        assert_eq!(v["delivery_id"], "3");
    }

    #[test]
    fn several_alerts_make_one_digest_and_slack_caps_its_attachments() {
        let items: Vec<Item> = (0..25)
            .map(|i| item(&format!("i-{i}"), Severity::Low))
            .collect();
        let v = webhook_body(1, &items, OffsetDateTime::UNIX_EPOCH);
        assert_eq!(v["digest"], true);
        assert_eq!(v["count"], 25);
        assert_eq!(v["alerts"].as_array().map(Vec::len), Some(25));
        let s = slack_body(&items, Some("#ops"), None);
        assert_eq!(s["channel"], "#ops");
        assert_eq!(s["attachments"].as_array().map(Vec::len), Some(21));
        assert!(
            s["text"]
                .as_str()
                .is_some_and(|t| t.contains("25 alert changes"))
        );
    }
}
