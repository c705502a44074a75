//! The operator's own account of what it has done, read from its /metrics: the positive signs a
//! "nothing happened" check waits for before it asserts that nothing else happened.

use std::time::{Duration, Instant};

use super::Result;
use super::case::sample;

/// The operator's counters and gauges at one moment.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// Events its watch of RegistryAccess objects delivered (its own status writes included).
    pub object_events: f64,
    /// Events its watch of Secrets delivered (its own token Secret writes included).
    pub secret_events: f64,
    /// Reconciles finished.
    pub reconciles: f64,
    /// Token requests sent to Keycloak, whatever their outcome.
    pub token_requests: f64,
    /// Token requests waiting for their turn.
    pub queued: f64,
    /// Token requests in flight.
    pub in_flight: f64,
    /// RegistryAccess objects the operator manages.
    pub managed_objects: f64,
    /// 1 while the process runs the controllers (it holds the Lease), 0 while it stands by.
    pub leader: f64,
}

impl Activity {
    pub fn parse(text: &str) -> Self {
        let value = |prefix: &str| sample(text, prefix).unwrap_or(0.0);
        Self {
            object_events: value(r#"registry_access_watch_events_total{resource="registryaccesses"}"#),
            secret_events: value(r#"registry_access_watch_events_total{resource="secrets"}"#),
            reconciles: value("registry_access_reconciles_total "),
            token_requests: text
                .lines()
                .filter(|l| l.starts_with("registry_access_token_requests_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
            queued: value("registry_access_token_requests_queued "),
            in_flight: value("registry_access_token_requests_in_flight "),
            managed_objects: value("registry_access_managed_objects "),
            leader: value("registry_access_leader "),
        }
    }

    /// Reads the operator's /metrics on 127.0.0.1:`port`.
    pub async fn read(port: u16) -> Result<Self> {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await?.error_for_status()?.text().await?;
        Ok(Self::parse(&text))
    }

    /// No token request waits for its turn or is in flight: whatever the operator decided to
    /// ask Keycloak for has been asked and answered.
    pub fn idle(&self) -> bool {
        self.queued == 0.0 && self.in_flight == 0.0
    }
}

/// Reads the operator's /metrics on `port` until `pred` holds; returns that reading.
pub async fn wait_activity(
    port: u16,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Activity) -> bool,
) -> Result<Activity> {
    let t = Instant::now();
    loop {
        if let Ok(now) = Activity::read(port).await
            && pred(&now)
        {
            return Ok(now);
        }
        if t.elapsed() > timeout {
            let last = Activity::read(port).await;
            return Err(
                format!("timed out after {timeout:?} waiting for {what}; the operator's metrics: {last:?}").into()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until no token request of the operator on `port` is queued or in flight.
pub async fn wait_idle(port: u16) -> Result<Activity> {
    wait_activity(port, "no token request queued or in flight", Duration::from_secs(30), Activity::idle).await
}
