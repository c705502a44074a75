//! The node suite: what a workload sees. Two real kubelets (containerd, runc) run the chart's
//! operator pods from the locally built image, and workload pods that mount the token Secret
//! check, every second, that the token they read has not expired.
//!
//! The suite runs in a sandbox of its own (tests/support/node.rs): network, mount and PID
//! namespaces, with the kubelet's changes to the machine undone afterwards.

mod support;

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

/// The chart's operator on real nodes: both replicas Ready through their own readiness probe, as
/// uid 65532 with a read-only root file system, talking to the API server with the pod's own
/// ServiceAccount token; a RegistryAccess is kept fresh while the leader's container is killed
/// (the kubelet restarts it) and while the leader's pod is deleted (the other replica takes over),
/// and its token never lapses.
async fn the_operator_runs_as_pods_and_survives_restarts(env: Arc<NodeEnv>) -> Result<()> {
    let e = &env.env;
    let pods = operator_pods(e).await?;
    assert_eq!(pods.len(), 2, "two operator pods");
    let on_nodes: BTreeSet<String> = pods.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
    assert_eq!(on_nodes.len(), 2, "the replicas share a node: {on_nodes:?}");
    for p in &pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        assert!(pod_ready(p), "{name} is not Ready");
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        assert!(node::NODE_IPS.contains(&ip.as_str()), "{name} is not on the node's network: pod IP {ip}");
        let (pid, vars) = operator_process(&name)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let uids = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
        assert!(uids.split_whitespace().skip(1).all(|u| u == "65532"), "{name} does not run as 65532: {uids}");
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        let root = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .ok_or_else(|| format!("{name}: no root mount"))?;
        let options = root.split_whitespace().nth(5).unwrap_or_default();
        assert!(options.split(',').any(|o| o == "ro"), "{name}'s root file system is writable: {options}");
        // In-cluster configuration: no kubeconfig, the pod's projected ServiceAccount token.
        assert!(!vars.iter().any(|v| v.starts_with("KUBECONFIG=")), "{name} has a KUBECONFIG");
        let token_file = format!("/proc/{pid}/root/var/run/secrets/kubernetes.io/serviceaccount/token");
        assert!(std::fs::metadata(&token_file).is_ok(), "{name} has no ServiceAccount token mounted");
        let probe =
            p.spec.as_ref().and_then(|s| s.containers[0].readiness_probe.clone()).ok_or("no readiness probe")?;
        assert_eq!(probe.http_get.map(|h| h.path), Some(Some("/readyz".to_owned())), "{name}'s readiness probe");
    }
    let names: BTreeSet<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let leader = lease_holder(e).await?.ok_or("nobody holds the Lease")?;
    assert!(names.contains(&leader), "the Lease holder {leader} is not an operator pod ({names:?})");

    // 60 s tokens renewed 40 s ahead: room for a lost Lease (15 s) and a restart.
    let ns = "team-restarts";
    let client_id = registry_access(e, ns, "svc", 60, Some("40s"), true).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, poller) = watch_secret(e, ns, "svc-token", stop.clone());
    let first = wait_new_token(&seen, 0, "at the start", Duration::from_secs(10)).await?;

    // Kill the leader's container: the kubelet starts it again in the same pod.
    let t = Instant::now();
    let (pid, _) = operator_process(&leader)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    let pods_api: Api<Pod> = Api::namespaced(e.cluster.client().await?, OPERATOR_NS);
    wait_for(&format!("{leader} restarted and Ready"), Duration::from_secs(90), || {
        let (pods_api, leader) = (pods_api.clone(), leader.clone());
        async move {
            pods_api.get_opt(&leader).await.ok().flatten().is_some_and(|p| restart_count(&p) >= 1 && pod_ready(&p))
        }
    })
    .await?;
    eprintln!("[node] killed container restarted and Ready after {:.1}s", t.elapsed().as_secs_f64());
    let after_kill =
        wait_new_token(&seen, first, "after the leader's container was killed", Duration::from_secs(60)).await?;

    // Delete the leader's pod: the other replica takes the Lease and renews.
    let t = Instant::now();
    let holder = lease_holder(e).await?.ok_or("nobody holds the Lease")?;
    e.cluster.kubectl(&["delete", "pod", "-n", OPERATOR_NS, &holder, "--wait=false"])?;
    let env2 = env.clone();
    wait_for("another pod holding the Lease", Duration::from_secs(60), || {
        let (env2, holder) = (env2.clone(), holder.clone());
        async move { lease_holder(&env2.env).await.ok().flatten().is_some_and(|h| h != holder) }
    })
    .await?;
    eprintln!("[node] Lease handed over {:.1}s after the leader pod's deletion", t.elapsed().as_secs_f64());
    wait_new_token(&seen, after_kill, "after the leader pod was deleted", Duration::from_secs(60)).await?;
    let env2 = env.clone();
    wait_for("the Deployment back to two Ready pods", Duration::from_secs(120), || {
        let env2 = env2.clone();
        async move { operator_pods(&env2.env).await.is_ok_and(|ps| ps.len() == 2 && ps.iter().all(pod_ready)) }
    })
    .await?;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.await??;
    let (tokens, distinct, min_left) = {
        let seen = seen.lock().unwrap();
        (seen.tokens.len(), seen.distinct.len(), seen.min_left_ms.ok_or("the Secret was never read")?)
    };
    eprintln!(
        "[node] {tokens} tokens while restarting; least validity left in the Secret: {:.1}s",
        min_left as f64 / 1000.0
    );
    assert!(min_left > 0, "the token lapsed: {min_left} ms left at one point");
    // One writer throughout: each grant's token reached the Secret, no token was issued twice over.
    let grants = e.keycloak.grants(REALM, &client_id).await?;
    assert_eq!(grants, distinct, "Keycloak grants vs distinct tokens written");
    leak_check(e, &[ns]).await
}

/// What the workload pods logged, parsed.
#[derive(Debug, Clone)]
struct Reading {
    at_ms: i64,
    iat: i64,
    remaining_s: i64,
    expired: bool,
}

/// The readings a workload pod has logged so far; an error line fails.
async fn readings(pods: &Api<Pod>, name: &str) -> Result<Vec<Reading>> {
    let log = pods.logs(name, &LogParams::default()).await?;
    let mut out = Vec::new();
    for line in log.lines() {
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("{name} logged a line that is not JSON ({e})"))?;
        if let Some(err) = v.get("error") {
            return Err(format!("{name} could not read its token: {err}").into());
        }
        out.push(Reading {
            at_ms: v["at_ms"].as_i64().ok_or("no at_ms")?,
            iat: v["iat"].as_i64().ok_or("no iat")?,
            remaining_s: v["remaining_s"].as_i64().ok_or("no remaining_s")?,
            expired: v["expired"].as_bool().ok_or("no expired")?,
        });
    }
    Ok(out)
}

/// Tokens a pod has read after its first (renewals it saw).
fn renewals_read(readings: &[Reading]) -> usize {
    readings.iter().map(|r| r.iat).collect::<BTreeSet<_>>().len().saturating_sub(1)
}

/// How a set of workload pods gets each new token into its mounted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// The operator nudges the pods after each write (the default): their kubelets resync them at once.
    Nudged,
    /// spec.nudgePods: false: the kubelet's periodic sync only.
    NotNudged,
    /// The nudges are sent and refused (an admission policy denies the operator's pod updates in
    /// the namespace): the kubelet's periodic sync only, and every nudge counted as failed.
    NudgeLost,
}

impl Delivery {
    fn describe(self) -> &'static str {
        match self {
            Self::Nudged => "with the nudge",
            Self::NotNudged => "without the nudge (spec.nudgePods: false)",
            Self::NudgeLost => "with every nudge refused (admission policy)",
        }
    }
}

/// A distribution of delays in seconds (nearest-rank percentiles).
#[derive(Debug, Clone, Copy)]
struct Spread {
    samples: usize,
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Spread {
    fn of(delays: &[f64]) -> Result<Self> {
        let mut d = delays.to_vec();
        d.sort_by(f64::total_cmp);
        let (first, last) = (*d.first().ok_or("no delays measured")?, d[d.len() - 1]);
        let pct = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize];
        Ok(Self { samples: d.len(), min: first, p50: pct(0.5), p90: pct(0.9), p99: pct(0.99), max: last })
    }

    fn json(&self) -> Value {
        json!({"samples": self.samples, "min": self.min, "p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max})
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} samples: min {:.1} s, p50 {:.1} s, p90 {:.1} s, p99 {:.1} s, max {:.1} s",
            self.samples, self.min, self.p50, self.p90, self.p99, self.max
        )
    }
}

/// The sum over the operator's pods of one sample of their /metrics (a counter), each read on
/// the pod's address (the node's: host network) and probe port. A pod that does not answer (it
/// is restarting) counts nothing.
async fn operator_metric(env: &Env, http: &reqwest::Client, sample: &str) -> Result<f64> {
    let mut total = 0.0;
    for p in operator_pods(env).await? {
        let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
        let port = p.spec.as_ref().and_then(|s| {
            s.containers
                .first()?
                .ports
                .as_ref()?
                .iter()
                .find(|p| p.name.as_deref() == Some("probes"))
                .map(|p| p.container_port)
        });
        let (Some(ip), Some(port)) = (ip, port) else { continue };
        let Ok(response) = http.get(format!("http://{ip}:{port}/metrics")).send().await else { continue };
        let Ok(text) = response.text().await else { continue };
        total += support::case::sample(&text, sample).unwrap_or(0.0);
    }
    Ok(total)
}

/// Makes every nudge in namespace `ns` fail, and only there: a ValidatingAdmissionPolicy that
/// refuses any pod update by the operator's ServiceAccount, bound to `ns` by its name. The
/// chart's ClusterRole could not do it: its verbs hold in every namespace, and RBAC has no deny.
/// The chart's own pod-nudge-only policy stays in force beside it.
fn lose_nudges_in(env: &Env, sa: &str, ns: &str) -> Result<()> {
    let name = format!("lose-pod-nudges-in-{ns}");
    let list = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": name},
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {"resourceRules": [{
                        "apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods"],
                    }]},
                    "matchConditions": [{
                        "name": "the-operator",
                        "expression": format!("request.userInfo.username == 'system:serviceaccount:{OPERATOR_NS}:{sa}'"),
                    }],
                    "validations": [{"expression": "false", "message": "pod nudges are lost in this namespace (node suite)"}],
                },
            },
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": name},
                "spec": {
                    "policyName": name,
                    "validationActions": ["Deny"],
                    "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
                },
            },
        ],
    });
    env.cluster.kubectl_stdin(&["apply", "-f", "-"], &serde_json::to_string(&list)?)?;
    Ok(())
}

/// Workload pods of one RegistryAccess, with the poller of its token Secret.
struct Workloads {
    delivery: Delivery,
    ns: &'static str,
    client_id: String,
    pods: Api<Pod>,
    /// The pods that mount the Secret as a volume, one per node.
    volume: Vec<String>,
    seen: Arc<Mutex<SecretWatch>>,
    poller: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl Workloads {
    /// A RegistryAccess `svc` in `ns` (180 s tokens renewed 130 s ahead; nudgePods false for
    /// [`Delivery::NotNudged`]), its Secret's poller, and `per_node` pods on each node that mount
    /// it as a volume, named `workload-volume-<n>`.
    async fn start(
        env: &NodeEnv,
        delivery: Delivery,
        ns: &'static str,
        lifespan: u32,
        renew_before: Option<&str>,
        per_node: usize,
        stop: &Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self> {
        let e = &env.env;
        let client_id = registry_access(e, ns, "svc", lifespan, renew_before, delivery != Delivery::NotNudged).await?;
        let (seen, poller) = watch_secret(e, ns, "svc-token", stop.clone());
        let pods: Api<Pod> = Api::namespaced(e.cluster.client().await?, ns);
        let mut volume = Vec::new();
        for i in 0..NODES * per_node {
            let name = format!("workload-volume-{i}");
            let pod = workload_pod(&env.images.workload, "volume", "svc-token", &name, &format!("node-{}", i % NODES))?;
            pods.create(&PostParams::default(), &pod).await?;
            volume.push(name);
        }
        Ok(Self { delivery, ns, client_id, pods, volume, seen, poller: Some(poller) })
    }

    /// Each volume pod's readings so far.
    async fn volume_readings(&self) -> Result<Vec<Vec<Reading>>> {
        let mut all = Vec::new();
        for name in &self.volume {
            all.push(readings(&self.pods, name).await?);
        }
        Ok(all)
    }

    /// Once the pollers' `stop` is set: the tokens written to the Secret (iat -> exp, first seen).
    async fn written(&mut self) -> Result<BTreeMap<i64, (i64, i64)>> {
        if let Some(poller) = self.poller.take() {
            poller.await??;
        }
        Ok(self.seen.lock().unwrap().tokens.clone())
    }
}

/// The namespaces of the delivery comparison.
const NUDGED_NS: &str = "team-workload";
const NOT_NUDGED_NS: &str = "team-no-nudge";
const NUDGE_LOST_NS: &str = "team-lost-nudge";
/// The longest a nudged pod may take to read a new token: the kubelet's resync of the pod
/// (about a second), the pod's 1 s reading cadence and the poller's 250 ms.
const NUDGED_DELIVERY_S: f64 = 5.0;
/// Renewals each volume pod must read: three with the nudge; two where only the kubelet's sync
/// delivers (a third could take another 90 s, and the first three minutes already hold two).
const NUDGED_RENEWALS: usize = 3;
const UNNUDGED_RENEWALS: usize = 2;

/// Pods that mount the token Secret as a volume read each new token and never an expired one,
/// over the same renewals of three RegistryAccess objects: with the nudge, within a few seconds
/// of the Secret write; with spec.nudgePods false, and with every nudge refused by an admission
/// policy (counted as failed in the operator's metrics), within the kubelet's sync period. The
/// delivery delays (Secret write to the pod's first reading of the new token) are printed. A
/// `subPath` mount and an environment variable never change: they read the first token until it
/// expires (the README's warning).
async fn pods_that_mount_the_token_never_read_an_expired_one(env: Arc<NodeEnv>) -> Result<()> {
    let e = &env.env;
    let sa = operator_pods(e)
        .await?
        .iter()
        .find_map(|p| p.spec.as_ref()?.service_account_name.clone())
        .ok_or("the operator's pods name no ServiceAccount")?;
    lose_nudges_in(e, &sa, NUDGE_LOST_NS)?;
    // 180 s tokens renewed 130 s ahead: a renewal every 50 s; 130 s covers the kubelet's worst
    // case (1.5 x its 1 min sync period) plus a Keycloak failure or a leader change. The three
    // objects are made at once, so that their renewals fall together.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sets = futures::future::try_join_all(
        [(Delivery::Nudged, NUDGED_NS), (Delivery::NotNudged, NOT_NUDGED_NS), (Delivery::NudgeLost, NUDGE_LOST_NS)]
            .map(|(d, ns)| Workloads::start(&env, d, ns, 180, Some("130s"), 1, &stop)),
    )
    .await?;
    let nudged = &sets[0];
    for how in ["subpath", "env"] {
        nudged
            .pods
            .create(
                &PostParams::default(),
                &workload_pod(&env.images.workload, how, "svc-token", &format!("workload-{how}"), "node-0")?,
            )
            .await?;
    }
    let t = Instant::now();
    'started: loop {
        if t.elapsed() > Duration::from_secs(120) {
            return Err("the workload pods did not start within 120 s".into());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for set in &sets {
            for name in &set.volume {
                if readings(&set.pods, name).await.unwrap_or_default().is_empty() {
                    continue 'started;
                }
            }
        }
        break;
    }
    // Grants and tokens so far: the other test kills the operator's leader while these objects
    // get their first token, and a grant whose process was killed before the write is lost
    // (the next leader asks again). From here on, each grant's token must reach the Secret.
    let mut at_start = Vec::new();
    for set in &sets {
        at_start.push((e.keycloak.grants(REALM, &set.client_id).await?, set.seen.lock().unwrap().tokens.len()));
    }
    eprintln!(
        "[node] {} workload pods reading their tokens after {:.1}s",
        sets.len() * NODES + 2,
        t.elapsed().as_secs_f64()
    );

    // Until every volume pod has read its renewals, the subPath and env pods have read their
    // first token expired, and the operator has counted a failed nudge. The operator's metrics
    // are read throughout: a counter restarts with its process (the other test restarts the
    // leader), so the largest sum seen is kept.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let (sent_sample, failed_sample) = (
        r#"registry_access_pod_nudges_total{outcome="sent"}"#,
        r#"registry_access_pod_nudges_total{outcome="failed"}"#,
    );
    let (mut sent, mut failed) = (0.0f64, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(420);
    let (volume, subpath, env_var) = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut volume = Vec::new();
        let mut short = Vec::new();
        for set in &sets {
            let want = if set.delivery == Delivery::Nudged { NUDGED_RENEWALS } else { UNNUDGED_RENEWALS };
            let rs = set.volume_readings().await?;
            for (name, r) in set.volume.iter().zip(&rs) {
                if renewals_read(r) < want {
                    short.push(format!("{}/{name}: {} of {want} renewals", set.ns, renewals_read(r)));
                }
            }
            volume.push(rs);
        }
        let subpath = readings(&nudged.pods, "workload-subpath").await?;
        let env_var = readings(&nudged.pods, "workload-env").await?;
        let past_first = [&subpath, &env_var].iter().all(|rs| rs.last().is_some_and(|r| r.expired));
        sent = sent.max(operator_metric(e, &http, sent_sample).await.unwrap_or(0.0));
        failed = failed.max(operator_metric(e, &http, failed_sample).await.unwrap_or(0.0));
        if short.is_empty() && past_first && failed > 0.0 {
            break (volume, subpath, env_var);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after 7 minutes: {short:?} short; first token read expired through subPath and env: {past_first}; \
                 failed nudges counted: {failed}"
            )
            .into());
        }
    };
    // Each grant Keycloak counted by now reaches the Secret before the pollers stop (a renewal
    // may be between its grant and its write).
    let mut granted = Vec::new();
    for (set, (grants_then, tokens_then)) in sets.iter().zip(&at_start) {
        let grants = e.keycloak.grants(REALM, &set.client_id).await? - grants_then;
        let seen = set.seen.clone();
        let want = tokens_then + grants;
        wait_for(&format!("the tokens of {grants} grants written in {}", set.ns), Duration::from_secs(15), || {
            let seen = seen.clone();
            async move { seen.lock().unwrap().tokens.len() >= want }
        })
        .await?;
        granted.push(grants);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    eprintln!(
        "[node] delivery delay, Secret write to the pod's first reading of the new token (180 s tokens renewed \
         130 s ahead, kubelet syncFrequency {SYNC_FREQUENCY}, pods read every second, {NODES} volume pods each):"
    );
    let mut results = Vec::new();
    for (((mut set, readings), granted), (grants_then, tokens_then)) in
        sets.into_iter().zip(volume).zip(granted).zip(at_start)
    {
        let written = set.written().await?;
        let mut delays = Vec::new();
        for rs in &readings {
            delays.extend(delivery_delays(rs, &written)?);
        }
        let skipped: usize = readings.iter().map(|rs| skipped_tokens(rs, &written)).sum();
        let expired: Vec<Reading> =
            readings.iter().flatten().filter(|r| r.expired || r.remaining_s <= 0).cloned().collect();
        let min_left = readings.iter().flatten().map(|r| r.remaining_s).min().unwrap_or_default();
        let spread = Spread::of(&delays).map_or_else(|e| e.to_string(), |s| s.to_string());
        let grants_now = e.keycloak.grants(REALM, &set.client_id).await?;
        eprintln!(
            "[node]   {:<45} {spread}; least validity left read: {min_left} s; tokens written {} \
             (Keycloak grants {grants_now}, {grants_then} before the pods started), not read by a pod: {skipped}; \
             each: {delays:.1?}",
            set.delivery.describe(),
            written.len()
        );
        let grants = granted..=grants_now - grants_then;
        results.push((set, delays, skipped, expired, grants, written.len() - tokens_then));
    }
    eprintln!(
        "[node] pod nudges counted by the operator's /metrics (largest sum over its pods seen): sent {sent}, \
         failed {failed}"
    );

    for (set, delays, skipped, expired, grants, written) in &results {
        assert!(expired.is_empty(), "{}: a volume pod read an expired token: {expired:?}", set.ns);
        // Since the pods started, every grant's token written and none twice: the tokens
        // written lie between the grants counted before the pollers stopped and after.
        assert!(
            grants.contains(written),
            "{}: {written} tokens written while the pods ran, Keycloak grants {grants:?}",
            set.ns
        );
        let want = if set.delivery == Delivery::Nudged { NUDGED_RENEWALS } else { UNNUDGED_RENEWALS };
        assert!(delays.len() >= want * set.volume.len(), "{}: fewer renewals reached the pods: {delays:?}", set.ns);
        // The kubelet resyncs each pod within 1.5 x syncFrequency (90 s); allow the sync's own
        // work, the poller's 250 ms and the pod's 1 s reading cadence.
        assert!(
            delays.iter().all(|d| *d < 95.0),
            "{}: a delivery took longer than the kubelet's 90 s worst case: {delays:?}",
            set.ns
        );
        let mut annotations = Vec::new();
        for name in &set.volume {
            let pod = set.pods.get(name).await?;
            annotations.push(pod.metadata.annotations.and_then(|a| a.get("registry-access.io/token-written").cloned()));
        }
        if set.delivery == Delivery::Nudged {
            assert!(
                delays.iter().all(|d| *d < NUDGED_DELIVERY_S),
                "{}: a nudged pod read a new token more than {NUDGED_DELIVERY_S} s after its write: {delays:?}",
                set.ns
            );
            assert_eq!(*skipped, 0, "{}: a nudged pod never read a token written while it ran", set.ns);
            assert!(
                annotations.iter().all(|a| a.as_ref().is_some_and(|v| v.starts_with("svc-token@"))),
                "{}: the pods do not carry the nudge annotation: {annotations:?}",
                set.ns
            );
        } else {
            assert!(annotations.iter().all(Option::is_none), "{}: pods were nudged: {annotations:?}", set.ns);
        }
    }
    assert!(failed > 0.0, "no failed nudge counted in {NUDGE_LOST_NS}");

    // subPath and env: one token, read until (and after) it expired.
    for (what, rs) in [("subPath mount", &subpath), ("environment variable", &env_var)] {
        let tokens: BTreeSet<i64> = rs.iter().map(|r| r.iat).collect();
        assert_eq!(tokens.len(), 1, "the {what} changed: it read {} tokens", tokens.len());
        assert!(rs.iter().any(|r| r.expired), "the {what} never showed its token expired");
    }
    eprintln!("[node] subPath mount and environment variable kept the first token and read it expired, as documented");
    leak_check(e, &[NUDGED_NS, NOT_NUDGED_NS, NUDGE_LOST_NS]).await
}

/// Seconds from each token's write to the Secret (first seen by the test's poller) to the first
/// reading of it in a pod, for every token after the pod's first.
fn delivery_delays(readings: &[Reading], written: &BTreeMap<i64, (i64, i64)>) -> Result<Vec<f64>> {
    let mut delays = Vec::new();
    let mut last = None;
    for r in readings {
        if last.is_some() && last != Some(r.iat) {
            let (_, written_at) = written.get(&r.iat).ok_or("the pod read a token never seen in the Secret")?;
            delays.push((r.at_ms - written_at) as f64 / 1000.0);
        }
        last = Some(r.iat);
    }
    Ok(delays)
}

/// Tokens written after a pod's first reading and more than 5 s before its last that it never
/// read: the pod went from an older token straight to a newer one (possible where only the
/// kubelet's sync delivers, every 60-90 s, and renewals come more often).
fn skipped_tokens(readings: &[Reading], written: &BTreeMap<i64, (i64, i64)>) -> usize {
    let (Some(first), Some(last)) = (readings.first(), readings.last()) else { return 0 };
    let read: BTreeSet<i64> = readings.iter().map(|r| r.iat).collect();
    written.iter().filter(|(iat, (_, at))| *at > first.at_ms && *at < last.at_ms - 5000 && !read.contains(iat)).count()
}

/// `make bench`'s pod freshness run: Keycloak's default 300 s tokens with the operator's default
/// renewBefore and the kubelet's default sync period, for two RegistryAccess objects at once:
/// one whose pods are nudged (the default), one with spec.nudgePods false. Each has
/// `RAO_POD_FRESHNESS_PODS` workload pods (default 10, spread over both nodes) that mount its
/// Secret for `RAO_POD_FRESHNESS_RENEWALS` renewals (default 5). Reports both delivery delay
/// distributions and the least validity any pod saw, to stdout and to
/// `target/bench/pod-freshness.json`; fails if a pod read an expired token.
async fn pod_freshness(env: Arc<NodeEnv>) -> Result<()> {
    let number = |var: &str, default: usize| std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (pod_count, renewals) = (number("RAO_POD_FRESHNESS_PODS", 10), number("RAO_POD_FRESHNESS_RENEWALS", 5));
    let e = &env.env;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let per_node = pod_count.div_ceil(NODES);
    let sets = futures::future::try_join_all(
        [(Delivery::Nudged, "team-freshness"), (Delivery::NotNudged, "team-freshness-no-nudge")]
            .map(|(d, ns)| Workloads::start(&env, d, ns, 300, None, per_node, &stop)),
    )
    .await?;
    let pods_per_set = per_node * NODES;
    let t = Instant::now();
    eprintln!(
        "[node] pod freshness: {pods_per_set} pods nudged and {pods_per_set} not, waiting for {renewals} renewals of \
         300 s tokens (about {} min)",
        renewals * 133 / 60 + 3
    );
    let all = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut all = Vec::new();
        for set in &sets {
            let mut rs = Vec::new();
            for name in &set.volume {
                rs.push(readings(&set.pods, name).await.unwrap_or_default());
            }
            all.push(rs);
        }
        let least = all.iter().flatten().map(|rs| rs.iter().map(|r| r.iat).collect::<BTreeSet<_>>().len()).min();
        if least.unwrap_or(0) > renewals {
            break all;
        }
        if t.elapsed() > Duration::from_secs(300 * (renewals as u64 + 2)) {
            return Err(format!("after {:?} the slowest pod has read {least:?} tokens", t.elapsed()).into());
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    println!(
        "pod freshness (300 s tokens, default renewBefore, kubelet syncFrequency {SYNC_FREQUENCY}, {pods_per_set} pods \
         with the nudge and {pods_per_set} without)"
    );
    println!("| figure | with the nudge | without (spec.nudgePods: false) |\n|---|---|---|");
    let mut report = json!({
        "pods_per_set": pods_per_set,
        "renewals": renewals,
        "token_lifetime_s": 300,
        "kubelet_sync_frequency": SYNC_FREQUENCY,
    });
    let mut rows: [Vec<String>; 5] = Default::default();
    let mut expired_total = 0;
    for (mut set, all) in sets.into_iter().zip(all) {
        let written = set.written().await?;
        let mut delays: Vec<f64> = Vec::new();
        for rs in &all {
            delays.extend(delivery_delays(rs, &written)?);
        }
        let spread = Spread::of(&delays)?;
        let least_left = all.iter().flatten().map(|r| r.remaining_s).min().unwrap_or_default();
        let expired = all.iter().flatten().filter(|r| r.expired).count();
        let grants = e.keycloak.grants(REALM, &set.client_id).await?;
        expired_total += expired;
        let key = if set.delivery == Delivery::Nudged { "nudge" } else { "no_nudge" };
        report[key] = json!({
            "namespace": set.ns,
            "tokens": written.len(),
            "delivery_delay_s": spread.json(),
            "least_validity_seen_in_a_pod_s": least_left,
            "expired_readings": expired,
            "grants": grants,
        });
        rows[0].push(spread.samples.to_string());
        rows[1].push(format!(
            "min {:.1} s, median {:.1} s, p90 {:.1} s, p99 {:.1} s, max {:.1} s",
            spread.min, spread.p50, spread.p90, spread.p99, spread.max
        ));
        rows[2].push(format!("{least_left} s"));
        rows[3].push(expired.to_string());
        rows[4].push(format!("{grants} / {}", written.len()));
    }
    for (figure, row) in [
        "delivery delay samples (pods x renewals)",
        "delivery delay, Secret write to the mounted file's change",
        "least validity left seen in a pod",
        "readings of an expired token",
        "Keycloak grants / tokens written",
    ]
    .iter()
    .zip(&rows)
    {
        println!("| {figure} | {} |", row.join(" | "));
    }
    let out = repo().join("target/bench/pod-freshness.json");
    std::fs::create_dir_all(out.parent().ok_or("no parent")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("[node] report written to {}", out.display());
    assert_eq!(expired_total, 0, "a pod read an expired token");
    Ok(())
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
