//! Refresh timing as pure functions of the token's times and the clock: when to renew, how long to
//! back off after a failure.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// Share of the lifetime renewed ahead by default: a Secret mounted as a volume reaches the pod
/// within the kubelet's sync period (60-90 s), so a 300 s token needs ~100 s of slack.
pub const DEFAULT_RENEW_FRACTION: f64 = 1.0 / 3.0;
/// Share of the lifetime used when `renewBefore` is not shorter than the lifetime.
pub const FALLBACK_RENEW_FRACTION: f64 = 0.5;
/// Jitter makes a renewal earlier by up to this share of the lifetime...
pub const MAX_JITTER_FRACTION: f64 = 0.05;
/// ...and by no more than this, so objects created together spread out without renewing much
/// earlier than asked.
pub const MAX_JITTER: Duration = Duration::from_secs(10);
/// First retry delay after a failed token request.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(2);
/// Longest retry delay after an error that needs someone to fix something (wrong secret, bad
/// realm); short, because a 300 s token leaves little room.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest retry delay while Keycloak is unreachable or failing: the token is recovered within
/// seconds of Keycloak's return, and a connection refused costs Keycloak nothing.
pub const MAX_TRANSIENT_BACKOFF: Duration = Duration::from_secs(10);
/// Shortest retry delay, also while a token is about to expire.
pub const MIN_RETRY: Duration = Duration::from_secs(1);

/// When a token is to be renewed, and how that was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewPlan {
    pub renew_at: Timestamp,
    /// The renew-before interval in effect (before jitter).
    pub renew_before: SignedDuration,
    /// The requested `renewBefore` was not shorter than the lifetime: half the lifetime is used.
    pub fell_back: bool,
}

/// Plans the renewal of a token issued at `issued_at` that expires at `expires_at`.
///
/// `jitter` in `[0, 1)` picks the point inside the jitter window; it only ever makes the renewal
/// earlier, so a mounted token always keeps at least `renew_before` of validity.
pub fn plan_renewal(
    issued_at: Timestamp,
    expires_at: Timestamp,
    renew_before: Option<Duration>,
    jitter: f64,
) -> RenewPlan {
    let lifetime = expires_at.duration_since(issued_at);
    if lifetime <= SignedDuration::ZERO {
        return RenewPlan { renew_at: issued_at, renew_before: SignedDuration::ZERO, fell_back: false };
    }
    let (before, fell_back) = match renew_before.and_then(|d| SignedDuration::try_from(d).ok()) {
        Some(d) if d < lifetime => (d, false),
        Some(_) => (lifetime.mul_f64(FALLBACK_RENEW_FRACTION), true),
        None => (lifetime.mul_f64(DEFAULT_RENEW_FRACTION), false),
    };
    let window =
        lifetime.mul_f64(MAX_JITTER_FRACTION).min(SignedDuration::try_from(MAX_JITTER).unwrap_or(SignedDuration::ZERO));
    // Jitter never moves the renewal before the issue time.
    let jitter = window.mul_f64(jitter.clamp(0.0, 1.0)).min(lifetime - before);
    RenewPlan { renew_at: expires_at - before - jitter, renew_before: before, fell_back }
}

/// When to try again after the `attempts`-th failure in a row at `now`.
///
/// The delay doubles from [`INITIAL_BACKOFF`] up to [`MAX_BACKOFF`] ([`MAX_TRANSIENT_BACKOFF`]
/// when Keycloak is down or failing), reduced by up to half by
/// `jitter` in `[0, 1)`. While the current token is still valid the delay is also at most half of
/// its remaining life, so several retries always happen before it expires.
pub fn retry_at(
    now: Timestamp,
    attempts: u32,
    transient: bool,
    token_expires_at: Option<Timestamp>,
    jitter: f64,
) -> Timestamp {
    let exp = attempts.saturating_sub(1).min(16);
    let cap = if transient { MAX_TRANSIENT_BACKOFF } else { MAX_BACKOFF };
    let base = INITIAL_BACKOFF.saturating_mul(1u32 << exp).min(cap);
    let mut delay = base.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0));
    if let Some(expires_at) = token_expires_at {
        let remaining = expires_at.duration_since(now);
        if remaining > SignedDuration::ZERO {
            let half = Duration::try_from(remaining / 2).unwrap_or(Duration::ZERO);
            delay = delay.min(half);
        }
    }
    let delay = delay.max(MIN_RETRY);
    now + SignedDuration::try_from(delay).unwrap_or(SignedDuration::from_secs(1))
}

/// A stable number in `[0, 1)` derived from `seed`, so that a restart plans the same times.
pub fn jitter_from(seed: &str) -> f64 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(seed.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn default_renews_with_a_third_of_the_lifetime_left() {
        let p = plan_renewal(t(0), t(300), None, 0.0);
        assert_eq!(p.renew_at, t(200));
        assert_eq!(p.renew_before, SignedDuration::from_secs(100));
        assert!(!p.fell_back);
    }

    #[test]
    fn explicit_renew_before_is_honoured() {
        let p = plan_renewal(t(0), t(300), Some(Duration::from_secs(60)), 0.0);
        assert_eq!(p.renew_at, t(240));
    }

    #[test]
    fn renew_before_not_shorter_than_lifetime_falls_back_to_half() {
        for rb in [300, 301, 10_000] {
            let p = plan_renewal(t(0), t(300), Some(Duration::from_secs(rb)), 0.0);
            assert_eq!(p.renew_at, t(150), "renewBefore {rb}s");
            assert!(p.fell_back);
        }
    }

    #[test]
    fn jitter_only_makes_renewal_earlier_and_is_bounded() {
        for j in [0.0, 0.25, 0.5, 0.999_999, 1.0, 7.0, -3.0] {
            let p = plan_renewal(t(0), t(300), None, j);
            assert!(p.renew_at <= t(200), "jitter {j}");
            // 5% of 300 s is 15 s, capped at 10 s.
            assert!(p.renew_at >= t(190), "jitter {j}: {}", p.renew_at);
        }
        let short = plan_renewal(t(0), t(20), None, 0.999);
        assert!(short.renew_at >= t(20 - 7 - 1) && short.renew_at <= t(14), "{short:?}");
    }

    #[test]
    fn an_already_expired_lifetime_renews_at_once() {
        assert_eq!(plan_renewal(t(10), t(10), None, 0.5).renew_at, t(10));
        assert_eq!(plan_renewal(t(10), t(5), None, 0.5).renew_at, t(10));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let d = |n| retry_at(t(0), n, false, None, 0.0).duration_since(t(0)).as_secs();
        assert_eq!([d(1), d(2), d(3), d(4), d(5), d(6), d(7), d(100)], [2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn keycloak_outages_are_retried_at_least_every_ten_seconds() {
        let d = |n| retry_at(t(0), n, true, None, 0.0).duration_since(t(0)).as_secs();
        assert_eq!([d(1), d(2), d(3), d(4), d(50)], [2, 4, 8, 10, 10]);
    }

    #[test]
    fn backoff_jitter_shortens_by_at_most_half() {
        for j in [0.0, 0.3, 0.99] {
            let d = retry_at(t(0), 6, false, None, j).duration_since(t(0));
            assert!(d >= SignedDuration::from_secs(30) && d <= SignedDuration::from_secs(60), "{d:?}");
        }
    }

    #[test]
    fn retries_before_the_current_token_expires() {
        // 40 s left: a 60 s backoff is cut to 20 s, then 10, 5, ... never past the expiry.
        let mut now = t(0);
        let expires = t(40);
        let mut tries = 0;
        while now < expires {
            let next = retry_at(now, 10, false, Some(expires), 0.0);
            assert!(next <= expires || next.duration_since(now) == SignedDuration::from_secs(1), "{now} -> {next}");
            now = next;
            tries += 1;
        }
        assert!(tries >= 5, "only {tries} tries before expiry");
    }

    #[test]
    fn expired_tokens_retry_at_the_normal_backoff() {
        let d = retry_at(t(100), 3, false, Some(t(50)), 0.0).duration_since(t(100));
        assert_eq!(d, SignedDuration::from_secs(8));
    }

    #[test]
    fn jitter_seed_is_stable_and_in_range() {
        assert_eq!(jitter_from("a"), jitter_from("a"));
        assert_ne!(jitter_from("a"), jitter_from("b"));
        for s in ["", "x", "uid-1/2026-01-01T00:00:00Z"] {
            let j = jitter_from(s);
            assert!((0.0..1.0).contains(&j));
        }
    }
}
