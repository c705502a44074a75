//! The local demo: a real control plane and Keycloak, the CRD, the operator, and the examples/
//! objects, with the token Secret and the RegistryAccess status shown as they are refreshed.
//!
//! Run with `make demo` (or `cargo run --example demo`); stop with Ctrl-C. `DEMO_SECONDS=N` stops
//! it after N seconds.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::Api;
use kube::api::ListParams;
use registry_access_operator::api::RegistryAccess;
use registry_access_operator::secret::token_digest;
use support::{Env, Result, k8s, operator::Operator, repo};

/// The Keycloak URL the example files name, replaced by the local one when applied.
const EXAMPLE_SERVER: &str = "https://platform-keycloak.apps.example.com/auth";
const NAMESPACE: &str = "default";

#[tokio::main]
async fn main() {
    registry_access_operator::token::install_crypto_provider();
    if let Err(e) = demo().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn demo() -> Result<()> {
    eprintln!(
        "Starting etcd, kube-apiserver, kube-controller-manager and Keycloak (first run builds them; later runs take seconds)..."
    );
    let env = Env::start().await?;
    let client = env.cluster.client().await?;

    // The Keycloak client of examples/secretless.yaml: authenticated by the ServiceAccount
    // `registry-client` of the demo namespace (the realm's Kubernetes identity provider points at
    // this API server's service-account issuer).
    env.keycloak
        .create_federated_client(support::keycloak::REALM, "secretless-demo", NAMESPACE, "registry-client", None)
        .await?;
    let mut applied = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo().join("examples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f)?.replace(EXAMPLE_SERVER, &env.keycloak.base_url);
        env.cluster.kubectl_stdin(&["apply", "-n", NAMESPACE, "-f", "-"], &text)?;
        applied.push(f.file_name().unwrap_or_default().to_string_lossy().into_owned());
    }
    let log = env.path().join("operator.log");
    let mut operator = Operator::start(&env.cluster.kubeconfig, &log, &[])?;

    println!();
    println!("Environment is up. In another shell:");
    println!("  export KUBECONFIG={}", env.cluster.kubeconfig.display());
    println!("  export PATH={}:$PATH", env.tools.bin.display());
    println!("  kubectl get registryaccesses -o wide      # or: kubectl get ra");
    println!("  kubectl get secret consent-02-token -o yaml");
    println!("  tail -f {}", log.display());
    println!("Keycloak: {} (realm consent-01-external-system)", env.keycloak.base_url);
    println!("Applied examples/: {} (server replaced by the local Keycloak)", applied.join(", "));
    println!("Press Ctrl-C to stop; everything started here is stopped and removed.");
    println!();

    let limit = std::env::var("DEMO_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()).map(Duration::from_secs);
    let start = Instant::now();
    let ras: Api<RegistryAccess> = Api::namespaced(client.clone(), NAMESPACE);
    let mut last = std::collections::BTreeMap::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if limit.is_some_and(|l| start.elapsed() > l) {
            break;
        }
        operator.check_alive()?;
        let now = Timestamp::now();
        for ra in ras.list(&ListParams::default()).await? {
            let name = ra.metadata.name.clone().unwrap_or_default();
            let Some(status) = ra.status.as_ref() else { continue };
            let ready = k8s::condition(status, "Ready").map(|c| format!("{} ({})", c.0, c.1)).unwrap_or_default();
            let secret = status.secret_name.clone().unwrap_or_default();
            let data = k8s::secret_data(&client, NAMESPACE, &secret).await?.unwrap_or_default();
            // The token itself is never printed: a digest tells tokens apart.
            let digest =
                data.get("access_token").map(|t| token_digest(t)[..12].to_owned()).unwrap_or_else(|| "-".into());
            let left = status.expires_at.as_ref().map(|e| e.0.duration_since(now).as_secs()).unwrap_or(0);
            let renew = status.renew_at.as_ref().map(|r| r.0.duration_since(now).as_secs()).unwrap_or(0);
            let changed = last.insert(name.clone(), digest.clone()).is_some_and(|d| d != digest);
            println!(
                "{} {:<12} Ready={:<18} Secret={:<24} token#{} expires in {:>4}s, refresh in {:>4}s{}",
                now.strftime("%H:%M:%S"),
                name,
                ready,
                secret,
                digest,
                left,
                renew,
                if changed { "   <- refreshed" } else { "" }
            );
        }
    }
    println!("Stopping the operator, Keycloak, kube-controller-manager, kube-apiserver and etcd...");
    operator.stop();
    drop(env);
    Ok(())
}
