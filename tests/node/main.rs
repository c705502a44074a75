//! The node suite: what a workload sees. Two real kubelets (containerd, runc) run the chart's
//! operator pods from the locally built image, and workload pods that mount the token Secret
//! check, every second, that the token they read has not expired.
//!
//! The suite runs in a sandbox of its own (tests/support/node.rs): network, mount and PID
//! namespaces, with the kubelet's changes to the machine undone afterwards.

#[path = "../support/mod.rs"]
mod support;

mod delivery;
mod freshness;
mod restarts;

use delivery::*;
use freshness::*;
use restarts::*;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams, PostParams};
use serde_json::{Value, json};

use support::cluster::NODE_CONTROLLERS;
use support::k8s;
use support::keycloak::REALM;
use support::node::{self, Images, NODES, Node, Scheduler, workload_pod};
use support::process::wait_for;
use support::{Env, Result, phase, repo};

/// The operator's release and namespace.
const RELEASE: &str = "rao";
const OPERATOR_NS: &str = "registry-access-operator";
/// The kubelet's default sync period: the delays measured are those of a default node.
const SYNC_FREQUENCY: &str = "1m";

/// The environment plus the nodes. Field order is drop order: nodes go before the control plane.
struct NodeEnv {
    _nodes: Vec<Node>,
    _scheduler: Scheduler,
    images: Images,
    env: Env,
}

fn main() {
    let list = std::env::args().any(|a| a == "--list");
    if !list && !node::inside() {
        std::process::exit(node::run_sandboxed());
    }
    // `make bench` runs the pod freshness measurement instead of the suite (RAO_POD_FRESHNESS=1).
    let cases = if std::env::var_os("RAO_POD_FRESHNESS").is_some() {
        tests![pod_freshness]
    } else {
        tests![the_operator_runs_as_pods_and_survives_restarts, pods_that_mount_the_token_never_read_an_expired_one]
    };
    support::harness::run_in("node", cases, 2, || Box::pin(start()))
}

async fn start() -> Result<NodeEnv> {
    let t = Instant::now();
    node::prepare_sandbox()?;
    let images = tokio::task::spawn_blocking(Images::build).await??;
    phase("sandbox network and images", t);
    let env = Env::start_with_controllers(NODE_CONTROLLERS).await?;
    let t = Instant::now();
    let scheduler = Scheduler::start(&env.cluster, &env.path().join("scheduler")).await?;
    // One after the other: two kubelets bind-mounting their root directories at the same moment
    // can fail to create their sockets (EXDEV).
    let mut nodes = Vec::new();
    for i in 0..NODES {
        nodes.push(Node::start(&env.cluster, &images, &env.path().join(format!("node-{i}")), i, SYNC_FREQUENCY).await?);
    }
    phase("kube-scheduler and nodes Ready", t);
    let t = Instant::now();
    install_operator(&env, &images)?;
    phase("helm install with the local image, rollout complete", t);
    Ok(NodeEnv { _nodes: nodes, _scheduler: scheduler, images, env })
}

/// `helm install` of the chart with the local image on the nodes' network: two replicas, one per
/// node. The pods reach the API server at its address in the sandbox (never a ClusterIP: there
/// is no service proxy) and Keycloak over plain http on loopback.
fn install_operator(env: &Env, images: &Images) -> Result<()> {
    let (repository, tag) = images.operator.rsplit_once(':').ok_or("the operator image has no tag")?;
    let port = env.cluster.api_port.to_string();
    let chart = repo().join("charts/registry-access-operator").display().to_string();
    let set = [
        format!("image.repository={repository}"),
        format!("image.tag={tag}"),
        "image.pullPolicy=Never".to_owned(),
        "hostNetwork=true".to_owned(),
        "replicaCount=2".to_owned(),
        "allowInsecureHttp=true".to_owned(),
        "extraEnv[0].name=KUBERNETES_SERVICE_HOST".to_owned(),
        "extraEnv[0].value=127.0.0.1".to_owned(),
        "extraEnv[1].name=KUBERNETES_SERVICE_PORT".to_owned(),
    ];
    let mut args: Vec<String> =
        ["install", RELEASE, &chart, "--namespace", OPERATOR_NS, "--create-namespace", "--wait", "--timeout=180s"]
            .map(str::to_owned)
            .to_vec();
    for s in set {
        args.extend(["--set".to_owned(), s]);
    }
    args.extend(["--set-string".to_owned(), format!("extraEnv[1].value={port}")]);
    env.helm(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// The `iat` and `exp` claims of a token, read with the operator's own decoder.
fn token_times(token: &str) -> Result<(i64, i64)> {
    let claims = registry_access_operator::keycloak::jwt::decode_claims(token)?;
    Ok((claims.iat.ok_or("no iat claim")?, claims.exp.ok_or("no exp claim")?))
}

/// A Keycloak client with the given token lifespan, its secret in an opted-in Secret `creds`, and
/// a RegistryAccess `name` for it in `ns` (with `renew_before`, or the default; without
/// `nudge_pods`, spec.nudgePods false), Ready. Returns the client id.
async fn registry_access(
    env: &Env,
    ns: &str,
    name: &str,
    lifespan: u32,
    renew_before: Option<&str>,
    nudge_pods: bool,
) -> Result<String> {
    let client = env.cluster.client().await?;
    k8s::create_namespace(&client, ns).await?;
    let client_id = format!("{ns}-{name}");
    let info = env.keycloak.create_client(REALM, &client_id, Some(lifespan), true).await?;
    k8s::put_client_secret(&client, ns, "creds", &[("client_secret", &info.secret)]).await?;
    let mut spec = json!({
        "server": env.keycloak.base_url,
        "realm": REALM,
        "clientId": client_id,
        "clientSecretRef": {"name": "creds"},
    });
    if let Some(renew_before) = renew_before {
        spec["renewBefore"] = renew_before.into();
    }
    if !nudge_pods {
        spec["nudgePods"] = false.into();
    }
    k8s::apply_ra(&client, ns, name, spec).await?;
    k8s::wait_condition(&client, ns, name, "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    Ok(client_id)
}

/// What a poller saw of a token Secret: each token's times and when it was first seen.
#[derive(Default)]
struct SecretWatch {
    /// iat -> (exp, first seen, ms since the epoch)
    tokens: BTreeMap<i64, (i64, i64)>,
    /// Distinct token values seen (their digests: the tokens themselves are not kept).
    distinct: BTreeSet<u64>,
    /// The least validity left at any poll, in ms.
    min_left_ms: Option<i64>,
}

/// Polls the token Secret `ns`/`name` every 250 ms until `stop` is set.
fn watch_secret(
    env: &Env,
    ns: &str,
    name: &str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<SecretWatch>>, tokio::task::JoinHandle<Result<()>>) {
    let seen = Arc::new(Mutex::new(SecretWatch::default()));
    let (kubeconfig, ns, name, out) = (env.cluster.kubeconfig.clone(), ns.to_owned(), name.to_owned(), seen.clone());
    let task = tokio::spawn(async move {
        let client = support::cluster::client_for(&kubeconfig).await?;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(token) =
                k8s::secret_data(&client, &ns, &name).await?.and_then(|d| d.get("access_token").cloned())
            {
                let (iat, exp) = token_times(&token)?;
                let at = now_ms();
                let mut s = out.lock().unwrap();
                s.tokens.entry(iat).or_insert((exp, at));
                s.distinct.insert({
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    token.hash(&mut h);
                    h.finish()
                });
                let left = exp * 1000 - at;
                s.min_left_ms = Some(s.min_left_ms.map_or(left, |m| m.min(left)));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    });
    (seen, task)
}

/// The operator's pods, by name, with their node.
async fn operator_pods(env: &Env) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(env.cluster.client().await?, OPERATOR_NS);
    let list = pods.list(&ListParams::default().labels("app.kubernetes.io/name=registry-access-operator")).await?;
    Ok(list.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect())
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restart_count(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .map_or(0, |c| c.restart_count)
}

async fn lease_holder(env: &Env) -> Result<Option<String>> {
    let leases: Api<Lease> = Api::namespaced(env.cluster.client().await?, OPERATOR_NS);
    Ok(leases
        .get_opt(&format!("{RELEASE}-registry-access-operator"))
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

/// The operator process of pod `pod_name`, found in /proc (the suite's PID namespace holds every
/// container): its pid, and its environment as KEY=VALUE strings.
fn operator_process(pod_name: &str) -> Result<(u32, Vec<String>)> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if !cmdline.starts_with(b"/registry-access-operator\0") {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if vars.iter().any(|v| *v == format!("POD_NAME={pod_name}")) {
            return Ok((pid, vars));
        }
    }
    Err(format!("no operator process for pod {pod_name}").into())
}

/// Waits until a token with an `iat` later than `after` is seen.
async fn wait_new_token(seen: &Arc<Mutex<SecretWatch>>, after: i64, what: &str, timeout: Duration) -> Result<i64> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(iat) = seen.lock().unwrap().tokens.keys().copied().find(|iat| *iat > after) {
            return Ok(iat);
        }
        if Instant::now() > deadline {
            return Err(format!("no new token within {timeout:?} {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Nothing sensitive in the namespaces' statuses and Events or in the operator pods' logs.
async fn leak_check(env: &Env, namespaces: &[&str]) -> Result<()> {
    let client = env.cluster.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NS);
    let mut logs = String::new();
    for p in operator_pods(env).await? {
        if let Some(name) = p.metadata.name {
            logs.push_str(&pods.logs(&name, &LogParams::default()).await.unwrap_or_default());
        }
    }
    for ns in namespaces {
        let mut sensitive = BTreeSet::new();
        if let Some(d) = k8s::secret_data(&client, ns, "svc-token").await? {
            sensitive.extend(d.get("access_token").cloned());
        }
        if let Some(d) = k8s::secret_data(&client, ns, "creds").await? {
            sensitive.extend(d.get("client_secret").cloned());
        }
        support::case::assert_nothing_leaked(&client, ns, &logs, &sensitive).await?;
    }
    Ok(())
}
