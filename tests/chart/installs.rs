//! `helm install` in both scopes, with the operator run with a token of the chart's own
//! ServiceAccount: any permission the chart lacks fails the flow.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::common::*;
use crate::support::k8s::{self, wait_condition};
use crate::support::keycloak::REALM;
use crate::support::{self, Env, Result};

pub async fn cluster_wide_install_works_with_the_chart_permissions_only(env: Arc<Env>) -> Result<()> {
    // The test Keycloak serves plain http.
    let release = Release::install(&env, "rao", "rao-system", &["allowInsecureHttp=true"])?;
    let (ns, sa) = (release.ns.as_str(), release.sa.as_str());
    let Running { mut operator, args, .. } = release.start_operator(None).await?;
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "cluster-wide mode must watch all namespaces: {args:?}"
    );

    // The permissions are the least the operator needs.
    assert!(release.can_i(&["list", "secrets", "-A"])?);
    assert!(release.can_i(&[
        "patch",
        "registryaccesses.registry-access.io",
        "--subresource=status",
        "-n",
        "anywhere"
    ])?);
    for denied in [
        ["delete", "secrets"],
        ["update", "secrets"],
        ["create", "pods"],
        ["update", "pods"],
        ["delete", "pods"],
        ["update", "registryaccesses.registry-access.io"],
        ["delete", "registryaccesses.registry-access.io"],
    ] {
        assert!(!release.can_i(&[denied[0], denied[1], "-A"])?, "the chart grants {} {}", denied[0], denied[1]);
    }

    let admin = env.cluster.client().await?;
    let app = "app-one";
    k8s::create_namespace(&admin, app).await?;
    let client = env.keycloak.create_client(REALM, "chart-cluster", Some(20), true).await?;
    k8s::put_client_secret(&admin, app, "creds", &[("client_secret", &client.secret)]).await?;
    k8s::apply_ra(&admin, app, "svc", spec(&env, "chart-cluster")).await?;
    wait_condition(&admin, app, "svc", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    wait_refresh(&admin, app, "svc-token", Duration::from_secs(30)).await?;
    // Without a client secret: the chart's permissions let the operator follow the
    // ServiceAccount and mint its tokens.
    k8s::put_service_account(&admin, app, "registry-client", Some(&env.keycloak.issuer(REALM))).await?;
    env.keycloak.create_federated_client(REALM, "chart-federated", app, "registry-client", None).await?;
    let federated = json!({
        "server": env.keycloak.base_url, "realm": REALM, "clientId": "chart-federated",
        "clientAuthMethod": "service_account", "serviceAccountRef": {"name": "registry-client"},
    });
    k8s::apply_ra(&admin, app, "federated", federated).await?;
    wait_condition(&admin, app, "federated", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    operator.check_alive()?;
    let logs = operator.logs();
    assert!(
        !logs.contains("Forbidden") && !logs.contains("forbidden"),
        "the operator hit a permission error:\n{}",
        support::process::tail(&operator.log, 20)
    );
    assert!(!logs.contains(&client.secret), "the client secret is in the log");

    // An upgrade with changed values rolls out new arguments.
    helm(
        &env,
        &[
            "upgrade",
            &release.name,
            &chart(),
            "--namespace",
            ns,
            "--set",
            "allowInsecureHttp=true",
            "--set",
            "logLevel=debug",
            "--set",
            "concurrency=4",
        ],
    )?;
    let (args, _) = deployment_args(&env, ns, sa).await?;
    assert!(args.contains(&"--log-level=debug".to_owned()) && args.contains(&"--concurrency=4".to_owned()), "{args:?}");

    // Uninstalling the operator leaves the users' tokens alone. The positive sign that the
    // garbage collector has dealt with what the uninstall deleted: a ConfigMap owned by the
    // release's ClusterRole is collected.
    operator.stop();
    support::case::assert_nothing_leaked(&admin, app, &operator.logs(), &Default::default()).await?;
    let role = Api::<ClusterRole>::all(admin.clone()).get(sa).await?;
    let owner = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "name": sa,
        "uid": role.metadata.uid.ok_or("the ClusterRole has no uid")?});
    let sentinel: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "owned-by-the-release", "ownerReferences": [owner]}}))?;
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), app);
    config_maps.create(&PostParams::default(), &sentinel).await?;
    release.uninstall()?;
    support::case::wait_until(
        "the ConfigMap the release's ClusterRole owned collected",
        Duration::from_secs(60),
        || async { config_maps.get_opt("owned-by-the-release").await.is_ok_and(|c| c.is_none()) },
    )
    .await?;
    assert!(
        k8s::secret_data(&admin, app, "svc-token").await?.is_some_and(|d| d.contains_key("access_token")),
        "uninstall removed a token Secret"
    );
    assert!(env.cluster.kubectl(&["get", "clusterrole", sa]).is_err(), "the ClusterRole outlived the release");
    Ok(())
}

pub async fn namespaced_install_is_limited_to_its_namespaces(env: Arc<Env>) -> Result<()> {
    let admin = env.cluster.client().await?;
    for n in ["team-a", "team-b"] {
        k8s::create_namespace(&admin, n).await?;
    }
    let release =
        Release::install(&env, "rao-team", "rao-team-system", &["allowInsecureHttp=true", "watchNamespaces={team-a}"])?;
    let Running { mut operator, args, .. } = release.start_operator(None).await?;
    assert!(args.contains(&"--namespace=team-a".to_owned()), "{args:?}");

    assert!(release.can_i(&["list", "secrets", "-n", "team-a"])?);
    for (verb, resource) in [("list", "secrets"), ("get", "secrets"), ("list", "registryaccesses.registry-access.io")] {
        assert!(!release.can_i(&[verb, resource, "-n", "team-b"])?, "{verb} {resource} allowed in team-b");
    }
    assert!(!release.can_i(&["list", "secrets", "-A"])?, "cluster-wide secrets access in namespaced mode");

    let client = env.keycloak.create_client(REALM, "chart-team", Some(20), true).await?;
    for n in ["team-a", "team-b"] {
        k8s::put_client_secret(&admin, n, "creds", &[("client_secret", &client.secret)]).await?;
        k8s::apply_ra(&admin, n, "svc", spec(&env, "chart-team")).await?;
    }
    wait_condition(&admin, "team-a", "svc", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    wait_refresh(&admin, "team-a", "svc-token", Duration::from_secs(30)).await?;
    assert!(
        k8s::ra_status(&admin, "team-b", "svc").await?.is_none(),
        "the operator acted in a namespace it does not watch"
    );
    assert!(k8s::secret_data(&admin, "team-b", "svc-token").await?.is_none());
    operator.check_alive()?;
    assert!(!operator.logs().to_lowercase().contains("forbidden"), "{}", support::process::tail(&operator.log, 20));
    operator.stop();
    support::case::assert_nothing_leaked(&admin, "team-a", &operator.logs(), &Default::default()).await?;
    release.uninstall()
}

pub async fn leader_election_works_with_the_chart_permissions(env: Arc<Env>) -> Result<()> {
    let admin = env.cluster.client().await?;
    k8s::create_namespace(&admin, "ha-team").await?;
    let values = ["allowInsecureHttp=true", "replicaCount=2", "watchNamespaces={ha-team}"];
    let release = Release::install(&env, "rao-ha", "rao-ha-system", &values)?;
    let Running { mut operator, args, .. } = release.start_operator(Some("rao-ha-0")).await?;
    assert!(args.contains(&"--leader-election".to_owned()), "two replicas without leader election: {args:?}");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), &release.ns);
    let lease_name = release.sa.as_str();
    support::process::wait_for("the Lease held by rao-ha-0", Duration::from_secs(30), || {
        let leases = leases.clone();
        async move {
            leases.get_opt(lease_name).await.ok().flatten().and_then(|l| l.spec?.holder_identity).as_deref()
                == Some("rao-ha-0")
        }
    })
    .await?;
    let client = env.keycloak.create_client(REALM, "chart-ha", None, true).await?;
    k8s::put_client_secret(&admin, "ha-team", "creds", &[("client_secret", &client.secret)]).await?;
    k8s::apply_ra(&admin, "ha-team", "svc", spec(&env, "chart-ha")).await?;
    wait_condition(&admin, "ha-team", "svc", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    operator.check_alive()?;
    assert!(!operator.logs().to_lowercase().contains("forbidden"), "{}", support::process::tail(&operator.log, 20));
    operator.stop();
    // SIGTERM released the Lease.
    let holder = leases.get(lease_name).await?.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(holder.is_empty(), "the Lease is still held by {holder:?} after SIGTERM");
    release.uninstall()
}
