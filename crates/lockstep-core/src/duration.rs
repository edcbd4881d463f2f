//! Human durations as flags and config files write them: `500ms`, `30s`, `5m`, `24h`, `7d`,
//! or a combination such as `1h30m`. A bare number is seconds.

use std::time::Duration;

/// Parses a human duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: use e.g. 500ms, 30s, 5m, 24h"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("number too large in {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => {
                return Err(format!(
                    "unknown unit {unit:?} in {s:?}: use ms, s, m, h or d"
                ));
            }
        };
        total = total.saturating_add(d);
    }
    Ok(total)
}

/// Formats whole seconds as the largest units that fit: `90` → `1m30s`.
pub fn format_secs(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (v, u) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if v > 0 {
            out.push_str(&format!("{v}{u}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_human_units() {
        let table = [
            ("30", Some(30_000)),
            ("500ms", Some(500)),
            ("30s", Some(30_000)),
            ("5m", Some(300_000)),
            ("1h30m", Some(5_400_000)),
            ("24h", Some(86_400_000)),
            ("1d", Some(86_400_000)),
            ("", None),
            ("5x", None),
            ("m", None),
            ("-1s", None),
        ];
        for (input, want) in table {
            assert_eq!(
                parse_duration(input).ok().map(|d| d.as_millis() as u64),
                want,
                "{input:?}"
            );
        }
    }

    #[test]
    fn seconds_format_in_the_largest_units() {
        assert_eq!(format_secs(0), "0s");
        assert_eq!(format_secs(90), "1m30s");
        assert_eq!(format_secs(90_061), "1d1h1m1s");
    }
}
