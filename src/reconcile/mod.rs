//! The reconcile of one RegistryAccess, as its four stages: read what the object refers to
//! ([`read`]), decide (pure, [`decide`]), apply the writes ([`apply`]), report ([`report`]).
//! Token requests are queued with the [`Issuer`] and their outcome comes back as another
//! reconcile, so a reconcile only ever waits for the Kubernetes API.

pub mod apply;
pub mod decide;
pub mod events;
pub mod read;
pub mod report;
pub mod schedule;
pub mod status;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::api::{Guarded, RegistryAccess};
use crate::failure::{Error, Problem, reason};
use crate::keycloak::digest_key::DigestKey;
use crate::keycloak::minted::Minted;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::requests::issuer::{Issuer, Job};
use crate::requests::state::{Completed, Known, States};
use crate::secret::{self, HeldToken, MANAGER, Observed};
use crate::watch::index::{Index, Key};
use decide::{Decision, Inputs};
use status::StatusInputs;

/// A conflicting Secret is looked at again at least this often (its deletion also triggers).
const CONFLICT_RECHECK: Duration = Duration::from_secs(300);
/// While a request is queued or in flight, the object is looked at this often anyway (its outcome
/// triggers a reconcile at once; this only bounds the wait if that were lost).
const PENDING_RECHECK: Duration = Duration::from_secs(60);
/// While the Secret watch of an object's namespace is in error, the object is looked at this often.
const WATCH_LOST_RECHECK: Duration = Duration::from_secs(60);
/// A request queued this long ago without an outcome shows in the status (`Issuing`).
const QUEUED_FIRST_LOOK: Duration = Duration::from_secs(5);

/// Handles shared by all reconciles.
pub struct Context {
    pub client: Client,
    /// Time limit of each Kubernetes API call.
    pub api_timeout: Duration,
    pub metrics: Arc<Metrics>,
    pub states: Arc<States>,
    pub index: Arc<Index>,
    pub issuer: Arc<Issuer>,
    /// This operator instance's name in Events (the pod name in a cluster).
    pub instance: String,
    pub policy: Policy,
    /// Key of the client secret fingerprints.
    pub digest_key: DigestKey,
    /// The longest a pod's mounted Secret lags an update (the kubelet's sync): a token renewed
    /// with less validity left than this may expire in a pod before the pod sees its successor.
    pub mount_delay: Duration,
    /// How long one failed token request and its retry delay take (for the default renewBefore).
    pub failed_attempt: Duration,
    /// ServiceAccount tokens minted moments ago.
    pub minted: Minted,
    /// CA bundles shared by queued requests.
    pub bundles: crate::keycloak::trust::Bundles,
    undecodable: Mutex<HashSet<Key>>,
    /// The objects that exist, by the watch: key -> uid.
    live: Mutex<std::collections::HashMap<Key, String>>,
    /// When each resource's watch error was last logged, and errors since.
    watch_logged: Mutex<std::collections::HashMap<&'static str, (Option<std::time::Instant>, u64)>>,
}

/// At most one log line per resource's watch errors in this interval.
const WATCH_ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// What a [`Context`] is made of, besides the shared handles.
pub struct Settings {
    pub api_timeout: Duration,
    pub policy: Policy,
    pub digest_key: DigestKey,
    pub mount_delay: Duration,
    /// The token request timeout plus the first retry delay.
    pub failed_attempt: Duration,
    /// This operator instance's name in Events; the operator's name when `None`.
    pub instance: Option<String>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        (states, index): (Arc<States>, Arc<Index>),
        issuer: Arc<Issuer>,
        settings: Settings,
    ) -> Self {
        Self {
            instance: settings.instance.unwrap_or_else(|| MANAGER.to_owned()),
            client,
            api_timeout: settings.api_timeout,
            metrics,
            states,
            index,
            issuer,
            policy: settings.policy,
            digest_key: settings.digest_key,
            mount_delay: settings.mount_delay,
            failed_attempt: settings.failed_attempt,
            minted: Minted::default(),
            bundles: Default::default(),
            undecodable: Mutex::new(HashSet::new()),
            live: Mutex::default(),
            watch_logged: Mutex::default(),
        }
    }

    /// Marks an object as (not) decodable, for the `undecodable_objects` metric.
    pub fn set_undecodable(&self, key: Key, undecodable: bool) {
        let mut set = self.undecodable.lock().unwrap_or_else(|p| p.into_inner());
        let changed = if undecodable { set.insert(key) } else { set.remove(&key) };
        if changed {
            self.metrics.set_undecodable(set.len());
        }
    }

    /// Records that the object under `key` exists with `uid` (the watch showed it).
    pub fn set_live(&self, key: Key, uid: &str) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(&key).map(String::as_str) != Some(uid) {
            live.insert(key, uid.to_owned());
        }
    }

    /// After a reconcile or its error handling: if the object was deleted meanwhile (or replaced
    /// by one of the same name), what the reconcile just recorded of it is forgotten again, so
    /// that no metric series, state or queued request outlives it.
    pub fn settle(&self, key: &Key, uid: &str) {
        let current = self.live.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned();
        match current {
            Some(u) if u == uid => {}
            Some(_) => {
                self.states.forget(uid);
                self.issuer.cancel(uid);
            }
            None => self.forget(key, Some(uid)),
        }
    }

    /// A watch failed: counted, and logged at most once per [`WATCH_ERROR_LOG_EVERY`] per
    /// resource (a watch that keeps failing retries with a backoff of its own).
    pub fn watch_failed(&self, resource: &'static str, error: &kube::runtime::watcher::Error) {
        self.metrics.watch_error(resource);
        let now = std::time::Instant::now();
        let mut logged = self.watch_logged.lock().unwrap_or_else(|p| p.into_inner());
        let last = logged.entry(resource).or_insert((None, 0));
        last.1 += 1;
        if last.0.is_none_or(|t: std::time::Instant| now.duration_since(t) >= WATCH_ERROR_LOG_EVERY) {
            warn!(
                resource,
                errors_since_last_log = last.1,
                error = %crate::text::foreign(&error.to_string(), crate::text::MAX_QUOTED_CHARS),
                "watch failed; the objects it concerns are read from the API until it has listed again (does the \
                 operator still have list and watch on this resource?)"
            );
            *last = (Some(now), 0);
        }
    }

    /// Forgets everything about a deleted object.
    pub fn forget(&self, key: &Key, uid: Option<&str>) {
        {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            if uid.is_none_or(|u| live.get(key).is_some_and(|l| l == u)) {
                live.remove(key);
            }
        }
        self.index.remove_object(key);
        self.metrics.forget_object(&key.namespace, &key.name);
        self.set_undecodable(key.clone(), false);
        if let Some(uid) = uid {
            self.states.forget(uid);
            self.issuer.cancel(uid);
        }
    }
}

/// Reconciles one RegistryAccess.
pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = Key::of(obj.as_ref());
    let span = info_span!("reconcile", namespace = %key.namespace, name = %key.name);
    let start = std::time::Instant::now();
    let result = match &obj.0 {
        Ok(ra) => {
            ctx.set_undecodable(key.clone(), false);
            reconcile_object(ra, &ctx).instrument(span).await
        }
        Err(invalid) => Ok(report::undecodable(&ctx, key.clone(), invalid)),
    };
    ctx.metrics.reconciled(start.elapsed(), result.as_ref().err().map(Error::kind));
    let uid = obj.meta().uid.as_deref().unwrap_or_default();
    if result.is_ok() {
        ctx.states.api_succeeded(uid);
    }
    ctx.settle(&key, uid);
    result
}

/// What the reconcile did about the token.
enum Step {
    /// The target Secret belongs to someone else.
    Conflict,
    /// Nothing to request: keep the token held (if any) until `until`.
    Keep { until: Timestamp },
    /// A request is queued or in flight; `now` when it was queued by this reconcile.
    Pending { now: bool },
    /// A request ended (or could not be made): what follows it.
    Attempted { after: decide::AfterAttempt, issued: bool },
}

async fn reconcile_object(ra: &RegistryAccess, ctx: &Context) -> Result<Action, Error> {
    if ra.metadata.deletion_timestamp.is_some() {
        // The token Secret goes with its owner through garbage collection.
        return Ok(Action::await_change());
    }
    let uid = ra.uid().unwrap_or_default();
    let secret_name = ra.token_secret_name();

    // 1. Read what the object refers to.
    let token = read::token_secret(ra, ctx).await?;
    let client = read::client_secret(ra, ctx).await?;
    let inputs = client.inputs(ra);
    let client_problem = client.problem(ra);

    // 2. Decide.
    let now = Timestamp::now();
    let failure = ctx.states.failure(&uid);
    let renew_before = schedule::RenewBefore {
        requested: ra.spec.renew_before.filter(|d| !d.is_negative()).map(Duration::from),
        mount_delay: ctx.mount_delay,
        failed_attempt: ctx.failed_attempt,
    };
    let decision_inputs = Inputs {
        now,
        observed: &token.observed,
        inputs: inputs.as_deref(),
        renew_before,
        failure: failure.as_ref(),
        jitter_seed: &uid,
    };
    let decision = decide::decide(decision_inputs);
    debug!(?decision, "decided");

    // 3. Apply.
    let step = match decision {
        Decision::Conflict => {
            warn!(secret = %secret_name, "token Secret exists and is not owned by this RegistryAccess; leaving it untouched");
            ctx.states.set_known(&uid, None);
            Step::Conflict
        }
        Decision::Wait { until } => {
            keep(ra, ctx, &token).await?;
            Step::Keep { until }
        }
        Decision::Fetch(why) => {
            // A token kept from a failed write that is due by now is dropped: a new one is asked.
            let completed =
                inputs.as_deref().and_then(|i| ctx.states.take_completed(&uid, i)).filter(|c| match &c.result {
                    Err(_) => true,
                    Ok(t) => decide::plan_for(&t.facts(), renew_before, &uid).renew_at > now,
                });
            match completed {
                Some(done) => store(ra, ctx, &decision_inputs, done).await?,
                None if inputs.as_deref().is_some_and(|i| ctx.states.pending(&uid, i)) => Step::Pending { now: false },
                None => match read::request(ra, ctx, client).await? {
                    Ok(read::Prepared { request, inputs, consent }) => {
                        debug!(reason = why.as_str(), "token request queued");
                        let deadline = match &token.observed {
                            Observed::Held(h) => Some(deadline(h.token.expires_at, ctx.failed_attempt, now)),
                            _ => None,
                        };
                        let job = Job {
                            object: ObjectRef::new(&ra.name_any()).within(&ra.namespace().unwrap_or_default()),
                            uid: uid.clone(),
                            inputs,
                            request,
                            due_at: decide::due_at(&decision_inputs, why),
                            deadline,
                            consent,
                        };
                        ctx.issuer.submit(&ra.namespace().unwrap_or_default(), job);
                        Step::Pending { now: true }
                    }
                    Err(problem) => failed(ctx, &decision_inputs, &uid, &problem),
                },
            }
        }
    };

    let held = match &step {
        Step::Attempted { after, .. } => after.held.clone(),
        _ => match &token.observed {
            Observed::Held(h) => Some(h.token.clone()),
            _ => None,
        },
    };
    // Once the Secret of the current spec.secret.name holds a valid token, a token Secret this
    // object controlled under a former name is retired.
    if held.as_ref().is_some_and(|t| t.expires_at > now) && !matches!(step, Step::Conflict) {
        retire_former(ra, ctx, &secret_name).await?;
    }

    // 4. Report.
    let failure = match &step {
        Step::Attempted { after, .. } => after.failure.clone(),
        _ => failure,
    };
    // A failure recorded for other inputs is stale: the next attempt uses the current ones. While
    // that attempt is on its way, the last failure stands, so that the status moves once, when the
    // outcome is known.
    let failure = if matches!(step, Step::Pending { .. }) { failure } else { failure.filter(|f| f.inputs == inputs) };
    let conflict = matches!(step, Step::Conflict);
    let upcoming = read::spec_problem(ra, &ctx.policy).or(client_problem);
    let plan = held.as_ref().map(|t| decide::plan_for(t, renew_before, &uid));
    let timing = plan.as_ref().and_then(|p| schedule::timing_warning(p, renew_before.requested, ctx.mount_delay));
    let status = status::build(&StatusInputs {
        now,
        generation: ra.metadata.generation,
        secret_name: &secret_name,
        token: held.as_ref(),
        plan,
        conflict,
        failure: failure.as_ref(),
        upcoming: upcoming.as_ref().map(|p| (p.reason, p.message.as_str())),
        timing: timing.as_ref().map(|(r, m)| (*r, m.as_str())),
        required_roles: &ra.spec.required_roles,
        previous: ra.status.as_ref(),
    });
    let roles_ok = held.as_ref().is_none_or(|t| status::roles_problem(&ra.spec.required_roles, t).is_none());
    let ready = held.as_ref().is_some_and(|t| t.expires_at > now) && !conflict && roles_ok;
    let missing_roles = status::missing_roles_count(&ra.spec.required_roles, held.as_ref());
    let issued = matches!(step, Step::Attempted { issued: true, .. });
    let expires_at = held.as_ref().map(|t| t.expires_at.as_second());
    let write_status = !matches!(step, Step::Pending { now: true });
    report::object(ctx, ra, report::Report { status: &status, write_status, issued, expires_at, ready, missing_roles })
        .await?;

    // Look again at the next renewal or retry; a token that expires meanwhile is reported.
    let next = match step {
        Step::Conflict => now + signed(CONFLICT_RECHECK),
        Step::Keep { until } => until,
        Step::Pending { now: true } => now + signed(QUEUED_FIRST_LOOK),
        Step::Pending { now: false } => now + signed(PENDING_RECHECK),
        Step::Attempted { after, .. } => after.next,
    };
    let next = match held.as_ref().map(|t| t.expires_at) {
        Some(e) if e > now => next.min(e),
        _ => next,
    };
    // While the Secret watch of the namespace is away, nothing tells the object that its Secrets
    // changed: it looks (reading them) at least this often.
    let next = if ctx.index.secrets_synced(&ra.namespace().unwrap_or_default()) {
        next
    } else {
        next.min(now + signed(WATCH_LOST_RECHECK))
    };
    let wait = Duration::try_from(next.duration_since(now)).unwrap_or(Duration::ZERO);
    debug!(requeue_after_secs = wait.as_secs(), "next look");
    Ok(Action::requeue(wait.max(Duration::from_millis(100))))
}

/// Nothing to request: restores the token Secret if someone changed what the operator set, and
/// remembers its version so that later reconciles need not read it.
async fn keep(ra: &RegistryAccess, ctx: &Context, token: &read::TokenSecret) -> Result<(), Error> {
    let (Some(live), Observed::Held(held)) = (&token.live, &token.observed) else { return Ok(()) };
    let Some((full, inputs)) = secret::read_token(live) else { return Ok(()) };
    let desired = secret::build(ra, &full, inputs.as_deref().unwrap_or_default());
    let resource_version = if secret::needs_apply(&desired, live) {
        info!(secret = %ra.token_secret_name(), "restoring token Secret");
        apply::token_secret(ctx, ra, &desired, false).await?
    } else {
        live.metadata.resource_version.clone().unwrap_or_default()
    };
    let known = Known { resource_version, generation: ra.metadata.generation, held: held.clone() };
    ctx.states.set_known(&ra.uid().unwrap_or_default(), Some(known));
    Ok(())
}

/// Retires the token Secrets this object controls under another name than `current` (it was
/// renamed in spec.secret.name): their token is removed, so no valid token is left behind that
/// nobody refreshes. The husk stays until the object is deleted (garbage collection), so the
/// operator needs no right to delete Secrets.
async fn retire_former(ra: &RegistryAccess, ctx: &Context, current: &str) -> Result<(), Error> {
    let namespace = ra.namespace().unwrap_or_default();
    for former in ctx.index.token_secrets_of(&ra.uid().unwrap_or_default()) {
        if former.name == current || former.namespace != namespace {
            continue;
        }
        info!(secret = %former.name, now = %current, "retiring the former token Secret");
        apply::retire_secret(ctx, ra, &former.name, current).await?;
    }
    Ok(())
}

/// Writes the outcome of a finished request.
async fn store(ra: &RegistryAccess, ctx: &Context, i: &Inputs<'_>, done: Completed) -> Result<Step, Error> {
    let uid = i.jitter_seed;
    let token = match done.result {
        Err(problem) => return Ok(failed(ctx, i, uid, &problem)),
        Ok(token) => token,
    };
    let desired = secret::build(ra, &token, &done.inputs);
    let create = matches!(i.observed, Observed::Missing);
    match apply::token_secret(ctx, ra, &desired, create).await {
        Ok(resource_version) => {
            let facts = token.facts();
            info!(
                secret = %ra.token_secret_name(),
                expires_at = %secret::rfc3339(facts.expires_at),
                "token refreshed"
            );
            let held = HeldToken { token: facts.clone(), inputs: Some(done.inputs) };
            let known = Known { resource_version, generation: ra.metadata.generation, held };
            ctx.states.set_known(uid, Some(known));
            let after = decide::after_attempt(i, Ok(&facts), 0.0);
            ctx.states.set_failure(uid, None);
            Ok(Step::Attempted { after, issued: true })
        }
        Err(e) => {
            // A token that cannot be stored is a failure like any other: it gets a reason and a
            // retry, the previous token stays, and the new one is written on the next try.
            // The message is ours and the API's status only (see `failure::api_summary`).
            let problem = write_problem(&e, ra);
            ctx.states.keep_completed(uid, Completed { inputs: done.inputs, result: Ok(token) });
            Ok(failed(ctx, i, uid, &problem))
        }
    }
}

/// The problem of a token Secret write that failed: a refusal someone must fix (403: a missing
/// right; 422: a field the API will not take) backs off like any error that needs a fix and says
/// what is wrong; anything else is retried soon.
fn write_problem(e: &Error, ra: &RegistryAccess) -> Problem {
    let code = match e {
        Error::ApplySecret { source: kube::Error::Api(status), .. } => status.code,
        Error::CreateSecret { source: kube::Error::Api(status), .. } if status.code == 409 => {
            return Problem::transient(
                reason::SECRET_CONFLICT,
                format!("{e}: someone else created it since it was read; it is left untouched"),
            );
        }
        Error::CreateSecret { source: kube::Error::Api(status), .. } => status.code,
        _ => 0,
    };
    let ns = ra.namespace().unwrap_or_default();
    match code {
        403 => Problem::fix(
            reason::SECRET_WRITE_FAILED,
            format!(
                "{e}; the operator needs create and patch on secrets in namespace {ns} (its ClusterRole, or a \
                 policy that refuses it); the token stays as it is and is written once that is fixed"
            ),
        ),
        422 => Problem::fix(
            reason::SECRET_WRITE_FAILED,
            format!(
                "{e}; the Secret {ns}/{} cannot take the token as the operator writes it (for example a Secret \
                 of another type, or labels or annotations in spec.secret the API refuses): fix spec.secret or \
                 delete that Secret",
                ra.token_secret_name()
            ),
        ),
        _ => Problem::transient(reason::SECRET_WRITE_FAILED, e.to_string()),
    }
}

/// Records a failed attempt and says what follows.
fn failed(ctx: &Context, i: &Inputs<'_>, uid: &str, problem: &Problem) -> Step {
    let after = decide::after_attempt(i, Err(problem), rand::random::<f64>());
    if let Some(f) = &after.failure {
        warn!(
            reason = f.reason,
            message = %f.message,
            attempts = f.attempts,
            retry_at = %secret::rfc3339(f.retry_at),
            "refresh failed"
        );
    }
    ctx.states.set_failure(uid, after.failure.clone());
    Step::Attempted { after, issued: false }
}

/// Kubernetes API errors: retried with a backoff of the object's own, so that an object the API
/// keeps refusing does not take turns from the others.
pub fn error_policy(obj: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    let uid = obj.meta().uid.clone().unwrap_or_default();
    let wait = ctx.states.api_failed(&uid, rand::random::<f64>());
    ctx.settle(&Key::of(obj.as_ref()), &uid);
    warn!(error = %error, retry_in_secs = wait.as_secs_f64(), "reconcile failed at the Kubernetes API; retrying");
    Action::requeue(wait)
}

/// The latest start of a request that still lets one failed attempt pass before the held token
/// expires, on the process clock.
fn deadline(expires_at: Timestamp, failed_attempt: Duration, now: Timestamp) -> std::time::Instant {
    let left = Duration::try_from(expires_at.duration_since(now)).unwrap_or(Duration::ZERO);
    std::time::Instant::now() + left.saturating_sub(failed_attempt)
}

fn signed(d: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A context whose Kubernetes client is a mock that no test here calls.
    fn context() -> Context {
        let (mock, _handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let client = Client::new(mock, "default");
        let (metrics, states, index) =
            (Arc::new(Metrics::new()), Arc::new(States::default()), Arc::new(Index::default()));
        let shared = crate::requests::issuer::Shared {
            tokens: crate::keycloak::token::TokenClient::new(Default::default()).expect("token client"),
            metrics: metrics.clone(),
            states: states.clone(),
            index: index.clone(),
            policy: Policy::default(),
        };
        let (issuer, _finished) = Issuer::new(Default::default(), shared);
        let settings = Settings {
            api_timeout: Duration::from_secs(1),
            policy: Policy::default(),
            digest_key: DigestKey::from_bytes([7; 32]),
            mount_delay: Duration::from_secs(90),
            failed_attempt: Duration::from_secs(17),
            instance: None,
        };
        Context::new(client, metrics, (states, index), issuer, settings)
    }

    fn failure() -> decide::Failure {
        decide::Failure {
            attempts: 1,
            at: Timestamp::now(),
            retry_at: Timestamp::now(),
            inputs: None,
            reason: reason::KEYCLOAK_UNAVAILABLE,
            message: "down".into(),
        }
    }

    /// The watch's Delete is handled while a reconcile of the object runs; the reconcile then
    /// writes what it found (series, a failure, an API backoff from its error policy). When it
    /// ends, nothing of the object is left.
    #[tokio::test]
    async fn a_delete_during_a_reconcile_leaves_no_state_or_series() {
        let ctx = context();
        let key = Key::new("ns", "ra");
        ctx.set_live(key.clone(), "uid-1");
        ctx.forget(&key, Some("uid-1"));
        ctx.metrics.set_object("ns", "ra", Some(1_900_000_000), true, None);
        ctx.metrics.set_degraded("ns", "ra", Some(reason::KEYCLOAK_UNAVAILABLE));
        ctx.states.set_failure("uid-1", Some(failure()));
        ctx.states.api_failed("uid-1", 0.0);
        assert!(ctx.metrics.render().contains("name=\"ra\""), "the reconcile's writes are there before it settles");
        ctx.settle(&key, "uid-1");
        let text = ctx.metrics.render();
        assert!(!text.contains("name=\"ra\""), "series of a deleted object remain:\n{text}");
        assert!(ctx.states.is_empty(), "state of a deleted object remains");
    }

    /// An object deleted and created again under the same name: the old object's reconcile
    /// settles its own state only; the new object's series stay.
    #[tokio::test]
    async fn a_late_reconcile_of_a_replaced_object_leaves_the_new_one_alone() {
        let ctx = context();
        let key = Key::new("ns", "ra");
        ctx.set_live(key.clone(), "uid-1");
        ctx.forget(&key, Some("uid-1"));
        ctx.set_live(key.clone(), "uid-2");
        ctx.metrics.set_object("ns", "ra", Some(1_900_000_000), true, None);
        ctx.states.set_failure("uid-1", Some(failure()));
        ctx.states.set_failure("uid-2", Some(failure()));
        ctx.settle(&key, "uid-1");
        assert!(ctx.metrics.render().contains("name=\"ra\""), "the new object's series went");
        assert!(ctx.states.failure("uid-1").is_none() && ctx.states.failure("uid-2").is_some());
        ctx.settle(&key, "uid-2");
        assert!(ctx.states.failure("uid-2").is_some(), "a live object keeps its state");
    }

    fn refused(code: u16) -> Error {
        let status = kube::core::Status { code, reason: "Forbidden".into(), ..Default::default() };
        Error::ApplySecret { namespace: "ns".into(), name: "t".into(), source: kube::Error::Api(Box::new(status)) }
    }

    #[test]
    fn a_refused_secret_write_needs_a_fix_and_says_what() {
        let ra = crate::secret::tests::ra();
        let p = write_problem(&refused(403), &ra);
        assert!(!p.transient && p.message.contains("create and patch on secrets"), "{}", p.message);
        let p = write_problem(&refused(422), &ra);
        assert!(!p.transient && p.message.contains("spec.secret"), "{}", p.message);
        assert!(write_problem(&refused(500), &ra).transient);
        assert!(write_problem(&refused(409), &ra).transient);
        let status = kube::core::Status { code: 409, reason: "AlreadyExists".into(), ..Default::default() };
        let taken = Error::CreateSecret {
            namespace: "ns".into(),
            name: "t".into(),
            source: kube::Error::Api(Box::new(status)),
        };
        let p = write_problem(&taken, &ra);
        assert_eq!(p.reason, reason::SECRET_CONFLICT);
        assert!(p.message.contains("left untouched"), "{}", p.message);
    }
}
