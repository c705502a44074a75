//! The reconciler: for each RegistryAccess, read (token Secret, client Secret) -> decide (pure) ->
//! write (token Secret, status), and requeue for the next renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::api::RegistryAccess;
use crate::credentials::{self, Credentials};
use crate::decide::{self, Decision, Failure};
use crate::events::{self, Severity};
use crate::leader::{self, LeaderConfig, LeaderError};
use crate::limits::{LimitConfig, Limits};
use crate::metrics::Metrics;
use crate::policy;
use crate::probes::Readiness;
use crate::schedule;
use crate::secret::{self, MANAGER, Observed};
use crate::status::{self, StatusInputs};
use crate::token::{self, TokenClient, TokenRequest};
use crate::trust;

/// How long to wait before retrying after a Kubernetes API error.
const API_ERROR_RETRY: Duration = Duration::from_secs(5);
/// How often readiness looks whether the watches have synced.
const READY_POLL: Duration = Duration::from_millis(250);
/// A conflicting Secret is re-checked at least this often (its deletion also triggers at once).
const CONFLICT_RECHECK: Duration = Duration::from_secs(300);

/// Why a reconcile failed at the Kubernetes API; token request failures are not errors here, they
/// become conditions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading token Secret {namespace}/{name}: {source}")]
    ReadTokenSecret { namespace: String, name: String, source: kube::Error },
    #[error("reading client Secret {namespace}/{name}: {source}")]
    ReadClientSecret { namespace: String, name: String, source: kube::Error },
    #[error("reading the CA bundle {kind} {namespace}/{name}: {source}")]
    ReadCaBundle { kind: &'static str, namespace: String, name: String, source: kube::Error },
    #[error("writing token Secret {namespace}/{name}: {source}")]
    ApplySecret { namespace: String, name: String, source: kube::Error },
    #[error("writing status of RegistryAccess {namespace}/{name}: {source}")]
    ApplyStatus { namespace: String, name: String, source: kube::Error },
}

/// Settings of a controller run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Watch only these namespaces; all namespaces when empty.
    pub namespaces: Vec<String>,
    /// Most reconciles in flight at once.
    pub concurrency: u16,
    pub token_client: token::ClientConfig,
    /// Set once the watches have synced (served on /readyz).
    pub readiness: Readiness,
    /// Keycloak servers objects may use (URL prefixes); any when empty.
    pub allowed_servers: Vec<String>,
    pub limits: LimitConfig,
    pub metrics: Arc<Metrics>,
    /// Name of this operator instance in Events (the pod name in a cluster).
    pub instance: Option<String>,
    /// Leader election; `None` runs the controllers at once.
    pub leader: Option<LeaderConfig>,
}

/// Handles shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub tokens: TokenClient,
    pub metrics: Arc<Metrics>,
    limits: Limits,
    recorder: Recorder,
    allowed_servers: Vec<String>,
    /// Last failure per object uid, until a request for it succeeds.
    failures: Mutex<HashMap<String, Failure>>,
    /// A token Keycloak issued but the API server did not take, per object uid, with the inputs it
    /// was issued for: written on the next try instead of asking Keycloak again.
    unwritten: Mutex<HashMap<String, (token::IssuedToken, String)>>,
}

impl Context {
    pub fn new(client: Client, tokens: TokenClient, config: &RunConfig) -> Self {
        let reporter = Reporter { controller: MANAGER.to_owned(), instance: config.instance.clone() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            tokens,
            metrics: config.metrics.clone(),
            limits: Limits::new(config.limits),
            allowed_servers: config.allowed_servers.clone(),
            failures: Mutex::new(HashMap::new()),
            unwritten: Mutex::new(HashMap::new()),
        }
    }

    fn failure(&self, uid: &str) -> Option<Failure> {
        self.failures.lock().ok().and_then(|m| m.get(uid).cloned())
    }

    /// Takes the unwritten token of `uid` if it was issued for `inputs` and is not due yet.
    fn take_unwritten(
        &self,
        uid: &str,
        inputs: Option<&str>,
        renew_before: Option<Duration>,
        now: Timestamp,
    ) -> Option<(token::IssuedToken, String)> {
        let mut m = self.unwritten.lock().ok()?;
        let (token, for_inputs) = m.remove(uid)?;
        (Some(for_inputs.as_str()) == inputs && now < decide::plan_for(&token, renew_before, uid).renew_at)
            .then_some((token, for_inputs))
    }

    fn keep_unwritten(&self, uid: &str, token: token::IssuedToken, inputs: String) {
        if let Ok(mut m) = self.unwritten.lock() {
            m.insert(uid.to_owned(), (token, inputs));
        }
    }

    /// Drops everything kept about a deleted object.
    fn forget(&self, ra: &RegistryAccess) {
        self.metrics.forget_object(&ra.namespace().unwrap_or_default(), &ra.name_any());
        let uid = ra.uid().unwrap_or_default();
        self.set_failure(&uid, None);
        if let Ok(mut m) = self.unwritten.lock() {
            m.remove(&uid);
        }
    }

    fn set_failure(&self, uid: &str, f: Option<Failure>) {
        if let Ok(mut m) = self.failures.lock() {
            match f {
                Some(f) => m.insert(uid.to_owned(), f),
                None => m.remove(uid),
            };
        }
    }
}

/// Why the operator could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("building the HTTP client for Keycloak: {0}")]
    TokenClient(#[source] token::TokenError),
    #[error(transparent)]
    Leader(#[from] LeaderError),
}

/// Runs the operator until a termination signal arrives; with leader election, only while this
/// replica holds the Lease.
pub async fn run(client: Client, config: RunConfig) -> Result<(), RunError> {
    let tokens = TokenClient::new(config.token_client.clone()).map_err(RunError::TokenClient)?;
    let ctx = Arc::new(Context::new(client.clone(), tokens, &config));
    match config.leader.clone() {
        None => run_controllers(client, &config, ctx).await,
        Some(leader) => {
            // A standby replica is healthy and ready: it is waiting for the Lease by design.
            config.readiness.set_ready();
            leader::run_as_leader(client.clone(), &leader, || run_controllers(client, &config, ctx)).await?;
        }
    }
    Ok(())
}

/// Runs the controllers until a termination signal arrives: one controller over all namespaces,
/// or one per watched namespace (each with its own watches, all sharing the token client and
/// the failure records).
async fn run_controllers(client: Client, config: &RunConfig, ctx: Arc<Context>) {
    let scopes: Vec<Option<String>> =
        if config.namespaces.is_empty() { vec![None] } else { config.namespaces.iter().cloned().map(Some).collect() };
    info!(
        namespaces = if config.namespaces.is_empty() { "<all>".to_owned() } else { config.namespaces.join(",") },
        concurrency = config.concurrency,
        "controller starting"
    );
    let mut synced = Vec::new();
    let controllers = scopes.into_iter().map(|scope| {
        let (store, controller) = controller(client.clone(), scope, config.concurrency, ctx.clone());
        synced.push(store);
        controller
    });
    let controllers: Vec<_> = controllers.collect();
    let readiness = config.readiness.clone();
    tokio::spawn(async move {
        for store in synced {
            // The store's ready signal wakes only its latest waiter (the controller), so look
            // again now and then instead of waiting for a wake-up.
            loop {
                match tokio::time::timeout(READY_POLL, store.wait_until_ready()).await {
                    Ok(Ok(())) => break,
                    Ok(Err(_)) => return,
                    Err(_) => {}
                }
            }
        }
        info!("watches synced");
        readiness.set_ready();
    });
    futures::future::join_all(controllers).await;
    info!("controller stopped");
}

/// The controller of one scope (a namespace, or all), and its RegistryAccess store.
fn controller(
    client: Client,
    namespace: Option<String>,
    concurrency: u16,
    ctx: Arc<Context>,
) -> (reflector::Store<RegistryAccess>, impl std::future::Future<Output = ()>) {
    let (ras, secrets): (Api<RegistryAccess>, Api<PartialObjectMeta<Secret>>) = match namespace.as_deref() {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let (store, writer) = reflector::store();
    // Reconcile on spec and annotation changes only: the operator's own status writes do not
    // trigger another round.
    let forget = ctx.clone();
    let counted = store.clone();
    let ra_events = watcher(ras, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(watcher::Event::Delete(ra)) = event {
                forget.forget(ra);
            }
            forget.metrics.set_objects(counted.len());
        })
        .applied_objects()
        .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
    // One metadata-only watch of Secrets serves both directions: the client Secrets a
    // RegistryAccess reads and the token Secrets it writes. No Secret data is cached.
    let secret_events = watcher(secrets, watcher::Config::default().any_semantic()).default_backoff().touched_objects();
    let lookup = store.clone();
    let run = Controller::for_stream(ra_events, store.clone())
        .watches_stream(secret_events, move |s| {
            let ns = s.namespace();
            let name = s.name_any();
            lookup
                .state()
                .into_iter()
                .filter(|ra| {
                    ra.namespace() == ns && (ra.spec.client_secret_ref.name == name || ra.token_secret_name() == name)
                })
                .map(|ra| ObjectRef::from_obj(&*ra))
                .collect::<Vec<_>>()
        })
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(namespace = obj.namespace.as_deref(), name = %obj.name, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile did not complete"),
            }
        });
    (store, run)
}

/// Reconciles one RegistryAccess.
pub async fn reconcile(ra: Arc<RegistryAccess>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = ra.namespace().unwrap_or_default();
    let name = ra.name_any();
    let span = info_span!("reconcile", namespace = %namespace, name = %name);
    let start = std::time::Instant::now();
    let result = reconcile_in(ra, ctx.clone(), namespace).instrument(span).await;
    ctx.metrics.reconciled(start.elapsed(), result.is_err());
    result
}

async fn reconcile_in(ra: Arc<RegistryAccess>, ctx: Arc<Context>, namespace: String) -> Result<Action, Error> {
    if ra.metadata.deletion_timestamp.is_some() {
        // The token Secret goes with its owner through garbage collection.
        return Ok(Action::await_change());
    }
    let uid = ra.uid().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret_name = ra.token_secret_name();
    let client_secret_name = &ra.spec.client_secret_ref.name;

    // Read.
    let live = secrets.get_opt(&secret_name).await.map_err(|source| Error::ReadTokenSecret {
        namespace: namespace.clone(),
        name: secret_name.clone(),
        source,
    })?;
    let client_secret = secrets.get_opt(client_secret_name).await.map_err(|source| Error::ReadClientSecret {
        namespace: namespace.clone(),
        name: client_secret_name.clone(),
        source,
    })?;

    let ca_bundle = trust::read_ca_bundle(&ra, &ctx.client, &namespace).await?;

    // Decide.
    let now = Timestamp::now();
    let observed = secret::observe(&ra, live.as_ref());
    let credentials = if policy::server_allowed(&ra.spec.server, &ctx.allowed_servers) {
        credentials::extract(&ra, client_secret.as_ref())
    } else {
        Err(credentials::Problem {
            reason: status::reason::SERVER_NOT_ALLOWED,
            message: format!(
                "spec.server {} is not among the Keycloak servers this operator may use ({}); no request was sent",
                ra.spec.server,
                ctx.allowed_servers.join(", ")
            ),
            transient: false,
        })
    };
    // A CA bundle that cannot be used blocks requests like an unusable client secret does.
    let credentials = match (credentials, &ca_bundle) {
        (Ok(_), Err(problem)) => Err(problem.clone()),
        (c, _) => c,
    };
    let inputs = credentials.as_ref().ok().map(|c| c.inputs.clone());
    let renew_before = ra.spec.renew_before.filter(|d| !d.is_negative()).map(Duration::from);
    let failure = ctx.failure(&uid);
    let decision = decide::decide(decide::Inputs {
        now,
        observed: &observed,
        inputs: inputs.as_deref(),
        renew_before,
        failure: failure.as_ref(),
        jitter_seed: &uid,
    });
    debug!(?decision, "decided");

    // Write.
    let apply = PatchParams::apply(MANAGER).force();
    let write_secret = |desired: Secret| {
        let secrets = secrets.clone();
        let (namespace, secret_name) = (namespace.clone(), secret_name.clone());
        async move {
            secrets.patch(&secret_name, &apply, &Patch::Apply(&desired)).await.map_err(|source| Error::ApplySecret {
                namespace,
                name: secret_name,
                source,
            })
        }
    };
    let mut issued = false;
    let (held, failure, conflict, next) = match decision {
        Decision::Conflict => {
            warn!(secret = %secret_name, "token Secret exists and is not owned by this RegistryAccess; leaving it untouched");
            (None, failure, true, now + signed(CONFLICT_RECHECK))
        }
        Decision::Wait { until } => {
            let held = match &observed {
                Observed::Held(h) => Some(h.clone()),
                _ => None,
            };
            if let (Some(h), Some(live)) = (&held, &live) {
                let desired = secret::build(&ra, &h.token, h.inputs.as_deref().unwrap_or_default());
                if secret::needs_apply(&desired, live) {
                    info!(secret = %secret_name, "restoring token Secret");
                    write_secret(desired).await?;
                }
            }
            (held.map(|h| h.token), failure, false, until)
        }
        Decision::Fetch(why) => {
            let previous_token = match &observed {
                Observed::Held(h) => Some(h.token.clone()),
                _ => None,
            };
            // A token issued before but not written (the API server refused or was away) is
            // written now rather than asking Keycloak again.
            let fetched = match ctx.take_unwritten(&uid, inputs.as_deref(), renew_before, now) {
                Some(kept) => Ok(kept),
                None => {
                    fetch(&ra, &ctx, credentials.as_ref(), ca_bundle.as_ref().ok().and_then(Option::as_deref)).await
                }
            };
            let outcome = match fetched {
                // A token that cannot be stored is a failure like any other: it gets a reason
                // and a retry, and the previous token stays.
                Ok((token, inputs)) => match write_secret(secret::build(&ra, &token, &inputs)).await {
                    Ok(_) => Ok((token, inputs)),
                    Err(e) => {
                        ctx.keep_unwritten(&uid, token, inputs);
                        Err(credentials::Problem {
                            reason: status::reason::SECRET_WRITE_FAILED,
                            message: e.to_string(),
                            transient: true,
                        })
                    }
                },
                Err(problem) => Err(problem),
            };
            match outcome {
                Ok((token, _)) => {
                    info!(
                        secret = %secret_name,
                        reason = why.as_str(),
                        expires_at = %secret::rfc3339(token.expires_at),
                        "token refreshed"
                    );
                    ctx.set_failure(&uid, None);
                    issued = true;
                    let next = decide::plan_for(&token, renew_before, &uid).renew_at;
                    (Some(token), None, false, next)
                }
                Err(problem) => {
                    let attempts = failure.as_ref().map(|f| f.attempts).unwrap_or(0).saturating_add(1);
                    let expires_at = previous_token.as_ref().map(|t| t.expires_at);
                    let retry_at =
                        schedule::retry_at(now, attempts, problem.transient, expires_at, rand::random::<f64>());
                    warn!(
                        reason = problem.reason,
                        message = %problem.message,
                        attempts,
                        retry_at = %secret::rfc3339(retry_at),
                        "refresh failed"
                    );
                    let f = Failure {
                        attempts,
                        at: now,
                        retry_at,
                        inputs: inputs.clone(),
                        reason: problem.reason,
                        message: problem.message,
                    };
                    ctx.set_failure(&uid, Some(f.clone()));
                    let next = match expires_at {
                        Some(e) if e > now => retry_at.min(e),
                        _ => retry_at,
                    };
                    (previous_token, Some(f), false, next)
                }
            }
        }
    };

    let plan = held.as_ref().map(|t| decide::plan_for(t, renew_before, &uid));
    // A failure recorded for other inputs is stale: the next attempt uses the current ones.
    let failure = failure.filter(|f| f.inputs == inputs);
    let status = status::build(&StatusInputs {
        now,
        generation: ra.metadata.generation,
        secret_name: &secret_name,
        token: held.as_ref(),
        plan,
        conflict,
        failure: failure.as_ref(),
        upcoming: credentials.as_ref().err().map(|p| (p.reason, p.message.as_str())),
        previous: ra.status.as_ref(),
    });
    let ready = held.as_ref().is_some_and(|t| t.expires_at > now) && !conflict;
    report(&ctx, &ra, &status, issued, held.as_ref().map(|t| t.expires_at.as_second()), ready).await?;

    // Look again at the next renewal or retry time; a token that expires meanwhile is reported.
    let next = match held.as_ref().map(|t| t.expires_at) {
        Some(e) if e > now => next.min(e),
        _ => next,
    };
    let wait = Duration::try_from(next.duration_since(now)).unwrap_or(Duration::ZERO);
    debug!(requeue_after_secs = wait.as_secs(), "next look");
    Ok(Action::requeue(wait.max(Duration::from_millis(100))))
}

/// Writes the status (when it changed), the object's metrics and the Events its change calls for.
async fn report(
    ctx: &Context,
    ra: &RegistryAccess,
    status: &crate::api::RegistryAccessStatus,
    issued: bool,
    expires_at: Option<i64>,
    ready: bool,
) -> Result<(), Error> {
    let (namespace, name) = (ra.namespace().unwrap_or_default(), ra.name_any());
    if ra.status.as_ref() != Some(status) {
        let api: Api<RegistryAccess> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({
            "apiVersion": RegistryAccess::api_version(&()),
            "kind": RegistryAccess::kind(&()),
            "status": status,
        });
        api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(|source| Error::ApplyStatus { namespace: namespace.clone(), name: name.clone(), source })?;
    }
    ctx.metrics.set_object(&namespace, &name, expires_at, ready);
    let reference = ra.object_ref(&());
    for notice in events::notices(ra.status.as_ref(), status, issued) {
        let event = KubeEvent {
            type_: match notice.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: notice.reason,
            note: Some(notice.note),
            action: "RefreshToken".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, "cannot write an Event");
        }
    }
    Ok(())
}

/// Requests a token with the credentials, turning every failure into a condition problem.
async fn fetch(
    ra: &RegistryAccess,
    ctx: &Context,
    credentials: Result<&Credentials, &credentials::Problem>,
    ca_bundle: Option<&str>,
) -> Result<(token::IssuedToken, String), credentials::Problem> {
    let credentials = credentials.map_err(Clone::clone)?;
    let url = token::token_url(&ra.spec.server, &ra.spec.realm).map_err(|message| credentials::Problem {
        reason: status::reason::INVALID_SPEC,
        message,
        transient: false,
    })?;
    let request = TokenRequest {
        token_url: &url,
        client_id: &ra.spec.client_id,
        client_secret: &credentials.client_secret,
        auth_method: ra.spec.client_auth_method,
        scopes: &ra.spec.scopes,
        ca_bundle,
    };
    let _permit = ctx.limits.acquire(url.origin().ascii_serialization().as_str()).await;
    let timer = ctx.metrics.token_request();
    // The expiry counts from when the request is sent, after any wait for a permit.
    let result = ctx.tokens.request(&request, Timestamp::now()).await;
    timer.finish(result.as_ref().err().map(status::reason_for));
    result.map(|t| (t, credentials.inputs.clone())).map_err(|e| credentials::Problem {
        reason: status::reason_for(&e),
        message: e.to_string(),
        transient: e.is_transient(),
    })
}

/// Kubernetes API errors: retried soon, with jitter so that many objects do not retry together.
pub fn error_policy(_ra: Arc<RegistryAccess>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(error = %error, "reconcile failed; retrying");
    Action::requeue(API_ERROR_RETRY.mul_f64(1.0 + rand::random::<f64>()))
}

fn signed(d: Duration) -> jiff::SignedDuration {
    jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::ZERO)
}
