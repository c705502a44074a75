//! An upgrade's old and new pod at once: only the Lease holder writes.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::json;

use jiff::Timestamp;

use crate::common::*;
use crate::support::k8s::{self};
use crate::support::keycloak::REALM;
use crate::support::metrics::{Activity, wait_activity};
use crate::support::{self, Env, Result};

/// The chart's default Deployment during a rolling update: the old and the new pod run at once
/// with the same arguments. Only one of them may write: each object gets one grant, one process
/// logs every token write, and the other takes over when the first stops.
pub async fn two_writers_during_an_upgrade_never_write_together(env: Arc<Env>) -> Result<()> {
    let team = "up-team";
    let admin = env.cluster.client().await?;
    k8s::create_namespace(&admin, team).await?;
    // The defaults, scoped to one namespace so that no other test's objects are touched.
    let watched = format!("watchNamespaces={{{team}}}");
    let release = Release::install(&env, "rao-up", "rao-up-system", &["allowInsecureHttp=true", &watched])?;
    let (ns, sa) = (release.ns.as_str(), release.sa.as_str());
    let deployment = Api::<Deployment>::namespaced(admin.clone(), ns).get(sa).await?;
    let strategy = deployment.spec.and_then(|s| s.strategy).ok_or("no strategy")?;
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "the old and new pods would not overlap");

    // The digest key Secret: readable by name, creatable, no other Secret of the namespace.
    let digest_key = format!("{sa}-digest-key");
    assert!(release.can_i(&["get", &format!("secrets/{digest_key}"), "-n", ns])?);
    assert!(release.can_i(&["create", "secrets", "-n", ns])?);
    assert!(!release.can_i(&["get", "secrets/other", "-n", ns])?, "the chart grants every Secret of {ns}");
    assert!(!release.can_i(&["list", "secrets", "-n", ns])?);

    // Two processes at once, as the old and the new pod of a rolling update.
    let mut processes = Vec::new();
    for pod in ["rao-up-old", "rao-up-new"] {
        processes.push((pod, release.start_operator(Some(pod)).await?));
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
    // Both processes keep running after every token was issued, until the holder has renewed
    // the Lease again: a round of leader election in which the standby could have stepped in.
    let all_ready = Timestamp::now();
    support::process::wait_for("the Lease renewed after every token was issued", Duration::from_secs(30), || async {
        leases.get_opt(sa).await.ok().flatten().and_then(|l| l.spec?.renew_time).is_some_and(|t| t.0 > all_ready)
    })
    .await?;
    for (_, p) in processes.iter_mut() {
        p.operator.check_alive()?;
    }
    // Each process says what it did: one runs the controllers for the N objects, the other
    // stands by and has reconciled nothing and asked Keycloak for nothing.
    let mut leading = Vec::new();
    for (pod, p) in &processes {
        let a = Activity::read(p.port).await?;
        if a.leader == 1.0 {
            assert_eq!(a.managed_objects, N as f64, "{pod} leads: {a:?}");
            leading.push(*pod);
        } else {
            assert!(a.reconciles == 0.0 && a.token_requests == 0.0, "{pod} stands by and yet acted: {a:?}");
        }
    }
    assert_eq!(leading.len(), 1, "processes that run the controllers: {leading:?}");
    for i in 0..N {
        let grants = env.keycloak.grants(REALM, &format!("chart-up-{i}")).await?;
        assert_eq!(grants, 1, "svc-{i} got {grants} grants with two processes running");
    }
    // One process wrote every token, the other none, and the writer holds the Lease.
    let writes: Vec<(&str, usize)> = processes.iter().map(|(pod, p)| (*pod, refreshes(&p.operator.logs()))).collect();
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
    let position = processes.iter().position(|(pod, _)| *pod == leader).ok_or("leader is not ours")?;
    let (_, Running { operator: mut old, .. }) = processes.remove(position);
    old.stop();
    let (standby, Running { operator: new, port: new_port, .. }) = &mut processes[0];
    let (standby, new_port) = (*standby, *new_port);
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
    // The positive sign that the new leader has looked at every object: it manages all N, has
    // reconciled at least as many times, and has no token request waiting or in flight.
    wait_activity(new_port, "the new leader to have reconciled every object", Duration::from_secs(30), |a| {
        a.managed_objects == N as f64 && a.reconciles >= N as f64 && a.idle()
    })
    .await?;
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
    release.uninstall()
}
