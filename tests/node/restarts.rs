//! The chart's operator as pods on real kubelets: it survives a killed container and a deleted
//! leader pod, and tokens stay fresh meanwhile.

#[allow(unused_imports)]
use crate::*;

/// The chart's operator on real nodes: both replicas Ready through their own readiness probe, as
/// uid 65532 with a read-only root file system, talking to the API server with the pod's own
/// ServiceAccount token; a RegistryAccess is kept fresh while the leader's container is killed
/// (the kubelet restarts it) and while the leader's pod is deleted (the other replica takes over),
/// and its token never lapses.
pub(crate) async fn the_operator_runs_as_pods_and_survives_restarts(env: Arc<NodeEnv>) -> Result<()> {
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
