//! Per-client limit on feedback submissions (`SUBMIT_RATE_LIMIT` per minute per address).
//!
//! Kept in memory, per web process: it works when Redis is down (submissions must keep
//! working then), and costs nothing per request. With N processes behind a load balancer
//! a client gets at most N times the limit, which is what a bot-brake needs.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The limiter; `None` inside when the limit is switched off (0).
pub struct SubmitLimiter {
    /// Keyed by client address.
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl SubmitLimiter {
    /// Allows `per_minute` submissions per address per minute (bursts up to that many);
    /// 0 switches the limit off.
    pub fn new(per_minute: u32) -> Self {
        let limiter = NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        Self { limiter }
    }

    /// `Ok` if `client` may submit now, else how long until it may.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        let result =
            limiter.check_key(&client).map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()));
        // Forget idle clients now and then so memory stays bounded.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_applies_per_address() {
        let limiter = SubmitLimiter::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(a).is_ok());
        assert!(limiter.check(a).is_err());
        assert!(limiter.check(b).is_ok());
    }

    #[test]
    fn zero_switches_the_limit_off() {
        let limiter = SubmitLimiter::new(0);
        let a: IpAddr = [10, 0, 0, 1].into();
        assert!((0..1000).all(|_| limiter.check(a).is_ok()));
    }
}
