//! `serve --config lockstep.toml`: drift thresholds, alert delivery and channels from a file,
//! each key overridable by a flag or an environment variable (flag > env > file > default).
//! A file that does not parse, has an unknown key or a bad value is refused with its line
//! and the reason (exit 2).

use lockstep_api::ChannelConfig;
use lockstep_core::{MissingSeverity, Severity, Thresholds, parse_duration};
use lockstep_notify::{NotifyConfig, RetryPolicy};
use lockstep_server::service::alerts::{AlertSettings, validate_channels};
use serde::{Deserialize, Deserializer};
use std::path::Path;
use std::time::Duration;

/// The file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[drift]`.
    #[serde(default)]
    pub drift: DriftSection,
    /// `[alerts]`.
    #[serde(default)]
    pub alerts: AlertsSection,
    /// `[[channels]]`.
    #[serde(default)]
    pub channels: Option<Vec<ChannelConfig>>,
}

/// A threshold: a duration, or `off` (that severity is never used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold(pub Option<Duration>);

impl std::str::FromStr for Threshold {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "off" {
            return Ok(Threshold(None));
        }
        parse_duration(s).map(|d| Threshold(Some(d)))
    }
}

fn threshold<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Threshold>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn missing<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MissingSeverity>, D::Error> {
    let s = String::deserialize(d)?;
    parse_missing(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `critical` (or another severity), or `thresholds`.
pub fn parse_missing(s: &str) -> Result<MissingSeverity, String> {
    if s == "thresholds" {
        return Ok(MissingSeverity::Thresholds);
    }
    Severity::parse(s)
        .map(MissingSeverity::Fixed)
        .ok_or_else(|| format!("{s:?} is not low, medium, high, critical or thresholds"))
}

/// `[drift]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSection {
    #[serde(default, deserialize_with = "threshold")]
    low: Option<Threshold>,
    #[serde(default, deserialize_with = "threshold")]
    medium: Option<Threshold>,
    #[serde(default, deserialize_with = "threshold")]
    high: Option<Threshold>,
    #[serde(default, deserialize_with = "threshold")]
    critical: Option<Threshold>,
    #[serde(default, deserialize_with = "missing")]
    missing: Option<MissingSeverity>,
    #[serde(default, deserialize_with = "duration")]
    check_interval: Option<Duration>,
}

/// `[alerts]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    #[serde(default, deserialize_with = "duration")]
    rate_limit: Option<Duration>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    retry_base: Option<Duration>,
}

/// What flags and environment variables said (each `None` when not given).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub low: Option<Threshold>,
    pub medium: Option<Threshold>,
    pub high: Option<Threshold>,
    pub critical: Option<Threshold>,
    pub missing: Option<MissingSeverity>,
    pub check_interval: Option<Duration>,
    pub rate_limit: Option<Duration>,
    pub max_attempts: Option<u32>,
    pub retry_base: Option<Duration>,
    pub channels: Option<Vec<ChannelConfig>>,
}

/// Reads and checks the file; the error names the file, the line and the reason.
pub fn read(path: &Path) -> Result<FileConfig, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

/// Parses a file's text.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    let cfg: FileConfig = toml::from_str(text).map_err(|e| {
        // toml's message has "at line L, column C" and a snippet; keep it all.
        e.to_string().trim_end().to_string()
    })?;
    if let Some(ch) = &cfg.channels {
        validate_channels(ch).map_err(|e| format!("[[channels]]: {e}"))?;
    }
    Ok(cfg)
}

/// Merges defaults, file and overrides into the settings and the channels to seed.
pub fn settings(
    file: FileConfig,
    o: Overrides,
) -> Result<(AlertSettings, Option<Vec<ChannelConfig>>), String> {
    let d = Thresholds::default();
    let pick = |flag: Option<Threshold>, file: Option<Threshold>, default: Option<Duration>| {
        flag.or(file).map_or(default, |t| t.0)
    };
    let thresholds = Thresholds {
        low: pick(o.low, file.drift.low, d.low),
        medium: pick(o.medium, file.drift.medium, d.medium),
        high: pick(o.high, file.drift.high, d.high),
        critical: pick(o.critical, file.drift.critical, d.critical),
        missing: o.missing.or(file.drift.missing).unwrap_or(d.missing),
    };
    thresholds.validate()?;
    let nd = NotifyConfig::default();
    let rd = RetryPolicy::default();
    let max_attempts = o
        .max_attempts
        .or(file.alerts.max_attempts)
        .unwrap_or(rd.max_attempts);
    if max_attempts == 0 {
        return Err("alerts.max_attempts must be at least 1".into());
    }
    let settings = AlertSettings {
        thresholds,
        check_interval: o
            .check_interval
            .or(file.drift.check_interval)
            .unwrap_or(AlertSettings::default().check_interval)
            .max(Duration::from_millis(50)),
        notify: NotifyConfig {
            rate_limit: o
                .rate_limit
                .or(file.alerts.rate_limit)
                .unwrap_or(nd.rate_limit),
            retry: RetryPolicy {
                max_attempts,
                base: o.retry_base.or(file.alerts.retry_base).unwrap_or(rd.base),
                max: rd.max,
            },
            poll: nd.poll,
        },
    };
    let channels = o.channels.or(file.channels);
    if let Some(ch) = &channels {
        validate_channels(ch)?;
    }
    Ok((settings, channels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_design_example_and_the_source_systems_thresholds_parse() {
        let cfg = parse(
            r#"
[drift]
low = "1m"
medium = "10m"
high = "1h"
critical = "24h"
missing = "critical"

[[channels]]
name = "ops-hook"
type = "webhook"
url = "http://127.0.0.1:9000/hook"
secret = "s"
min_severity = "low"
"#,
        )
        .expect("parses");
        let (s, ch) = settings(cfg, Overrides::default()).expect("settings");
        assert_eq!(s.thresholds, Thresholds::default());
        assert_eq!(ch.map(|c| c.len()), Some(1));
        let cfg =
            parse("[drift]\nlow = \"off\"\nmedium = \"6h\"\nhigh = \"12h\"\ncritical = \"24h\"\n")
                .expect("parses");
        let (s, _) = settings(cfg, Overrides::default()).expect("settings");
        assert_eq!(s.thresholds.low, None);
        assert_eq!(s.thresholds.medium, Some(Duration::from_secs(6 * 3600)));
    }

    #[test]
    fn a_flag_beats_the_file() {
        let cfg = parse("[drift]\nlow = \"5m\"\n").expect("parses");
        let o = Overrides {
            low: Some(Threshold(Some(Duration::ZERO))),
            ..Overrides::default()
        };
        let (s, _) = settings(cfg, o).expect("settings");
        assert_eq!(s.thresholds.low, Some(Duration::ZERO));
    }

    #[test]
    fn a_bad_file_is_refused_with_its_line_and_reason() {
        let cases = [
            (
                "[drift]\nlow = \"1m\"\nmedium = \"ten minutes\"\n",
                "line 3",
            ),
            ("[drift]\nloww = \"1m\"\n", "line 2"),
            ("[drift]\nmissing = \"sometimes\"\n", "line 2"),
            ("[drift\n", "line 1"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let err = parse("[[channels]]\nname = \"x\"\ntype = \"webhook\"\n").expect_err("no url");
        assert!(err.contains("url"), "{err}");
    }
}
