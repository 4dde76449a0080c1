//! Retry delays: exponential backoff with jitter, never shorter than a `Retry-After`.

use std::time::Duration;

use rand::Rng;

/// The delay before attempt `attempts + 1`, after `attempts` failed ones.
///
/// The exponential part is `base * 2^(attempts - 1)`, capped at `cap`; "equal jitter"
/// keeps half of it fixed and randomises the other half, so retries of many
/// subscriptions that failed together (a push-service outage) spread out instead of
/// returning as one burst. A push service's `Retry-After` is a floor (capped too).
pub fn delay(attempts: u32, base: Duration, cap: Duration, retry_after: Option<Duration>) -> Duration {
    let exponent = attempts.saturating_sub(1).min(20);
    let exponential = base.saturating_mul(1 << exponent).min(cap);
    let half = exponential / 2;
    let jitter = rand::thread_rng().gen_range(Duration::ZERO..=half);
    let delay = half + jitter;
    match retry_after {
        Some(floor) => delay.max(floor.min(cap)),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(600);

    #[test]
    fn delays_grow_exponentially_within_jitter_bounds() {
        for attempts in 1..=8 {
            let full = BASE * (1 << (attempts - 1));
            for _ in 0..50 {
                let d = delay(attempts, BASE, CAP, None);
                assert!(d >= full / 2 && d <= full, "attempt {attempts}: {d:?}");
            }
        }
    }

    #[test]
    fn delays_never_exceed_the_cap() {
        assert!(delay(40, BASE, CAP, None) <= CAP);
    }

    #[test]
    fn retry_after_is_a_floor() {
        let d = delay(1, BASE, CAP, Some(Duration::from_secs(7)));
        assert!(d >= Duration::from_secs(7));
        assert!(delay(1, BASE, CAP, Some(Duration::from_secs(86_400))) <= CAP);
    }
}
