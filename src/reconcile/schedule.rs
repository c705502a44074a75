//! Refresh timing as pure functions of the token's times and the clock: when to renew, how long to
//! back off after a failure.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// Share of the lifetime renewed ahead by default, at least (see [`RenewBefore`]).
pub const DEFAULT_RENEW_FRACTION: f64 = 1.0 / 3.0;
/// Validity a pod mounting the Secret should still have when it sees the next token, in the
/// kubelet's worst case after one failed token request: the default `renewBefore` aims for it.
pub const POD_MARGIN: Duration = Duration::from_secs(60);
/// A token is renewed no sooner than this share of its lifetime after it was issued...
pub const MIN_RENEW_INTERVAL_FRACTION: f64 = 0.25;
/// ...and no sooner than this (capped at half the lifetime), so that no `renewBefore` makes an
/// object ask Keycloak every second: a `renewBefore` leaving less is reduced to leave this much.
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// The longest a pod's mounted Secret shows an old value after an update by default: the
/// kubelet resyncs each pod every 1 to 1.5 times its `syncFrequency` (60 s by default).
pub const DEFAULT_MOUNT_DELAY: Duration = Duration::from_secs(90);
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
    /// The requested `renewBefore` left less than the minimum interval between renewals: the
    /// longest renew-before that leaves it is used instead.
    pub fell_back: bool,
    /// The token's lifetime.
    pub lifetime: SignedDuration,
}

/// How early tokens are renewed: the object's `renewBefore`, or else the default.
///
/// The default is a third of the lifetime, or longer when that is what it takes for a pod that
/// mounts the Secret to keep [`POD_MARGIN`] of validity: `mount_delay` (the longest the kubelet
/// takes to show an update in a volume, measured at 1 to 1.5 times its sync period) plus one
/// failed request (`failed_attempt`) plus the margin. For 300 s tokens and the defaults
/// (90 s, 15 s request timeout plus 2 s backoff) that is 167 s. When even the longest
/// renew-before the minimum interval allows is shorter than `mount_delay`, volumes cannot be
/// served anyway (`RenewBeforeTooShort` says so) and the default stays a third.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RenewBefore {
    /// The object's `spec.renewBefore`.
    pub requested: Option<Duration>,
    /// `--kubelet-sync-period`; zero: no pod reads tokens from a volume, the default is a third.
    pub mount_delay: Duration,
    /// How long one failed token request and its retry delay take.
    pub failed_attempt: Duration,
}

impl RenewBefore {
    /// `requested`, or a third of the lifetime.
    pub fn requested(requested: Option<Duration>) -> Self {
        Self { requested, ..Self::default() }
    }

    /// The default renew-before of a token of `lifetime`, of which at most `longest` may be
    /// renewed ahead.
    fn default_for(&self, lifetime: SignedDuration, longest: SignedDuration) -> SignedDuration {
        let third = lifetime.mul_f64(DEFAULT_RENEW_FRACTION);
        let signed = |d: Duration| SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
        let mount = signed(self.mount_delay);
        if mount.is_zero() || longest < mount {
            return third;
        }
        let target = mount.saturating_add(signed(self.failed_attempt)).saturating_add(signed(POD_MARGIN));
        third.max(target.min(longest))
    }
}

/// The shortest interval between a token's issue and its renewal.
pub fn min_renew_interval(lifetime: SignedDuration) -> SignedDuration {
    let floor = SignedDuration::try_from(MIN_RENEW_INTERVAL).unwrap_or(SignedDuration::ZERO);
    lifetime.mul_f64(MIN_RENEW_INTERVAL_FRACTION).max(floor).min(lifetime / 2)
}

/// Plans the renewal of a token issued at `issued_at` that expires at `expires_at`.
///
/// `jitter` in `[0, 1)` picks the point inside the jitter window; it only ever makes the renewal
/// earlier, so a mounted token always keeps at least `renew_before` of validity.
pub fn plan_renewal(issued_at: Timestamp, expires_at: Timestamp, renew_before: RenewBefore, jitter: f64) -> RenewPlan {
    let lifetime = expires_at.duration_since(issued_at);
    if lifetime <= SignedDuration::ZERO {
        return RenewPlan { renew_at: issued_at, renew_before: SignedDuration::ZERO, fell_back: false, lifetime };
    }
    let min_interval = min_renew_interval(lifetime);
    let longest = lifetime - min_interval;
    let (before, fell_back) = match renew_before.requested.and_then(|d| SignedDuration::try_from(d).ok()) {
        Some(d) if d <= longest => (d, false),
        Some(_) => (longest, true),
        None => (renew_before.default_for(lifetime, longest), false),
    };
    let window =
        lifetime.mul_f64(MAX_JITTER_FRACTION).min(SignedDuration::try_from(MAX_JITTER).unwrap_or(SignedDuration::ZERO));
    // Jitter never shortens the interval since the issue below the minimum.
    let room = (lifetime - before - min_interval).max(SignedDuration::ZERO);
    let jitter = window.mul_f64(jitter.clamp(0.0, 1.0)).min(room);
    RenewPlan { renew_at: expires_at - before - jitter, renew_before: before, fell_back, lifetime }
}

/// What is wrong with a renewal plan, if anything, as a reason and a message: `renewBefore` had
/// to be reduced, or the validity left at renewal is shorter than `mount_delay` (pods reading the
/// token from a volume may read an expired one). `mount_delay` zero checks only the former.
pub fn timing_warning(
    plan: &RenewPlan,
    requested: Option<Duration>,
    mount_delay: Duration,
) -> Option<(&'static str, String)> {
    use crate::failure::reason;
    let secs = |d: SignedDuration| d.as_secs_f64().round() as i64;
    let slack = secs(plan.renew_before);
    let mount = mount_delay.as_secs_f64().round() as i64;
    let short = !mount_delay.is_zero() && plan.renew_before < SignedDuration::try_from(mount_delay).unwrap_or_default();
    let advice = |m: &mut String| {
        if short {
            m.push_str(&format!(
                "; a pod that mounts the Secret sees a new token up to {mount}s after it is written (the kubelet \
                 resyncs each pod within 1.5 times its sync period), so pods reading it from a volume may read an \
                 expired token: ask Keycloak for tokens that live at least {}s (the client's Access Token Lifespan) \
                 and leave spec.renewBefore unset (the default then leaves pods a margin) or set it above {mount}s, \
                 or read the Secret through the Kubernetes API",
                mount * 4 / 3 + 1
            ));
        }
    };
    if plan.fell_back {
        let requested = requested.map(|d| d.as_secs()).unwrap_or_default();
        let mut m = format!(
            "spec.renewBefore {requested}s leaves less than {}s between a token's issue and its renewal (the \
             minimum: a quarter of the {}s lifetime, at least 5s), so tokens are renewed {slack}s before they expire \
             instead",
            secs(min_renew_interval(plan.lifetime)),
            secs(plan.lifetime)
        );
        advice(&mut m);
        return Some((reason::RENEW_BEFORE_ADJUSTED, m));
    }
    if short {
        let mut m = format!("tokens are renewed {slack}s before they expire (of a {}s lifetime)", secs(plan.lifetime));
        advice(&mut m);
        return Some((reason::RENEW_BEFORE_TOO_SHORT, m));
    }
    None
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

/// Pods named at most in a [`read_once_warning`]; the rest are counted.
const MAX_PODS_NAMED: usize = 3;

/// The warning for running pods that read the token in a way that never sees a new one (an
/// environment variable, a subPath mount) of the token's access_token or authorization key, or
/// all its keys; `None` when there are none. `readers`: (pod, container, key, how), sorted.
pub fn read_once_warning(
    secret: &str,
    readers: &[(String, String, Option<String>, &'static str)],
    lifetime: Option<SignedDuration>,
) -> Option<(&'static str, String)> {
    use crate::secret::{KEY_ACCESS_TOKEN, KEY_AUTHORIZATION};
    let token_key = |k: &Option<String>| {
        k.as_deref().is_none_or(|k| {
            k.trim_start_matches("./") == KEY_ACCESS_TOKEN || k.trim_start_matches("./") == KEY_AUTHORIZATION
        })
    };
    let relevant: Vec<_> = readers.iter().filter(|(_, _, key, _)| token_key(key)).collect();
    let (pod, container, key, how) = relevant.first()?;
    let safe = |s: &str| crate::text::foreign(s, 253);
    let what = match key {
        Some(k) => format!("key {}", safe(k)),
        None => "keys".to_owned(),
    };
    let life = lifetime.map(|l| format!(" ({}s after it was issued)", l.as_secs())).unwrap_or_default();
    let mut m = format!(
        "pod {} (container {}) reads the token Secret {secret}'s {what} through {how}: it never sees a renewed \
         token and its calls fail once the token it read expires{life}; mount the Secret as a volume without \
         subPath and read the file each time it calls",
        safe(pod),
        safe(container),
    );
    let others: std::collections::BTreeSet<&str> =
        relevant.iter().skip(1).map(|(p, ..)| p.as_str()).filter(|p| p != pod).collect();
    if !others.is_empty() {
        let named: Vec<String> = others.iter().take(MAX_PODS_NAMED).map(|p| safe(p)).collect();
        m.push_str(&format!("; so do pods {}", named.join(", ")));
        if others.len() > MAX_PODS_NAMED {
            m.push_str(&format!(" and {} more", others.len() - MAX_PODS_NAMED));
        }
    }
    Some((crate::failure::reason::TOKEN_READ_ONCE, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn default_renews_with_a_third_of_the_lifetime_left() {
        let p = plan_renewal(t(0), t(300), RenewBefore::default(), 0.0);
        assert_eq!(p.renew_at, t(200));
        assert_eq!(p.renew_before, SignedDuration::from_secs(100));
        assert!(!p.fell_back);
    }

    /// The operator's defaults: the kubelet's worst case 90 s, a 15 s request timeout and the
    /// 2 s first backoff.
    fn for_volumes(requested: Option<Duration>) -> RenewBefore {
        RenewBefore {
            requested,
            mount_delay: Duration::from_secs(90),
            failed_attempt: Duration::from_secs(15) + INITIAL_BACKOFF,
        }
    }

    #[test]
    fn default_leaves_a_pod_a_minute_after_the_kubelets_worst_case_and_one_failure() {
        // 300 s tokens: 90 + 17 + 60 = 167 s ahead, more than a third.
        let p = plan_renewal(t(0), t(300), for_volumes(None), 0.0);
        assert_eq!(p.renew_before, SignedDuration::from_secs(167));
        assert_eq!(p.renew_at, t(133));
        assert!(!p.fell_back);
        // Long tokens: a third is more than enough.
        assert_eq!(plan_renewal(t(0), t(900), for_volumes(None), 0.0).renew_before, SignedDuration::from_secs(300));
        // 180 s tokens: the target does not fit; as much as the minimum interval (45 s) allows.
        assert_eq!(plan_renewal(t(0), t(180), for_volumes(None), 0.0).renew_before, SignedDuration::from_secs(135));
        // Too short for volumes at all (75 s < 90 s even at the minimum interval): a third.
        assert_eq!(plan_renewal(t(0), t(100), for_volumes(None), 0.0).renew_before.as_secs(), 33);
        assert_eq!(plan_renewal(t(0), t(20), for_volumes(None), 0.0).renew_before.as_secs(), 6);
        // No volumes to cover (--kubelet-sync-period=0s): a third.
        let none = RenewBefore { mount_delay: Duration::ZERO, ..for_volumes(None) };
        assert_eq!(plan_renewal(t(0), t(300), none, 0.0).renew_before, SignedDuration::from_secs(100));
        // An explicit renewBefore wins.
        let explicit = plan_renewal(t(0), t(300), for_volumes(Some(Duration::from_secs(100))), 0.0);
        assert_eq!(explicit.renew_before, SignedDuration::from_secs(100));
    }

    #[test]
    fn explicit_renew_before_is_honoured() {
        let p = plan_renewal(t(0), t(300), RenewBefore::requested(Some(Duration::from_secs(60))), 0.0);
        assert_eq!(p.renew_at, t(240));
    }

    #[test]
    fn renewals_keep_a_minimum_interval() {
        // Just under the lifetime: renewed a quarter of the lifetime after issue, not every second.
        let p = plan_renewal(t(0), t(300), RenewBefore::requested(Some(Duration::from_secs(299))), 0.9);
        assert_eq!(p.renew_at, t(75));
        assert!(p.fell_back);
        // A 12 s token: at least 5 s between issue and renewal.
        let p = plan_renewal(t(0), t(12), RenewBefore::requested(Some(Duration::from_secs(11))), 0.0);
        assert_eq!(p.renew_at, t(5));
        // A 6 s token: half its lifetime.
        let p = plan_renewal(t(0), t(6), RenewBefore::requested(Some(Duration::from_secs(6))), 0.0);
        assert_eq!(p.renew_at, t(3));
        // Within the limit: as asked.
        let p = plan_renewal(t(0), t(300), RenewBefore::requested(Some(Duration::from_secs(225))), 0.0);
        assert_eq!((p.renew_at, p.fell_back), (t(75), false));
    }

    #[test]
    fn timing_warnings_name_the_fix() {
        let mount = DEFAULT_MOUNT_DELAY;
        let ok = plan_renewal(t(0), t(300), RenewBefore::default(), 0.0);
        assert_eq!(timing_warning(&ok, None, mount), None);
        let short = plan_renewal(t(0), t(20), RenewBefore::requested(Some(Duration::from_secs(8))), 0.0);
        let (why, m) = timing_warning(&short, Some(Duration::from_secs(8)), mount).unwrap();
        assert_eq!(why, crate::failure::reason::RENEW_BEFORE_TOO_SHORT);
        assert!(m.contains("renewed 8s before") && m.contains("90s") && m.contains("at least 121s"), "{m}");
        assert_eq!(timing_warning(&short, Some(Duration::from_secs(8)), Duration::ZERO), None, "0 turns it off");
        let adjusted = plan_renewal(t(0), t(300), RenewBefore::requested(Some(Duration::from_secs(600))), 0.0);
        let (why, m) = timing_warning(&adjusted, Some(Duration::from_secs(600)), mount).unwrap();
        assert_eq!(why, crate::failure::reason::RENEW_BEFORE_ADJUSTED);
        assert!(m.contains("spec.renewBefore 600s") && m.contains("renewed 225s before"), "{m}");
    }

    #[test]
    fn renew_before_not_shorter_than_lifetime_falls_back_to_the_minimum_interval() {
        for rb in [300, 301, 10_000] {
            let p = plan_renewal(t(0), t(300), RenewBefore::requested(Some(Duration::from_secs(rb))), 0.0);
            assert_eq!(p.renew_at, t(75), "renewBefore {rb}s");
            assert!(p.fell_back);
        }
    }

    #[test]
    fn jitter_only_makes_renewal_earlier_and_is_bounded() {
        for j in [0.0, 0.25, 0.5, 0.999_999, 1.0, 7.0, -3.0] {
            let p = plan_renewal(t(0), t(300), RenewBefore::default(), j);
            assert!(p.renew_at <= t(200), "jitter {j}");
            // 5% of 300 s is 15 s, capped at 10 s.
            assert!(p.renew_at >= t(190), "jitter {j}: {}", p.renew_at);
        }
        let short = plan_renewal(t(0), t(20), RenewBefore::default(), 0.999);
        assert!(short.renew_at >= t(20 - 7 - 1) && short.renew_at <= t(14), "{short:?}");
    }

    #[test]
    fn an_already_expired_lifetime_renews_at_once() {
        assert_eq!(plan_renewal(t(10), t(10), RenewBefore::default(), 0.5).renew_at, t(10));
        assert_eq!(plan_renewal(t(10), t(5), RenewBefore::default(), 0.5).renew_at, t(10));
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

    #[test]
    fn a_pod_reading_the_token_once_is_named_with_what_to_do() {
        let r = |pod: &str, key: Option<&str>, how| (pod.to_owned(), "app".to_owned(), key.map(str::to_owned), how);
        let env = "an environment variable (env[].valueFrom.secretKeyRef)";
        assert_eq!(read_once_warning("t", &[r("p", Some("registry_url"), env)], None), None, "not the token");
        let (why, m) = read_once_warning(
            "ra-token",
            &[r("p", Some("access_token"), env), r("q", None, "x"), r("q", Some("authorization"), "y")],
            Some(SignedDuration::from_secs(300)),
        )
        .expect("a warning");
        assert_eq!(why, crate::failure::reason::TOKEN_READ_ONCE);
        assert!(m.contains("pod p (container app)") && m.contains("key access_token") && m.contains(env), "{m}");
        assert!(m.contains("300s after it was issued") && m.contains("without subPath"), "{m}");
        assert!(m.contains("so do pods q") && !m.contains("q, q"), "{m}");
    }
}
