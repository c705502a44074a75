//! Which Kubernetes Events the operator writes: only what a user must notice (first token,
//! refresh failing, recovered, expired, conflict), never one per routine refresh.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use crate::api::RegistryAccessStatus;
use crate::reconcile::status::{DEGRADED, READY, find, reason};
use crate::secret::MANAGER;

/// Severity of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// An Event to write on the RegistryAccess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub severity: Severity,
    pub reason: String,
    pub note: String,
}

/// The Events for the change from `previous` to `next` status; `issued` is true when this
/// reconcile wrote a new token.
pub fn notices(previous: Option<&RegistryAccessStatus>, next: &RegistryAccessStatus, issued: bool) -> Vec<Notice> {
    let cond = |s: Option<&RegistryAccessStatus>, t: &str| {
        s.and_then(|s| find(s, t)).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let (prev_ready, prev_degraded) = (cond(previous, READY), cond(previous, DEGRADED));
    let (ready, degraded) = (cond(Some(next), READY), cond(Some(next), DEGRADED));
    let mut out = Vec::new();
    let had_token = previous.is_some_and(|p| p.expires_at.is_some());
    let was_degraded = prev_degraded.as_ref().is_some_and(|d| d.0 == "True");

    if let Some((_, r, m)) = &ready
        && r == reason::SECRET_CONFLICT
    {
        if prev_ready.as_ref().is_none_or(|p| p.1 != reason::SECRET_CONFLICT) {
            out.push(Notice { severity: Severity::Warning, reason: r.clone(), note: m.clone() });
        }
        return out;
    }
    if issued && !had_token {
        let note = match &next.expires_at {
            Some(t) => format!("first token issued, valid until {}", t.0),
            None => "first token issued".to_owned(),
        };
        out.push(Notice { severity: Severity::Normal, reason: "TokenIssued".into(), note });
    }
    match &degraded {
        Some((s, r, m)) if s == "True" => {
            if !was_degraded || prev_degraded.as_ref().is_some_and(|p| &p.1 != r) {
                out.push(Notice { severity: Severity::Warning, reason: r.clone(), note: m.clone() });
            }
        }
        _ => {
            // Recovered: by a new token, or because the cause went away (a client secret put
            // back to the value the current token was issued with needs no new token).
            if was_degraded {
                let note = if issued {
                    "a token was issued again after failures"
                } else {
                    "the problem reported is gone; the current token stays"
                };
                out.push(Notice { severity: Severity::Normal, reason: "Recovered".into(), note: note.into() });
            }
        }
    }
    if let Some((s, r, m)) = &ready
        && s == "False"
        && r == reason::TOKEN_EXPIRED
        && prev_ready.as_ref().is_none_or(|p| p.1 != reason::TOKEN_EXPIRED)
    {
        out.push(Notice { severity: Severity::Warning, reason: r.clone(), note: m.clone() });
    }
    out
}

/// The `events.k8s.io/v1` Event of a notice about `regarding`, written by `instance` at `now`.
///
/// Notices are already one per transition, so each is created once: no series and no cache of
/// past Events (kube's `Recorder` keeps every Event for six minutes and scans them all on each
/// publish, which costs memory and time when thousands of objects get their first token).
pub fn event(notice: &Notice, regarding: &ObjectReference, instance: &str, now: Timestamp) -> Event {
    Event {
        metadata: ObjectMeta {
            namespace: regarding.namespace.clone(),
            name: Some(format!("{}.{:x}", regarding.name.as_deref().unwrap_or(MANAGER), now.as_nanosecond())),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some("RefreshToken".to_owned()),
        reason: Some(notice.reason.clone()),
        note: Some(notice.note.clone()),
        type_: Some(
            match notice.severity {
                Severity::Normal => "Normal",
                Severity::Warning => "Warning",
            }
            .to_owned(),
        ),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(MANAGER.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn status(ready: (&str, &str), degraded: (&str, &str), token: bool) -> RegistryAccessStatus {
        let c = |t: &str, (s, r): (&str, &str)| Condition {
            type_: t.into(),
            status: s.into(),
            reason: r.into(),
            message: format!("{r} message"),
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        };
        RegistryAccessStatus {
            expires_at: token.then_some(Time(Timestamp::UNIX_EPOCH)),
            conditions: vec![c(READY, ready), c(DEGRADED, degraded)],
            ..Default::default()
        }
    }

    fn reasons(v: Vec<Notice>) -> Vec<String> {
        v.into_iter().map(|n| n.reason).collect()
    }

    const OK: (&str, &str) = ("True", "TokenValid");
    const FINE: (&str, &str) = ("False", "RefreshSucceeded");

    #[test]
    fn the_first_token_is_announced_routine_refreshes_are_not() {
        let issuing = status(("False", "Issuing"), FINE, false);
        let ready = status(OK, FINE, true);
        assert_eq!(reasons(notices(None, &ready, true)), ["TokenIssued"]);
        assert_eq!(reasons(notices(Some(&issuing), &ready, true)), ["TokenIssued"]);
        assert!(notices(Some(&ready), &ready, true).is_empty(), "a routine refresh writes no Event");
        assert!(notices(Some(&ready), &ready, false).is_empty());
    }

    #[test]
    fn failing_is_announced_once_per_reason_and_recovery_once() {
        let ready = status(OK, FINE, true);
        let failing = status(OK, ("True", "KeycloakUnavailable"), true);
        let other = status(OK, ("True", "InvalidClientCredentials"), true);
        assert_eq!(reasons(notices(Some(&ready), &failing, false)), ["KeycloakUnavailable"]);
        assert!(notices(Some(&failing), &failing, false).is_empty(), "each retry is not an Event");
        assert_eq!(reasons(notices(Some(&failing), &other, false)), ["InvalidClientCredentials"]);
        assert_eq!(reasons(notices(Some(&other), &ready, true)), ["Recovered"]);
        // Fixed without a new token (the client secret put back): recovered all the same.
        let recovered = notices(Some(&other), &ready, false);
        assert_eq!(reasons(recovered.clone()), ["Recovered"]);
        assert!(recovered[0].note.contains("current token stays"));
    }

    #[test]
    fn expiry_and_conflict_are_announced() {
        let failing = status(OK, ("True", "KeycloakUnavailable"), true);
        let expired = status(("False", "TokenExpired"), ("True", "KeycloakUnavailable"), true);
        assert_eq!(reasons(notices(Some(&failing), &expired, false)), ["TokenExpired"]);
        assert!(notices(Some(&expired), &expired, false).is_empty());
        let conflict = status(("False", "SecretConflict"), ("True", "SecretConflict"), false);
        assert_eq!(reasons(notices(None, &conflict, false)), ["SecretConflict"]);
        assert!(notices(Some(&conflict), &conflict, false).is_empty());
    }

    #[test]
    fn an_event_names_its_object_reporter_and_reason() {
        let notice = Notice { severity: Severity::Warning, reason: "KeycloakUnavailable".into(), note: "down".into() };
        let regarding = ObjectReference {
            kind: Some("RegistryAccess".into()),
            namespace: Some("billing".into()),
            name: Some("consent-02".into()),
            ..ObjectReference::default()
        };
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let e = event(&notice, &regarding, "pod-1", now);
        assert_eq!(e.metadata.namespace.as_deref(), Some("billing"));
        assert!(e.metadata.name.as_deref().unwrap().starts_with("consent-02."));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("KeycloakUnavailable"));
        assert_eq!(e.reporting_controller.as_deref(), Some(MANAGER));
        assert_eq!(e.reporting_instance.as_deref(), Some("pod-1"));
        assert_eq!(e.regarding, Some(regarding));
        assert!(e.series.is_none());
    }
}
