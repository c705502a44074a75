//! What the chart renders: lint, templates validated by the real API server, safe defaults for a
//! shared cluster, the alert rules and the dashboard.

use std::process::Command;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::common::*;
use crate::support::{Env, Result, repo};

/// The alert rules: `promtool check rules` accepts the plain rules file, `promtool test rules`
/// shows each alert firing where it should and quiet through normal refresh cycles, and the
/// chart's PrometheusRule and dashboard ConfigMap carry exactly the files' contents.
pub async fn alerts_fire_and_stay_quiet_under_promtool(env: Arc<Env>) -> Result<()> {
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

/// Chart values that turn the NetworkPolicy on, with one API server and one Keycloak.
const NETWORK_POLICY: [&str; 6] = [
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "networkPolicy.apiServer[0].cidr=10.0.0.1/32,networkPolicy.apiServer[0].ports={443}",
    "--set",
    "networkPolicy.keycloak[0].cidr=192.0.2.10/32,networkPolicy.keycloak[0].ports={443}",
];

pub async fn lints_and_renders_for_both_scopes(env: Arc<Env>) -> Result<()> {
    let (chart_dir, kube) = (chart(), kube_version());
    helm(&env, &["lint", &chart_dir])?;
    helm(&env, &["lint", &chart_dir, "--set", "watchNamespaces={team-x,team-y}"])?;
    let lint: Vec<&str> =
        ["lint", &chart_dir, "--set", "replicaCount=2", "--set", "allowedServers={https://kc.example.com/auth}"]
            .into_iter()
            .chain(NETWORK_POLICY)
            .collect();
    helm(&env, &lint)?;
    env.cluster.kubectl(&["create", "namespace", "render-system"])?;
    for ns in ["team-x", "team-y"] {
        env.cluster.kubectl(&["create", "namespace", ns])?;
    }
    for values in [
        vec![],
        vec!["--set", "watchNamespaces={team-x,team-y}"],
        [NETWORK_POLICY.as_slice(), &["--set", "replicaCount=2", "--set", "caBundle.configMap=platform-ca"]].concat(),
    ] {
        let mut args = vec!["template", "rao", &chart_dir, "--namespace", "render-system", "--kube-version", &kube];
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
pub async fn renders_safe_defaults_for_a_shared_cluster(env: Arc<Env>) -> Result<()> {
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
    // No allow-list, so no allowed-servers policy; the pod policies of the nudge are there: the one
    // that bounds what the operator may change in a pod, and the warning for tokens read once.
    let policies: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    assert_eq!(
        policies,
        vec![format!("{fullname}-pod-nudge-only"), format!("{fullname}-token-read-once")],
        "the default policies"
    );

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
    assert!(find(&docs, "ValidatingAdmissionPolicy", &policy, "").is_none(), "the allowed-servers policy stayed");
    // Without the nudge, no pod rights and no pod policy; without the warning, no warning policy.
    let off = ["admissionPolicy.enabled=false", "podNudge.enabled=false", "admissionPolicy.warnReadOnce=false"];
    let docs = documents(&render(&env, ns, &off)?);
    assert_eq!(count(&docs, "ValidatingAdmissionPolicy") + count(&docs, "ValidatingAdmissionPolicyBinding"), 0);
    let role = find(&docs, "ClusterRole", fullname, "").ok_or("no ClusterRole")?;
    assert!(!role["rules"].to_string().contains("\"pods\""), "pod rights without the nudge: {}", role["rules"]);
    let deployment = find(&docs, "Deployment", fullname, ns).ok_or("no Deployment")?;
    assert!(args_of(deployment).contains(&"--nudge-pods=false".to_owned()));
    Ok(())
}
