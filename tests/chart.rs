//! The Helm chart on the real API server: lint and render, a server-side dry run of what it
//! renders, `helm install` in both scopes, and the operator's binary run with a token of the
//! chart's own ServiceAccount, so that any permission the chart lacks fails the flow.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::{Value, json};

use support::k8s::{self, wait_condition};
use support::keycloak::REALM;
use support::operator::Operator;
use support::process::free_port;
use support::{Env, Result, repo};

fn chart() -> String {
    repo().join("charts/registry-access-operator").display().to_string()
}

/// The Kubernetes version the environment runs (hack/versions.env), for `helm template`.
fn kube_version() -> String {
    let versions = std::fs::read_to_string(repo().join("hack/versions.env")).unwrap_or_default();
    versions.lines().find_map(|l| l.strip_prefix("KUBERNETES_VERSION=")).unwrap_or("v1.34.0").to_owned()
}

/// Runs the built helm against the test cluster, with its state kept in the environment.
fn helm(env: &Env, args: &[&str]) -> Result<String> {
    let home = env.path().join("helm");
    let out = Command::new(env.tools.bin.join("helm"))
        .args(args)
        .arg(format!("--kubeconfig={}", env.cluster.kubeconfig.display()))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A kubeconfig holding a token of the ServiceAccount (TokenRequest API).
fn service_account_kubeconfig(env: &Env, ns: &str, sa: &str) -> Result<PathBuf> {
    let token = env.cluster.kubectl(&["create", "token", sa, "-n", ns, "--duration=2h"])?;
    env.cluster.kubeconfig_with_token(&format!("{ns}-{sa}"), token.trim())
}

/// `kubectl auth can-i` as the ServiceAccount: true for "yes".
fn can_i(env: &Env, ns: &str, sa: &str, args: &[&str]) -> Result<bool> {
    let user = format!("--as=system:serviceaccount:{ns}:{sa}");
    let mut full = vec!["auth", "can-i", user.as_str()];
    full.extend_from_slice(args);
    let out = Command::new(env.tools.bin.join("kubectl"))
        .arg(format!("--kubeconfig={}", env.cluster.kubeconfig.display()))
        .args(&full)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
}

/// The operator's arguments as the chart's Deployment gives them, with the probe port moved to
/// a free loopback port.
async fn deployment_args(env: &Env, ns: &str, name: &str) -> Result<(Vec<String>, u16)> {
    let client = env.cluster.client().await?;
    let d = Api::<Deployment>::namespaced(client, ns).get(name).await?;
    let container = d
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers)
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or("no container")?;
    let port = free_port()?;
    let args = container
        .args
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a != "run")
        .map(|a| if a.starts_with("--probe-addr=") { format!("--probe-addr=127.0.0.1:{port}") } else { a })
        .collect();
    Ok((args, port))
}

async fn wait_ready_endpoint(port: u16) -> Result<()> {
    let http = reqwest::Client::new();
    support::process::wait_for("/readyz of the operator", Duration::from_secs(30), || {
        let http = http.clone();
        async move {
            matches!(http.get(format!("http://127.0.0.1:{port}/readyz")).send().await, Ok(r) if r.status().is_success())
        }
    })
    .await
}

/// Waits until the token in the Secret changes: a refresh happened.
async fn wait_refresh(client: &kube::Client, ns: &str, secret: &str, timeout: Duration) -> Result<()> {
    let first =
        k8s::secret_data(client, ns, secret).await?.and_then(|d| d.get("access_token").cloned()).ok_or("no token")?;
    let t = Instant::now();
    loop {
        let now = k8s::secret_data(client, ns, secret).await?.and_then(|d| d.get("access_token").cloned());
        if now.as_ref().is_some_and(|n| *n != first) {
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(format!("no refresh of {ns}/{secret} within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn spec(env: &Env, client_id: &str) -> Value {
    json!({"server": env.keycloak.base_url, "realm": REALM, "clientId": client_id, "clientSecretRef": {"name": "creds"}})
}

// ---- the tests ----

async fn lints_and_renders_for_both_scopes(env: Arc<Env>) -> Result<()> {
    helm(&env, &["lint", &chart()])?;
    helm(&env, &["lint", &chart(), "--set", "watchNamespaces={team-x,team-y}"])?;
    env.cluster.kubectl(&["create", "namespace", "render-system"])?;
    for ns in ["team-x", "team-y"] {
        env.cluster.kubectl(&["create", "namespace", ns])?;
    }
    for values in [
        vec![],
        vec!["--set", "watchNamespaces={team-x,team-y}"],
        vec![
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "replicaCount=2",
            "--set",
            "caBundle.configMap=platform-ca",
        ],
    ] {
        let mut args = vec![
            "template",
            "rao",
            chart().leak() as &str,
            "--namespace",
            "render-system",
            "--kube-version",
            kube_version().leak(),
        ];
        args.extend(values.iter());
        let rendered = helm(&env, &args)?;
        // The real API server validates every rendered object without storing it.
        env.cluster.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered)?;
        for doc in rendered.split("\n---") {
            let Ok(v) = serde_yaml::from_str::<Value>(doc) else { continue };
            if matches!(v["kind"].as_str(), Some("ClusterRole" | "Role")) {
                for rule in v["rules"].as_array().ok_or("no rules")? {
                    for field in ["verbs", "resources", "apiGroups"] {
                        let items = rule[field].as_array().ok_or("rule without field")?;
                        assert!(!items.iter().any(|i| i == "*"), "wildcard {field} in {rule}");
                    }
                }
            }
        }
        let kinds: Vec<String> = rendered.lines().filter_map(|l| l.strip_prefix("kind: ").map(str::to_owned)).collect();
        if values.is_empty() {
            assert!(kinds.contains(&"ClusterRole".to_owned()) && !kinds.contains(&"Role".to_owned()), "{kinds:?}");
        } else if values[1].starts_with("watchNamespaces") {
            assert_eq!(kinds.iter().filter(|k| *k == "Role").count(), 2, "{kinds:?}");
            // The operator gets no cluster-wide permission; the only ClusterRoles are the two
            // tenant roles aggregated into edit/admin and view, bound to no one by the chart.
            assert!(!kinds.contains(&"ClusterRoleBinding".to_owned()), "{kinds:?}");
            assert_eq!(kinds.iter().filter(|k| *k == "ClusterRole").count(), 2, "{kinds:?}");
            assert!(rendered.contains("-tenant-edit") && rendered.contains("-tenant-view"));
            assert!(rendered.contains("--namespace=team-x") && rendered.contains("--namespace=team-y"));
        } else {
            assert!(kinds.contains(&"NetworkPolicy".to_owned()));
        }
    }
    // deploy/ is the chart rendered with its defaults, for installs without Helm.
    let rendered = helm(
        &env,
        &[
            "template",
            "registry-access-operator",
            &chart(),
            "--namespace",
            "registry-access-operator",
            "--kube-version",
            &kube_version(),
        ],
    )?;
    let committed = std::fs::read_to_string(repo().join("deploy/registry-access-operator.yaml"))?;
    assert!(rendered == committed, "deploy/registry-access-operator.yaml is out of date: run `make manifests`");

    // The deployment is hardened as documented.
    let rendered = helm(
        &env,
        &[
            "template",
            "rao",
            &chart(),
            "--namespace",
            "render-system",
            "--kube-version",
            &kube_version(),
            "--show-only",
            "templates/deployment.yaml",
        ],
    )?;
    let d: Value = serde_yaml::from_str(&rendered)?;
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["resources"]["limits"]["memory"].is_string());
    // values.schema.json refuses a typo'd value.
    let refused =
        helm(&env, &["template", "rao", &chart(), "--kube-version", &kube_version(), "--set", "logFormat=yaml"])
            .err()
            .ok_or("schema accepted logFormat=yaml")?;
    assert!(refused.to_string().contains("logFormat"), "{refused}");
    Ok(())
}

async fn cluster_wide_install_works_with_the_chart_permissions_only(env: Arc<Env>) -> Result<()> {
    let (ns, sa) = ("rao-system", "rao-registry-access-operator");
    helm(&env, &["install", "rao", &chart(), "--namespace", ns, "--create-namespace"])?;
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
    k8s::put_secret(&admin, app, "creds", &[("client_secret", &client.secret)]).await?;
    k8s::apply_ra(&admin, app, "svc", spec(&env, "chart-cluster")).await?;
    wait_condition(&admin, app, "svc", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    wait_refresh(&admin, app, "svc-token", Duration::from_secs(30)).await?;
    operator.check_alive()?;
    let logs = operator.logs();
    assert!(
        !logs.contains("Forbidden") && !logs.contains("forbidden"),
        "the operator hit a permission error:\n{}",
        support::process::tail(&operator.log, 20)
    );
    assert!(!logs.contains(&client.secret), "the client secret is in the log");

    // An upgrade with changed values rolls out new arguments.
    helm(&env, &["upgrade", "rao", &chart(), "--namespace", ns, "--set", "logLevel=debug", "--set", "concurrency=4"])?;
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

async fn namespaced_install_is_limited_to_its_namespaces(env: Arc<Env>) -> Result<()> {
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
        k8s::put_secret(&admin, n, "creds", &[("client_secret", &client.secret)]).await?;
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

async fn leader_election_works_with_the_chart_permissions(env: Arc<Env>) -> Result<()> {
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
    k8s::put_secret(&admin, "ha-team", "creds", &[("client_secret", &client.secret)]).await?;
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

// ---- the harness ----

/// Runs kubectl as a user (impersonated by the admin), with `input` on its standard input.
fn kubectl_as_user(env: &Env, user: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new(env.tools.bin.join("kubectl"))
        .arg(format!("--kubeconfig={}", env.cluster.kubeconfig.display()))
        .arg(format!("--as={user}"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().ok_or("no stdin")?.write_all(input.unwrap_or_default().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!("kubectl {} as {user}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Users bound to the standard `edit` role manage RegistryAccess objects in their namespace, users
/// bound to `view` only read them; nothing of it outlives the release.
async fn tenants_use_registryaccess_through_the_standard_roles(env: Arc<Env>) -> Result<()> {
    let (ns, app) = ("rao-tenants-system", "tenant-app");
    let admin = env.cluster.client().await?;
    k8s::create_namespace(&admin, app).await?;
    for (user, role) in [("editor", "edit"), ("viewer", "view")] {
        env.cluster.kubectl(&["create", "serviceaccount", user, "-n", app])?;
        let (role, subject) = (format!("--clusterrole={role}"), format!("--serviceaccount={app}:{user}"));
        env.cluster.kubectl(&["create", "rolebinding", user, "-n", app, &role, &subject])?;
    }
    let ra = "registryaccesses.registry-access.io";
    let can = |user: &str, verb: &str, extra: &[&str]| {
        let mut args = vec![verb, ra, "-n", app];
        args.extend_from_slice(extra);
        can_i(&env, app, user, &args)
    };
    assert!(!can("editor", "create", &[])?, "edit included RegistryAccess before the chart was installed");

    helm(&env, &["install", "rao-tenants", &chart(), "--namespace", ns, "--create-namespace"])?;
    // The aggregation controller merges the chart's rules into the standard roles.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !can("editor", "create", &[])? {
        if Instant::now() > deadline {
            return Err("edit did not come to include RegistryAccess within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for verb in ["get", "list", "watch", "create", "update", "patch", "delete"] {
        assert!(can("editor", verb, &[])?, "edit may not {verb} RegistryAccess");
    }
    assert!(!can("editor", "patch", &["--subresource=status"])?, "edit may write the status");
    for verb in ["get", "list", "watch"] {
        assert!(can("viewer", verb, &[])?, "view may not {verb} RegistryAccess");
    }
    for verb in ["create", "patch", "delete"] {
        assert!(!can("viewer", verb, &[])?, "view may {verb} RegistryAccess");
    }

    // Real requests as those users.
    let (editor, viewer) =
        (format!("system:serviceaccount:{app}:editor"), format!("system:serviceaccount:{app}:viewer"));
    let object = json!({"apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
        "metadata": {"name": "by-editor", "namespace": app},
        "spec": {"server": "https://kc.example.com/auth", "realm": REALM, "clientId": "c", "clientSecretRef": {"name": "creds"}}});
    kubectl_as_user(&env, &editor, &["create", "-f", "-"], Some(&object.to_string()))?;
    kubectl_as_user(
        &env,
        &editor,
        &["annotate", "registryaccess", "by-editor", "-n", app, "registry-access.io/refresh-requested-at=now"],
        None,
    )?;
    let seen = kubectl_as_user(&env, &viewer, &["get", "registryaccess", "by-editor", "-n", app, "-o", "name"], None)?;
    assert!(seen.contains("by-editor"), "{seen}");
    let refused = kubectl_as_user(&env, &viewer, &["delete", "registryaccess", "by-editor", "-n", app], None)
        .err()
        .ok_or("a viewer deleted a RegistryAccess")?;
    assert!(refused.to_string().contains("forbidden"), "{refused}");

    helm(&env, &["uninstall", "rao-tenants", "--namespace", ns])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while can("editor", "create", &[])? {
        if Instant::now() > deadline {
            return Err("edit still includes RegistryAccess 30 s after the release was uninstalled".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

fn main() {
    // Installs in the two scopes share the cluster: one at a time, so that a cluster-wide
    // operator never acts on another test's objects.
    support::harness::run(
        "chart",
        tests![
            lints_and_renders_for_both_scopes,
            cluster_wide_install_works_with_the_chart_permissions_only,
            namespaced_install_is_limited_to_its_namespaces,
            leader_election_works_with_the_chart_permissions,
            tenants_use_registryaccess_through_the_standard_roles,
        ],
        1,
    )
}
