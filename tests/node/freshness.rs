//! The pod freshness measurement of `make bench` (RAO_POD_FRESHNESS=1): delivery delays of 300 s
//! tokens with the default renewBefore, with the nudge and without it.

#[allow(unused_imports)]
use crate::*;

/// `make bench`'s pod freshness run: Keycloak's default 300 s tokens with the operator's default
/// renewBefore and the kubelet's default sync period, for two RegistryAccess objects at once:
/// one whose pods are nudged (the default), one with spec.nudgePods false. Each has
/// `RAO_POD_FRESHNESS_PODS` workload pods (default 10, spread over both nodes) that mount its
/// Secret for `RAO_POD_FRESHNESS_RENEWALS` renewals (default 5). Reports both delivery delay
/// distributions and the least validity any pod saw, to stdout and to
/// `target/bench/pod-freshness.json`; fails if a pod read an expired token.
pub(crate) async fn pod_freshness(env: Arc<NodeEnv>) -> Result<()> {
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
