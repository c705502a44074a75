//! Sends token requests outside the reconcile slots: a reconcile queues a request and returns; a
//! dispatcher takes requests from the [`Queue`] as pace and caps allow, each runs in a task of its
//! own, and its outcome is kept for the object, whose reconcile is then triggered to write it.
//! So waiting for Keycloak (its pace, its caps, its answer) never holds up any other object.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use reqwest::Url;
use tokio::sync::{Notify, mpsc};
use tracing::warn;

use crate::api::Guarded;
use crate::assertion::Credential;
use crate::failure::{Problem, reason, reason_for};
use crate::metrics::Metrics;
use crate::queue::{Dispatch, Next, Queue, QueueConfig};
use crate::state::{Completed, States};
use crate::token::{TokenClient, TokenError, TokenRequest};

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
    pub ca_bundle: Option<String>,
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
}

/// A queued request on behalf of one object.
pub struct Job {
    pub object: ObjectRef<Guarded>,
    pub uid: String,
    pub inputs: String,
    pub request: OwnedRequest,
    /// When the request was meant to go; its lag counts from here.
    pub due_at: Timestamp,
}

/// The queue and the dispatcher.
pub struct Issuer {
    queue: Mutex<Queue<Job>>,
    config: QueueConfig,
    wake: Notify,
    tokens: TokenClient,
    metrics: Arc<Metrics>,
    states: Arc<States>,
    done: mpsc::UnboundedSender<ObjectRef<Guarded>>,
    warned: Mutex<HashMap<String, Instant>>,
}

impl Issuer {
    /// The issuer, and the stream of objects whose request has finished.
    pub fn new(
        config: QueueConfig,
        tokens: TokenClient,
        metrics: Arc<Metrics>,
        states: Arc<States>,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<ObjectRef<Guarded>>) {
        let (done, finished) = mpsc::unbounded_channel();
        let issuer = Self {
            queue: Mutex::new(Queue::new(config)),
            config,
            wake: Notify::new(),
            tokens,
            metrics,
            states,
            done,
            warned: Mutex::new(HashMap::new()),
        };
        (Arc::new(issuer), finished)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<Job>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request for an object in `namespace`; one queued earlier for the same object is
    /// replaced.
    pub fn submit(&self, namespace: &str, job: Job) {
        self.states.set_pending(&job.uid, &job.inputs);
        let server = job.request.server();
        let uid = job.uid.clone();
        let queued = {
            let mut q = self.queue();
            q.push(&server, namespace, &uid, job, Instant::now());
            q.len()
        };
        self.metrics.set_queued(queued);
        self.wake.notify_one();
    }

    /// Drops the queued request of a deleted object.
    pub fn cancel(&self, uid: &str) {
        self.queue().cancel(uid);
    }

    /// Dispatches requests until the process ends.
    pub async fn run(self: Arc<Self>) {
        loop {
            let next = self.queue().next(Instant::now());
            match next {
                Next::Go(dispatch) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.send(dispatch).await });
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

    async fn send(&self, dispatch: Dispatch<Job>) {
        let Dispatch { server, job, .. } = dispatch;
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
            self.queue().done(&server);
            self.wake.notify_one();
            let problem = Problem::transient(
                reason::QUEUED_TOO_LONG,
                "the ServiceAccount token minted for this request aged while the request waited for its turn; \
                 a new one is minted for the next try",
            );
            if self.states.complete(&job.uid, Completed { inputs: job.inputs, result: Err(problem) }) {
                let _ = self.done.send(job.object);
            }
            return;
        }
        let timer = self.metrics.token_request();
        // The expiry counts from when the request is sent.
        let result = self.tokens.request(&job.request.borrow(), Timestamp::now()).await;
        timer.finish(result.as_ref().err().map(reason_for));
        {
            let mut q = self.queue();
            q.done(&server);
            // A server that rate limits gets no request from anyone until it says so.
            if let Err(e @ TokenError::RateLimited { .. }) = &result
                && let Some(wait) = e.retry_after()
            {
                q.pause(&server, Instant::now() + wait);
            }
        }
        self.wake.notify_one();
        let result = result.map_err(|e| Problem::from(&e));
        if self.states.complete(&job.uid, Completed { inputs: job.inputs, result }) {
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
        let queued = self.queue().len_for(server);
        warn!(
            server,
            lag_secs = lag.as_secs(),
            queued,
            pace_per_second = self.config.per_server_per_second,
            "token requests start late: demand on this Keycloak server is near the pace; raise \
             --max-requests-per-second-per-server (sizing: objects x 1.5 / token lifetime in seconds)"
        );
    }
}
