//! The local demo: a real control plane and Keycloak, the CRD, the operator, and the examples/
//! objects, with the token Secret and the RegistryAccess status shown as they are refreshed.
//!
//! Where a node can run (root, containerd, runc, buildah: see tests/support/node.rs), the demo runs
//! in the node suite's sandbox with a real kubelet, and a workload pod that mounts the documented
//! token Secret shows, every line, how long the token it reads has left. `RAO_DEMO_NODE=0` runs
//! without a node.
//!
//! Run with `make demo` (or `cargo run --example demo`); stop with Ctrl-C. `DEMO_SECONDS=N` stops
//! it after N seconds.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams, PostParams};
use registry_access_operator::api::RegistryAccess;
use registry_access_operator::secret::token_digest;
use support::cluster::NODE_CONTROLLERS;
use support::node::{self, Images, Node};
use support::{Env, Result, k8s, operator::Operator, repo};

/// The Keycloak URL the example files name, replaced by the local one when applied.
const EXAMPLE_SERVER: &str = "https://platform-keycloak.apps.example.com/auth";
const NAMESPACE: &str = "default";

/// The token Secret of examples/registryaccess.yaml, which the workload pod mounts.
const WORKLOAD_SECRET: &str = "consent-02-token";
/// The pod that shows what a workload reads (examples/workload).
const WORKLOAD_POD: &str = "registry-client-demo";

fn main() {
    let with_node = std::env::var("RAO_DEMO_NODE").map_or(true, |v| v != "0");
    if with_node && !node::inside() {
        match node::unavailable() {
            None => std::process::exit(node::run_sandboxed()),
            Some(why) => eprintln!("No workload pod in this demo ({why}); RAO_DEMO_NODE=0 skips this check."),
        }
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime").block_on(run());
}

async fn run() {
    registry_access_operator::keycloak::token::install_crypto_provider();
    if let Err(e) = demo().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn demo() -> Result<()> {
    eprintln!(
        "Starting etcd, kube-apiserver, kube-controller-manager and Keycloak (first run builds them; later runs take seconds)..."
    );
    let inside = node::inside();
    let images = if inside {
        node::prepare_sandbox()?;
        eprintln!("Building the workload's image (first run: a few minutes)...");
        Some(tokio::task::spawn_blocking(Images::build).await??)
    } else {
        None
    };
    let env = Env::start_with_controllers(if inside { NODE_CONTROLLERS } else { "" }).await?;
    let client = env.cluster.client().await?;
    let node = match &images {
        Some(images) => Some(Node::start(&env.cluster, images, &env.path().join("node-0"), 0, "1m").await?),
        None => None,
    };

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
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    if let Some(images) = &images {
        pods.create(
            &PostParams::default(),
            &node::workload_pod(&images.workload, "volume", WORKLOAD_SECRET, WORKLOAD_POD, "node-0")?,
        )
        .await?;
    }

    println!();
    println!("Environment is up. In another shell:");
    println!("  export KUBECONFIG={}", env.cluster.kubeconfig.display());
    println!("  export PATH={}:$PATH", env.tools.bin.display());
    // In the sandbox the API server listens on the sandbox's loopback: enter its network first.
    let k = match std::env::var(node::OUTER_PID) {
        Ok(outer) if inside => format!("nsenter --net=/proc/$(pgrep -P {outer})/ns/net kubectl"),
        _ => "kubectl".to_owned(),
    };
    println!("  {k} get registryaccesses -o wide      # or: {k} get ra");
    println!("  {k} get secret consent-02-token -o yaml");
    if node.is_some() {
        println!("  {k} logs -f {WORKLOAD_POD}      # the workload pod's view of the token");
    }
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
        if node.is_some() {
            println!("{}", workload_view(&pods, now).await);
        }
    }
    println!("Stopping the operator, Keycloak, kube-controller-manager, kube-apiserver and etcd...");
    operator.stop();
    drop(node);
    drop(env);
    Ok(())
}

/// The workload pod's last log line, as a line of the demo's output.
async fn workload_view(pods: &Api<Pod>, now: Timestamp) -> String {
    let params = LogParams { tail_lines: Some(1), ..LogParams::default() };
    let line = match pods.logs(WORKLOAD_POD, &params).await {
        Ok(l) => l,
        Err(_) => return format!("{} pod {WORKLOAD_POD}: starting", now.strftime("%H:%M:%S")),
    };
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_default();
    match (v["remaining_s"].as_i64(), v["iat"].as_i64()) {
        (Some(left), Some(iat)) => format!(
            "{} pod {WORKLOAD_POD} reads {WORKLOAD_SECRET} from its volume: token issued at {}, {left:>4}s left{}",
            now.strftime("%H:%M:%S"),
            Timestamp::from_second(iat).map(|t| t.strftime("%H:%M:%S").to_string()).unwrap_or_default(),
            if v["changed"].as_bool() == Some(true) { "   <- the kubelet delivered a new token" } else { "" }
        ),
        _ => format!("{} pod {WORKLOAD_POD}: {}", now.strftime("%H:%M:%S"), line.trim()),
    }
}
