//! The RegistryAccess status and its Ready and Degraded conditions, built as a pure function.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::RegistryAccessStatus;
use crate::keycloak::token::TokenFacts;
use crate::reconcile::decide::Failure;
use crate::reconcile::schedule::RenewPlan;
use crate::secret::rfc3339;

/// Condition types.
pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";

pub use crate::failure::reason;

/// What the status is built from.
pub struct StatusInputs<'a> {
    pub now: Timestamp,
    pub generation: Option<i64>,
    pub secret_name: &'a str,
    /// The token the Secret holds now, if any.
    pub token: Option<&'a TokenFacts>,
    pub plan: Option<RenewPlan>,
    pub conflict: bool,
    pub failure: Option<&'a Failure>,
    /// A problem that will make the next refresh fail (e.g. the client Secret is gone) while the
    /// current token is still good: reported as Degraded before it bites.
    pub upcoming: Option<(&'static str, &'a str)>,
    /// A warning about the renewal timing (see [`crate::reconcile::schedule::timing_warning`]): reported as
    /// Degraded while nothing worse is.
    pub timing: Option<(&'static str, &'a str)>,
    /// Realm roles the token must grant (spec.requiredRoles).
    pub required_roles: &'a [String],
    pub previous: Option<&'a RegistryAccessStatus>,
}

/// Builds the status. Conditions keep their lastTransitionTime while their status is unchanged.
pub fn build(i: &StatusInputs<'_>) -> RegistryAccessStatus {
    let previous = i.previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let valid = i.token.filter(|t| t.expires_at > i.now);
    let (ready, ready_reason, ready_message) = if i.conflict {
        (false, reason::SECRET_CONFLICT, conflict_message(i.secret_name))
    } else if let Some((reason, message)) = valid.and_then(|t| roles_problem(i.required_roles, t)) {
        let t = valid.map(|t| rfc3339(t.expires_at)).unwrap_or_default();
        (false, reason, format!("{message}; Secret {} holds that token, valid until {t}", i.secret_name))
    } else if let Some(t) = valid {
        let mut m = format!("Secret {} holds a token valid until {}", i.secret_name, rfc3339(t.expires_at));
        if let Some(p) = &i.plan {
            m.push_str(&format!("; next refresh at {}", rfc3339(p.renew_at)));
            if p.fell_back {
                m.push_str(&format!(
                    "; renewBefore leaves too little time between renewals, renewing {}s before expiry instead",
                    p.renew_before.as_secs()
                ));
            }
        }
        (true, reason::TOKEN_VALID, m)
    } else if let Some(t) = i.token {
        let mut m = format!("the token in Secret {} expired at {}", i.secret_name, rfc3339(t.expires_at));
        if let Some(f) = i.failure {
            m.push_str(&format!("; refreshing fails: {}", f.message));
        }
        (false, reason::TOKEN_EXPIRED, m)
    } else if let Some(f) = i.failure {
        (false, f.reason, f.message.clone())
    } else {
        (false, reason::ISSUING, "requesting the first token".to_owned())
    };
    let (degraded, degraded_reason, degraded_message) = match (i.failure, i.conflict) {
        (_, true) => (true, reason::SECRET_CONFLICT, conflict_message(i.secret_name)),
        (Some(f), _) => (
            true,
            f.reason,
            format!("{} (failed {} time(s) in a row; next attempt at {})", f.message, f.attempts, rfc3339(f.retry_at)),
        ),
        (None, _) if i.upcoming.is_some() => {
            let (reason, message) = i.upcoming.unwrap_or_default();
            (
                true,
                reason,
                format!(
                    "{message}; the current token stays in place, but the next refresh will fail unless this is fixed"
                ),
            )
        }
        (None, _) if valid.is_some() && i.timing.is_some() => {
            let (reason, message) = i.timing.unwrap_or_default();
            (true, reason, message.to_owned())
        }
        (None, _) => (false, reason::REFRESH_SUCCEEDED, "the last token request succeeded".to_owned()),
    };
    let conditions = vec![
        condition(previous, READY, ready, ready_reason, ready_message, i.generation, i.now),
        condition(previous, DEGRADED, degraded, degraded_reason, degraded_message, i.generation, i.now),
    ];
    RegistryAccessStatus {
        observed_generation: i.generation,
        secret_name: Some(i.secret_name.to_owned()),
        issued_at: i.token.map(|t| time(t.issued_at)),
        expires_at: i.token.map(|t| time(t.expires_at)),
        renew_at: i.token.and(i.plan).map(|p| time(p.renew_at)),
        granted_roles: i.token.map(|t| t.realm_roles.clone()).unwrap_or_default(),
        scope: i.token.and_then(|t| t.scope.clone()),
        failed_attempts: i.failure.map(|f| f.attempts),
        last_failure_time: i.failure.map(|f| time(f.at)),
        conditions,
    }
}

/// Longest list of granted roles quoted in a condition message (all of them are in grantedRoles).
const MAX_GRANTED_IN_MESSAGE: usize = 500;

/// What is wrong with a token's roles, if anything: roles of `required` it lacks, or no roles
/// claim at all (a lightweight access token), so that they cannot be checked.
pub fn roles_problem(required: &[String], token: &TokenFacts) -> Option<(&'static str, String)> {
    if required.is_empty() {
        return None;
    }
    if !token.roles_claim {
        return Some((
            reason::ROLES_NOT_IN_TOKEN,
            format!(
                "the token has no realm_access claim (Keycloak issues lightweight access tokens for this client?), \
                 so spec.requiredRoles ({}) cannot be checked: turn lightweight access tokens off for the client or \
                 drop requiredRoles",
                required.join(", ")
            ),
        ));
    }
    let missing: Vec<&str> = required.iter().filter(|r| !token.realm_roles.contains(r)).map(String::as_str).collect();
    if missing.is_empty() {
        return None;
    }
    // The granted roles are the token server's text: each is already cleaned, the list is cut.
    let granted = if token.realm_roles.is_empty() {
        "none".to_owned()
    } else {
        crate::text::foreign(&token.realm_roles.join(", "), MAX_GRANTED_IN_MESSAGE)
    };
    Some((
        reason::REQUIRED_ROLES_MISSING,
        format!(
            "the token lacks the required realm role(s) {} (it grants: {granted}): grant them to the client's \
             service account in Keycloak, then ask for a new token with the refresh annotation",
            missing.join(", ")
        ),
    ))
}

/// How many required roles the token lacks, for the metric: -1 when it has no roles claim;
/// `None` without required roles.
pub fn missing_roles_count(required: &[String], token: Option<&TokenFacts>) -> Option<i64> {
    if required.is_empty() {
        return None;
    }
    let token = token?;
    if !token.roles_claim {
        return Some(-1);
    }
    Some(required.iter().filter(|r| !token.realm_roles.contains(r)).count() as i64)
}

fn conflict_message(secret_name: &str) -> String {
    format!(
        "Secret {secret_name} already exists and is not owned by this RegistryAccess; it is left untouched: \
         delete it, or choose another name in spec.secret.name"
    )
}

/// Truncates to whole seconds, as the API server stores times, so that comparing a built status
/// with the stored one does not see a difference that is not there.
fn time(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| time(now));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition of the given type, if present.
pub fn find<'a>(status: &'a RegistryAccessStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::schedule::{RenewBefore, plan_renewal};
    use crate::secret::tests::{facts as token, token as full_token};
    use secrecy::ExposeSecret;

    const T0: i64 = 1_700_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(T0 + s).unwrap()
    }

    fn inputs<'a>(now: i64, token: Option<&'a TokenFacts>, failure: Option<&'a Failure>) -> StatusInputs<'a> {
        StatusInputs {
            now: at(now),
            generation: Some(3),
            secret_name: "consent-02-token",
            token,
            plan: token.map(|t| plan_renewal(t.issued_at, t.expires_at, RenewBefore::default(), 0.0)),
            conflict: false,
            failure,
            upcoming: None,
            timing: None,
            required_roles: &[],
            previous: None,
        }
    }

    #[test]
    fn required_roles_are_checked_against_the_token() {
        let t = token(T0, T0 + 300);
        let required = vec!["trembita-invoker".to_owned(), "auditor".to_owned()];
        let mut i = inputs(10, Some(&t), None);
        i.required_roles = &required;
        let s = build(&i);
        let (status, why, message) = cond(&s, READY);
        assert_eq!((status, why), ("False", reason::REQUIRED_ROLES_MISSING));
        assert!(message.contains("auditor") && !message.contains("role(s) trembita-invoker"), "{message}");
        assert!(message.contains("consent-02-token"), "{message}");
        assert_eq!(s.granted_roles, vec!["trembita-invoker"], "the token is still reported");
        assert_eq!(missing_roles_count(&required, Some(&t)), Some(1));
        let enough = vec!["trembita-invoker".to_owned()];
        i.required_roles = &enough;
        assert_eq!(cond(&build(&i), READY).1, reason::TOKEN_VALID);
        let mut light = t.clone();
        light.roles_claim = false;
        light.realm_roles.clear();
        let i = StatusInputs { token: Some(&light), required_roles: &enough, ..inputs(10, Some(&light), None) };
        assert_eq!(cond(&build(&i), READY).1, reason::ROLES_NOT_IN_TOKEN);
        assert_eq!(missing_roles_count(&enough, Some(&light)), Some(-1));
        assert_eq!(missing_roles_count(&[], Some(&light)), None);
    }

    #[test]
    fn a_timing_warning_is_degraded_while_nothing_worse_is() {
        let t = token(T0, T0 + 300);
        let mut i = inputs(10, Some(&t), None);
        i.timing = Some((reason::RENEW_BEFORE_TOO_SHORT, "renewed 8s before"));
        let s = build(&i);
        assert_eq!(cond(&s, READY).0, "True");
        assert_eq!(cond(&s, DEGRADED), ("True", reason::RENEW_BEFORE_TOO_SHORT, "renewed 8s before"));
        let f = failure(reason::KEYCLOAK_UNAVAILABLE);
        i.failure = Some(&f);
        assert_eq!(cond(&build(&i), DEGRADED).1, reason::KEYCLOAK_UNAVAILABLE, "a failure comes first");
    }

    fn failure(reason: &'static str) -> Failure {
        Failure {
            attempts: 2,
            at: at(250),
            retry_at: at(254),
            inputs: None,
            reason,
            message: "Keycloak rejected the client credentials".into(),
        }
    }

    fn cond<'a>(s: &'a RegistryAccessStatus, t: &str) -> (&'a str, &'a str, &'a str) {
        let c = find(s, t).unwrap();
        (c.status.as_str(), c.reason.as_str(), c.message.as_str())
    }

    #[test]
    fn a_valid_token_is_ready_with_times_and_roles() {
        let t = token(T0, T0 + 300);
        let s = build(&inputs(10, Some(&t), None));
        assert_eq!(cond(&s, READY).0, "True");
        assert_eq!(cond(&s, READY).1, reason::TOKEN_VALID);
        assert_eq!(cond(&s, DEGRADED).0, "False");
        assert_eq!(s.expires_at, Some(Time(at(300))));
        assert_eq!(s.renew_at, Some(Time(at(200))));
        assert_eq!(s.issued_at, Some(Time(at(0))));
        assert_eq!(s.granted_roles, vec!["trembita-invoker"]);
        assert_eq!(s.scope.as_deref(), Some("profile email"));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.secret_name.as_deref(), Some("consent-02-token"));
    }

    #[test]
    fn a_failure_with_a_valid_token_is_ready_and_degraded() {
        let t = token(T0, T0 + 300);
        let f = failure(reason::INVALID_CLIENT_CREDENTIALS);
        let s = build(&inputs(250, Some(&t), Some(&f)));
        assert_eq!(cond(&s, READY).0, "True");
        assert_eq!(cond(&s, DEGRADED).0, "True");
        assert_eq!(cond(&s, DEGRADED).1, reason::INVALID_CLIENT_CREDENTIALS);
        assert!(cond(&s, DEGRADED).2.contains("2 time(s)"));
        assert_eq!(s.failed_attempts, Some(2));
    }

    #[test]
    fn an_expired_token_is_not_ready() {
        let t = token(T0, T0 + 300);
        let f = failure(reason::KEYCLOAK_UNAVAILABLE);
        let s = build(&inputs(300, Some(&t), Some(&f)));
        assert_eq!(cond(&s, READY).1, reason::TOKEN_EXPIRED);
        assert_eq!(cond(&s, READY).0, "False");
        assert!(cond(&s, READY).2.contains("refreshing fails"));
    }

    #[test]
    fn no_token_reports_the_failure_or_issuing() {
        let f = failure(reason::CLIENT_SECRET_NOT_FOUND);
        let s = build(&inputs(0, None, Some(&f)));
        assert_eq!(
            cond(&s, READY),
            ("False", reason::CLIENT_SECRET_NOT_FOUND, "Keycloak rejected the client credentials")
        );
        let s = build(&inputs(0, None, None));
        assert_eq!(cond(&s, READY).1, reason::ISSUING);
        assert!(s.expires_at.is_none() && s.renew_at.is_none());
    }

    #[test]
    fn an_unusable_client_secret_is_reported_before_the_refresh_fails() {
        let t = token(T0, T0 + 300);
        let mut i = inputs(10, Some(&t), None);
        i.upcoming = Some((reason::CLIENT_SECRET_NOT_FOUND, "Secret billing/creds does not exist"));
        let s = build(&i);
        assert_eq!(cond(&s, READY).0, "True");
        assert_eq!(cond(&s, DEGRADED).0, "True");
        assert_eq!(cond(&s, DEGRADED).1, reason::CLIENT_SECRET_NOT_FOUND);
        assert!(cond(&s, DEGRADED).2.contains("next refresh will fail"));
    }

    #[test]
    fn conflict_is_reported_on_both_conditions() {
        let mut i = inputs(0, None, None);
        i.conflict = true;
        let s = build(&i);
        assert_eq!(cond(&s, READY).1, reason::SECRET_CONFLICT);
        assert_eq!(cond(&s, DEGRADED).1, reason::SECRET_CONFLICT);
        assert!(cond(&s, READY).2.contains("spec.secret.name"));
    }

    #[test]
    fn fallback_is_said_in_the_status() {
        let t = token(T0, T0 + 300);
        let mut i = inputs(10, Some(&t), None);
        i.plan = Some(plan_renewal(
            t.issued_at,
            t.expires_at,
            RenewBefore::requested(Some(std::time::Duration::from_secs(400))),
            0.0,
        ));
        let s = build(&i);
        assert!(cond(&s, READY).2.contains("renewing 225s before expiry instead"), "{}", cond(&s, READY).2);
        assert_eq!(s.renew_at, Some(Time(at(75))));
    }

    #[test]
    fn transition_time_is_kept_while_the_status_holds() {
        let t = token(T0, T0 + 300);
        let first = build(&inputs(10, Some(&t), None));
        let mut i = inputs(100, Some(&t), None);
        i.previous = Some(&first);
        let second = build(&i);
        assert_eq!(find(&second, READY).unwrap().last_transition_time, Time(at(10)));
        let f = failure(reason::KEYCLOAK_UNAVAILABLE);
        let mut i = inputs(120, Some(&t), Some(&f));
        i.previous = Some(&second);
        let third = build(&i);
        assert_eq!(find(&third, READY).unwrap().last_transition_time, Time(at(10)));
        assert_eq!(find(&third, DEGRADED).unwrap().last_transition_time, Time(at(120)));
    }

    #[test]
    fn status_never_contains_the_token() {
        let full = full_token(T0, T0 + 300);
        let t = full.facts();
        let s = build(&inputs(10, Some(&t), None));
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains(full.access_token.expose_secret()));
    }
}
