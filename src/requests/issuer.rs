//! Sends token requests outside the reconcile slots: a reconcile queues a request and returns; a
//! dispatcher takes requests from the [`Queue`] as pace and caps allow, each runs in a task of its
//! own, and its outcome is kept for the object, whose reconcile is then triggered to write it.
//! So waiting for Keycloak (its pace, its caps, its answer) never holds up any other object.
//!
//! Right before a request leaves, the consent it was made under is checked again: the operator's
//! allow-list, and the credential (client Secret, key Secret or ServiceAccount) still at the
//! version that was read when the request was queued. A request whose credential changed since
//! (its opt-in label removed, its allowed servers narrowed, its annotation withdrawn) is dropped
//! unsent and its object reconciled again from what the credential says now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use reqwest::Url;
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::api::Guarded;
use crate::failure::{Problem, reason, reason_for};
use crate::keycloak::assertion::Credential;
use crate::keycloak::token::{IssuedToken, TokenClient, TokenError, TokenRequest};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::requests::queue::{Dispatch, Next, Queue, QueueConfig, Ticket};
use crate::requests::state::{Completed, States};
use crate::watch::index::{Index, Key};

/// A request that starts this late after it was due is reported: demand is near the pace.
pub const LAG_WARNING: Duration = Duration::from_secs(10);
/// At most one lag warning per server in this interval.
const LAG_WARNING_EVERY: Duration = Duration::from_secs(60);
/// A minted ServiceAccount token (600 s) older than this is not sent: it could expire on the way
/// or be past what Keycloak accepts.
const SERVICE_ACCOUNT_TOKEN_MAX_AGE: Duration = Duration::from_secs(300);

/// Everything one token request needs, owned so that it can wait in the queue.
pub struct OwnedRequest {
    pub token_url: Url,
    pub client_id: String,
    pub credential: Credential,
    pub scopes: Vec<String>,
    /// Shared by every request of the objects that name the same bundle.
    pub ca_bundle: Option<Arc<str>>,
}

impl OwnedRequest {
    fn borrow(&self) -> TokenRequest<'_> {
        TokenRequest {
            token_url: &self.token_url,
            client_id: &self.client_id,
            credential: &self.credential,
            scopes: &self.scopes,
            ca_bundle: self.ca_bundle.as_deref(),
        }
    }

    /// The server the request goes to, for its queue and caps: scheme, host and port.
    pub fn server(&self) -> String {
        self.token_url.origin().ascii_serialization()
    }

    /// The client on that server, which a `Retry-After` pauses: token URL and client id.
    pub fn client(&self) -> String {
        format!("{} {}", self.token_url, self.client_id)
    }
}

/// Which credential a request was made with, and the version of it that allowed the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consent {
    /// A client Secret or private key Secret at this resourceVersion.
    Secret { key: Key, resource_version: String },
    /// A ServiceAccount at this resourceVersion.
    ServiceAccount { key: Key, resource_version: String },
}

/// Why a queued request was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    /// The server is no longer among those the operator allows.
    ServerNotAllowed,
    /// The credential changed (or went) since the request was queued.
    CredentialChanged,
}

impl Withdrawn {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServerNotAllowed => "server_not_allowed",
            Self::CredentialChanged => "credential_changed",
        }
    }
}

/// Whether the consent a request was queued under still holds, from what the watches show now.
/// A credential the watch does not know (yet) stands as read while its watch is not in sync.
pub fn consent_holds(index: &Index, policy: &Policy, server: &str, consent: &Consent) -> Result<(), Withdrawn> {
    if policy.refusal(server).is_some() {
        return Err(Withdrawn::ServerNotAllowed);
    }
    let (now, synced, wanted) = match consent {
        Consent::Secret { key, resource_version } => {
            (index.secret(key).map(|m| m.resource_version), index.secrets_synced(&key.namespace), resource_version)
        }
        Consent::ServiceAccount { key, resource_version } => (
            index.service_account(key).map(|m| m.resource_version),
            index.service_accounts_synced(&key.namespace),
            resource_version,
        ),
    };
    match now {
        Some(rv) if rv == *wanted => Ok(()),
        None if !synced => Ok(()),
        _ => Err(Withdrawn::CredentialChanged),
    }
}

/// A queued request on behalf of one object.
pub struct Job {
    pub object: ObjectRef<Guarded>,
    pub uid: String,
    pub inputs: String,
    pub request: OwnedRequest,
    /// When the request was meant to go; its lag counts from here.
    pub due_at: Timestamp,
    /// The latest start that still saves the token the object holds: a `Retry-After` pause of
    /// its client does not hold it longer.
    pub deadline: Option<Instant>,
    /// What allowed the request, checked again right before it is sent.
    pub consent: Consent,
}

/// A job as it waits in the queue, with the number [`States::set_pending`] gave it.
struct Queued {
    job: Job,
    number: u64,
}

/// The in-flight slot of a dispatched request: handed back to the queue when the request ends,
/// also when its task panics or is dropped, so a failure on the way never keeps a slot.
struct Slot<'a> {
    issuer: &'a Issuer,
    ticket: Option<Ticket>,
}

impl Slot<'_> {
    /// Frees the slot, doing `then` on the queue under the same lock.
    fn free(mut self, then: impl FnOnce(&mut Queue<Queued>, &Ticket)) {
        if let Some(ticket) = self.ticket.take() {
            let mut q = self.issuer.queue();
            then(&mut q, &ticket);
            q.done(&ticket);
        }
        self.issuer.wake.notify_one();
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.issuer.queue().done(&ticket);
            self.issuer.wake.notify_one();
        }
    }
}

/// The queue and the dispatcher.
pub struct Issuer {
    queue: Mutex<Queue<Queued>>,
    config: QueueConfig,
    wake: Notify,
    tokens: TokenClient,
    metrics: Arc<Metrics>,
    states: Arc<States>,
    index: Arc<Index>,
    policy: Policy,
    done: mpsc::UnboundedSender<ObjectRef<Guarded>>,
    warned: Mutex<HashMap<String, Instant>>,
}

/// What an [`Issuer`] works with besides its queue.
pub struct Shared {
    pub tokens: TokenClient,
    pub metrics: Arc<Metrics>,
    pub states: Arc<States>,
    /// What the watches show of credentials, for the consent check.
    pub index: Arc<Index>,
    pub policy: Policy,
}

impl Issuer {
    /// The issuer, and the stream of objects whose request has finished.
    pub fn new(config: QueueConfig, shared: Shared) -> (Arc<Self>, mpsc::UnboundedReceiver<ObjectRef<Guarded>>) {
        let (done, finished) = mpsc::unbounded_channel();
        let Shared { tokens, metrics, states, index, policy } = shared;
        let issuer = Self {
            queue: Mutex::new(Queue::new(config)),
            config,
            wake: Notify::new(),
            tokens,
            metrics,
            states,
            index,
            policy,
            done,
            warned: Mutex::new(HashMap::new()),
        };
        (Arc::new(issuer), finished)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<Queued>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request for an object in `namespace`; one queued earlier for the same object is
    /// replaced.
    pub fn submit(&self, namespace: &str, job: Job) {
        let number = self.states.set_pending(&job.uid, &job.inputs);
        let ticket = Ticket {
            server: job.request.server(),
            client: job.request.client(),
            namespace: namespace.to_owned(),
            key: job.uid.clone(),
            deadline: job.deadline,
        };
        let queued = {
            let mut q = self.queue();
            q.push(ticket, Queued { job, number });
            q.len()
        };
        self.metrics.set_queued(queued);
        self.wake.notify_one();
    }

    /// Drops the queued request of a deleted object.
    pub fn cancel(&self, uid: &str) {
        let left = {
            let mut q = self.queue();
            q.cancel(uid).map(|_| q.len())
        };
        if let Some(n) = left {
            self.metrics.set_queued(n);
        }
    }

    /// Dispatches requests until the process ends.
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = self.queue().next(Instant::now());
            match next {
                Next::Go(dispatch) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let tokens = &me.tokens;
                        me.send(dispatch, |request| async move {
                            // The expiry counts from when the request is sent.
                            tokens.request(&request.borrow(), Timestamp::now()).await
                        })
                        .await
                    });
                }
                Next::WaitUntil(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                        () = self.wake.notified() => {}
                    }
                }
                Next::Idle => self.wake.notified().await,
            }
        }
    }

    /// Sends one dispatched request with `request` (the token client; a stand-in in tests), and
    /// keeps its outcome for the object.
    async fn send<F, Fut>(&self, dispatch: Dispatch<Queued>, request: F)
    where
        F: FnOnce(OwnedRequest) -> Fut,
        Fut: std::future::Future<Output = Result<IssuedToken, TokenError>>,
    {
        let Dispatch { ticket, job: Queued { job, number } } = dispatch;
        let server = ticket.server.clone();
        let (namespace, client) = (ticket.namespace.clone(), ticket.client.clone());
        let slot = Slot { issuer: self, ticket: Some(ticket) };
        if let Err(why) = consent_holds(&self.index, &self.policy, job.request.token_url.as_str(), &job.consent) {
            slot.free(|_, _| {});
            self.metrics.request_withdrawn(why.as_str());
            info!(
                namespace = %namespace,
                name = %job.object.name,
                why = why.as_str(),
                "token request dropped unsent: what allowed it changed while it waited; reconciling again"
            );
            self.states.abandon(&job.uid, &job.inputs);
            let _ = self.done.send(job.object);
            return;
        }
        self.metrics.set_queued(self.queue().len());
        let lag = Duration::try_from(Timestamp::now().duration_since(job.due_at)).unwrap_or(Duration::ZERO);
        self.metrics.renewal_lag(lag);
        if lag >= LAG_WARNING {
            self.warn_lag(&server, lag);
        }
        // A ServiceAccount token that aged in the queue (a long pause) is not sent: Keycloak would
        // refuse it as an invalid credential. The object mints a fresh one on its next try.
        if let Credential::ServiceAccountToken(_, minted) = &job.request.credential
            && minted.elapsed() >= SERVICE_ACCOUNT_TOKEN_MAX_AGE
        {
            slot.free(|_, _| {});
            let problem = Problem::transient(
                reason::QUEUED_TOO_LONG,
                "the ServiceAccount token minted for this request aged while the request waited for its turn; \
                 a new one is minted for the next try",
            );
            if self.states.complete(&job.uid, number, Completed { inputs: job.inputs, result: Err(problem) }) {
                let _ = self.done.send(job.object);
            }
            return;
        }
        let timer = self.metrics.token_request();
        let result = request(job.request).await;
        timer.finish(result.as_ref().err().map(reason_for));
        // A client that is rate limited gets no request until the server says so (each request at
        // most until its own deadline); other clients of the server go on.
        slot.free(|q, _| {
            if let Err(e @ TokenError::RateLimited { .. }) = &result
                && let Some(wait) = e.retry_after()
            {
                q.pause(&client, Instant::now() + wait);
            }
        });
        let result = result.map_err(|e| Problem::from(&e));
        if self.states.complete(&job.uid, number, Completed { inputs: job.inputs, result }) {
            // The receiver lives as long as the controller; after it, nothing is left to tell.
            let _ = self.done.send(job.object);
        }
    }

    fn warn_lag(&self, server: &str, lag: Duration) {
        let now = Instant::now();
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.get(server).is_some_and(|t| now.duration_since(*t) < LAG_WARNING_EVERY) {
            return;
        }
        warned.retain(|_, t| now.duration_since(*t) < LAG_WARNING_EVERY);
        warned.insert(server.to_owned(), now);
        let queued = self.queue().len();
        warn!(
            server,
            lag_secs = lag.as_secs(),
            queued,
            pace_per_second = self.config.per_server_per_second,
            "token requests start late: demand on this Keycloak server is near the pace; raise \
             --max-requests-per-second-per-server (sizing: objects / (token lifetime - renewBefore) in seconds)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::index::{Role, SecretMeta, ServiceAccountMeta, Watched};

    const URL: &str = "https://kc.example.com/auth/realms/r/protocol/openid-connect/token";

    fn secret(rv: &str) -> SecretMeta {
        SecretMeta { uid: "u".into(), resource_version: rv.into(), token_of: None }
    }

    /// An index whose watches are in sync, with an object naming the Secret `creds`.
    fn synced_index() -> Index {
        let index = Index::default();
        index.set_object(Key::new("ns", "ra"), "uid", &[("creds".into(), Role::Client)]);
        let _ = index.set_synced(Watched::Secrets, None, true);
        let _ = index.set_synced(Watched::ServiceAccounts, None, true);
        index
    }

    #[test]
    fn a_request_goes_while_its_credential_is_as_it_was_read() {
        let index = synced_index();
        let key = Key::new("ns", "creds");
        index.secret_applied(key.clone(), secret("7"));
        let consent = Consent::Secret { key, resource_version: "7".into() };
        assert_eq!(consent_holds(&index, &Policy::default(), URL, &consent), Ok(()));
    }

    #[test]
    fn a_changed_or_deleted_credential_withdraws_the_request() {
        let index = synced_index();
        let key = Key::new("ns", "creds");
        // The opt-in label removed, the allowed-servers annotation narrowed or the value
        // rotated: each is a new resourceVersion.
        index.secret_applied(key.clone(), secret("8"));
        let consent = Consent::Secret { key: key.clone(), resource_version: "7".into() };
        assert_eq!(consent_holds(&index, &Policy::default(), URL, &consent), Err(Withdrawn::CredentialChanged));
        index.secret_deleted(&key);
        assert_eq!(consent_holds(&index, &Policy::default(), URL, &consent), Err(Withdrawn::CredentialChanged));
    }

    #[test]
    fn a_service_accounts_annotation_edited_while_waiting_withdraws_the_request() {
        let index = synced_index();
        let key = Key::new("ns", "builder");
        index.set_object(Key::new("ns", "ra"), "uid", &[("builder".into(), Role::ServiceAccount)]);
        let meta = |rv: &str| ServiceAccountMeta {
            uid: "sa".into(),
            resource_version: rv.into(),
            issuers: None,
            annotation_too_long: false,
        };
        index.service_account_applied(key.clone(), meta("1"));
        let consent = Consent::ServiceAccount { key: key.clone(), resource_version: "1".into() };
        assert_eq!(consent_holds(&index, &Policy::default(), URL, &consent), Ok(()));
        index.service_account_applied(key, meta("2"));
        assert_eq!(consent_holds(&index, &Policy::default(), URL, &consent), Err(Withdrawn::CredentialChanged));
    }

    #[test]
    fn the_allow_list_is_checked_at_sending() {
        let index = synced_index();
        let key = Key::new("ns", "creds");
        index.secret_applied(key.clone(), secret("7"));
        let policy = Policy { allowed_servers: vec!["https://other.example.com".into()], ..Policy::default() };
        let consent = Consent::Secret { key, resource_version: "7".into() };
        assert_eq!(consent_holds(&index, &policy, URL, &consent), Err(Withdrawn::ServerNotAllowed));
    }

    #[test]
    fn a_watch_out_of_sync_leaves_the_read_standing() {
        let index = Index::default();
        let consent = Consent::Secret { key: Key::new("ns", "creds"), resource_version: "7".into() };
        assert_eq!(consent_holds(&index, &Policy::default(), URL, &consent), Ok(()));
    }

    fn issuer() -> (Arc<Issuer>, mpsc::UnboundedReceiver<ObjectRef<Guarded>>) {
        let shared = Shared {
            tokens: TokenClient::new(Default::default()).expect("token client"),
            metrics: Arc::new(Metrics::new()),
            states: Arc::new(States::default()),
            index: Arc::new(Index::default()),
            policy: Policy::default(),
        };
        Issuer::new(Default::default(), shared)
    }

    fn job(uid: &str) -> Job {
        Job {
            object: ObjectRef::new("ra").within("ns"),
            uid: uid.to_owned(),
            inputs: "in".into(),
            request: OwnedRequest {
                token_url: Url::parse(URL).expect("url"),
                client_id: "c".into(),
                credential: Credential::SecretPost("not-a-real-secret".to_owned().into()),
                scopes: Vec::new(),
                ca_bundle: None,
            },
            due_at: Timestamp::now(),
            deadline: None,
            consent: Consent::Secret { key: Key::new("ns", "creds"), resource_version: "1".into() },
        }
    }

    /// Queues a job and takes it from the queue as the dispatcher would: its slot is taken.
    fn dispatched(issuer: &Issuer, uid: &str) -> Dispatch<Queued> {
        issuer.submit("ns", job(uid));
        let Next::Go(dispatch) = issuer.queue().next(Instant::now()) else { panic!("nothing to dispatch") };
        assert_eq!(issuer.queue().in_flight_of("ns"), 1);
        dispatch
    }

    #[tokio::test]
    async fn a_panic_in_a_send_frees_its_slot() {
        let (issuer, _finished) = issuer();
        let dispatch = dispatched(&issuer, "uid-1");
        let me = issuer.clone();
        let task = tokio::spawn(async move {
            me.send(dispatch, |_| async { panic!("the token client panicked (on purpose, in a test)") }).await
        });
        assert!(task.await.expect_err("the send panicked").is_panic());
        assert_eq!(issuer.queue().in_flight_of("ns"), 0, "the panicked request still holds its slot");
    }

    #[tokio::test]
    async fn a_send_dropped_on_the_way_frees_its_slot() {
        let (issuer, _finished) = issuer();
        let dispatch = dispatched(&issuer, "uid-1");
        let send = issuer.send(dispatch, |_| std::future::pending());
        assert!(tokio::time::timeout(Duration::from_millis(20), send).await.is_err(), "the send never ends");
        assert_eq!(issuer.queue().in_flight_of("ns"), 0, "the dropped request still holds its slot");
    }

    #[tokio::test]
    async fn an_error_in_a_send_frees_its_slot_and_is_kept_for_the_object() {
        let (issuer, mut finished) = issuer();
        let dispatch = dispatched(&issuer, "uid-1");
        let down = TokenError::Timeout { url: URL.into(), timeout: Duration::from_secs(15) };
        issuer.send(dispatch, |_| async { Err(down) }).await;
        assert_eq!(issuer.queue().in_flight_of("ns"), 0);
        let outcome = issuer.states.take_completed("uid-1", "in").expect("the outcome is kept");
        assert_eq!(outcome.result.expect_err("a failure").reason, reason::KEYCLOAK_UNAVAILABLE);
        assert_eq!(finished.try_recv().expect("the object is reconciled again").name, "ra");
    }
}
