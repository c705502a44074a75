//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager): of several replicas,
//! only the holder of the Lease runs the controllers, so only one writes.

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info};

/// The Lease's name unless `--leader-election-lease-name` says otherwise; `kubectl
/// registry-access check` looks for Leases ending in it.
pub const DEFAULT_LEASE_NAME: &str = "registry-access-operator";
/// How long the Lease stays valid after its holder's last renewal, by default.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long before the Lease would expire its holder renews it, by default.
pub const DEFAULT_RENEW_GRACE: Duration = Duration::from_secs(5);

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's name in the Lease (the pod name in a cluster).
    pub identity: String,
    /// How long the Lease stays valid after the holder's last renewal: the longest a failed
    /// leader blocks the others.
    pub lease_duration: Duration,
    /// The holder renews this long before the Lease would expire.
    pub renew_grace: Duration,
}

/// Why leader election failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("setting up the Lease {namespace}/{name}: {source}")]
    Setup { namespace: String, name: String, source: kube_lease_manager::LeaseManagerError },
    #[error("the leader election task stopped unexpectedly")]
    Stopped,
    #[error("lost the Lease {0}; stopping so that only the leader writes")]
    Lost(String),
}

/// Waits for the Lease, then runs `work` while holding it. Returns when `work` ends (a
/// termination signal) and the Lease has been released, or with [`LeaderError::Lost`] as soon as
/// the Lease is lost. A termination signal while standing by returns at once.
pub async fn run_as_leader<F, Fut>(client: Client, config: &LeaderConfig, work: F) -> Result<(), LeaderError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.lease_duration.as_secs().max(2))
        .with_grace(config.renew_grace.as_secs().max(1))
        .build()
        .await
        .map_err(|source| LeaderError::Setup {
            namespace: config.namespace.clone(),
            name: config.lease_name.clone(),
            source,
        })?;
    let (mut leading, task) = manager.watch().await;
    info!(lease = %config.lease_name, identity = %config.identity, "waiting for the Lease");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => if changed.is_err() { return Err(LeaderError::Stopped) },
            _ = shutdown_signal() => {
                drop(leading);
                let _ = task.await;
                return Ok(());
            }
        }
    }
    info!(lease = %config.lease_name, identity = %config.identity, "acquired the Lease; starting the controllers");
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return;
            }
        }
    };
    tokio::select! {
        _ = work() => {}
        _ = lost => {
            error!(lease = %config.lease_name, "lost the Lease");
            return Err(LeaderError::Lost(config.lease_name.clone()));
        }
    }
    // Closing the channel makes the manager release the Lease: a standby takes over at once.
    drop(leading);
    let _ = task.await;
    info!(lease = %config.lease_name, "released the Lease");
    Ok(())
}

/// SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
