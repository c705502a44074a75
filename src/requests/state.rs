//! What the operator remembers of each object between reconciles, by uid: the last failure, a
//! token request waiting or in flight, a result not yet written, what it last wrote or verified
//! in the token Secret, and the Kubernetes API backoff. Forgotten when the object goes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::failure::Problem;
use crate::keycloak::token::IssuedToken;
use crate::reconcile::decide::Failure;
use crate::secret::HeldToken;

/// The outcome of a token request, kept until a reconcile writes it.
#[derive(Debug, Clone)]
pub struct Completed {
    /// The request inputs the outcome belongs to.
    pub inputs: String,
    pub result: Result<IssuedToken, Problem>,
}

/// The token Secret as the operator last wrote or verified it.
#[derive(Debug, Clone)]
pub struct Known {
    /// The Secret's resourceVersion then: while the watch shows the same, it holds this token.
    pub resource_version: String,
    /// The object's generation then: a new spec may want other labels or keys.
    pub generation: Option<i64>,
    pub held: HeldToken,
}

#[derive(Debug, Default)]
struct ObjectState {
    failure: Option<Failure>,
    /// Inputs of a request queued or in flight, and when it was queued.
    pending: Option<(String, Instant)>,
    /// The number of the object's latest request: only its outcome is kept (an older request
    /// still in flight may end after it).
    latest: u64,
    completed: Option<Completed>,
    known: Option<Known>,
    api_failures: u32,
    /// Digest of the status last written: the watch may not have brought it back yet.
    status: Option<u64>,
}

impl ObjectState {
    fn is_empty(&self) -> bool {
        self.failure.is_none()
            && self.pending.is_none()
            && self.completed.is_none()
            && self.known.is_none()
            && self.api_failures == 0
            && self.status.is_none()
    }
}

/// A request queued this long ago without an outcome is queued again (the queue replaces it where
/// it stands): longer than any wait the queue imposes (a `Retry-After` is at most 10 min).
pub const PENDING_STALE: Duration = Duration::from_secs(900);

/// First delay after a Kubernetes API error, doubled per error in a row up to [`MAX_API_BACKOFF`].
pub const INITIAL_API_BACKOFF: Duration = Duration::from_secs(1);
/// Longest delay after Kubernetes API errors: an API server that is away is tried every 2 min.
pub const MAX_API_BACKOFF: Duration = Duration::from_secs(120);

/// The memory of all objects.
#[derive(Default)]
pub struct States {
    objects: Mutex<HashMap<String, ObjectState>>,
    /// Numbers requests, over all objects, so that a number is never reused for an object.
    requests: AtomicU64,
}

impl States {
    fn with<R>(&self, uid: &str, f: impl FnOnce(&mut ObjectState) -> R) -> R {
        let mut map = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let state = map.entry(uid.to_owned()).or_default();
        let r = f(state);
        if state.is_empty() {
            map.remove(uid);
        }
        r
    }

    fn read<R>(&self, uid: &str, f: impl FnOnce(&ObjectState) -> R) -> Option<R> {
        let map = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        map.get(uid).map(f)
    }

    pub fn failure(&self, uid: &str) -> Option<Failure> {
        self.read(uid, |s| s.failure.clone()).flatten()
    }

    pub fn set_failure(&self, uid: &str, failure: Option<Failure>) {
        self.with(uid, |s| s.failure = failure);
    }

    /// True when a request with these inputs is queued or in flight (and not given up on).
    pub fn pending(&self, uid: &str, inputs: &str) -> bool {
        self.read(uid, |s| s.pending.as_ref().is_some_and(|(i, at)| i == inputs && at.elapsed() < PENDING_STALE))
            .unwrap_or(false)
    }

    /// Records a request queued with these inputs; returns its number, which its outcome brings
    /// back to [`States::complete`].
    pub fn set_pending(&self, uid: &str, inputs: &str) -> u64 {
        let number = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.with(uid, |s| {
            s.pending = Some((inputs.to_owned(), Instant::now()));
            s.latest = number;
        });
        number
    }

    /// Records the outcome of request number `request`; returns false when it is not kept: the
    /// object was forgotten meanwhile, or a later request of it was made (an old result that ends
    /// after a new one never replaces it).
    pub fn complete(&self, uid: &str, request: u64, completed: Completed) -> bool {
        let mut map = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = map.get_mut(uid) else { return false };
        if state.latest != request {
            return false;
        }
        if state.pending.as_ref().is_some_and(|(i, _)| *i == completed.inputs) {
            state.pending = None;
        }
        state.completed = Some(completed);
        true
    }

    /// Forgets a request that was dropped unsent, so that the next reconcile makes a new one.
    pub fn abandon(&self, uid: &str, inputs: &str) {
        self.with(uid, |s| {
            if s.pending.as_ref().is_some_and(|(i, _)| i == inputs) {
                s.pending = None;
            }
        });
    }

    /// Takes the outcome of the last request if it was for `inputs`; an outcome for other inputs
    /// is dropped.
    pub fn take_completed(&self, uid: &str, inputs: &str) -> Option<Completed> {
        self.with(uid, |s| s.completed.take().filter(|c| c.inputs == inputs))
    }

    /// Keeps a token that could not be written, to write it on the next try.
    pub fn keep_completed(&self, uid: &str, completed: Completed) {
        self.with(uid, |s| s.completed = Some(completed));
    }

    pub fn known(&self, uid: &str) -> Option<Known> {
        self.read(uid, |s| s.known.clone()).flatten()
    }

    pub fn set_known(&self, uid: &str, known: Option<Known>) {
        self.with(uid, |s| s.known = known);
    }

    /// True when `resource_version` is the token Secret as the operator last wrote or verified it:
    /// the watch event of the operator's own write.
    pub fn is_known_version(&self, uid: &str, resource_version: &str) -> bool {
        self.read(uid, |s| s.known.as_ref().is_some_and(|k| k.resource_version == resource_version)).unwrap_or(false)
    }

    /// Digest of the status last written for the object.
    pub fn status_written(&self, uid: &str) -> Option<u64> {
        self.read(uid, |s| s.status).flatten()
    }

    pub fn set_status_written(&self, uid: &str, digest: u64) {
        self.with(uid, |s| s.status = Some(digest));
    }

    /// Counts a Kubernetes API error and returns how long to wait before trying again; `jitter`
    /// in `[0, 1)` shortens it by up to half.
    pub fn api_failed(&self, uid: &str, jitter: f64) -> Duration {
        let n = self.with(uid, |s| {
            s.api_failures = s.api_failures.saturating_add(1);
            s.api_failures
        });
        api_backoff(n, jitter)
    }

    pub fn api_succeeded(&self, uid: &str) {
        let any = self.read(uid, |s| s.api_failures > 0).unwrap_or(false);
        if any {
            self.with(uid, |s| s.api_failures = 0);
        }
    }

    /// Forgets a deleted object.
    pub fn forget(&self, uid: &str) {
        self.objects.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }

    /// Objects remembered.
    pub fn len(&self) -> usize {
        self.objects.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The wait after the `n`-th Kubernetes API error in a row.
pub fn api_backoff(n: u32, jitter: f64) -> Duration {
    let base = INITIAL_API_BACKOFF.saturating_mul(1u32 << n.saturating_sub(1).min(16)).min(MAX_API_BACKOFF);
    base.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::reason;

    fn problem() -> Problem {
        Problem::transient(reason::KEYCLOAK_UNAVAILABLE, "down")
    }

    #[test]
    fn api_backoff_doubles_per_object_up_to_the_cap() {
        let s = States::default();
        let waits: Vec<u64> = (0..10).map(|_| s.api_failed("a", 0.0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
        assert_eq!(s.api_failed("b", 0.0).as_secs(), 1, "another object has its own backoff");
        s.api_succeeded("a");
        assert_eq!(s.api_failed("a", 0.0).as_secs(), 1);
        assert!(api_backoff(3, 0.99) >= Duration::from_secs(2));
    }

    #[test]
    fn an_outcome_is_taken_once_and_only_for_its_inputs() {
        let s = States::default();
        let n = s.set_pending("a", "in-1");
        assert!(s.pending("a", "in-1"));
        assert!(s.complete("a", n, Completed { inputs: "in-1".into(), result: Err(problem()) }));
        assert!(!s.pending("a", "in-1"));
        assert!(s.take_completed("a", "in-2").is_none(), "an outcome for other inputs is not used");
        assert!(s.take_completed("a", "in-1").is_none(), "and it is dropped");
        let n = s.set_pending("a", "in-1");
        s.complete("a", n, Completed { inputs: "in-1".into(), result: Err(problem()) });
        assert!(s.take_completed("a", "in-1").is_some());
        assert!(s.take_completed("a", "in-1").is_none());
    }

    #[test]
    fn a_forgotten_object_takes_no_outcome_and_leaves_nothing() {
        let s = States::default();
        let n = s.set_pending("a", "in");
        s.forget("a");
        assert!(!s.complete("a", n, Completed { inputs: "in".into(), result: Err(problem()) }));
        assert!(s.is_empty());
        s.set_failure("b", None);
        s.api_succeeded("b");
        assert!(s.is_empty(), "empty records are not kept");
        s.set_pending("c", "in");
        s.forget("c");
        assert!(s.is_empty());
    }

    /// The spec changed while a request was in flight, and a second request (new inputs) was
    /// made; the new one ends first and the old one after it. The new outcome stays; the old one
    /// is dropped and does not trigger a reconcile.
    #[test]
    fn an_old_result_after_a_new_one_does_not_replace_it() {
        let s = States::default();
        let old = s.set_pending("a", "in-old");
        let new = s.set_pending("a", "in-new");
        let token = |inputs: &str| Completed { inputs: inputs.into(), result: Err(problem()) };
        assert!(s.complete("a", new, token("in-new")));
        assert!(!s.complete("a", old, token("in-old")), "the old outcome is not kept");
        assert!(s.take_completed("a", "in-new").is_some(), "the new outcome was replaced by the old one");
        // Also with the same inputs (a request queued again after PENDING_STALE): only the later
        // request's outcome is kept.
        let first = s.set_pending("a", "in");
        let second = s.set_pending("a", "in");
        assert!(!s.complete("a", first, token("in")));
        assert!(s.complete("a", second, token("in")));
    }
}
