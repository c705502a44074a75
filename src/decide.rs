//! The decision "request a token now, or wait until when" as a pure function of what was observed
//! and the clock.

use std::time::Duration;

use jiff::Timestamp;

use crate::schedule::{self, RenewPlan};
use crate::secret::Observed;
use crate::token::IssuedToken;

/// The last failed attempt to get a token for one object, kept until an attempt succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Failures in a row.
    pub attempts: u32,
    pub at: Timestamp,
    /// Not before this time is the same request tried again.
    pub retry_at: Timestamp,
    /// The request inputs that failed; new inputs (a fixed spec, a rotated client secret) are
    /// tried at once.
    pub inputs: Option<String>,
    /// The condition reason, a name from [`crate::status::reason`].
    pub reason: &'static str,
    /// What went wrong and what to fix; never contains a secret.
    pub message: String,
}

/// Why a new token is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchReason {
    /// There is no token Secret yet (or it was deleted).
    NoToken,
    /// The token Secret was edited: its token no longer matches what the operator wrote.
    Damaged,
    /// The spec or the client Secret changed since the token was issued.
    InputsChanged,
    /// The renewal time has come.
    Due,
}

impl FetchReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoToken => "no token yet",
            Self::Damaged => "token Secret was edited",
            Self::InputsChanged => "spec or client secret changed",
            Self::Due => "renewal due",
        }
    }
}

/// What the reconciler does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The Secret with the target name belongs to someone else: touch nothing.
    Conflict,
    /// Request a token now.
    Fetch(FetchReason),
    /// Keep the current token (if any) and look again at `until`.
    Wait { until: Timestamp },
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub now: Timestamp,
    pub observed: &'a Observed,
    /// Digest of the current request inputs; `None` when the client secret cannot be read.
    pub inputs: Option<&'a str>,
    pub renew_before: Option<Duration>,
    pub failure: Option<&'a Failure>,
    /// Seed of the renewal jitter (the object's uid), stable across restarts.
    pub jitter_seed: &'a str,
}

/// The renewal plan of a token; the jitter comes from `jitter_seed` and the expiry, so the same
/// token always gets the same plan (a restart plans the same time).
pub fn plan_for(token: &IssuedToken, renew_before: Option<Duration>, jitter_seed: &str) -> RenewPlan {
    let jitter = schedule::jitter_from(&format!("{jitter_seed}/{}", token.expires_at));
    schedule::plan_renewal(token.issued_at, token.expires_at, renew_before, jitter)
}

/// The renewal plan for the token an object holds.
fn renewal(observed: &Observed, renew_before: Option<Duration>, jitter_seed: &str) -> Option<RenewPlan> {
    let Observed::Held(held) = observed else { return None };
    Some(plan_for(&held.token, renew_before, jitter_seed))
}

/// Decides whether to request a token now.
pub fn decide(i: Inputs<'_>) -> Decision {
    let plan = renewal(i.observed, i.renew_before, i.jitter_seed);
    let want = match i.observed {
        Observed::Foreign => return Decision::Conflict,
        Observed::Missing => Some(FetchReason::NoToken),
        Observed::Damaged => Some(FetchReason::Damaged),
        Observed::Held(held) => {
            let renew_at = plan.map(|p| p.renew_at).unwrap_or(i.now);
            if i.inputs.is_some() && held.inputs.as_deref() != i.inputs {
                Some(FetchReason::InputsChanged)
            } else if i.now >= renew_at {
                Some(FetchReason::Due)
            } else {
                return Decision::Wait { until: renew_at };
            }
        }
    };
    let expires_at = match i.observed {
        Observed::Held(held) => Some(held.token.expires_at),
        _ => None,
    };
    match (want, i.failure) {
        (Some(_), Some(f)) if f.inputs.as_deref() == i.inputs && i.now < f.retry_at => {
            // Back off, but look again when the token expires so that Ready turns False on time.
            let until = match expires_at {
                Some(e) if e > i.now => f.retry_at.min(e),
                _ => f.retry_at,
            };
            Decision::Wait { until }
        }
        (Some(reason), _) => Decision::Fetch(reason),
        (None, _) => Decision::Wait { until: i.now },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::HeldToken;
    use crate::secret::tests::token;

    const T0: i64 = 1_700_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(T0 + s).unwrap()
    }

    fn held(issued: i64, expires: i64, inputs: &str) -> Observed {
        Observed::Held(HeldToken { token: token(T0 + issued, T0 + expires), inputs: Some(inputs.to_owned()) })
    }

    fn decide_at(now: i64, observed: &Observed, inputs: Option<&str>, failure: Option<&Failure>) -> Decision {
        decide(Inputs { now: at(now), observed, inputs, renew_before: None, failure, jitter_seed: "uid" })
    }

    fn failure(at_s: i64, retry: i64, inputs: Option<&str>) -> Failure {
        Failure {
            attempts: 1,
            at: at(at_s),
            retry_at: at(retry),
            inputs: inputs.map(str::to_owned),
            reason: "KeycloakUnavailable",
            message: "down".into(),
        }
    }

    #[test]
    fn waits_while_the_token_is_not_due() {
        let obs = held(0, 300, "in");
        let Decision::Wait { until } = decide_at(10, &obs, Some("in"), None) else { panic!() };
        // Renewal with a third of the lifetime left, minus at most 10 s of jitter.
        assert!(until <= at(200) && until >= at(190), "{until}");
    }

    #[test]
    fn restart_with_a_valid_token_requests_nothing() {
        // The same observation read back after a restart plans the same renewal time.
        let obs = held(0, 300, "in");
        assert_eq!(decide_at(1, &obs, Some("in"), None), decide_at(150, &obs, Some("in"), None));
    }

    #[test]
    fn fetches_when_due() {
        assert_eq!(decide_at(200, &held(0, 300, "in"), Some("in"), None), Decision::Fetch(FetchReason::Due));
        assert_eq!(decide_at(400, &held(0, 300, "in"), Some("in"), None), Decision::Fetch(FetchReason::Due));
    }

    #[test]
    fn fetches_when_missing_damaged_or_inputs_changed() {
        assert_eq!(decide_at(0, &Observed::Missing, Some("in"), None), Decision::Fetch(FetchReason::NoToken));
        assert_eq!(decide_at(0, &Observed::Damaged, Some("in"), None), Decision::Fetch(FetchReason::Damaged));
        assert_eq!(decide_at(10, &held(0, 300, "old"), Some("new"), None), Decision::Fetch(FetchReason::InputsChanged));
    }

    #[test]
    fn unreadable_client_secret_does_not_replace_a_valid_token() {
        assert!(matches!(decide_at(10, &held(0, 300, "old"), None, None), Decision::Wait { .. }));
    }

    #[test]
    fn a_foreign_secret_is_a_conflict() {
        assert_eq!(decide_at(0, &Observed::Foreign, Some("in"), None), Decision::Conflict);
    }

    #[test]
    fn backs_off_after_a_failure_with_the_same_inputs() {
        let f = failure(200, 210, Some("in"));
        assert_eq!(decide_at(205, &held(0, 300, "in"), Some("in"), Some(&f)), Decision::Wait { until: at(210) });
        assert_eq!(decide_at(210, &held(0, 300, "in"), Some("in"), Some(&f)), Decision::Fetch(FetchReason::Due));
    }

    #[test]
    fn new_inputs_skip_the_backoff() {
        let f = failure(200, 260, Some("bad-secret"));
        assert_eq!(
            decide_at(205, &held(0, 300, "bad-secret"), Some("rotated"), Some(&f)),
            Decision::Fetch(FetchReason::InputsChanged)
        );
        let f = failure(0, 60, None);
        assert_eq!(
            decide_at(5, &Observed::Missing, Some("now-readable"), Some(&f)),
            Decision::Fetch(FetchReason::NoToken)
        );
    }

    #[test]
    fn backoff_wakes_up_at_expiry_to_report_it() {
        let f = failure(290, 330, Some("in"));
        assert_eq!(decide_at(295, &held(0, 300, "in"), Some("in"), Some(&f)), Decision::Wait { until: at(300) });
    }

    #[test]
    fn renew_before_longer_than_lifetime_uses_half() {
        let obs = held(0, 300, "in");
        let d = decide(Inputs {
            now: at(10),
            observed: &obs,
            inputs: Some("in"),
            renew_before: Some(Duration::from_secs(600)),
            failure: None,
            jitter_seed: "uid",
        });
        let Decision::Wait { until } = d else { panic!() };
        assert!(until <= at(150) && until >= at(140), "{until}");
    }
}
