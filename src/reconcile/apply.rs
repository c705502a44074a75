//! Stage 3 of a reconcile, every write: what the decision comes to (store a finished request's
//! token, keep or restore the Secret, queue a new request), the token Secret and the status with
//! server-side apply under the operator's one field manager within the API time limit, the
//! ServiceAccount tokens minted for a request, former token Secrets retired, and what the reads
//! learned kept in the index and the per-object state.
//!
//! Nothing here reads from the API: what it needs was read by the read stage.

use futures::StreamExt as _;
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use std::time::Duration;
use tracing::{debug, info, warn};

use super::Context;
use super::decide::{self, Decision, FetchReason, Inputs};
use super::read::{Learned, Prepared, Presented, TokenSecret};
use crate::api::{RegistryAccess, RegistryAccessStatus, TOKEN_WRITTEN_ANNOTATION};
use crate::failure::{self, Error, Problem, reason, within};
use crate::keycloak::assertion::Credential;
use crate::keycloak::token::TokenFacts;
use crate::requests::issuer::{Job, OwnedRequest};
use crate::requests::state::{Completed, Known};
use crate::secret::{self, HeldToken, MANAGED_BY_LABEL, MANAGER, Observed, RETIRED_ANNOTATION};
use crate::watch::index::Key;

/// What the apply stage did about the token.
pub enum Step {
    /// The target Secret belongs to someone else.
    Conflict,
    /// Nothing to request: keep the token held (if any) until `until`.
    Keep { until: Timestamp },
    /// A request is queued or in flight; `now` when it was queued by this reconcile.
    Pending { now: bool },
    /// A request ended (or could not be made): what follows it.
    Attempted { after: decide::AfterAttempt, issued: bool },
}

impl Step {
    /// The token the object holds after this step: the one just stored, else the one read.
    pub fn held(&self, observed: &Observed) -> Option<TokenFacts> {
        match self {
            Step::Attempted { after, .. } => after.held.clone(),
            _ => match observed {
                Observed::Held(h) => Some(h.token.clone()),
                _ => None,
            },
        }
    }
}

/// What the decision comes to, with what the operator remembers of earlier requests.
pub enum Todo {
    /// The target Secret belongs to someone else.
    Conflict,
    /// Nothing to request until `until`.
    Wait { until: Timestamp },
    /// A request of these inputs ended: store its outcome.
    Store(Completed),
    /// A request of these inputs is queued or in flight.
    Pending,
    /// Queue a request.
    Request(FetchReason),
}

/// What the decision comes to: a finished request's outcome is stored, a pending one awaited, or
/// a new one made. A token kept from a failed write that is due by now is dropped: a new one is
/// asked.
pub fn todo(ctx: &Context, decision: Decision, i: &Inputs<'_>) -> Todo {
    let why = match decision {
        Decision::Conflict => return Todo::Conflict,
        Decision::Wait { until } => return Todo::Wait { until },
        Decision::Fetch(why) => why,
    };
    let uid = i.jitter_seed;
    let completed = i.inputs.and_then(|inputs| ctx.states.take_completed(uid, inputs)).filter(|c| match &c.result {
        Err(_) => true,
        Ok(t) => decide::plan_for(&t.facts(), i.renew_before, uid).renew_at > i.now,
    });
    match completed {
        Some(done) => Todo::Store(done),
        None if i.inputs.is_some_and(|inputs| ctx.states.pending(uid, inputs)) => Todo::Pending,
        None => Todo::Request(why),
    }
}

/// Carries out what the decision came to, and keeps in the index what the reads learned; once
/// the Secret of the current spec.secret.name holds a valid token, a token Secret this object
/// controlled under a former name is retired.
pub async fn carry_out(
    ra: &RegistryAccess,
    ctx: &Context,
    i: &Inputs<'_>,
    todo: Todo,
    token: &TokenSecret,
    learned: Learned,
    request: Option<(Result<Prepared, Problem>, Learned)>,
) -> Result<Step, Error> {
    let uid = i.jitter_seed;
    remember(ctx, learned);
    if !matches!(token.observed, Observed::Held(_)) {
        ctx.states.set_known(uid, None);
    }
    let step = match todo {
        Todo::Conflict => {
            warn!(secret = %ra.token_secret_name(), "token Secret exists and is not owned by this RegistryAccess; leaving it untouched");
            ctx.states.set_known(uid, None);
            Step::Conflict
        }
        Todo::Wait { until } => {
            keep(ra, ctx, token).await?;
            Step::Keep { until }
        }
        Todo::Store(done) => store(ra, ctx, i, done).await?,
        Todo::Pending => Step::Pending { now: false },
        Todo::Request(why) => match request {
            Some((prepared, learned)) => {
                remember(ctx, learned);
                match prepared {
                    Ok(prepared) => match queue(ra, ctx, i, why, token, prepared).await {
                        Ok(()) => Step::Pending { now: true },
                        Err(problem) => failed(ctx, i, uid, &problem),
                    },
                    Err(problem) => failed(ctx, i, uid, &problem),
                }
            }
            None => Step::Pending { now: false },
        },
    };
    if step.held(&token.observed).is_some_and(|t| t.expires_at > i.now) && !matches!(step, Step::Conflict) {
        retire_former(ra, ctx, &ra.token_secret_name()).await?;
    }
    Ok(step)
}

/// Keeps in the index what a read learned that the watch had not shown.
fn remember(ctx: &Context, learned: Learned) {
    if let Some((key, meta)) = learned.secret {
        ctx.index.secret_read(key, meta);
    }
    if let Some((key, fingerprint)) = learned.fingerprint {
        ctx.index.set_fingerprint(key, fingerprint);
    }
    if let Some((key, meta)) = learned.service_account {
        ctx.index.service_account_read(key, meta);
    }
}

/// Queues a prepared request, minting the ServiceAccount token it presents first if it presents
/// one.
async fn queue(
    ra: &RegistryAccess,
    ctx: &Context,
    i: &Inputs<'_>,
    why: FetchReason,
    token: &TokenSecret,
    prepared: Prepared,
) -> Result<(), Problem> {
    let namespace = ra.namespace().unwrap_or_default();
    let credential = match prepared.presented {
        Presented::Ready(credential) => credential,
        Presented::Mint { name, uid, audience } => {
            let (token, at) = mint(ctx, &namespace, &name, &uid, &audience).await?;
            Credential::ServiceAccountToken(token, at)
        }
    };
    debug!(reason = why.as_str(), "token request queued");
    let deadline = match &token.observed {
        Observed::Held(h) => Some(deadline(h.token.expires_at, ctx.failed_attempt, i.now)),
        _ => None,
    };
    let job = Job {
        object: ObjectRef::new(&ra.name_any()).within(&namespace),
        uid: i.jitter_seed.to_owned(),
        inputs: prepared.inputs,
        request: OwnedRequest {
            token_url: prepared.token_url,
            client_id: ra.spec.client_id.clone(),
            credential,
            scopes: ra.spec.scopes.clone(),
            ca_bundle: prepared.ca_bundle,
        },
        due_at: decide::due_at(i, why),
        deadline,
        consent: prepared.consent,
    };
    ctx.issuer.submit(&namespace, job);
    Ok(())
}

/// Nothing to request: restores the token Secret if someone changed what the operator set, and
/// remembers its version so that later reconciles need not read it.
async fn keep(ra: &RegistryAccess, ctx: &Context, token: &TokenSecret) -> Result<(), Error> {
    let (Some(live), Observed::Held(held)) = (&token.live, &token.observed) else { return Ok(()) };
    let Some((full, inputs)) = secret::read_token(live) else { return Ok(()) };
    let desired = secret::build(ra, &full, inputs.as_deref().unwrap_or_default());
    let resource_version = if secret::needs_apply(&desired, live) {
        info!(secret = %ra.token_secret_name(), "restoring token Secret");
        let version = token_secret(ctx, ra, &desired, false).await?;
        nudge(ctx, ra, &version);
        version
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
        retire_secret(ctx, ra, &former.name, current).await?;
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
    match token_secret(ctx, ra, &desired, create).await {
        Ok(resource_version) => {
            let facts = token.facts();
            info!(
                secret = %ra.token_secret_name(),
                expires_at = %secret::rfc3339(facts.expires_at),
                "token refreshed"
            );
            nudge(ctx, ra, &resource_version);
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

/// A token of the ServiceAccount for `audience`, minted with the TokenRequest API for the
/// shortest lifetime the API server allows, or one minted moments ago for the same
/// ServiceAccount (same uid) and audience. Never written anywhere.
async fn mint(
    ctx: &Context,
    namespace: &str,
    name: &str,
    uid: &str,
    audience: &str,
) -> Result<(SecretString, std::time::Instant), Problem> {
    if let Some(young) = ctx.minted.young(uid, audience) {
        return Ok(young);
    }
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(MINTED_LIFETIME_SECS),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    ctx.metrics.service_account_token_requested();
    match within(ctx.api_timeout, api.create_token_request(name, &PostParams::default(), &request)).await {
        Ok(answer) => {
            let token = SecretString::from(answer.status.map(|s| s.token).unwrap_or_default());
            if token.expose_secret().is_empty() {
                return Err(Problem::transient(
                    reason::SERVICE_ACCOUNT_TOKEN_REFUSED,
                    format!("the TokenRequest API answered without a token for ServiceAccount {namespace}/{name}"),
                ));
            }
            let at = std::time::Instant::now();
            ctx.minted.keep(uid, audience, token.clone(), at);
            Ok((token, at))
        }
        Err(e) => {
            let (transient, hint) = match &e {
                kube::Error::Api(s) if s.code == 403 => {
                    (false, "; the operator needs create on serviceaccounts/token in this namespace")
                }
                kube::Error::Api(s) if s.code == 404 => (true, "; the ServiceAccount was deleted"),
                _ => (true, ""),
            };
            let message = format!(
                "a token for ServiceAccount {namespace}/{name} could not be made: {}{hint}",
                crate::failure::api_summary(&e)
            );
            Err(if transient {
                Problem::transient(reason::SERVICE_ACCOUNT_TOKEN_REFUSED, message)
            } else {
                Problem::fix(reason::SERVICE_ACCOUNT_TOKEN_REFUSED, message)
            })
        }
    }
}

/// Lifetime asked for minted ServiceAccount tokens: the shortest the API server allows.
const MINTED_LIFETIME_SECS: i64 = 600;

/// The latest start of a request that still lets one failed attempt pass before the held token
/// expires, on the process clock.
fn deadline(expires_at: Timestamp, failed_attempt: Duration, now: Timestamp) -> std::time::Instant {
    let left = Duration::try_from(expires_at.duration_since(now)).unwrap_or(Duration::ZERO);
    std::time::Instant::now() + left.saturating_sub(failed_attempt)
}

/// Pods of one token Secret nudged at once.
const NUDGE_CONCURRENCY: usize = 8;

/// Pod nudges in flight operator-wide. However many Secrets and mounting pods a namespace has,
/// their nudges hold at most this many of the operator's API requests at a time, so that the
/// token writes of every other object never queue behind them (in the client or in the API
/// server's priority and fairness). Secrets take turns: each waits with at most
/// [`NUDGE_CONCURRENCY`] of its pods, and turns are given first come first served.
pub const NUDGES_IN_FLIGHT: usize = 16;

/// Tells the running pods that mount `ra`'s token Secret as a volume that it was written (at
/// `version`): one patch of one annotation each, concurrently up to [`NUDGE_CONCURRENCY`] and
/// within the operator-wide [`NUDGES_IN_FLIGHT`], in a task of its own, so that a slow or refused
/// nudge never delays the refresh (the kubelet's periodic sync still delivers). Each patch
/// carries the pod's uid as a precondition: a pod replaced under the same name meanwhile is left
/// alone.
pub(super) fn nudge(ctx: &Context, ra: &RegistryAccess, version: &str) {
    if !ctx.nudge_pods || ra.spec.nudge_pods == Some(false) {
        return;
    }
    let secret = Key::new(&ra.namespace().unwrap_or_default(), &ra.token_secret_name());
    let pods = ctx.pods.mounting(&secret);
    if pods.is_empty() {
        return;
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &secret.namespace);
    let (metrics, timeout, in_flight) = (ctx.metrics.clone(), ctx.api_timeout, ctx.nudges_in_flight.clone());
    let value = format!("{}@{version}", secret.name);
    tokio::spawn(async move {
        futures::stream::iter(pods)
            .for_each_concurrent(NUDGE_CONCURRENCY, |pod| {
                let (api, metrics, value, in_flight) = (&api, &metrics, &value, &in_flight);
                async move {
                    // The semaphore is never closed.
                    let Ok(_turn) = in_flight.acquire().await else { return };
                    let patch = json!({
                        "metadata": {"uid": pod.uid, "annotations": {TOKEN_WRITTEN_ANNOTATION: value}},
                    });
                    let sent =
                        within(timeout, api.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))).await;
                    metrics.pod_nudged(sent.is_ok());
                    match sent {
                        Ok(_) => debug!(pod = %pod.name, "pod nudged"),
                        Err(e) => debug!(
                            pod = %pod.name,
                            error = %failure::api_summary(&e),
                            "pod nudge failed; the kubelet's sync delivers"
                        ),
                    }
                }
            })
            .await;
    });
}

/// Applies the token Secret; returns its new resourceVersion. With `create`, the Secret was not
/// there when it was read: it is first created, empty but for what the operator always sets (its
/// label and owner), with a create that fails if the Secret exists by now. So a Secret someone
/// else created since the read is never taken over: the next reconcile finds it foreign.
pub async fn token_secret(ctx: &Context, ra: &RegistryAccess, desired: &Secret, create: bool) -> Result<String, Error> {
    let (namespace, name) = (ra.namespace().unwrap_or_default(), ra.token_secret_name());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    if create {
        let husk = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())].into()),
                owner_references: ra.controller_owner_ref(&()).map(|r| vec![r]),
                ..Default::default()
            },
            type_: desired.type_.clone(),
            ..Default::default()
        };
        let params = PostParams { field_manager: Some(MANAGER.to_owned()), ..PostParams::default() };
        within(ctx.api_timeout, api.create(&params, &husk)).await.map_err(|source| Error::CreateSecret {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    }
    let written =
        within(ctx.api_timeout, api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(desired)))
            .await
            .map_err(|source| Error::ApplySecret { namespace, name, source })?;
    Ok(written.resource_version().unwrap_or_default())
}

/// Retires a former token Secret of `ra`: applies it with the operator's labels, owner and a
/// retired annotation only, so that server-side apply removes the token keys and annotations the
/// operator had set (keys someone else added stay).
pub async fn retire_secret(ctx: &Context, ra: &RegistryAccess, name: &str, successor: &str) -> Result<(), Error> {
    let namespace = ra.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let husk = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGER},
            "annotations": {RETIRED_ANNOTATION: format!("replaced by Secret {successor} (spec.secret.name)")},
            "ownerReferences": ra.controller_owner_ref(&()).map(|r| vec![r]),
        },
        "type": "Opaque",
    });
    within(ctx.api_timeout, api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&husk)))
        .await
        .map_err(|source| Error::RetireSecret { namespace, name: name.to_owned(), source })?;
    Ok(())
}

/// Applies the status.
pub async fn status(ctx: &Context, ra: &RegistryAccess, status: &RegistryAccessStatus) -> Result<(), Error> {
    let (namespace, name) = (ra.namespace().unwrap_or_default(), ra.name_any());
    let api: Api<RegistryAccess> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": RegistryAccess::api_version(&()),
        "kind": RegistryAccess::kind(&()),
        "status": status,
    });
    within(ctx.api_timeout, api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)))
        .await
        .map_err(|source| Error::ApplyStatus { namespace, name, source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
