//! Stage 2 of a reconcile, pure: "request a token now, or wait until when", and what follows a
//! request's outcome (the failure to record, when to look again), as functions of what was read
//! and the clock.

use jiff::{SignedDuration, Timestamp};

use crate::failure::Problem;
use crate::keycloak::token::TokenFacts;
use crate::reconcile::schedule::{self, RenewBefore, RenewPlan};
use crate::secret::Observed;

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
    /// The condition reason, a name from [`crate::failure::reason`].
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
    pub renew_before: RenewBefore,
    pub failure: Option<&'a Failure>,
    /// Seed of the renewal jitter (the object's uid), stable across restarts.
    pub jitter_seed: &'a str,
}

/// The renewal plan of a token; the jitter comes from `jitter_seed` and the expiry, so the same
/// token always gets the same plan (a restart plans the same time).
pub fn plan_for(token: &TokenFacts, renew_before: RenewBefore, jitter_seed: &str) -> RenewPlan {
    let jitter = schedule::jitter_from(&format!("{jitter_seed}/{}", token.expires_at));
    schedule::plan_renewal(token.issued_at, token.expires_at, renew_before, jitter)
}

/// The renewal plan for the token an object holds.
fn renewal(observed: &Observed, renew_before: RenewBefore, jitter_seed: &str) -> Option<RenewPlan> {
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

/// When a request decided now was meant to go: the renewal time of a due token, the retry time
/// after a failure, else now. The renewal lag is counted from here.
pub fn due_at(i: &Inputs<'_>, reason: FetchReason) -> Timestamp {
    if let Some(f) = i.failure.filter(|f| f.inputs.as_deref() == i.inputs) {
        return f.retry_at.min(i.now);
    }
    match (reason, renewal(i.observed, i.renew_before, i.jitter_seed)) {
        (FetchReason::Due, Some(plan)) => plan.renew_at.min(i.now),
        _ => i.now,
    }
}

/// What follows the outcome of a token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterAttempt {
    /// The token the Secret holds now.
    pub held: Option<TokenFacts>,
    /// The failure to remember; `None` after a success.
    pub failure: Option<Failure>,
    /// When to look again: the renewal of the new token, or the retry.
    pub next: Timestamp,
}

/// What follows an attempt that gave `outcome`, decided with `i`; `jitter` in `[0, 1)` spreads
/// the retries.
pub fn after_attempt(i: &Inputs<'_>, outcome: Result<&TokenFacts, &Problem>, jitter: f64) -> AfterAttempt {
    let (now, renew_before, jitter_seed, inputs) = (i.now, i.renew_before, i.jitter_seed, i.inputs);
    let previous = match i.observed {
        Observed::Held(h) => Some(&h.token),
        _ => None,
    };
    // A failure recorded for other inputs does not count: these inputs are tried for the first time.
    let failure = i.failure.filter(|f| f.inputs.as_deref() == inputs);
    match outcome {
        Ok(token) => AfterAttempt {
            held: Some(token.clone()),
            failure: None,
            next: plan_for(token, renew_before, jitter_seed).renew_at,
        },
        Err(problem) => {
            let attempts = failure.map(|f| f.attempts).unwrap_or(0).saturating_add(1);
            let expires_at = previous.map(|t| t.expires_at);
            let mut retry_at = schedule::retry_at(now, attempts, problem.transient, expires_at, jitter);
            let (mut reason, mut message) = (problem.reason, problem.message.clone());
            // A server that says when to come back is believed, but never so far that the token
            // held would expire without one more attempt (one failed attempt before expiry): a
            // gateway that limits one client must not let its token lapse silently.
            if let Some(wait) = problem.retry_after.and_then(|d| SignedDuration::try_from(d).ok()) {
                let asked = now + wait;
                let latest = expires_at.filter(|e| *e > now).map(|e| e - signed(renew_before.failed_attempt));
                match latest {
                    Some(latest) if asked > latest => {
                        retry_at = retry_at.max(latest);
                        reason = crate::failure::reason::RATE_LIMITED_PAST_EXPIRY;
                        message = format!(
                            "{message}; waiting that long would let the token in the Secret expire at {} without \
                             a successor, so the operator asks again at {}: ask the Keycloak administrators to \
                             raise this client's limit",
                            crate::secret::rfc3339(expires_at.unwrap_or(now)),
                            crate::secret::rfc3339(retry_at),
                        );
                    }
                    _ => retry_at = retry_at.max(asked),
                }
            }
            let next = match expires_at {
                Some(e) if e > now => retry_at.min(e),
                _ => retry_at,
            };
            AfterAttempt {
                held: previous.cloned(),
                failure: Some(Failure {
                    attempts,
                    at: now,
                    retry_at,
                    inputs: inputs.map(str::to_owned),
                    reason,
                    message,
                }),
                next,
            }
        }
    }
}

fn signed(d: std::time::Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::reason;
    use crate::secret::HeldToken;
    use crate::secret::tests::facts as token;
    use std::time::Duration;

    const T0: i64 = 1_700_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(T0 + s).unwrap()
    }

    fn held(issued: i64, expires: i64, inputs: &str) -> Observed {
        Observed::Held(HeldToken { token: token(T0 + issued, T0 + expires), inputs: Some(inputs.to_owned()) })
    }

    fn decide_at(now: i64, observed: &Observed, inputs: Option<&str>, failure: Option<&Failure>) -> Decision {
        decide(Inputs {
            now: at(now),
            observed,
            inputs,
            renew_before: RenewBefore::default(),
            failure,
            jitter_seed: "uid",
        })
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
    fn a_success_plans_the_renewal_and_clears_the_failure() {
        let t = token(T0, T0 + 300);
        let f = failure(100, 110, Some("in"));
        let i = Inputs {
            now: at(0),
            observed: &Observed::Missing,
            inputs: Some("in"),
            renew_before: RenewBefore::default(),
            failure: Some(&f),
            jitter_seed: "uid",
        };
        let a = after_attempt(&i, Ok(&t), 0.5);
        assert_eq!(a.failure, None);
        assert_eq!(a.next, plan_for(&t, RenewBefore::default(), "uid").renew_at);
        // The plan right after the request is the one read back from the Secret later: no second
        // status write for a moved renewAt.
        let Decision::Wait { until } = decide_at(1, &held(0, 300, "in"), Some("in"), None) else { panic!() };
        assert_eq!(until, a.next);
    }

    #[test]
    fn a_failure_counts_attempts_keeps_the_token_and_retries_before_expiry() {
        let t = token(T0, T0 + 300);
        let p = Problem::transient(reason::KEYCLOAK_UNAVAILABLE, "down");
        let f = failure(190, 195, Some("in"));
        let obs = held(0, 300, "in");
        let i = Inputs {
            now: at(290),
            observed: &obs,
            inputs: Some("in"),
            renew_before: RenewBefore::default(),
            failure: Some(&f),
            jitter_seed: "uid",
        };
        let a = after_attempt(&i, Err(&p), 0.0);
        let nf = a.failure.unwrap();
        assert_eq!((nf.attempts, nf.reason), (2, reason::KEYCLOAK_UNAVAILABLE));
        assert_eq!(a.held, Some(t));
        assert!(a.next <= at(300), "{}", a.next);
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut p = Problem::transient(reason::RATE_LIMITED, "slow down");
        p.retry_after = Some(Duration::from_secs(45));
        let i = Inputs {
            now: at(0),
            observed: &Observed::Missing,
            inputs: Some("in"),
            renew_before: RenewBefore::default(),
            failure: None,
            jitter_seed: "uid",
        };
        let a = after_attempt(&i, Err(&p), 0.0);
        assert_eq!(a.failure.unwrap().retry_at, at(45));
    }

    #[test]
    fn a_retry_after_that_would_let_the_token_lapse_is_not_obeyed_and_says_so() {
        let mut p = Problem::transient(reason::RATE_LIMITED, "Keycloak is rate limiting");
        p.retry_after = Some(Duration::from_secs(150));
        let obs = held(0, 300, "in");
        let i = Inputs {
            now: at(170),
            observed: &obs,
            inputs: Some("in"),
            renew_before: RenewBefore::default(),
            failure: None,
            jitter_seed: "uid",
        };
        let a = after_attempt(&i, Err(&p), 0.0);
        let f = a.failure.unwrap();
        // The token expires at 300; one failed attempt takes 17 s: asked again at 283, not 320.
        assert_eq!(f.retry_at, at(300) - signed(RenewBefore::default().failed_attempt));
        assert_eq!(f.reason, reason::RATE_LIMITED_PAST_EXPIRY);
        assert!(f.message.contains("without a successor"), "{}", f.message);
        // A wait that leaves time is obeyed as asked.
        p.retry_after = Some(Duration::from_secs(60));
        let f = after_attempt(&i, Err(&p), 0.0).failure.unwrap();
        assert_eq!((f.retry_at, f.reason), (at(230), reason::RATE_LIMITED));
    }

    #[test]
    fn lag_counts_from_the_renewal_or_retry_time() {
        let obs = held(0, 300, "in");
        let plan = plan_for(&token(T0, T0 + 300), RenewBefore::default(), "uid");
        let i = Inputs {
            now: at(250),
            observed: &obs,
            inputs: Some("in"),
            renew_before: RenewBefore::default(),
            failure: None,
            jitter_seed: "uid",
        };
        assert_eq!(due_at(&i, FetchReason::Due), plan.renew_at);
        let f = failure(220, 230, Some("in"));
        let i = Inputs { failure: Some(&f), ..i };
        assert_eq!(due_at(&i, FetchReason::Due), at(230));
        let i = Inputs {
            now: at(5),
            observed: &Observed::Missing,
            inputs: Some("in"),
            renew_before: RenewBefore::default(),
            failure: None,
            jitter_seed: "uid",
        };
        assert_eq!(due_at(&i, FetchReason::NoToken), at(5));
    }

    #[test]
    fn renew_before_longer_than_lifetime_keeps_the_minimum_interval() {
        let obs = held(0, 300, "in");
        let d = decide(Inputs {
            now: at(10),
            observed: &obs,
            inputs: Some("in"),
            renew_before: RenewBefore::requested(Some(Duration::from_secs(600))),
            failure: None,
            jitter_seed: "uid",
        });
        let Decision::Wait { until } = d else { panic!() };
        assert_eq!(until, at(75));
    }
}
