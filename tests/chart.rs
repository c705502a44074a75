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

fn helm(env: &Env, args: &[&str]) -> Result<String> {
    env.helm(args)
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

/// `helm template rao` of the chart into namespace `ns` with `values` (`--set` pairs).
fn render(env: &Env, ns: &str, values: &[&str]) -> Result<String> {
    let (chart, kube) = (chart(), kube_version());
    let mut args = vec!["template", "rao", chart.as_str(), "--namespace", ns, "--kube-version", kube.as_str()];
    for v in values {
        args.extend(["--set", v]);
    }
    helm(env, &args)
}

/// The alert rules: `promtool check rules` accepts the plain rules file, `promtool test rules`
/// shows each alert firing where it should and quiet through normal refresh cycles, and the
/// chart's PrometheusRule and dashboard ConfigMap carry exactly the files' contents.
async fn alerts_fire_and_stay_quiet_under_promtool(env: Arc<Env>) -> Result<()> {
    let rules = repo().join("charts/registry-access-operator/files/prometheus-rules.yaml");
    let promtool = |args: &[&str]| -> Result<String> {
        let out = Command::new(env.tools.bin.join("promtool")).args(args).output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return Err(format!("promtool {} failed:\n{text}", args.join(" ")).into());
        }
        Ok(text)
    };
    let checked = promtool(&["check", "rules", &rules.display().to_string()])?;
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested =
        promtool(&["test", "rules", &repo().join("tests/fixtures/prometheus-rules.test.yaml").display().to_string()])?;
    assert!(tested.contains("SUCCESS"), "{tested}");

    let rendered = helm(
        &env,
        &[
            "template",
            "rao",
            &chart(),
            "--kube-version",
            &kube_version(),
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "grafanaDashboard.enabled=true",
        ],
    )?;
    let docs = documents(&rendered);
    let rule = find(&docs, "PrometheusRule", "rao-registry-access-operator", "").ok_or("no PrometheusRule")?;
    let file: Value = serde_yaml::from_str(&std::fs::read_to_string(&rules)?)?;
    assert_eq!(rule["spec"]["groups"], file["groups"], "the PrometheusRule differs from the rules file");
    let dashboard =
        find(&docs, "ConfigMap", "rao-registry-access-operator-dashboard", "").ok_or("no dashboard ConfigMap")?;
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value =
        serde_json::from_str(dashboard["data"]["registry-access-operator.json"].as_str().ok_or("no JSON")?)?;
    let file: Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("charts/registry-access-operator/files/dashboard.json"),
    )?)?;
    assert_eq!(json, file, "the dashboard ConfigMap differs from files/dashboard.json");
    // Off by default.
    let defaults = documents(&helm(&env, &["template", "rao", &chart(), "--kube-version", &kube_version()])?);
    assert_eq!(count(&defaults, "PrometheusRule") + count(&defaults, "ConfigMap"), 0);
    Ok(())
}

/// The objects of a rendered manifest.
fn documents(rendered: &str) -> Vec<Value> {
    rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .filter(|v| v["kind"].is_string())
        .collect()
}

/// The object of that kind and name (and namespace, unless empty) among `docs`.
fn find<'a>(docs: &'a [Value], kind: &str, name: &str, ns: &str) -> Option<&'a Value> {
    docs.iter().find(|d| {
        d["kind"] == kind && d["metadata"]["name"] == name && (ns.is_empty() || d["metadata"]["namespace"] == ns)
    })
}

fn count(docs: &[Value], kind: &str) -> usize {
    docs.iter().filter(|d| d["kind"] == kind).count()
}

/// The arguments of the rendered Deployment's container.
fn args_of(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The chart's pod selector labels for release `rao`.
fn selector_labels() -> Value {
    json!({"app.kubernetes.io/name": "registry-access-operator", "app.kubernetes.io/instance": "rao"})
}

// ---- the tests ----

async fn lints_and_renders_for_both_scopes(env: Arc<Env>) -> Result<()> {
    helm(&env, &["lint", &chart()])?;
    helm(&env, &["lint", &chart(), "--set", "watchNamespaces={team-x,team-y}"])?;
    helm(
        &env,
        &[
            "lint",
            &chart(),
            "--set",
            "replicaCount=2",
            "--set",
            "allowedServers={https://kc.example.com/auth}",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.apiServer[0].cidr=10.0.0.1/32,networkPolicy.apiServer[0].ports={443}",
            "--set",
            "networkPolicy.keycloak[0].cidr=192.0.2.10/32,networkPolicy.keycloak[0].ports={443}",
        ],
    )?;
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
            "networkPolicy.apiServer[0].cidr=10.0.0.1/32,networkPolicy.apiServer[0].ports={443}",
            "--set",
            "networkPolicy.keycloak[0].cidr=192.0.2.10/32,networkPolicy.keycloak[0].ports={443}",
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
            assert!(kinds.contains(&"ClusterRole".to_owned()), "{kinds:?}");
            // Cluster-wide mode: the only Roles are the Lease's and the digest key's, in the
            // release namespace.
            let mut roles: Vec<String> = documents(&rendered)
                .into_iter()
                .filter(|d| d["kind"] == "Role")
                .map(|d| {
                    format!(
                        "{}/{}",
                        d["metadata"]["namespace"].as_str().unwrap_or(""),
                        d["metadata"]["name"].as_str().unwrap_or("")
                    )
                })
                .collect();
            roles.sort();
            assert_eq!(
                roles,
                [
                    "render-system/rao-registry-access-operator-digest-key",
                    "render-system/rao-registry-access-operator-leader-election",
                ],
                "{kinds:?}"
            );
        } else if values[1].starts_with("watchNamespaces") {
            // One Role per watched namespace, plus the Lease's and the digest key's in the
            // release namespace.
            assert_eq!(kinds.iter().filter(|k| *k == "Role").count(), 4, "{kinds:?}");
            let docs = documents(&rendered);
            for ns in ["team-x", "team-y"] {
                let role = find(&docs, "Role", "rao-registry-access-operator", ns).ok_or(format!("no Role in {ns}"))?;
                assert!(role["rules"].as_array().is_some_and(|r| !r.is_empty()));
            }
            // The operator gets no cluster-wide permission; the only ClusterRoles are the two
            // tenant roles aggregated into edit/admin and view, bound to no one by the chart.
            assert!(!kinds.contains(&"ClusterRoleBinding".to_owned()), "{kinds:?}");
            assert_eq!(kinds.iter().filter(|k| *k == "ClusterRole").count(), 2, "{kinds:?}");
            assert!(rendered.contains("-tenant-edit") && rendered.contains("-tenant-view"));
            assert!(rendered.contains("--namespace=team-x") && rendered.contains("--namespace=team-y"));
        } else {
            assert!(kinds.contains(&"NetworkPolicy".to_owned()));
            assert!(kinds.contains(&"PodDisruptionBudget".to_owned()));
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

/// What the chart renders for a shared cluster: one writer during upgrades, a priority class, a
/// PodDisruptionBudget and topology spread with several replicas, image digests, no open
/// NetworkPolicy peers, a ClusterIP-only Service, the digest key's Role, the admission policy
/// of the allow-list; every successful render is validated by the real API server (dry run).
async fn renders_safe_defaults_for_a_shared_cluster(env: Arc<Env>) -> Result<()> {
    let ns = "render-safe";
    env.cluster.kubectl(&["create", "namespace", ns])?;
    let fullname = "rao-registry-access-operator";
    let digest_key = format!("{fullname}-digest-key");
    let dry_run = |rendered: &str| env.cluster.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], rendered);

    // Defaults: leader election on, rolling updates that start the new pod first.
    let rendered = render(&env, ns, &[])?;
    dry_run(&rendered)?;
    let docs = documents(&rendered);
    let d = find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?;
    let args = args_of(d);
    assert!(args.contains(&"--leader-election".to_owned()), "leader election is off by default: {args:?}");
    assert!(args.contains(&format!("--leader-election-lease-name={fullname}")), "{args:?}");
    assert_eq!(
        d["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    assert!(find(&docs, "Role", &format!("{fullname}-leader-election"), ns).is_some(), "no Lease Role");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert!(pod["topologySpreadConstraints"].is_null(), "topology spread with one replica: {pod}");
    assert_eq!(count(&docs, "PodDisruptionBudget"), 0, "a PodDisruptionBudget for one replica would block drains");
    assert_eq!(pod["containers"][0]["image"], "registry-access-operator:0.1.0");
    // The digest key: passed to the operator, readable by name only, creatable.
    assert!(args.contains(&format!("--digest-key-secret={digest_key}")), "{args:?}");
    assert!(args.contains(&format!("--digest-key-namespace={ns}")), "{args:?}");
    assert!(!args.contains(&"--allow-insecure-http".to_owned()), "plain http allowed by default: {args:?}");
    let role = find(&docs, "Role", &format!("{fullname}-digest-key"), ns).ok_or("no digest key Role")?;
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [digest_key], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        ])
    );
    let binding = find(&docs, "RoleBinding", &format!("{fullname}-digest-key"), ns).ok_or("no digest key binding")?;
    assert_eq!(binding["subjects"][0]["name"], fullname);
    // The metrics Service stays inside the cluster.
    assert_eq!(find(&docs, "Service", fullname, ns).ok_or("no Service")?["spec"]["type"], "ClusterIP");
    assert_eq!(count(&docs, "ValidatingAdmissionPolicy"), 0, "an admission policy without an allow-list");

    // The API server admits the operator's pod with that priority class outside kube-system.
    let mut pod_spec = pod.clone();
    pod_spec["serviceAccountName"] = json!("default");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "priority-probe", "namespace": ns},
        "spec": pod_spec});
    let admitted: Value = serde_json::from_str(
        &env.cluster.kubectl_stdin(&["create", "--dry-run=server", "-o", "json", "-f", "-"], &pod.to_string())?,
    )?;
    assert_eq!(admitted["spec"]["priority"], 2_000_000_000, "{}", admitted["spec"]);

    // Without leader election an upgrade must stop the old pod first; with several replicas it
    // is refused outright.
    for off in ["leaderElection.enabled=false", "leaderElection.enabled=auto"] {
        let docs = documents(&render(&env, ns, &[off])?);
        let d = find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?;
        assert_eq!(d["spec"]["strategy"], json!({"type": "Recreate"}), "{off}");
        assert!(!args_of(d).contains(&"--leader-election".to_owned()), "{off}");
    }
    let refused = render(&env, ns, &["leaderElection.enabled=false", "replicaCount=2"])
        .err()
        .ok_or("two replicas without leader election rendered")?;
    assert!(refused.to_string().contains("leader election is off"), "{refused}");
    let custom = render(
        &env,
        ns,
        &["updateStrategy.rollingUpdate.maxSurge=0", "updateStrategy.rollingUpdate.maxUnavailable=1"],
    )?;
    let docs = documents(&custom);
    assert_eq!(
        find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?["spec"]["strategy"]["rollingUpdate"],
        json!({"maxSurge": 0, "maxUnavailable": 1})
    );

    // Several replicas: a PodDisruptionBudget and a spread over nodes, by the pods' labels.
    let rendered = render(&env, ns, &["replicaCount=2"])?;
    dry_run(&rendered)?;
    let docs = documents(&rendered);
    let pdb = find(&docs, "PodDisruptionBudget", fullname, ns).ok_or("no PodDisruptionBudget with 2 replicas")?;
    assert_eq!(pdb["spec"], json!({"minAvailable": 1, "selector": {"matchLabels": selector_labels()}}));
    let d = find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?;
    assert_eq!(
        d["spec"]["template"]["spec"]["topologySpreadConstraints"],
        json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector_labels()}}])
    );
    let docs = documents(&render(&env, ns, &["replicaCount=2", "podDisruptionBudget.enabled=false"])?);
    assert_eq!(count(&docs, "PodDisruptionBudget"), 0);
    // A constraint of one's own is used even with one replica, with the chart's labels.
    let own = "topologySpreadConstraints[0].maxSkew=1,topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone,topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule";
    let docs = documents(&render(&env, ns, &[own])?);
    let d = find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?;
    assert_eq!(
        d["spec"]["template"]["spec"]["topologySpreadConstraints"],
        json!([{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": selector_labels()}}])
    );
    let docs = documents(&render(&env, ns, &["priorityClassName="])?);
    let d = find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?;
    assert!(d["spec"]["template"]["spec"]["priorityClassName"].is_null(), "priorityClassName=\"\" did not opt out");

    // An image digest pins the image; the tag is ignored.
    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let docs = documents(&render(&env, ns, &[&format!("image.digest={digest}"), "image.tag=9.9.9"])?);
    let d = find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?;
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], format!("registry-access-operator@{digest}"));
    assert!(render(&env, ns, &["image.digest=latest"]).is_err(), "the schema accepted a digest without algorithm");

    // The NetworkPolicy: no peer unless given, ingress only to the probe/metrics port.
    let refused = render(&env, ns, &["networkPolicy.enabled=true"]).err().ok_or("a NetworkPolicy without peers")?;
    assert!(refused.to_string().contains("networkPolicy.apiServer is empty"), "{refused}");
    let api_server = "networkPolicy.apiServer[0].cidr=10.0.0.1/32,networkPolicy.apiServer[0].ports={443,6443}";
    let refused = render(&env, ns, &["networkPolicy.enabled=true", api_server])
        .err()
        .ok_or("a NetworkPolicy without Keycloak peers")?;
    assert!(refused.to_string().contains("networkPolicy.keycloak is empty"), "{refused}");
    let keycloak = "networkPolicy.keycloak[0].cidr=192.0.2.10/32,networkPolicy.keycloak[0].ports={8443}";
    let rendered = render(&env, ns, &["networkPolicy.enabled=true", api_server, keycloak])?;
    dry_run(&rendered)?;
    assert!(!rendered.contains("0.0.0.0/0"), "an open peer in:\n{rendered}");
    let docs = documents(&rendered);
    let np = find(&docs, "NetworkPolicy", fullname, ns).ok_or("no NetworkPolicy")?;
    assert_eq!(np["spec"]["ingress"], json!([{"ports": [{"port": 8081, "protocol": "TCP"}]}]));
    let egress = np["spec"]["egress"].to_string();
    assert!(egress.contains("10.0.0.1/32") && egress.contains("192.0.2.10/32") && egress.contains("8443"), "{egress}");
    assert!(!values_yaml().contains("0.0.0.0/0"), "values.yaml still has an open peer");

    // The Service is ClusterIP only: the type is no longer a value.
    for t in ["LoadBalancer", "NodePort", "ClusterIP"] {
        let refused =
            render(&env, ns, &[&format!("service.type={t}")]).err().ok_or(format!("service.type={t} accepted"))?;
        assert!(refused.to_string().contains("type"), "{refused}");
    }

    // Plain http only when asked for, and never in the allow-list without it.
    let docs = documents(&render(&env, ns, &["allowInsecureHttp=true"])?);
    assert!(
        args_of(find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?)
            .contains(&"--allow-insecure-http".to_owned())
    );
    let refused =
        render(&env, ns, &["allowedServers={http://kc.example.com/auth}"]).err().ok_or("http allowed server")?;
    assert!(refused.to_string().contains("allowInsecureHttp"), "{refused}");

    // The allow-list's admission policy: cluster-wide, or bound to the watched namespaces only.
    let allowed = "allowedServers={https://kc.example.com/auth,https://kc2.example.com}";
    let rendered = render(&env, ns, &[allowed])?;
    dry_run(&rendered)?;
    let docs = documents(&rendered);
    let policy = format!("{fullname}-allowed-servers");
    let vap = find(&docs, "ValidatingAdmissionPolicy", &policy, "").ok_or("no ValidatingAdmissionPolicy")?;
    assert_eq!(vap["apiVersion"], "admissionregistration.k8s.io/v1");
    assert_eq!(vap["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        vap["spec"]["matchConstraints"]["resourceRules"],
        json!([{"apiGroups": ["registry-access.io"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"],
            "resources": ["registryaccesses"]}])
    );
    let binding = find(&docs, "ValidatingAdmissionPolicyBinding", &policy, "").ok_or("no binding")?;
    assert_eq!(binding["spec"], json!({"policyName": policy, "validationActions": ["Deny"]}));
    let rendered = render(&env, ns, &[allowed, "watchNamespaces={team-p,team-q}"])?;
    let docs = documents(&rendered);
    let binding = find(&docs, "ValidatingAdmissionPolicyBinding", &policy, "").ok_or("no binding")?;
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"],
        json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-p", "team-q"]}]})
    );
    // The digest key's Role is in the release namespace in namespaced mode too.
    assert!(find(&docs, "Role", &format!("{fullname}-digest-key"), ns).is_some());
    let docs = documents(&render(&env, ns, &[allowed, "admissionPolicy.enabled=false"])?);
    assert_eq!(count(&docs, "ValidatingAdmissionPolicy") + count(&docs, "ValidatingAdmissionPolicyBinding"), 0);
    Ok(())
}

fn values_yaml() -> String {
    std::fs::read_to_string(repo().join("charts/registry-access-operator/values.yaml")).unwrap_or_default()
}

async fn cluster_wide_install_works_with_the_chart_permissions_only(env: Arc<Env>) -> Result<()> {
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

/// A RegistryAccess object (JSON) for `kubectl create -f -`.
fn ra_object(ns: &str, name: &str, server: &str) -> String {
    json!({"apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"server": server, "realm": REALM, "clientId": "chart-vap", "clientSecretRef": {"name": "creds"}}})
    .to_string()
}

/// With `allowedServers`, the API server itself refuses a RegistryAccess for another server (the
/// chart's ValidatingAdmissionPolicy), with the same prefix rule as the operator's, only in the
/// release's namespaces; an allowed one is admitted and served.
async fn the_admission_policy_refuses_servers_outside_the_allow_list(env: Arc<Env>) -> Result<()> {
    let (ns, sa, release) = ("rao-vap-system", "rao-vap-registry-access-operator", "rao-vap");
    let (team, other) = ("vap-team", "vap-other");
    let admin = env.cluster.client().await?;
    for n in [team, other] {
        k8s::create_namespace(&admin, n).await?;
    }
    env.cluster.kubectl(&["create", "serviceaccount", "editor", "-n", team])?;
    env.cluster.kubectl(&[
        "create",
        "rolebinding",
        "editor",
        "-n",
        team,
        "--clusterrole=edit",
        &format!("--serviceaccount={team}:editor"),
    ])?;
    let editor = format!("system:serviceaccount:{team}:editor");
    // An object made before the policy existed, for a server the policy will refuse.
    let elsewhere = "https://elsewhere.example.com/auth";
    env.cluster.kubectl_stdin(&["create", "-f", "-"], &ra_object(team, "legacy", elsewhere))?;

    let kc = env.keycloak.base_url.clone(); // http://127.0.0.1:<port>/auth
    let allowed = vec![kc.clone(), "https://kc.example.com/auth".to_owned()];
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
            "--set",
            &format!("allowedServers={{{}}}", allowed.join(",")),
        ],
    )?;

    // Policies reach the API server's admission asynchronously: try until the refusal comes.
    let create_dry = |user: &str, ns: &str, name: &str, server: &str| {
        kubectl_as_user(&env, user, &["create", "--dry-run=server", "-f", "-"], Some(&ra_object(ns, name, server)))
    };
    let t = Instant::now();
    let refusal = loop {
        match create_dry(&editor, team, "probe", elsewhere) {
            Err(e) if e.to_string().contains("denied request") => break e.to_string(),
            outcome => {
                if t.elapsed() > Duration::from_secs(30) {
                    return Err(format!("no admission refusal within 30 s; last outcome: {outcome:?}").into());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    eprintln!("[e2e] admission policy active after {:.1}s", t.elapsed().as_secs_f64());
    // A real `kubectl apply` as a tenant is refused, with the server and the allowed list.
    let refused = kubectl_as_user(&env, &editor, &["apply", "-f", "-"], Some(&ra_object(team, "elsewhere", elsewhere)))
        .err()
        .ok_or("kubectl apply of a server outside the allow-list succeeded")?
        .to_string();
    for text in [refusal.as_str(), refused.as_str()] {
        assert!(text.contains(elsewhere), "the refusal does not name spec.server: {text}");
        for a in &allowed {
            assert!(text.contains(a.as_str()), "the refusal does not list {a}: {text}");
        }
    }
    assert!(!ra_exists(&admin, team, "elsewhere").await?, "the refused object exists");

    // The same prefix rule as the operator's (src/policy.rs), case by case.
    let port: u16 =
        kc.rsplit(':').next().and_then(|p| p.split('/').next()).and_then(|p| p.parse().ok()).ok_or("port")?;
    let cases = [
        kc.clone(),
        format!("{kc}/"),
        format!("{kc}/realms"),
        format!("{kc}x"),
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{}/auth", port + 1),
        format!("https://127.0.0.1:{port}/auth"),
        format!("http://localhost:{port}/auth"),
        "https://kc.example.com/auth".to_owned(),
        "https://KC.Example.com:443/auth/sub/".to_owned(),
        "https://kc.example.com:8443/auth".to_owned(),
        "http://kc.example.com/auth".to_owned(),
        "https://kc.example.com".to_owned(),
        "https://kc.example.com/authx".to_owned(),
        "https://kc.example.com/auth/../admin".to_owned(),
        "https://kc.example.com.evil.example/auth".to_owned(),
    ];
    let mut admitted_any = false;
    for (i, server) in cases.iter().enumerate() {
        let outcome = create_dry(&editor, team, &format!("case-{i}"), server);
        let operator_allows = registry_access_operator::policy::server_allowed(server, &allowed);
        assert_eq!(
            outcome.is_ok(),
            operator_allows,
            "admission and the operator disagree on {server}: operator allows: {operator_allows}, admission: {outcome:?}"
        );
        if let Err(e) = outcome {
            assert!(e.to_string().contains("denied request"), "{server} refused for another reason: {e}");
        }
        admitted_any |= operator_allows;
    }
    assert!(admitted_any);

    // An allowed server is admitted, and the operator with the chart's arguments serves it.
    let kubeconfig = service_account_kubeconfig(&env, ns, sa)?;
    let (args, probe) = deployment_args(&env, ns, sa).await?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut operator = Operator::start(&kubeconfig, &env.path().join("operator-chart-vap.log"), &args)?;
    wait_ready_endpoint(probe).await?;
    let client = env.keycloak.create_client(REALM, "chart-vap", Some(60), true).await?;
    k8s::put_client_secret(&admin, team, "creds", &[("client_secret", &client.secret)]).await?;
    kubectl_as_user(&env, &editor, &["apply", "-f", "-"], Some(&ra_object(team, "svc", &kc)))?;
    wait_condition(&admin, team, "svc", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    // An update to another server is refused too, and the object keeps its server.
    let patch = json!({"spec": {"server": elsewhere}}).to_string();
    let refused = kubectl_as_user(
        &env,
        &editor,
        &["patch", "registryaccess", "svc", "-n", team, "--type=merge", "-p", &patch],
        None,
    )
    .err()
    .ok_or("an update to a server outside the allow-list succeeded")?;
    assert!(refused.to_string().contains("denied request"), "{refused}");
    let server = env.cluster.kubectl(&["get", "registryaccess", "svc", "-n", team, "-o", "jsonpath={.spec.server}"])?;
    assert_eq!(server, kc);

    // The policy is bound to the release's namespaces only: another namespace is not refused.
    env.cluster.kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], &ra_object(other, "free", elsewhere))?;
    // An object made before the policy can still go, even through the garbage collector's
    // finalizer removal (an UPDATE of an object being deleted).
    env.cluster.kubectl(&[
        "delete",
        "registryaccess",
        "legacy",
        "-n",
        team,
        "--cascade=foreground",
        "--timeout=30s",
    ])?;
    assert!(!ra_exists(&admin, team, "legacy").await?, "legacy still exists");

    operator.check_alive()?;
    assert!(!operator.logs().to_lowercase().contains("forbidden"), "{}", support::process::tail(&operator.log, 20));
    operator.stop();
    helm(&env, &["uninstall", release, "--namespace", ns])?;
    assert!(
        env.cluster.kubectl(&["get", "validatingadmissionpolicy", &format!("{sa}-allowed-servers")]).is_err(),
        "the admission policy outlived the release"
    );
    Ok(())
}

async fn ra_exists(client: &kube::Client, ns: &str, name: &str) -> Result<bool> {
    let api: Api<registry_access_operator::api::RegistryAccess> = Api::namespaced(client.clone(), ns);
    Ok(api.get_opt(name).await?.is_some())
}

/// Lines of an operator log that record a token write.
fn refreshes(log: &str) -> usize {
    log.lines().filter(|l| l.contains("token refreshed")).count()
}

/// The chart's default Deployment during a rolling update: the old and the new pod run at once
/// with the same arguments. Only one of them may write: each object gets one grant, one process
/// logs every token write, and the other takes over when the first stops.
async fn two_writers_during_an_upgrade_never_write_together(env: Arc<Env>) -> Result<()> {
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
            alerts_fire_and_stay_quiet_under_promtool,
            renders_safe_defaults_for_a_shared_cluster,
            cluster_wide_install_works_with_the_chart_permissions_only,
            namespaced_install_is_limited_to_its_namespaces,
            leader_election_works_with_the_chart_permissions,
            tenants_use_registryaccess_through_the_standard_roles,
            the_admission_policy_refuses_servers_outside_the_allow_list,
            two_writers_during_an_upgrade_never_write_together,
        ],
        1,
    )
}
