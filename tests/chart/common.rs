//! What the chart tests share: helm and kubectl as the chart's ServiceAccount or a tenant,
//! rendering and reading manifests, and a release whose operator runs as the chart's Deployment
//! would run it.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde_json::{Value, json};

use crate::support::k8s;
use crate::support::keycloak::REALM;
use crate::support::operator::Operator;
use crate::support::process::free_port;
use crate::support::{self, Env, Result, repo};

pub fn chart() -> String {
    repo().join("charts/registry-access-operator").display().to_string()
}

/// The Kubernetes version the environment runs (hack/versions.env), for `helm template`.
pub fn kube_version() -> String {
    let versions = std::fs::read_to_string(repo().join("hack/versions.env")).unwrap_or_default();
    versions.lines().find_map(|l| l.strip_prefix("KUBERNETES_VERSION=")).unwrap_or("v1.34.0").to_owned()
}

pub fn helm(env: &Env, args: &[&str]) -> Result<String> {
    env.helm(args)
}

/// A release of the chart, installed with `helm install`.
pub struct Release<'a> {
    pub env: &'a Env,
    pub name: String,
    /// The release namespace.
    pub ns: String,
    /// The operator's ServiceAccount, which is also its Deployment's name (and the Lease's).
    pub sa: String,
}

/// The operator started by [`Release::start_operator`], ready.
pub struct Running {
    pub operator: Operator,
    /// Its probe and metrics port on loopback.
    pub port: u16,
    /// Its arguments, as the chart's Deployment gives them (the probe address moved to `port`).
    pub args: Vec<String>,
}

impl<'a> Release<'a> {
    /// `helm install <name>` of the chart into namespace `ns` (created), with `values` (`--set`
    /// pairs).
    pub fn install(env: &'a Env, name: &str, ns: &str, values: &[&str]) -> Result<Self> {
        let chart = chart();
        let mut args = vec!["install", name, chart.as_str(), "--namespace", ns, "--create-namespace"];
        for v in values {
            args.extend(["--set", v]);
        }
        helm(env, &args)?;
        Ok(Self { env, name: name.to_owned(), ns: ns.to_owned(), sa: format!("{name}-registry-access-operator") })
    }

    /// The operator's binary run as the chart's Deployment runs it: with its arguments and a
    /// token of the chart's ServiceAccount, as pod `pod` (POD_NAME and POD_NAMESPACE) when given.
    /// Returns once its /readyz answers.
    pub async fn start_operator(&self, pod: Option<&str>) -> Result<Running> {
        let env = self.env;
        let who = pod.unwrap_or(&self.name);
        let token = env.cluster.kubectl(&["create", "token", &self.sa, "-n", &self.ns, "--duration=2h"])?;
        let kubeconfig = env.cluster.kubeconfig_with_token(&format!("{}-{who}", self.ns), token.trim())?;
        let (args, port) = deployment_args(env, &self.ns, &self.sa).await?;
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> =
            pod.map(|pod| vec![("POD_NAME", pod), ("POD_NAMESPACE", self.ns.as_str())]).unwrap_or_default();
        let log = env.path().join(format!("operator-chart-{who}.log"));
        let operator = Operator::start_with_env(&kubeconfig, &log, &argv, &envs)?;
        wait_ready_endpoint(port).await?;
        Ok(Running { operator, port, args })
    }

    /// `kubectl auth can-i` as the operator's ServiceAccount.
    pub fn can_i(&self, args: &[&str]) -> Result<bool> {
        can_i(self.env, &self.ns, &self.sa, args)
    }

    pub fn uninstall(&self) -> Result<()> {
        helm(self.env, &["uninstall", &self.name, "--namespace", &self.ns])?;
        Ok(())
    }
}

/// `kubectl auth can-i` as the ServiceAccount: true for "yes".
pub fn can_i(env: &Env, ns: &str, sa: &str, args: &[&str]) -> Result<bool> {
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
pub async fn deployment_args(env: &Env, ns: &str, name: &str) -> Result<(Vec<String>, u16)> {
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

pub async fn wait_ready_endpoint(port: u16) -> Result<()> {
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
pub async fn wait_refresh(client: &kube::Client, ns: &str, secret: &str, timeout: Duration) -> Result<()> {
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

pub fn spec(env: &Env, client_id: &str) -> Value {
    json!({"server": env.keycloak.base_url, "realm": REALM, "clientId": client_id, "clientSecretRef": {"name": "creds"}})
}

/// `helm template rao` of the chart into namespace `ns` with `values` (`--set` pairs).
pub fn render(env: &Env, ns: &str, values: &[&str]) -> Result<String> {
    let (chart, kube) = (chart(), kube_version());
    let mut args = vec!["template", "rao", chart.as_str(), "--namespace", ns, "--kube-version", kube.as_str()];
    for v in values {
        args.extend(["--set", v]);
    }
    helm(env, &args)
}

/// The objects of a rendered manifest.
pub fn documents(rendered: &str) -> Vec<Value> {
    rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .filter(|v| v["kind"].is_string())
        .collect()
}

/// The object of that kind and name (and namespace, unless empty) among `docs`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str, ns: &str) -> Option<&'a Value> {
    docs.iter().find(|d| {
        d["kind"] == kind && d["metadata"]["name"] == name && (ns.is_empty() || d["metadata"]["namespace"] == ns)
    })
}

pub fn count(docs: &[Value], kind: &str) -> usize {
    docs.iter().filter(|d| d["kind"] == kind).count()
}

/// The arguments of the rendered Deployment's container.
pub fn args_of(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The chart's pod selector labels for release `rao`.
pub fn selector_labels() -> Value {
    json!({"app.kubernetes.io/name": "registry-access-operator", "app.kubernetes.io/instance": "rao"})
}

pub fn values_yaml() -> String {
    std::fs::read_to_string(repo().join("charts/registry-access-operator/values.yaml")).unwrap_or_default()
}

/// A RegistryAccess object (JSON) for `kubectl create -f -`.
pub fn ra_object(ns: &str, name: &str, server: &str) -> String {
    json!({"apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"server": server, "realm": REALM, "clientId": "chart-vap", "clientSecretRef": {"name": "creds"}}})
    .to_string()
}

pub async fn ra_exists(client: &kube::Client, ns: &str, name: &str) -> Result<bool> {
    let api: Api<registry_access_operator::api::RegistryAccess> = Api::namespaced(client.clone(), ns);
    Ok(api.get_opt(name).await?.is_some())
}

/// Lines of an operator log that record a token write.
pub fn refreshes(log: &str) -> usize {
    log.lines().filter(|l| l.contains("token refreshed")).count()
}

/// Runs kubectl as a user (impersonated by the admin), with `input` on its standard input.
pub fn kubectl_as_user(env: &Env, user: &str, args: &[&str], input: Option<&str>) -> Result<String> {
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
