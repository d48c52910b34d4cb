//! A token bucket per user (role@database, or the role a login names): `per_minute` requests in a burst, refilled
//! at `per_minute` a minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimiter {
    per_minute: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        RateLimiter { per_minute: per_minute.max(1) as f64, buckets: Mutex::new(HashMap::new()) }
    }

    /// Take one token for `key` at `now`: Ok, or Err with how long until the next one.
    pub fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 10_000 {
            // Forget buckets that have refilled completely: they are equivalent to new ones.
            let full = Duration::from_secs(60);
            buckets.retain(|_, (_, at)| now.saturating_duration_since(*at) < full);
        }
        let rate = self.per_minute / 60.0;
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((self.per_minute, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(self.per_minute);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }

    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refuses_then_refills() {
        let rl = RateLimiter::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(rl.check_at("alice", t0).is_ok());
        }
        let wait = rl.check_at("alice", t0).unwrap_err();
        assert!(wait > Duration::from_secs(19) && wait <= Duration::from_secs(20), "{wait:?}");
        // Another user has its own bucket.
        assert!(rl.check_at("bob", t0).is_ok());
        // One token back after 20 s (3 a minute), not two.
        let t1 = t0 + Duration::from_secs(20);
        assert!(rl.check_at("alice", t1).is_ok());
        assert!(rl.check_at("alice", t1).is_err());
    }
}
