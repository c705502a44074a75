//! Prometheus metrics, all prefixed `registry_access_`, rendered in the text exposition format
//! on `/metrics`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming one RegistryAccess.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

/// Labels of a token request's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `success` or `failure`.
    pub result: String,
    /// The condition reason of a failure; empty for a success.
    pub reason: String,
}

/// Labels of a Degraded object: which one, and the condition's reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DegradedLabels {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// Labels of a failed reconcile: the stage that failed at the Kubernetes API.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

/// Labels of a token request dropped unsent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WhyLabels {
    pub why: String,
}

/// Labels of a pod nudge: `sent` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Labels of a watch error: which resource's watch.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub resource: String,
}

/// All of the operator's metrics.
pub struct Metrics {
    registry: Registry,
    token_expiry: Family<ObjectLabels, Gauge<i64>>,
    ready: Family<ObjectLabels, Gauge<i64>>,
    missing_roles: Family<ObjectLabels, Gauge<i64>>,
    degraded: Family<DegradedLabels, Gauge<i64>>,
    /// The reason each Degraded object's series carries, to remove it when it changes.
    degraded_reasons: Mutex<std::collections::HashMap<(String, String), String>>,
    leader: Gauge<i64>,
    service_account_tokens: Counter,
    token_requests: Family<RequestLabels, Counter>,
    keycloak_duration: Histogram,
    in_flight: Gauge<i64>,
    reconciles: Counter,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Histogram,
    objects: Gauge<i64>,
    renewal_lag: Histogram,
    queued: Gauge<i64>,
    undecodable: Gauge<i64>,
    withdrawn: Family<WhyLabels, Counter>,
    nudges: Family<OutcomeLabels, Counter>,
    pods: Gauge<i64>,
    watch_errors: Family<WatchLabels, Counter>,
    watch_events: Family<WatchLabels, Counter>,
    /// Serializes rendering (the registry's encoder needs exclusive access to nothing, but one
    /// scrape at a time keeps the output consistent).
    render: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("registry_access");
        let token_expiry = Family::<ObjectLabels, Gauge<i64>>::default();
        registry.register(
            "token_expiry_timestamp_seconds",
            "Unix time when the token in the object's Secret expires",
            token_expiry.clone(),
        );
        let ready = Family::<ObjectLabels, Gauge<i64>>::default();
        registry.register("ready", "1 when the object's Secret holds an unexpired token, else 0", ready.clone());
        let missing_roles = Family::<ObjectLabels, Gauge<i64>>::default();
        registry.register(
            "missing_roles",
            "Required realm roles (spec.requiredRoles) the object's current token lacks; -1 when the token carries no realm_access claim; only for objects with requiredRoles",
            missing_roles.clone(),
        );
        let degraded = Family::<DegradedLabels, Gauge<i64>>::default();
        registry.register(
            "degraded",
            "1 while the object's Degraded condition is True, labelled with its reason (what to fix); no series otherwise",
            degraded.clone(),
        );
        let leader = Gauge::<i64>::default();
        registry.register(
            "leader",
            "1 while this process runs the controllers (it holds the Lease, or leader election is off), 0 while it waits",
            leader.clone(),
        );
        let service_account_tokens = Counter::default();
        registry.register(
            "service_account_token_requests",
            "TokenRequests sent to the Kubernetes API to mint ServiceAccount tokens (method service_account)",
            service_account_tokens.clone(),
        );
        let token_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "token_requests",
            "Token requests sent to Keycloak, by result and reason",
            token_requests.clone(),
        );
        // 5 ms to ~20 s.
        let keycloak_duration = Histogram::new(exponential_buckets(0.005, 2.0, 13));
        registry.register(
            "keycloak_request_duration_seconds",
            "Duration of token requests to Keycloak",
            keycloak_duration.clone(),
        );
        let in_flight = Gauge::<i64>::default();
        registry.register("token_requests_in_flight", "Token requests currently in flight", in_flight.clone());
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed at the Kubernetes API, by the stage that failed",
            reconcile_errors.clone(),
        );
        // Every stage's series from the start, at zero: rate() and the dashboard see them before
        // the first failure.
        for kind in crate::failure::Error::kinds() {
            reconcile_errors.get_or_create(&ErrorLabels { kind: kind.to_owned() }).inc_by(0);
        }
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register("reconcile_duration_seconds", "Duration of reconciles", reconcile_duration.clone());
        let objects = Gauge::<i64>::default();
        registry.register("managed_objects", "RegistryAccess objects the operator manages", objects.clone());
        // 10 ms to ~160 s.
        let renewal_lag = Histogram::new(exponential_buckets(0.01, 2.0, 15));
        registry.register(
            "renewal_lag_seconds",
            "How late token requests start after they were due (the renewal or retry time): grows when demand nears the pace",
            renewal_lag.clone(),
        );
        let queued = Gauge::<i64>::default();
        registry.register("token_requests_queued", "Token requests waiting for their turn", queued.clone());
        let undecodable = Gauge::<i64>::default();
        registry.register(
            "undecodable_objects",
            "RegistryAccess objects stored in a form this operator cannot read (skipped)",
            undecodable.clone(),
        );
        let withdrawn = Family::<WhyLabels, Counter>::default();
        registry.register(
            "token_requests_withdrawn",
            "Token requests dropped unsent because what allowed them changed while they waited (the credential's opt-in, its allowed servers or its version; the operator's allow-list)",
            withdrawn.clone(),
        );
        let nudges = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "pod_nudges",
            "Pods told of a new token by a change of their registry-access.io/token-written annotation, by outcome (sent, failed); a failed nudge leaves delivery to the kubelet's periodic sync",
            nudges.clone(),
        );
        for outcome in ["sent", "failed"] {
            let _ = nudges.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() });
        }
        let pods = Gauge::<i64>::default();
        registry.register(
            "pods_followed",
            "Pods kept in memory because they mount or read a Secret, in the namespaces that have RegistryAccess objects",
            pods.clone(),
        );
        let watch_errors = Family::<WatchLabels, Counter>::default();
        registry.register(
            "watch_errors",
            "Errors of the operator's watches, by resource; while a watch is in error the objects it concerns are read from the API",
            watch_errors.clone(),
        );
        let watch_events = Family::<WatchLabels, Counter>::default();
        registry.register(
            "watch_events",
            "Events the operator's watches delivered, by resource (a sign that the operator has seen a change)",
            watch_events.clone(),
        );
        for resource in ["registryaccesses", "secrets", "serviceaccounts", "pods"] {
            let _ = watch_errors.get_or_create(&WatchLabels { resource: resource.to_owned() });
            let _ = watch_events.get_or_create(&WatchLabels { resource: resource.to_owned() });
        }
        Self {
            registry,
            token_expiry,
            ready,
            missing_roles,
            degraded,
            degraded_reasons: Mutex::new(std::collections::HashMap::new()),
            leader,
            service_account_tokens,
            token_requests,
            keycloak_duration,
            in_flight,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            objects,
            renewal_lag,
            queued,
            undecodable,
            withdrawn,
            nudges,
            pods,
            watch_errors,
            watch_events,
            render: Mutex::new(()),
        }
    }

    /// Records the state of one object after a reconcile.
    pub fn set_object(
        &self,
        namespace: &str,
        name: &str,
        expires_at: Option<i64>,
        ready: bool,
        missing_roles: Option<i64>,
    ) {
        let labels = ObjectLabels { namespace: namespace.to_owned(), name: name.to_owned() };
        match expires_at {
            Some(t) => {
                self.token_expiry.get_or_create(&labels).set(t);
            }
            None => {
                self.token_expiry.remove(&labels);
            }
        }
        self.ready.get_or_create(&labels).set(i64::from(ready));
        match missing_roles {
            Some(n) => {
                self.missing_roles.get_or_create(&labels).set(n);
            }
            None => {
                self.missing_roles.remove(&labels);
            }
        }
    }

    /// Records whether one object is Degraded, and why: one series per object while it is.
    pub fn set_degraded(&self, namespace: &str, name: &str, reason: Option<&str>) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut reasons = self.degraded_reasons.lock().unwrap_or_else(|e| e.into_inner());
        let labels = |reason: String| DegradedLabels { namespace: key.0.clone(), name: key.1.clone(), reason };
        match reason {
            Some(reason) => {
                if let Some(old) = reasons.insert(key.clone(), reason.to_owned()).filter(|old| old != reason) {
                    self.degraded.remove(&labels(old));
                }
                self.degraded.get_or_create(&labels(reason.to_owned())).set(1);
            }
            None => {
                if let Some(old) = reasons.remove(&key) {
                    self.degraded.remove(&labels(old));
                }
            }
        }
    }

    /// Whether this process runs the controllers.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Forgets a deleted object.
    pub fn forget_object(&self, namespace: &str, name: &str) {
        let labels = ObjectLabels { namespace: namespace.to_owned(), name: name.to_owned() };
        self.token_expiry.remove(&labels);
        self.ready.remove(&labels);
        self.missing_roles.remove(&labels);
        self.set_degraded(namespace, name, None);
    }

    /// A TokenRequest was sent for a ServiceAccount token.
    pub fn service_account_token_requested(&self) {
        self.service_account_tokens.inc();
    }

    pub fn set_objects(&self, n: usize) {
        self.objects.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Marks a token request as started; the guard records its outcome and duration.
    pub fn token_request(&self) -> RequestTimer<'_> {
        self.in_flight.inc();
        RequestTimer { metrics: self, start: std::time::Instant::now(), done: false }
    }

    /// Records a reconcile; `failed` names the stage that failed at the Kubernetes API.
    pub fn reconciled(&self, took: Duration, failed: Option<&str>) {
        self.reconciles.inc();
        if let Some(kind) = failed {
            self.reconcile_errors.get_or_create(&ErrorLabels { kind: kind.to_owned() }).inc();
        }
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Records how late a token request started after it was due.
    pub fn renewal_lag(&self, lag: Duration) {
        self.renewal_lag.observe(lag.as_secs_f64());
    }

    pub fn set_queued(&self, n: usize) {
        self.queued.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A queued token request was dropped unsent.
    pub fn request_withdrawn(&self, why: &str) {
        self.withdrawn.get_or_create(&WhyLabels { why: why.to_owned() }).inc();
    }

    /// A pod was nudged (`true`) or the nudge failed.
    pub fn pod_nudged(&self, sent: bool) {
        let outcome = if sent { "sent" } else { "failed" };
        self.nudges.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    }

    /// Pods kept in memory.
    pub fn set_pods(&self, n: usize) {
        self.pods.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A watch of `resource` delivered an event.
    pub fn watch_event(&self, resource: &str) {
        self.watch_events.get_or_create(&WatchLabels { resource: resource.to_owned() }).inc();
    }

    /// A watch of `resource` failed.
    pub fn watch_error(&self, resource: &str) {
        self.watch_errors.get_or_create(&WatchLabels { resource: resource.to_owned() }).inc();
    }

    pub fn set_undecodable(&self, n: usize) {
        self.undecodable.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let _one = self.render.lock();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An in-flight token request.
pub struct RequestTimer<'a> {
    metrics: &'a Metrics,
    start: std::time::Instant,
    done: bool,
}

impl RequestTimer<'_> {
    /// Records the outcome: `None` for a success, else the failure's condition reason.
    pub fn finish(mut self, failure_reason: Option<&str>) {
        self.done = true;
        let m = self.metrics;
        m.in_flight.dec();
        m.keycloak_duration.observe(self.start.elapsed().as_secs_f64());
        let labels = match failure_reason {
            None => RequestLabels { result: "success".into(), reason: String::new() },
            Some(r) => RequestLabels { result: "failure".into(), reason: r.to_owned() },
        };
        m.token_requests.get_or_create(&labels).inc();
    }
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Cancelled (e.g. shutdown): no longer in flight.
            self.metrics.in_flight.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics_that_move() {
        let m = Metrics::new();
        m.set_object("billing", "consent-02", Some(1_700_000_300), true, Some(1));
        let t = m.token_request();
        assert!(m.render().contains("registry_access_token_requests_in_flight 1"));
        t.finish(None);
        m.token_request().finish(Some("KeycloakUnavailable"));
        m.reconciled(Duration::from_millis(3), None);
        m.reconciled(Duration::from_millis(3), Some("apply_status"));
        m.renewal_lag(Duration::from_millis(20));
        m.set_queued(3);
        m.set_undecodable(1);
        m.set_objects(1);
        m.service_account_token_requested();
        m.set_degraded("billing", "consent-02", Some("KeycloakUnavailable"));
        m.set_degraded("billing", "consent-02", Some("InvalidClientCredentials"));
        m.set_leader(true);
        let text = m.render();
        assert!(!text.contains("KeycloakUnavailable\"} 1\nregistry_access_degraded"), "the old reason's series stays");
        assert_eq!(text.matches("registry_access_degraded{").count(), 1, "one series per Degraded object");
        for line in [
            r#"registry_access_token_expiry_timestamp_seconds{namespace="billing",name="consent-02"} 1700000300"#,
            r#"registry_access_ready{namespace="billing",name="consent-02"} 1"#,
            r#"registry_access_missing_roles{namespace="billing",name="consent-02"} 1"#,
            r#"registry_access_token_requests_total{result="success",reason=""} 1"#,
            r#"registry_access_token_requests_total{result="failure",reason="KeycloakUnavailable"} 1"#,
            "registry_access_token_requests_in_flight 0",
            "registry_access_keycloak_request_duration_seconds_count 2",
            "registry_access_reconciles_total 2",
            r#"registry_access_reconcile_errors_total{kind="apply_status"} 1"#,
            "registry_access_renewal_lag_seconds_count 1",
            "registry_access_token_requests_queued 3",
            "registry_access_undecodable_objects 1",
            "registry_access_managed_objects 1",
            "registry_access_service_account_token_requests_total 1",
            r#"registry_access_degraded{namespace="billing",name="consent-02",reason="InvalidClientCredentials"} 1"#,
            "registry_access_leader 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        m.set_degraded("billing", "consent-02", None);
        assert!(!m.render().contains("registry_access_degraded{"), "Degraded cleared, its series stays");
        m.set_degraded("billing", "consent-02", Some("KeycloakUnavailable"));
        m.forget_object("billing", "consent-02");
        assert!(!m.render().contains("consent-02"));
    }

    #[test]
    fn a_dropped_request_is_no_longer_in_flight() {
        let m = Metrics::new();
        drop(m.token_request());
        assert!(m.render().contains("registry_access_token_requests_in_flight 0"));
    }
}
