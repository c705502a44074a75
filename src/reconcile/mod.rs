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
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, debug, info_span, warn};

use crate::api::{Guarded, RegistryAccess};
use crate::failure::Error;
use crate::keycloak::digest_key::DigestKey;
use crate::keycloak::minted::Minted;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::requests::issuer::Issuer;
use crate::requests::state::States;
use crate::secret::MANAGER;
use crate::watch::index::{Index, Key};
use apply::Step;
use decide::Inputs;
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
    /// The pods of the namespaces with objects, as token delivery needs them.
    pub pods: Arc<crate::watch::pods::Pods>,
    /// Pods that mount a token Secret are nudged after each write (`--nudge-pods`), where the
    /// object allows it.
    pub nudge_pods: bool,
    /// Turns for pod nudges, [`apply::NUDGES_IN_FLIGHT`] operator-wide.
    pub nudges_in_flight: Arc<tokio::sync::Semaphore>,
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
    /// Whether pods are nudged after a token Secret write.
    pub nudge_pods: bool,
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
            pods: Default::default(),
            nudge_pods: settings.nudge_pods,
            nudges_in_flight: Arc::new(tokio::sync::Semaphore::new(apply::NUDGES_IN_FLIGHT)),
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

async fn reconcile_object(ra: &RegistryAccess, ctx: &Context) -> Result<Action, Error> {
    if ra.metadata.deletion_timestamp.is_some() {
        // The token Secret goes with its owner through garbage collection.
        return Ok(Action::await_change());
    }
    let uid = ra.uid().unwrap_or_default();
    let secret_name = ra.token_secret_name();

    // 1. Read what the object refers to.
    let token = read::token_secret(ra, ctx).await?;
    let (client, learned) = read::client_secret(ra, ctx).await?;
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
    let todo = apply::todo(ctx, decision, &decision_inputs);
    // Only a request about to be queued reads the credential's value and the CA bundle.
    let request = match todo {
        apply::Todo::Request(_) => Some(read::request(ra, ctx, client).await?),
        _ => None,
    };

    // 3. Apply: what was learned, the token Secret, the request, a former Secret retired.
    let step = apply::carry_out(ra, ctx, &decision_inputs, todo, &token, learned, request).await?;
    let held = step.held(&token.observed);

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
    // A pod that reads the token once cannot be helped by any timing: that comes first.
    let readers: Vec<_> = ctx
        .pods
        .fixed_readers(&Key::new(&ra.namespace().unwrap_or_default(), &secret_name))
        .into_iter()
        .map(|(pod, f)| (pod, f.container, f.key, f.how.as_str()))
        .collect();
    let timing = schedule::read_once_warning(&secret_name, &readers, plan.as_ref().map(|p| p.lifetime))
        .or_else(|| plan.as_ref().and_then(|p| schedule::timing_warning(p, renew_before.requested, ctx.mount_delay)));
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

/// Kubernetes API errors: retried with a backoff of the object's own, so that an object the API
/// keeps refusing does not take turns from the others.
pub fn error_policy(obj: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    let uid = obj.meta().uid.clone().unwrap_or_default();
    let wait = ctx.states.api_failed(&uid, rand::random::<f64>());
    ctx.settle(&Key::of(obj.as_ref()), &uid);
    warn!(error = %error, retry_in_secs = wait.as_secs_f64(), "reconcile failed at the Kubernetes API; retrying");
    Action::requeue(wait)
}

fn signed(d: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::reason;

    type ApiHandle = tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;

    /// A context whose Kubernetes client is a mock API server, and the mock's handle.
    fn context_with_api() -> (Context, ApiHandle) {
        let (mock, handle) =
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
            nudge_pods: true,
        };
        (Context::new(client, metrics, (states, index), issuer, settings), handle)
    }

    /// A context whose mock API server no test here calls.
    fn context() -> Context {
        context_with_api().0
    }

    /// Answers every API call with `answer(method, path)` (status code and JSON body), in a task
    /// of its own; returns the calls seen, as "METHOD path".
    fn serve(
        mut handle: ApiHandle,
        answer: impl Fn(&http::Method, &str) -> (u16, serde_json::Value) + Send + 'static,
    ) -> Arc<Mutex<Vec<String>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let path = request.uri().path().to_owned();
                log.lock().unwrap().push(format!("{} {path}", request.method()));
                let (code, body) = answer(request.method(), &path);
                let body = kube::client::Body::from(serde_json::to_vec(&body).expect("json"));
                respond.send_response(http::Response::builder().status(code).body(body).expect("response"));
            }
        });
        seen
    }

    fn not_found() -> (u16, serde_json::Value) {
        let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"});
        (404, status)
    }

    /// An opted-in client Secret `creds` of namespace billing holding `value`, at version `rv`.
    fn client_secret(value: &str, rv: &str) -> k8s_openapi::api::core::v1::Secret {
        let mut s = k8s_openapi::api::core::v1::Secret::default();
        s.metadata.name = Some("creds".into());
        s.metadata.namespace = Some("billing".into());
        s.metadata.uid = Some("cs-uid".into());
        s.metadata.resource_version = Some(rv.into());
        s.metadata.labels = Some([(crate::api::CLIENT_SECRET_LABEL.to_owned(), "true".to_owned())].into());
        s.data = Some([("client_secret".to_owned(), k8s_openapi::ByteString(value.as_bytes().to_vec()))].into());
        s
    }

    const CREDS: &str = "/api/v1/namespaces/billing/secrets/creds";
    const TOKEN_SECRET: &str = "/api/v1/namespaces/billing/secrets/consent-02-token";
    const STATUS: &str = "/apis/registry-access.io/v1alpha1/namespaces/billing/registryaccesses/consent-02/status";

    /// The watch's Delete comes while a reconcile of a new object runs (here: while it reads the
    /// client Secret). The reconcile goes on and queues a request and records series; when it
    /// ends, nothing of the object is left: no series, no state, no queued request.
    #[tokio::test]
    async fn a_delete_during_a_reconcile_leaves_nothing_behind() {
        let (ctx, api) = context_with_api();
        let ctx = Arc::new(ctx);
        let ra = crate::secret::tests::ra();
        let key = Key::of(&ra);
        ctx.set_live(key.clone(), "uid-1");
        let (watch, deleted) = (ctx.clone(), key.clone());
        let seen = serve(api, move |method, path| match (method.as_str(), path) {
            ("GET", TOKEN_SECRET) => not_found(),
            ("GET", CREDS) => {
                watch.forget(&deleted, Some("uid-1"));
                (200, serde_json::to_value(client_secret("s3cret", "1")).expect("json"))
            }
            _ => not_found(),
        });
        let obj = Arc::new(kube::core::DeserializeGuard(Ok(ra)));
        reconcile(obj, ctx.clone()).await.expect("the reconcile succeeds");
        assert!(seen.lock().unwrap().iter().any(|c| c == &format!("GET {CREDS}")), "the reconcile read the Secret");
        let text = ctx.metrics.render();
        assert!(!text.contains("consent-02"), "series of a deleted object remain:\n{text}");
        assert!(
            text.contains("registry_access_token_requests_queued 0"),
            "a request of a deleted object waits:\n{text}"
        );
        assert!(ctx.states.is_empty(), "state of a deleted object remains");
    }

    /// The index holds a stale view of the client Secret (version 1 and its fingerprint) while
    /// the Secret watch is away, and the secret was rotated meanwhile (version 2). The reconcile
    /// does not trust the index: it reads the Secret and asks for a token with the new secret.
    #[tokio::test]
    async fn a_stale_index_entry_is_not_trusted_while_the_watch_is_away() {
        let (ctx, api) = context_with_api();
        let ctx = Arc::new(ctx);
        let ra = crate::secret::tests::ra();
        let key = Key::of(&ra);
        ctx.set_live(key.clone(), "uid-1");
        let (old, new) = (client_secret("old-secret", "1"), client_secret("rotated-secret", "2"));
        let fingerprint = |s| crate::keycloak::credentials::Fingerprint::of(s, &ctx.digest_key, "client_secret");
        let old_inputs = fingerprint(&old).inputs(&ra).expect("inputs");
        let new_inputs = fingerprint(&new).inputs(&ra).expect("inputs");
        let creds = Key::new("billing", "creds");
        ctx.index.set_object(key, "uid-1", &[("creds".into(), crate::watch::index::Role::Client)]);
        ctx.index.secret_applied(creds.clone(), crate::watch::index::SecretMeta::of(&old.metadata));
        ctx.index.set_fingerprint(creds, Arc::new(fingerprint(&old)));
        let now = Timestamp::now().as_second();
        let held = crate::secret::build(&ra, &crate::secret::tests::token(now - 10, now + 290), &old_inputs);
        let held = serde_json::to_value(held).expect("json");
        let served = serde_json::to_value(&new).expect("json");
        let object = serde_json::to_value(&ra).expect("json");
        let seen = serve(api, move |method, path| match (method.as_str(), path) {
            ("GET" | "PATCH", TOKEN_SECRET) => (200, held.clone()),
            ("GET", CREDS) => (200, served.clone()),
            ("PATCH", STATUS) => (200, object.clone()),
            _ => not_found(),
        });
        let obj = Arc::new(kube::core::DeserializeGuard(Ok(ra)));
        reconcile(obj, ctx.clone()).await.expect("the reconcile succeeds");
        assert!(seen.lock().unwrap().iter().any(|c| c == &format!("GET {CREDS}")), "the Secret was not read");
        assert!(ctx.states.pending("uid-1", &new_inputs), "no token was asked for with the rotated secret");
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

    /// One namespace's nudges hold a bounded number of the operator's API requests, and token
    /// Secrets take turns: four Secrets written together, ten running mounting pods each, against
    /// an API server that holds every patch until the test answers the whole round. At most
    /// [`apply::NUDGES_IN_FLIGHT`] patches wait at once (without the operator-wide turns: 32,
    /// eight per Secret); the second round is the first eight pods of the two Secrets that
    /// waited, before the ninth pods of the first two; every pod is patched once.
    #[tokio::test(start_paused = true)]
    async fn nudges_of_many_secrets_hold_a_bounded_number_of_requests() {
        let (ctx, mut api) = context_with_api();
        let secrets = ["a", "b", "c", "d"];
        for s in secrets {
            for i in 0..10 {
                let view = crate::watch::pods::PodView {
                    uid: format!("{s}{i}-uid"),
                    running: true,
                    mounts: vec![format!("{s}-token")],
                    fixed: Vec::new(),
                };
                ctx.pods.applied(Key::new("billing", &format!("{s}{i}")), Some(view));
            }
        }
        for s in secrets {
            let mut ra = crate::secret::tests::ra();
            ra.metadata.name = Some(s.into());
            apply::nudge(&ctx, &ra, "7");
        }
        let answer = |respond: tower_test::mock::SendResponse<http::Response<kube::client::Body>>| {
            let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
            let body = kube::client::Body::from(serde_json::to_vec(&pod).expect("json"));
            respond.send_response(http::Response::builder().status(200).body(body).expect("response"));
        };
        let (mut waiting, mut rounds) = (Vec::new(), vec![Vec::<String>::new()]);
        let mut most = 0;
        while rounds.iter().map(Vec::len).sum::<usize>() < 40 {
            // The clock is paused: it moves on only when every task waits, so a quiet 100 ms
            // means that no further patch can come before some are answered.
            match tokio::time::timeout(Duration::from_millis(100), api.next_request()).await {
                Ok(Some((request, respond))) => {
                    assert_eq!(request.method(), http::Method::PATCH, "{}", request.uri());
                    let name = request.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
                    rounds.last_mut().expect("a round").push(name);
                    waiting.push(respond);
                    most = most.max(waiting.len());
                }
                Ok(None) => panic!("the client went away after {rounds:?}"),
                Err(_) => {
                    assert!(!waiting.is_empty(), "the nudges stopped after {rounds:?}");
                    waiting.drain(..).for_each(answer);
                    rounds.push(Vec::new());
                }
            }
        }
        waiting.drain(..).for_each(answer);
        // The last answers are counted once their tasks have run (before the paused clock moves).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(most, apply::NUDGES_IN_FLIGHT, "patches waiting at once: {rounds:?}");
        let sorted = |names: &[String]| {
            let mut names = names.to_vec();
            names.sort();
            names
        };
        let waited: Vec<String> = ["c", "d"].iter().flat_map(|s| (0..8).map(move |i| format!("{s}{i}"))).collect();
        assert_eq!(sorted(&rounds[1]), waited, "the second round: {rounds:?}");
        let mut each = sorted(&rounds.concat());
        each.dedup();
        assert_eq!(each.len(), 40, "a pod was patched twice or not at all: {rounds:?}");
        let text = ctx.metrics.render();
        assert!(text.contains(r#"registry_access_pod_nudges_total{outcome="sent"} 40"#), "{text}");
    }
}
