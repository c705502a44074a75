//! Wiring only: one controller for any number of watched namespaces, fed by the RegistryAccess
//! watches, the metadata-only Secret watches (through the keyed index, skipping the operator's
//! own writes) and the issuer's finished requests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{Predicate, WatchStreamExt, predicates};
use kube::{Api, Client, Resource};
use tracing::{debug, info};

use crate::api::{CredentialSource, Guarded, REFRESH_ANNOTATION, RegistryAccess};
use crate::keycloak::digest_key::{DigestKey, KeyError};
use crate::keycloak::token::{self, TokenClient};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::reconcile::{Context, Settings, error_policy, reconcile};
use crate::requests::issuer::{Issuer, Shared};
use crate::requests::queue::QueueConfig;
use crate::requests::state::States;
use crate::runtime::leader::{self, LeaderConfig, LeaderError};
use crate::runtime::probes::Readiness;
use crate::watch::index::{Index, Key, Role, SecretMeta, ServiceAccountMeta, Watched};
use crate::watch::{pods, scopes};

/// Longest refresh annotation value kept as it is in the cache; a longer one is kept as its
/// digest (only a change of it matters).
const MAX_REFRESH_VALUE: usize = 64;
/// Objects per page when a watch lists (kube's default is 500: about 1.5 MB of RegistryAccess JSON).
const LIST_PAGE_SIZE: u32 = 100;
/// How often readiness looks whether the watches have synced.
const READY_POLL: Duration = Duration::from_millis(250);

/// Most reconciles in flight at once, by default.
pub const DEFAULT_CONCURRENCY: u16 = 16;
/// Time allowed for one Kubernetes API call, by default.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Which Keycloak servers objects may use.
    pub policy: Policy,
    /// Where the digest key is kept: namespace and name of its Secret.
    pub digest_key_secret: (String, String),
    /// The longest a pod's mounted Secret lags an update; zero turns the timing warning off.
    pub mount_delay: Duration,
    pub limits: QueueConfig,
    /// Time limit of each Kubernetes API call of a reconcile.
    pub api_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Name of this operator instance in Events (the pod name in a cluster).
    pub instance: Option<String>,
    /// Leader election; `None` runs the controller at once.
    pub leader: Option<LeaderConfig>,
    /// Follow the pods of namespaces with objects: nudge those that mount a token Secret after
    /// each write, and report those that read it once.
    pub nudge_pods: bool,
}

/// Why the operator could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("building the HTTP client for Keycloak: {0}")]
    TokenClient(#[source] token::TokenError),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error(transparent)]
    DigestKey(#[from] KeyError),
}

/// Runs the operator until a termination signal arrives; with leader election, only while this
/// replica holds the Lease.
pub async fn run(client: Client, config: RunConfig) -> Result<(), RunError> {
    let tokens = TokenClient::new(config.token_client.clone()).map_err(RunError::TokenClient)?;
    let (ns, name) = &config.digest_key_secret;
    let key = DigestKey::load_or_create(&client, ns, name, config.api_timeout).await?;
    match config.leader.clone() {
        None => run_controller(client, &config, tokens, key).await,
        Some(leader) => {
            // A standby replica is healthy and ready: it is waiting for the Lease by design.
            config.readiness.set_ready();
            leader::run_as_leader(client.clone(), &leader, || run_controller(client, &config, tokens, key)).await?;
        }
    }
    Ok(())
}

type Scope = Option<String>;

/// Runs the controller until a termination signal arrives.
async fn run_controller(client: Client, config: &RunConfig, tokens: TokenClient, digest_key: DigestKey) {
    config.metrics.set_leader(true);
    let scopes: Vec<Scope> =
        if config.namespaces.is_empty() { vec![None] } else { config.namespaces.iter().cloned().map(Some).collect() };
    info!(
        namespaces = if config.namespaces.is_empty() { "<all>".to_owned() } else { config.namespaces.join(",") },
        concurrency = config.concurrency,
        per_server_per_second = config.limits.per_server_per_second,
        "controller starting"
    );
    let states = Arc::new(States::default());
    let index = Arc::new(Index::default());
    let shared = Shared {
        tokens,
        metrics: config.metrics.clone(),
        states: states.clone(),
        index: index.clone(),
        policy: config.policy.clone(),
    };
    let (issuer, finished) = Issuer::new(config.limits, shared);
    let settings = Settings {
        api_timeout: config.api_timeout,
        policy: config.policy.clone(),
        digest_key,
        mount_delay: config.mount_delay,
        failed_attempt: config.token_client.request_timeout + crate::reconcile::schedule::INITIAL_BACKOFF,
        instance: config.instance.clone(),
        nudge_pods: config.nudge_pods,
    };
    let ctx = Arc::new(Context::new(client.clone(), config.metrics.clone(), (states, index), issuer.clone(), settings));
    let dispatcher = tokio::spawn(issuer.run());

    // RegistryAccess: one watch per scope, merged into one store.
    let (store, writer) = reflector::store::<Guarded>();
    let watches: Vec<BoxStream<'static, _>> = scopes
        .iter()
        .map(|scope| {
            let api: Api<Guarded> = match scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            watcher(api).modify(|o: &mut Guarded| trim(o.meta_mut())).boxed()
        })
        .collect();
    let (pod_triggers, pod_events) = tokio::sync::mpsc::unbounded_channel();
    let pods = Arc::new(PodWatches {
        client: client.clone(),
        ctx: ctx.clone(),
        enabled: config.nudge_pods,
        triggers: pod_triggers,
        namespaces: Mutex::default(),
    });
    let (index_ctx, counted, pod_watches) = (ctx.clone(), store.clone(), pods.clone());
    let objects = scopes::merge(watches, store.clone())
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(event) => {
                index_ctx.metrics.watch_event("registryaccesses");
                follow_object(&index_ctx, event);
                pod_watches.follow(event);
                index_ctx.metrics.set_objects(counted.len());
            }
            Err(e) => index_ctx.watch_failed("registryaccesses", e),
        })
        .applied_objects()
        // Spec and annotation changes only: the operator's own status writes do not come back.
        .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());

    // Secrets: metadata only, one watch per scope; an event reaches the objects that name the
    // Secret through the index, unless it is the operator's own write.
    let secret_ctx = ctx.clone();
    let secret_events = metadata_watches::<Secret>(&client, &scopes)
        .flat_map(move |(scope, event)| stream::iter(secret_triggers(&secret_ctx, &scope, event)));
    // ServiceAccounts: metadata only, for the objects that authenticate with one.
    let sa_ctx = ctx.clone();
    let service_account_events = metadata_watches::<ServiceAccount>(&client, &scopes)
        .flat_map(move |(scope, event)| stream::iter(service_account_triggers(&sa_ctx, &scope, event)));
    let finished = stream::unfold(finished, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let pod_events = stream::unfold(pod_events, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });

    let readiness = config.readiness.clone();
    let synced = store.clone();
    tokio::spawn(async move {
        // The store's ready signal wakes only its latest waiter (the controller), so look again
        // now and then instead of waiting for a wake-up.
        loop {
            match tokio::time::timeout(READY_POLL, synced.wait_until_ready()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
        info!("watches synced");
        readiness.set_ready();
    });

    Controller::for_stream(objects, store)
        .reconcile_on(secret_events)
        .reconcile_on(service_account_events)
        .reconcile_on(finished)
        .reconcile_on(pod_events)
        .with_config(ControllerConfig::default().concurrency(config.concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(namespace = obj.namespace.as_deref(), name = %obj.name, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile did not complete"),
            }
        })
        .await;
    dispatcher.abort();
    pods.stop_all();
    config.metrics.set_leader(false);
    info!("controller stopped");
}

/// Metadata-only watches of `K`, one per scope, merged; each event tagged with its scope (a
/// re-list prunes only what its own scope no longer has).
fn metadata_watches<K>(
    client: &Client,
    scopes: &[Scope],
) -> impl futures::Stream<Item = (Scope, Result<Event<PartialObjectMeta<K>>, watcher::Error>)> + Send + 'static
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K: serde::de::DeserializeOwned,
{
    stream::select_all(scopes.iter().map(|scope| {
        let api: Api<PartialObjectMeta<K>> = match scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let scope = scope.clone();
        watcher::watcher(api, list_config()).default_backoff().map(move |e| (scope.clone(), e)).boxed()
    }))
}

/// Drops from a cached RegistryAccess what no decision needs, so that an object costs the
/// operator its spec (bounded by the CRD) and not whatever its metadata holds: managed fields,
/// labels, owner references, finalizers and every annotation but the refresh request (kept as a
/// digest when long).
fn trim(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.annotations = meta.annotations.take().and_then(|mut a| a.remove(REFRESH_ANNOTATION)).map(|v| {
        let v = if v.len() <= MAX_REFRESH_VALUE {
            v
        } else {
            use sha2::Digest as _;
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(v.as_bytes())))
        };
        [(REFRESH_ANNOTATION.to_owned(), v)].into()
    });
}

/// The watch of one scope's RegistryAccess objects.
fn watcher(api: Api<Guarded>) -> impl futures::Stream<Item = Result<Event<Guarded>, watcher::Error>> {
    watcher::watcher(api, list_config()).default_backoff()
}

/// Watches list from the API server's cache, in pages small enough that listing thousands of
/// objects never holds a large response in memory at once.
fn list_config() -> watcher::Config {
    watcher::Config::default().any_semantic().page_size(LIST_PAGE_SIZE)
}

/// Keeps the index of the Secrets objects name, and forgets deleted objects.
fn follow_object(ctx: &Context, event: &Event<Guarded>) {
    match event {
        Event::Apply(obj) | Event::InitApply(obj) => {
            let key = Key::of(obj);
            ctx.set_live(key.clone(), obj.meta().uid.as_deref().unwrap_or_default());
            match &obj.0 {
                Ok(ra) => ctx.index.set_object(key, obj.meta().uid.as_deref().unwrap_or_default(), &secrets_of(ra)),
                Err(_) => ctx.index.remove_object(&key),
            }
        }
        Event::Delete(obj) => ctx.forget(&Key::of(obj), obj.meta().uid.as_deref()),
        Event::Init | Event::InitDone => {}
    }
}

/// One pod watch per namespace that has RegistryAccess objects, started with the first object
/// there and stopped with the last: pods of other namespaces are never listed.
struct PodWatches {
    client: Client,
    ctx: Arc<Context>,
    enabled: bool,
    /// Objects to reconcile because a pod that reads their token Secret once came or went.
    triggers: tokio::sync::mpsc::UnboundedSender<ObjectRef<Guarded>>,
    /// Namespace -> its objects (names) and its pod watch.
    namespaces: Mutex<HashMap<String, (HashSet<String>, tokio::task::AbortHandle)>>,
}

impl PodWatches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (HashSet<String>, tokio::task::AbortHandle)>> {
        self.namespaces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts or stops a namespace's pod watch as its objects come and go.
    fn follow(&self, event: &Event<Guarded>) {
        if !self.enabled {
            return;
        }
        match event {
            Event::Apply(obj) | Event::InitApply(obj) => {
                let key = Key::of(obj);
                let mut namespaces = self.lock();
                let (objects, _) = namespaces.entry(key.namespace.clone()).or_insert_with(|| {
                    let task = tokio::spawn(follow_pods(
                        self.client.clone(),
                        key.namespace.clone(),
                        self.ctx.clone(),
                        self.triggers.clone(),
                    ));
                    (HashSet::new(), task.abort_handle())
                });
                objects.insert(key.name);
            }
            Event::Delete(obj) => {
                let key = Key::of(obj);
                let mut namespaces = self.lock();
                let Some((objects, watch)) = namespaces.get_mut(&key.namespace) else { return };
                objects.remove(&key.name);
                if objects.is_empty() {
                    watch.abort();
                    namespaces.remove(&key.namespace);
                    self.ctx.pods.forget_namespace(&key.namespace);
                    self.ctx.metrics.set_pods(self.ctx.pods.len());
                }
            }
            Event::Init | Event::InitDone => {}
        }
    }

    fn stop_all(&self) {
        for (_, (_, watch)) in self.lock().drain() {
            watch.abort();
        }
    }
}

/// Follows the pods of one namespace into the pod index; a pod that starts or stops reading a
/// token Secret once has that Secret's object reconciled (to report it).
async fn follow_pods(
    client: Client,
    namespace: String,
    ctx: Arc<Context>,
    triggers: tokio::sync::mpsc::UnboundedSender<ObjectRef<Guarded>>,
) {
    let api: Api<Pod> = Api::namespaced(client, &namespace);
    let mut events = watcher::watcher(api, list_config()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let changed = match event {
            Err(e) => {
                ctx.watch_failed("pods", &e);
                continue;
            }
            Ok(Event::Init) => {
                ctx.pods.relist_begin(&namespace);
                Vec::new()
            }
            Ok(Event::InitApply(pod) | Event::Apply(pod)) => ctx.pods.applied(Key::of(&pod), pods::view(&pod)),
            Ok(Event::Delete(pod)) => ctx.pods.deleted(&Key::of(&pod)),
            Ok(Event::InitDone) => ctx.pods.relist_end(&namespace),
        };
        ctx.metrics.watch_event("pods");
        ctx.metrics.set_pods(ctx.pods.len());
        for secret in changed {
            for r in ctx.index.referrers(&secret).into_iter().filter(|r| r.role == Role::Token) {
                let _ = triggers.send(ObjectRef::new(&r.object.name).within(&r.object.namespace));
            }
        }
    }
}

/// What an object names: its credential (a Secret or a ServiceAccount) and its token Secret.
fn secrets_of(ra: &RegistryAccess) -> Vec<(String, Role)> {
    let mut named = vec![(ra.token_secret_name(), Role::Token)];
    match ra.spec.credential_source() {
        CredentialSource::Secret { name, .. } => named.push((name.to_owned(), Role::Client)),
        CredentialSource::ServiceAccount { name } => named.push((name.to_owned(), Role::ServiceAccount)),
        CredentialSource::Missing => {}
    }
    named
}

/// The objects a ServiceAccount event concerns: those that authenticate with a ServiceAccount
/// that is new, changed (recreated, its annotation edited) or gone.
fn service_account_triggers(
    ctx: &Context,
    scope: &Scope,
    event: Result<Event<PartialObjectMeta<ServiceAccount>>, watcher::Error>,
) -> Vec<ObjectRef<Guarded>> {
    let event = match event {
        Ok(event) => event,
        Err(e) => {
            ctx.watch_failed("serviceaccounts", &e);
            ctx.index.set_synced(Watched::ServiceAccounts, scope.clone(), false);
            return Vec::new();
        }
    };
    ctx.metrics.watch_event("serviceaccounts");
    let changed: Vec<Key> = match event {
        Event::Init => {
            ctx.index.relist_begin(Watched::ServiceAccounts, scope.clone());
            Vec::new()
        }
        Event::InitApply(sa) | Event::Apply(sa) => {
            let key = Key::of(&sa);
            let meta = ServiceAccountMeta::of(&sa.metadata);
            if ctx.index.service_account_applied(key.clone(), meta) { vec![key] } else { Vec::new() }
        }
        Event::Delete(sa) => {
            let key = Key::of(&sa);
            ctx.index.service_account_deleted(&key);
            vec![key]
        }
        Event::InitDone => {
            let _ = ctx.index.set_synced(Watched::ServiceAccounts, scope.clone(), true);
            ctx.index.relist_end(Watched::ServiceAccounts, scope)
        }
    };
    changed
        .iter()
        .flat_map(|sa| ctx.index.referrers(sa))
        .filter(|r| r.role == Role::ServiceAccount)
        .map(|r| ObjectRef::new(&r.object.name).within(&r.object.namespace))
        .collect()
}

/// The objects a Secret event concerns: those that name a Secret that is new, changed or gone,
/// except for the watch's report of the operator's own write of a token Secret.
fn secret_triggers(
    ctx: &Context,
    scope: &Scope,
    event: Result<Event<PartialObjectMeta<Secret>>, watcher::Error>,
) -> Vec<ObjectRef<Guarded>> {
    let event = match event {
        Ok(event) => event,
        Err(e) => {
            ctx.watch_failed("secrets", &e);
            // Every object of the scope looks again now, reading its Secrets from the API (and
            // again at least every minute while the watch is away).
            if !ctx.index.set_synced(Watched::Secrets, scope.clone(), false) {
                return Vec::new();
            }
            return ctx
                .index
                .objects_in(scope)
                .into_iter()
                .map(|k| ObjectRef::new(&k.name).within(&k.namespace))
                .collect();
        }
    };
    ctx.metrics.watch_event("secrets");
    let (changed, version): (Vec<Key>, Option<String>) = match event {
        Event::Init => {
            ctx.index.relist_begin(Watched::Secrets, scope.clone());
            (Vec::new(), None)
        }
        Event::InitApply(s) | Event::Apply(s) => {
            let key = Key::of(&s);
            let meta = SecretMeta::of(&s.metadata);
            let version = meta.resource_version.clone();
            if ctx.index.secret_applied(key.clone(), meta) { (vec![key], Some(version)) } else { (Vec::new(), None) }
        }
        Event::Delete(s) => {
            let key = Key::of(&s);
            ctx.index.secret_deleted(&key);
            (vec![key], None)
        }
        Event::InitDone => {
            let _ = ctx.index.set_synced(Watched::Secrets, scope.clone(), true);
            (ctx.index.relist_end(Watched::Secrets, scope), None)
        }
    };
    changed
        .iter()
        .flat_map(|secret| ctx.index.referrers(secret))
        .filter(|r| r.role != Role::ServiceAccount)
        .filter(|r| {
            !(r.role == Role::Token && version.as_deref().is_some_and(|v| ctx.states.is_known_version(&r.uid, v)))
        })
        .map(|r| ObjectRef::new(&r.object.name).within(&r.object.namespace))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn a_cached_object_keeps_only_what_decisions_need() {
        let big = "x".repeat(200 * 1024);
        let mut meta = ObjectMeta {
            name: Some("ra".into()),
            uid: Some("u".into()),
            labels: Some([("l".to_owned(), big.clone())].into()),
            annotations: Some(
                [
                    ("kubectl.kubernetes.io/last-applied-configuration".to_owned(), big.clone()),
                    ("hostile".to_owned(), big.clone()),
                    (REFRESH_ANNOTATION.to_owned(), big.clone()),
                ]
                .into(),
            ),
            finalizers: Some(vec![big.clone()]),
            ..ObjectMeta::default()
        };
        trim(&mut meta);
        let size = serde_json::to_string(&meta).unwrap().len();
        assert!(size < 200, "{size} bytes kept");
        let refresh = &meta.annotations.as_ref().unwrap()[REFRESH_ANNOTATION];
        assert!(refresh.starts_with("sha256:"), "{refresh}");
        let mut short = ObjectMeta {
            annotations: Some([(REFRESH_ANNOTATION.to_owned(), "2026-12-04T10:00:00Z".to_owned())].into()),
            ..ObjectMeta::default()
        };
        trim(&mut short);
        assert_eq!(short.annotations.unwrap()[REFRESH_ANNOTATION], "2026-12-04T10:00:00Z", "a timestamp is kept as is");
    }
}
