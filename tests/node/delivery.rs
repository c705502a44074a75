//! What a workload sees of each new token on real kubelets: pods that mount the token Secret,
//! nudged, not nudged, and with every nudge refused; readings, delivery delays and their spread.

#[allow(unused_imports)]
use crate::*;

/// What the workload pods logged, parsed.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    pub(crate) at_ms: i64,
    pub(crate) iat: i64,
    pub(crate) remaining_s: i64,
    pub(crate) expired: bool,
}

/// The readings a workload pod has logged so far; an error line fails.
pub(crate) async fn readings(pods: &Api<Pod>, name: &str) -> Result<Vec<Reading>> {
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
pub(crate) fn renewals_read(readings: &[Reading]) -> usize {
    readings.iter().map(|r| r.iat).collect::<BTreeSet<_>>().len().saturating_sub(1)
}

/// How a set of workload pods gets each new token into its mounted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The operator nudges the pods after each write (the default): their kubelets resync them at once.
    Nudged,
    /// spec.nudgePods: false: the kubelet's periodic sync only.
    NotNudged,
    /// The nudges are sent and refused (an admission policy denies the operator's pod updates in
    /// the namespace): the kubelet's periodic sync only, and every nudge counted as failed.
    NudgeLost,
}

impl Delivery {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Nudged => "with the nudge",
            Self::NotNudged => "without the nudge (spec.nudgePods: false)",
            Self::NudgeLost => "with every nudge refused (admission policy)",
        }
    }
}

/// A distribution of delays in seconds (nearest-rank percentiles).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spread {
    pub(crate) samples: usize,
    pub(crate) min: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Spread {
    pub(crate) fn of(delays: &[f64]) -> Result<Self> {
        let mut d = delays.to_vec();
        d.sort_by(f64::total_cmp);
        let (first, last) = (*d.first().ok_or("no delays measured")?, d[d.len() - 1]);
        let pct = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize];
        Ok(Self { samples: d.len(), min: first, p50: pct(0.5), p90: pct(0.9), p99: pct(0.99), max: last })
    }

    pub(crate) fn json(&self) -> Value {
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
pub(crate) async fn operator_metric(env: &Env, http: &reqwest::Client, sample: &str) -> Result<f64> {
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
pub(crate) fn lose_nudges_in(env: &Env, sa: &str, ns: &str) -> Result<()> {
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
pub(crate) struct Workloads {
    pub(crate) delivery: Delivery,
    pub(crate) ns: &'static str,
    pub(crate) client_id: String,
    pub(crate) pods: Api<Pod>,
    /// The pods that mount the Secret as a volume, one per node.
    pub(crate) volume: Vec<String>,
    pub(crate) seen: Arc<Mutex<SecretWatch>>,
    pub(crate) poller: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl Workloads {
    /// A RegistryAccess `svc` in `ns` (180 s tokens renewed 130 s ahead; nudgePods false for
    /// [`Delivery::NotNudged`]), its Secret's poller, and `per_node` pods on each node that mount
    /// it as a volume, named `workload-volume-<n>`.
    pub(crate) async fn start(
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
    pub(crate) async fn volume_readings(&self) -> Result<Vec<Vec<Reading>>> {
        let mut all = Vec::new();
        for name in &self.volume {
            all.push(readings(&self.pods, name).await?);
        }
        Ok(all)
    }

    /// Once the pollers' `stop` is set: the tokens written to the Secret (iat -> exp, first seen).
    pub(crate) async fn written(&mut self) -> Result<BTreeMap<i64, (i64, i64)>> {
        if let Some(poller) = self.poller.take() {
            poller.await??;
        }
        Ok(self.seen.lock().unwrap().tokens.clone())
    }
}

/// The namespaces of the delivery comparison.
pub(crate) const NUDGED_NS: &str = "team-workload";
pub(crate) const NOT_NUDGED_NS: &str = "team-no-nudge";
pub(crate) const NUDGE_LOST_NS: &str = "team-lost-nudge";
/// The longest a nudged pod may take to read a new token: the kubelet's resync of the pod
/// (about a second), the pod's 1 s reading cadence and the poller's 250 ms.
pub(crate) const NUDGED_DELIVERY_S: f64 = 5.0;
/// Renewals each volume pod must read: five with the nudge; two where only the kubelet's sync
/// delivers (their pods run as long as the nudged ones, and a spread needs no more).
pub(crate) const NUDGED_RENEWALS: usize = 5;
pub(crate) const UNNUDGED_RENEWALS: usize = 2;
/// Volume pods on each node: five for the nudged object and for the one with `nudgePods: false`
/// (ten pods over the two nodes each), one for the object whose nudges are all refused.
pub(crate) const PODS_PER_NODE: usize = 5;
pub(crate) const LOST_PODS_PER_NODE: usize = 1;

/// Pods that mount the token Secret as a volume read each new token and never an expired one,
/// over the same renewals of three RegistryAccess objects: with the nudge, within a few seconds
/// of the Secret write; with spec.nudgePods false, and with every nudge refused by an admission
/// policy (counted as failed in the operator's metrics), within the kubelet's sync period. The
/// delivery delays (Secret write to the pod's first reading of the new token) are printed. A
/// `subPath` mount and an environment variable never change: they read the first token until it
/// expires (the README's warning).
pub(crate) async fn pods_that_mount_the_token_never_read_an_expired_one(env: Arc<NodeEnv>) -> Result<()> {
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
        [
            (Delivery::Nudged, NUDGED_NS, PODS_PER_NODE),
            (Delivery::NotNudged, NOT_NUDGED_NS, PODS_PER_NODE),
            (Delivery::NudgeLost, NUDGE_LOST_NS, LOST_PODS_PER_NODE),
        ]
        .map(|(d, ns, per_node)| Workloads::start(&env, d, ns, 180, Some("130s"), per_node, &stop)),
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
        sets.iter().map(|s| s.volume.len()).sum::<usize>() + 2,
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
    let deadline = Instant::now() + Duration::from_secs(480);
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
                "after 8 minutes: {short:?} short; first token read expired through subPath and env: {past_first}; \
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
         130 s ahead, kubelet syncFrequency {SYNC_FREQUENCY}, pods read every second, volume pods over {NODES} nodes):"
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
            "[node]   {:<45} {} pods, {spread}; least validity left read: {min_left} s; tokens written {} \
             (Keycloak grants {grants_now}, {grants_then} before the pods started), not read by a pod: {skipped}; \
             each: {delays:.1?}",
            set.delivery.describe(),
            set.volume.len(),
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
pub(crate) fn delivery_delays(readings: &[Reading], written: &BTreeMap<i64, (i64, i64)>) -> Result<Vec<f64>> {
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
pub(crate) fn skipped_tokens(readings: &[Reading], written: &BTreeMap<i64, (i64, i64)>) -> usize {
    let (Some(first), Some(last)) = (readings.first(), readings.last()) else { return 0 };
    let read: BTreeSet<i64> = readings.iter().map(|r| r.iat).collect();
    written.iter().filter(|(iat, (_, at))| *at > first.at_ms && *at < last.at_ms - 5000 && !read.contains(iat)).count()
}
