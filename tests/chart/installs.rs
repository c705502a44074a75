//! `helm install` in both scopes, with the operator run with a token of the chart's own
//! ServiceAccount: any permission the chart lacks fails the flow.

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use serde_json::json;

use crate::common::*;
use crate::support::k8s::{self, wait_condition};
use crate::support::keycloak::REALM;
use crate::support::operator::Operator;
use crate::support::{self, Env, Result};

pub async fn cluster_wide_install_works_with_the_chart_permissions_only(env: Arc<Env>) -> Result<()> {
    let (ns, sa) = ("rao-system", "rao-registry-access-operator");
    // The test Keycloak serves plain http.
    helm(
        &env,
        &["install", "rao", &chart(), "--namespace", ns, "--create-namespace", "--set", "allowInsecureHttp=true"],
    )?;
    let kubeconfig = service_account_kubeconfig(&env, ns, sa)?;
    let (args, port) = deployment_args(&env, ns, sa).await?;
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "cluster-wide mode must watch all namespaces: {args:?}"
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut operator = Operator::start(&kubeconfig, &env.path().join("operator-chart-cluster.log"), &args)?;
    wait_ready_endpoint(port).await?;

    // The permissions are the least the operator needs.
    assert!(can_i(&env, ns, sa, &["list", "secrets", "-A"])?);
    assert!(can_i(
        &env,
        ns,
        sa,
        &["patch", "registryaccesses.registry-access.io", "--subresource=status", "-n", "anywhere"]
    )?);
    for denied in [
        ["delete", "secrets"],
        ["update", "secrets"],
        ["list", "pods"],
        ["update", "registryaccesses.registry-access.io"],
        ["delete", "registryaccesses.registry-access.io"],
    ] {
        assert!(!can_i(&env, ns, sa, &[denied[0], denied[1], "-A"])?, "the chart grants {} {}", denied[0], denied[1]);
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
            "rao",
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

    // Uninstalling the operator leaves the users' tokens alone.
    operator.stop();
    support::case::assert_nothing_leaked(&admin, app, &operator.logs(), &Default::default()).await?;
    helm(&env, &["uninstall", "rao", "--namespace", ns])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        k8s::secret_data(&admin, app, "svc-token").await?.is_some_and(|d| d.contains_key("access_token")),
        "uninstall removed a token Secret"
    );
    assert!(env.cluster.kubectl(&["get", "clusterrole", sa]).is_err(), "the ClusterRole outlived the release");
    Ok(())
}

pub async fn namespaced_install_is_limited_to_its_namespaces(env: Arc<Env>) -> Result<()> {
    let (ns, sa) = ("rao-team-system", "rao-team-registry-access-operator");
    let admin = env.cluster.client().await?;
    for n in ["team-a", "team-b"] {
        k8s::create_namespace(&admin, n).await?;
    }
    helm(
        &env,
        &[
            "install",
            "rao-team",
            &chart(),
            "--namespace",
            ns,
            "--create-namespace",
            "--set",
            "allowInsecureHttp=true",
            "--set",
            "watchNamespaces={team-a}",
        ],
    )?;
    let kubeconfig = service_account_kubeconfig(&env, ns, sa)?;
    let (args, port) = deployment_args(&env, ns, sa).await?;
    assert!(args.contains(&"--namespace=team-a".to_owned()), "{args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut operator = Operator::start(&kubeconfig, &env.path().join("operator-chart-team.log"), &args)?;
    wait_ready_endpoint(port).await?;

    assert!(can_i(&env, ns, sa, &["list", "secrets", "-n", "team-a"])?);
    for (verb, resource) in [("list", "secrets"), ("get", "secrets"), ("list", "registryaccesses.registry-access.io")] {
        assert!(!can_i(&env, ns, sa, &[verb, resource, "-n", "team-b"])?, "{verb} {resource} allowed in team-b");
    }
    assert!(!can_i(&env, ns, sa, &["list", "secrets", "-A"])?, "cluster-wide secrets access in namespaced mode");

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
    helm(&env, &["uninstall", "rao-team", "--namespace", ns])?;
    Ok(())
}

pub async fn leader_election_works_with_the_chart_permissions(env: Arc<Env>) -> Result<()> {
    let (ns, sa) = ("rao-ha-system", "rao-ha-registry-access-operator");
    let admin = env.cluster.client().await?;
    k8s::create_namespace(&admin, "ha-team").await?;
    helm(
        &env,
        &[
            "install",
            "rao-ha",
            &chart(),
            "--namespace",
            ns,
            "--create-namespace",
            "--set",
            "allowInsecureHttp=true",
            "--set",
            "replicaCount=2",
            "--set",
            "watchNamespaces={ha-team}",
        ],
    )?;
    let kubeconfig = service_account_kubeconfig(&env, ns, sa)?;
    let (args, port) = deployment_args(&env, ns, sa).await?;
    assert!(args.contains(&"--leader-election".to_owned()), "two replicas without leader election: {args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let envs = [("POD_NAME", "rao-ha-0"), ("POD_NAMESPACE", ns)];
    let mut operator = Operator::start_with_env(&kubeconfig, &env.path().join("operator-chart-ha.log"), &args, &envs)?;
    wait_ready_endpoint(port).await?;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), ns);
    let lease_name = "rao-ha-registry-access-operator";
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
    helm(&env, &["uninstall", "rao-ha", "--namespace", ns])?;
    Ok(())
}
