//! An upgrade's old and new pod at once: only the Lease holder writes.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::json;

use crate::common::*;
use crate::support::k8s::{self};
use crate::support::keycloak::REALM;
use crate::support::operator::Operator;
use crate::support::process::free_port;
use crate::support::{self, Env, Result};

/// The chart's default Deployment during a rolling update: the old and the new pod run at once
/// with the same arguments. Only one of them may write: each object gets one grant, one process
/// logs every token write, and the other takes over when the first stops.
pub async fn two_writers_during_an_upgrade_never_write_together(env: Arc<Env>) -> Result<()> {
    let (ns, sa, release, team) = ("rao-up-system", "rao-up-registry-access-operator", "rao-up", "up-team");
    let admin = env.cluster.client().await?;
    k8s::create_namespace(&admin, team).await?;
    // The defaults, scoped to one namespace so that no other test's objects are touched.
    helm(
        &env,
        &[
            "install",
            release,
            &chart(),
            "--namespace",
            ns,
            "--create-namespace",
            "--set",
            "allowInsecureHttp=true",
            "--set",
            &format!("watchNamespaces={{{team}}}"),
        ],
    )?;
    let deployment = Api::<Deployment>::namespaced(admin.clone(), ns).get(sa).await?;
    let strategy = deployment.spec.and_then(|s| s.strategy).ok_or("no strategy")?;
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "the old and new pods would not overlap");
    let kubeconfig = service_account_kubeconfig(&env, ns, sa)?;
    let (args, _) = deployment_args(&env, ns, sa).await?;

    // The digest key Secret: readable by name, creatable, no other Secret of the namespace.
    let digest_key = format!("{sa}-digest-key");
    assert!(can_i(&env, ns, sa, &["get", &format!("secrets/{digest_key}"), "-n", ns])?);
    assert!(can_i(&env, ns, sa, &["create", "secrets", "-n", ns])?);
    assert!(!can_i(&env, ns, sa, &["get", "secrets/other", "-n", ns])?, "the chart grants every Secret of {ns}");
    assert!(!can_i(&env, ns, sa, &["list", "secrets", "-n", ns])?);

    // Two processes at once, as the old and the new pod of a rolling update.
    let mut processes = Vec::new();
    for pod in ["rao-up-old", "rao-up-new"] {
        let port = free_port()?;
        let args: Vec<String> = args
            .iter()
            .map(|a| if a.starts_with("--probe-addr=") { format!("--probe-addr=127.0.0.1:{port}") } else { a.clone() })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs = [("POD_NAME", pod), ("POD_NAMESPACE", ns)];
        let log = env.path().join(format!("operator-chart-{pod}.log"));
        processes.push((pod, Operator::start_with_env(&kubeconfig, &log, &args, &envs)?, port));
    }
    for (_, _, port) in &processes {
        wait_ready_endpoint(*port).await?;
    }
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), ns);
    let holder = || async {
        leases.get_opt(sa).await.ok().flatten().and_then(|l| l.spec?.holder_identity).filter(|h| !h.is_empty())
    };
    const N: usize = 10;
    let mut names = Vec::new();
    for i in 0..N {
        let (name, client_id) = (format!("svc-{i}"), format!("chart-up-{i}"));
        let client = env.keycloak.create_client(REALM, &client_id, None, true).await?;
        k8s::put_client_secret(&admin, team, &format!("creds-{i}"), &[("client_secret", &client.secret)]).await?;
        let mut spec = spec(&env, &client_id);
        spec["clientSecretRef"]["name"] = json!(format!("creds-{i}"));
        k8s::apply_ra(&admin, team, &name, spec).await?;
        names.push(name);
    }
    support::case::wait_all_ready(&admin, team, &names, Duration::from_secs(60)).await?;
    // Both processes keep running for a while after every token was issued.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for (_, p, _) in processes.iter_mut() {
        p.check_alive()?;
    }
    for i in 0..N {
        let grants = env.keycloak.grants(REALM, &format!("chart-up-{i}")).await?;
        assert_eq!(grants, 1, "svc-{i} got {grants} grants with two processes running");
    }
    // One process wrote every token, the other none, and the writer holds the Lease.
    let writes: Vec<(&str, usize)> = processes.iter().map(|(pod, p, _)| (*pod, refreshes(&p.logs()))).collect();
    let leader = holder().await;
    eprintln!("[e2e] token writes per process: {writes:?}, Lease holder {leader:?}");
    let writers: Vec<&str> = writes.iter().filter(|(_, n)| *n > 0).map(|(pod, _)| *pod).collect();
    assert_eq!(writers.len(), 1, "token writes per process: {writes:?}");
    assert!(writes.contains(&(writers[0], N)), "token writes per process: {writes:?}");
    let leader = leader.ok_or("no Lease holder")?;
    assert_eq!(writers[0], leader, "the process that wrote does not hold the Lease");
    assert!(
        env.cluster.kubectl(&["get", "secret", &digest_key, "-n", ns, "-o", "name"]).is_ok(),
        "the operator did not keep its digest key in {ns}/{digest_key}"
    );

    // The old pod stops: the new one takes over, without asking again for valid tokens.
    let position = processes.iter().position(|(pod, _, _)| *pod == leader).ok_or("leader is not ours")?;
    let (_, mut old, _) = processes.remove(position);
    old.stop();
    let (standby, new, _) = &mut processes[0];
    let standby = *standby;
    support::process::wait_for("the standby to take the Lease", Duration::from_secs(30), || async {
        holder().await.as_deref() == Some(standby)
    })
    .await?;
    // A refresh on demand shows the new holder writes.
    env.cluster.kubectl(&[
        "annotate",
        "registryaccess",
        "svc-0",
        "-n",
        team,
        "registry-access.io/refresh-requested-at=takeover",
    ])?;
    support::case::wait_until("the new leader's first token write", Duration::from_secs(30), || async {
        refreshes(&new.logs()) >= 1
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(refreshes(&new.logs()), 1, "the new leader wrote more than the requested token");
    assert_eq!(env.keycloak.grants(REALM, "chart-up-0").await?, 2);
    for i in 1..N {
        assert_eq!(env.keycloak.grants(REALM, &format!("chart-up-{i}")).await?, 1, "svc-{i} re-issued on takeover");
    }
    new.check_alive()?;
    for log in [old.logs(), new.logs()] {
        assert!(!log.to_lowercase().contains("forbidden"), "a permission error:\n{log}");
    }
    new.stop();
    support::case::assert_nothing_leaked(&admin, team, &(old.logs() + &new.logs()), &Default::default()).await?;
    helm(&env, &["uninstall", release, "--namespace", ns])?;
    Ok(())
}
