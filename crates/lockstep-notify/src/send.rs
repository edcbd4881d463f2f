//! The I/O of one attempt: POST to a webhook (signed), to a Slack incoming webhook, or hand
//! an email to an SMTP server. Each returns a short error text on failure; the caller decides
//! about retries (`plan::outcome`). No secret ever appears in an error or a log line.

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use lockstep_api::{ChannelConfig, ChannelKind};
use std::time::Duration;
use time::OffsetDateTime;

use crate::render::{self, Item};

/// How long one attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Header carrying the HMAC signature of a webhook body.
pub const SIGNATURE_HEADER: &str = "x-lockstep-signature";
/// Header carrying the delivery id (the same on every retry, so a receiver can drop a repeat).
pub const DELIVERY_HEADER: &str = "x-lockstep-delivery";

/// Sends one delivery over one channel.
pub async fn send(
    http: &reqwest::Client,
    channel: &ChannelConfig,
    delivery_id: i64,
    items: &[Item],
    now: OffsetDateTime,
) -> Result<(), String> {
    match channel.kind {
        ChannelKind::Webhook => webhook(http, channel, delivery_id, items, now).await,
        ChannelKind::Slack => slack(http, channel, items).await,
        ChannelKind::Email => email(channel, items).await,
    }
}

/// The error text of a failed HTTP call, without its URL (it may hold a credential, as a
/// Slack webhook's does).
fn http_error(e: reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    format!("{what}: {}", e.without_url())
}

async fn check(res: Result<reqwest::Response, reqwest::Error>) -> Result<(), String> {
    let res = res.map_err(http_error)?;
    let status = res.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}

async fn webhook(
    http: &reqwest::Client,
    c: &ChannelConfig,
    delivery_id: i64,
    items: &[Item],
    now: OffsetDateTime,
) -> Result<(), String> {
    let url = c.url.as_deref().ok_or("webhook without url")?;
    let method = match c.method.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("POST") => reqwest::Method::POST,
        Some("PUT") => reqwest::Method::PUT,
        Some(other) => return Err(format!("unsupported method {other}")),
    };
    let body = serde_json::to_vec(&render::webhook_body(delivery_id, items, now))
        .map_err(|e| e.to_string())?;
    let mut req = http
        .request(method, url)
        .timeout(ATTEMPT_TIMEOUT)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(DELIVERY_HEADER, delivery_id.to_string());
    for (k, v) in &c.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if let Some(secret) = &c.secret {
        req = req.header(SIGNATURE_HEADER, render::signature(secret, &body));
    }
    check(req.body(body).send().await).await
}

async fn slack(http: &reqwest::Client, c: &ChannelConfig, items: &[Item]) -> Result<(), String> {
    let url = c
        .webhook_url
        .as_deref()
        .ok_or("slack without webhook_url")?;
    let body = render::slack_body(items, c.channel.as_deref(), c.username.as_deref());
    check(
        http.post(url)
            .timeout(ATTEMPT_TIMEOUT)
            .json(&body)
            .send()
            .await,
    )
    .await
}

async fn email(c: &ChannelConfig, items: &[Item]) -> Result<(), String> {
    let host = c.smtp_host.as_deref().ok_or("email without smtp_host")?;
    let from = c
        .from_address
        .as_deref()
        .ok_or("email without from_address")?;
    if c.to_addresses.is_empty() {
        return Err("email without to_addresses".into());
    }
    let (subject, text) = render::email(items);
    let mut msg = Message::builder()
        .from(from.parse().map_err(|e| format!("from_address: {e}"))?)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for to in &c.to_addresses {
        msg = msg.to(to.parse().map_err(|e| format!("to_addresses: {e}"))?);
    }
    let msg = msg.body(text).map_err(|e| e.to_string())?;
    let plain = c.smtp_security.as_deref() == Some("plain");
    let mut builder = if plain {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(c.smtp_port.unwrap_or(25))
    } else {
        AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
            .map_err(|e| format!("smtp: {e}"))?
            .port(c.smtp_port.unwrap_or(587))
    };
    builder = builder.timeout(Some(ATTEMPT_TIMEOUT));
    if let (Some(user), Some(pw)) = (&c.username, &c.password) {
        builder = builder.credentials(Credentials::new(user.clone(), pw.clone()));
    }
    builder
        .build()
        .send(msg)
        .await
        .map(|_| ())
        .map_err(|e| format!("smtp: {e}"))
}
