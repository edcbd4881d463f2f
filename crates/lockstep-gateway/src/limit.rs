//! Rate limits: token buckets per user and per IP, exact under concurrency.
//!
//! One rule, written twice: [`take_all`] in Rust for the local buckets and the same steps
//! in Lua for Redis, where every bucket a request touches is refilled, checked and taken
//! in one atomic script (one round-trip). A request is allowed only when every bucket it
//! touches has a token, and then takes one from each; a refused request takes nothing.
//! When Redis does not answer, the gateway counts locally, says so once in the log and in
//! `lockstep_gateway_ratelimit_redis_fallback_total`, and never fails a request for it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `capacity` requests per `period`, refilled continuously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Bucket size (and refill per period).
    pub capacity: u32,
    /// Refill period.
    pub period: Duration,
}

impl Rate {
    /// Parses `100/60s` (or `100/1m`, `5/s` meaning one second).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (n, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected COUNT/PERIOD such as 100/60s"))?;
        let capacity: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {n:?} is not a count"))?;
        let p = p.trim();
        let p = if p.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            p.to_string()
        } else {
            format!("1{p}")
        };
        let period = lockstep_core::parse_duration(&p).map_err(|e| format!("{s:?}: {e}"))?;
        if capacity == 0 || period.is_zero() {
            return Err(format!("{s:?}: count and period must be positive"));
        }
        Ok(Rate { capacity, period })
    }

    fn period_ms(&self) -> f64 {
        (self.period.as_millis() as f64).max(1.0)
    }
}

/// A bucket's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    updated_ms: u64,
}

/// What one bucket says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request may pass.
    pub allowed: bool,
    /// The bucket size (`X-RateLimit-Limit`).
    pub limit: u32,
    /// Whole tokens left (`X-RateLimit-Remaining`).
    pub remaining: u32,
    /// Seconds until a token is available (`Retry-After`), 0 when one is.
    pub retry_after_secs: u64,
    /// Seconds until the bucket is full again (`X-RateLimit-Reset`).
    pub reset_secs: u64,
}

fn ceil_secs(ms: f64) -> u64 {
    (ms / 1000.0).ceil().max(0.0) as u64
}

/// Refills every bucket to `now_ms`, then takes one token from each if all have one.
/// Returns one verdict per bucket (all allowed, or all refused).
pub fn take_all(buckets: &mut [(&mut Option<Bucket>, Rate)], now_ms: u64) -> Vec<Verdict> {
    let mut all = true;
    for (b, rate) in buckets.iter_mut() {
        let cap = f64::from(rate.capacity);
        let st = b.get_or_insert(Bucket {
            tokens: cap,
            updated_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(st.updated_ms) as f64;
        st.tokens = (st.tokens + elapsed * cap / rate.period_ms()).min(cap);
        st.updated_ms = st.updated_ms.max(now_ms);
        all &= st.tokens >= 1.0;
    }
    buckets
        .iter_mut()
        .map(|(b, rate)| {
            let cap = f64::from(rate.capacity);
            let per_token = rate.period_ms() / cap;
            let st = b.get_or_insert(Bucket {
                tokens: cap,
                updated_ms: now_ms,
            });
            if all {
                st.tokens -= 1.0;
            }
            let retry = if st.tokens >= 1.0 {
                0
            } else {
                ceil_secs((1.0 - st.tokens) * per_token).max(1)
            };
            Verdict {
                allowed: all,
                limit: rate.capacity,
                remaining: st.tokens.floor().max(0.0) as u32,
                retry_after_secs: if all { 0 } else { retry },
                reset_secs: ceil_secs((cap - st.tokens) * per_token),
            }
        })
        .collect()
}

/// The verdict to report in headers: a refusing one with the longest wait, else the
/// bucket with the fewest tokens left.
pub fn headline(v: &[Verdict]) -> Option<Verdict> {
    v.iter().copied().min_by_key(|x| {
        (
            x.allowed,
            u64::MAX - x.retry_after_secs,
            x.remaining,
            u64::MAX - x.reset_secs,
        )
    })
}

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local toks = {}
local all = 1
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2*i-1]); local period = tonumber(ARGV[2*i])
  local v = redis.call('HMGET', KEYS[i], 't', 'u')
  local tokens = tonumber(v[1]); local upd = tonumber(v[2])
  if tokens == nil or upd == nil then tokens = cap; upd = now end
  local el = now - upd
  if el < 0 then el = 0 end
  tokens = math.min(cap, tokens + el * cap / period)
  toks[i] = tokens
  if tokens < 1 then all = 0 end
end
local out = {all}
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2*i-1]); local period = tonumber(ARGV[2*i])
  local tokens = toks[i]
  if all == 1 then tokens = tokens - 1 end
  redis.call('HSET', KEYS[i], 't', tostring(tokens), 'u', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(period * 2))
  local per = period / cap
  local retry = 0
  if tokens < 1 then retry = math.max(1, math.ceil((1 - tokens) * per / 1000)) end
  if all == 1 then retry = 0 end
  out[#out+1] = math.max(0, math.floor(tokens))
  out[#out+1] = retry
  out[#out+1] = math.ceil((cap - tokens) * per / 1000)
end
return out
"#;

struct RedisConn {
    conn: redis::aio::MultiplexedConnection,
    sha: String,
}

/// Buckets kept in Redis, shared by every gateway pointing at it.
struct RedisBuckets {
    client: redis::Client,
    prefix: String,
    conn: tokio::sync::Mutex<Option<RedisConn>>,
    /// Do not try to reconnect before this instant (one attempt per second at most).
    retry_at: Mutex<Instant>,
}

/// The limiter: local buckets, or Redis with local buckets as the fallback.
pub struct Limiter {
    local: Mutex<HashMap<String, Option<Bucket>>>,
    redis: Option<RedisBuckets>,
    epoch: Instant,
    degraded: AtomicBool,
    /// Requests counted locally because Redis did not answer.
    pub fallbacks: AtomicU64,
}

const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

impl Limiter {
    /// A limiter; with `redis` (a `redis://` URL) the buckets live there.
    pub fn new(redis: Option<&str>, prefix: &str) -> Result<Limiter, String> {
        let redis = redis
            .map(|url| {
                redis::Client::open(url)
                    .map(|client| RedisBuckets {
                        client,
                        prefix: prefix.to_string(),
                        conn: tokio::sync::Mutex::new(None),
                        retry_at: Mutex::new(Instant::now()),
                    })
                    .map_err(|e| format!("rate_limit.redis: {e}"))
            })
            .transpose()?;
        Ok(Limiter {
            local: Mutex::new(HashMap::new()),
            redis,
            epoch: Instant::now(),
            degraded: AtomicBool::new(false),
            fallbacks: AtomicU64::new(0),
        })
    }

    /// Whether this limiter counts in Redis.
    pub fn shared(&self) -> bool {
        self.redis.is_some()
    }

    /// Checks and takes from every bucket in `keys`; one verdict per key.
    pub async fn check(&self, keys: &[(String, Rate)]) -> Vec<Verdict> {
        if keys.is_empty() {
            return Vec::new();
        }
        if let Some(r) = &self.redis {
            match self.check_redis(r, keys).await {
                Ok(v) => {
                    if self.degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!("rate limits: Redis answers again; counting there");
                    }
                    return v;
                }
                Err(e) => {
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    if !self.degraded.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "rate limits: Redis unreachable; counting locally in this gateway");
                    }
                }
            }
        }
        self.check_local(keys)
    }

    fn check_local(&self, keys: &[(String, Rate)]) -> Vec<Verdict> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let Ok(mut map) = self.local.lock() else {
            // A poisoned map cannot count: let the request through rather than fail it.
            return Vec::new();
        };
        if map.len() > 100_000 {
            // Forget buckets that refilled long ago (they would be full anyway).
            map.retain(|_, b| b.is_some_and(|b| now.saturating_sub(b.updated_ms) < 600_000));
        }
        let mut slots: Vec<Option<Bucket>> = keys
            .iter()
            .map(|(k, _)| map.get(k).copied().flatten())
            .collect();
        let verdicts = {
            let mut refs: Vec<(&mut Option<Bucket>, Rate)> = slots
                .iter_mut()
                .zip(keys)
                .map(|(s, (_, r))| (s, *r))
                .collect();
            take_all(&mut refs, now)
        };
        for ((k, _), s) in keys.iter().zip(slots) {
            map.insert(k.clone(), s);
        }
        verdicts
    }

    async fn check_redis(
        &self,
        r: &RedisBuckets,
        keys: &[(String, Rate)],
    ) -> Result<Vec<Verdict>, String> {
        let mut guard = r.conn.lock().await;
        if guard.is_none() {
            {
                let mut at = r.retry_at.lock().map_err(|_| "poisoned")?;
                if Instant::now() < *at {
                    return Err("not reconnecting yet".into());
                }
                *at = Instant::now() + Duration::from_secs(1);
            }
            let connect = async {
                let mut conn = r.client.get_multiplexed_async_connection().await?;
                let sha: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(SCRIPT)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, redis::RedisError>(RedisConn { conn, sha })
            };
            let c = tokio::time::timeout(REDIS_TIMEOUT, connect)
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            *guard = Some(c);
        }
        let Some(c) = guard.as_ref() else {
            return Err("no connection".into());
        };
        let mut conn = c.conn.clone();
        let sha = c.sha.clone();
        drop(guard);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&sha).arg(keys.len());
        for (k, _) in keys {
            cmd.arg(format!("{}:{k}", r.prefix));
        }
        for (_, rate) in keys {
            cmd.arg(rate.capacity).arg(rate.period.as_millis() as u64);
        }
        let res: Result<Vec<i64>, String> =
            match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<Vec<i64>>(&mut conn)).await
            {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("Redis did not answer in time".into()),
            };
        let v = match res {
            Ok(v) => v,
            Err(e) => {
                // Drop the connection: the next request (after a second) reconnects and
                // reloads the script (a restarted Redis has forgotten it).
                *r.conn.lock().await = None;
                return Err(e);
            }
        };
        if v.len() != 1 + 3 * keys.len() {
            return Err("unexpected answer from the rate-limit script".into());
        }
        let allowed = v[0] == 1;
        Ok(keys
            .iter()
            .enumerate()
            .map(|(i, (_, rate))| Verdict {
                allowed,
                limit: rate.capacity,
                remaining: u32::try_from(v[1 + 3 * i].max(0)).unwrap_or(u32::MAX),
                retry_after_secs: v[2 + 3 * i].max(0) as u64,
                reset_secs: v[3 + 3 * i].max(0) as u64,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_or_without_a_period_count() {
        for (s, cap, secs) in [("100/60s", 100, 60), ("5/s", 5, 1), ("10/1m", 10, 60)] {
            let r = Rate::parse(s).expect(s);
            assert_eq!((r.capacity, r.period.as_secs()), (cap, secs), "{s}");
        }
        for bad in ["100", "0/1s", "x/1s", "1/0s", "1/forever"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    fn check(rate: &str, steps: &[(u64, bool, u32, u64)]) {
        let rate = Rate::parse(rate).expect("rate");
        let mut b = None;
        for (i, &(at_ms, allowed, remaining, retry)) in steps.iter().enumerate() {
            let v = take_all(&mut [(&mut b, rate)], at_ms)[0];
            assert_eq!(
                (v.allowed, v.remaining, v.retry_after_secs),
                (allowed, remaining, retry),
                "step {i} at {at_ms} ms"
            );
        }
    }

    #[test]
    fn a_bucket_empties_then_refills_with_time() {
        check(
            "2/10s",
            &[
                (0, true, 1, 0),
                (0, true, 0, 0),
                (0, false, 0, 5),
                (4_999, false, 0, 1),
                (5_000, true, 0, 0),
                (100_000, true, 1, 0),
            ],
        );
    }

    #[test]
    fn a_refusal_takes_from_no_bucket() {
        let small = Rate::parse("1/60s").expect("r");
        let big = Rate::parse("10/60s").expect("r");
        let (mut a, mut b) = (None, None);
        assert!(take_all(&mut [(&mut a, small), (&mut b, big)], 0)[0].allowed);
        let v = take_all(&mut [(&mut a, small), (&mut b, big)], 0);
        assert!(!v[0].allowed && !v[1].allowed);
        assert_eq!(
            v[1].remaining, 9,
            "the refused request took nothing from the big bucket"
        );
        let h = headline(&v).expect("headline");
        assert_eq!((h.limit, h.retry_after_secs), (1, 60));
    }

    #[tokio::test]
    async fn local_buckets_are_exact_under_concurrency() {
        let lim = std::sync::Arc::new(Limiter::new(None, "t").expect("limiter"));
        let rate = Rate::parse("50/1h").expect("r");
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let lim = lim.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..20 {
                    if lim.check(&[("ip:1".into(), rate)]).await[0].allowed {
                        ok += 1;
                    }
                }
                ok
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        assert_eq!(total, 50);
    }
}
