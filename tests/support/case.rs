//! One end-to-end test case: its namespace, its own operator, the secrets that must never leak,
//! and the helpers the cases share (verified JWTs, polling, metrics scraping, Events).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::ListParams;
use kube::{Api, Client};
use registry_access_operator::api::RegistryAccess;
use serde_json::{Value, json};

use super::keycloak::{ClientInfo, Keycloak, REALM};
use super::operator::Operator;
use super::{Env, Result, k8s};
use k8s::wait_condition;

/// A test case: its namespace, its operator, and the secrets that must never leak.
pub struct Case {
    pub env: Arc<Env>,
    pub client: Client,
    pub ns: String,
    pub operator: Operator,
    sensitive: Mutex<BTreeSet<String>>,
}

impl Case {
    pub async fn new(env: Arc<Env>, name: &str) -> Result<Self> {
        Self::with_operator_args(env, name, &[]).await
    }

    pub async fn with_operator_args(env: Arc<Env>, name: &str, extra: &[&str]) -> Result<Self> {
        Self::with_operator_env(env, name, extra, &[]).await
    }

    /// A case whose operator serves its probes and metrics on a free port, returned with it.
    pub async fn with_metrics(env: Arc<Env>, name: &str, extra: &[&str]) -> Result<(Self, u16)> {
        let port = super::process::free_port()?;
        let probe = format!("--probe-addr=127.0.0.1:{port}");
        let args: Vec<&str> = std::iter::once(probe.as_str()).chain(extra.iter().copied()).collect();
        Ok((Self::with_operator_args(env, name, &args).await?, port))
    }

    /// A case whose operator gets `extra` arguments and `envs` environment variables.
    pub async fn with_operator_env(env: Arc<Env>, name: &str, extra: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        let kubeconfig = env.cluster.kubeconfig.clone();
        Self::with_kubeconfig(env, name, &kubeconfig, extra, envs).await
    }

    /// A case whose operator runs with the identity of `kubeconfig` (the test itself stays admin).
    pub async fn with_kubeconfig(
        env: Arc<Env>,
        name: &str,
        kubeconfig: &std::path::Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let client = env.cluster.client().await?;
        let ns = format!("e2e-{name}");
        k8s::create_namespace(&client, &ns).await?;
        let mut args = vec!["--namespace", ns.as_str()];
        args.extend_from_slice(extra);
        let log = env.path().join(format!("operator-{name}.log"));
        let operator = Operator::start_with_env(kubeconfig, &log, &args, envs)?;
        Ok(Self { env, client, ns, operator, sensitive: Mutex::new(BTreeSet::new()) })
    }

    pub fn kc(&self) -> &Keycloak {
        &self.env.keycloak
    }

    /// Registers a value that must not appear in logs, statuses or Events.
    pub fn sensitive(&self, s: &str) {
        self.sensitive.lock().unwrap().insert(s.to_owned());
    }

    /// A Keycloak client of its own for this case (so that its grants can be counted), with
    /// the test role and the given token lifespan, and its secret in the Secret `creds`.
    pub async fn client_with_creds(&self, prefix: &str, lifespan_secs: Option<u32>) -> Result<(String, ClientInfo)> {
        let client_id = unique(prefix);
        let client = self.kc().create_client(REALM, &client_id, lifespan_secs, true).await?;
        self.client_secret("creds", &client.secret).await?;
        Ok((client_id, client))
    }

    /// A client Secret holding `secret` under the default key.
    pub async fn client_secret(&self, name: &str, secret: &str) -> Result<()> {
        self.sensitive(secret);
        k8s::put_client_secret(&self.client, &self.ns, name, &[("client_secret", secret)]).await
    }

    pub async fn ra(&self, name: &str, spec: Value) -> Result<()> {
        k8s::apply_ra(&self.client, &self.ns, name, spec).await
    }

    /// Creates many RegistryAccess objects (name, spec) in the case's namespace, 16 at a time;
    /// returns when all exist.
    pub async fn ra_many(&self, objects: Vec<(String, Value)>) -> Result<()> {
        futures::stream::iter(objects)
            .map(|(name, spec)| async move { self.ra(&name, spec).await })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// The spec of a RegistryAccess for `client_id` against `kc`, client secret in Secret `creds`.
    pub fn spec(&self, kc: &Keycloak, client_id: &str, creds: &str) -> Value {
        json!({
            "server": kc.base_url,
            "realm": REALM,
            "clientId": client_id,
            "clientSecretRef": {"name": creds},
        })
    }

    /// The token Secret's data; the token is registered as sensitive.
    pub async fn token_secret(&self, name: &str) -> Result<Option<std::collections::BTreeMap<String, String>>> {
        let data = k8s::secret_data(&self.client, &self.ns, name).await?;
        if let Some(t) = data.as_ref().and_then(|d| d.get("access_token")) {
            self.sensitive(t);
        }
        Ok(data)
    }

    pub async fn access_token(&self, name: &str) -> Result<String> {
        let data = self.token_secret(name).await?.ok_or_else(|| format!("Secret {name} does not exist"))?;
        Ok(data.get("access_token").cloned().ok_or("no access_token key")?)
    }

    pub async fn ready(&self, name: &str) -> Result<registry_access_operator::api::RegistryAccessStatus> {
        wait_condition(&self.client, &self.ns, name, "Ready", "True", "TokenValid", Duration::from_secs(60)).await
    }

    /// Ends the case: the operator is still running, and nothing sensitive leaked.
    pub async fn finish(self) -> Result<()> {
        self.finish_with_namespaces(&[]).await
    }

    /// [`Case::finish`] for an operator that also watched `others`: their statuses, Events and
    /// Secrets are checked as well.
    pub async fn finish_with_namespaces(mut self, others: &[&str]) -> Result<()> {
        self.operator.check_alive()?;
        self.operator.stop();
        let logs = self.operator.logs();
        let sensitive = self.sensitive.lock().unwrap().clone();
        for ns in std::iter::once(self.ns.as_str()).chain(others.iter().copied()) {
            assert_nothing_leaked(&self.client, ns, &logs, &sensitive).await?;
        }
        if !logs.contains("token refreshed")
            && !logs.contains("refresh failed")
            && !logs.contains("leaving it untouched")
        {
            return Err("the operator logged no token activity at all; is it working?".into());
        }
        Ok(())
    }
}

/// Where `text` holds a compact JWT (`eyJ...` header, a dot, `eyJ...` payload), if it does.
fn jwt_like(text: &str) -> Option<usize> {
    let b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let bytes = text.as_bytes();
    text.match_indices("eyJ").map(|(i, _)| i).find(|&i| {
        let header = bytes[i..].iter().take_while(|c| b64(**c)).count();
        header >= 10 && bytes[i + header..].starts_with(b".eyJ")
    })
}

/// Checks that no token or client secret of namespace `ns` (plus `extra`) appears in `logs`, the
/// namespace's RegistryAccess statuses or its Events. Never prints the values themselves.
pub async fn assert_nothing_leaked(client: &Client, ns: &str, logs: &str, extra: &BTreeSet<String>) -> Result<()> {
    let mut sensitive = extra.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in secrets.list(&ListParams::default()).await? {
        let managed = s.metadata.labels.as_ref().is_some_and(|l| l.contains_key("app.kubernetes.io/managed-by"));
        for (k, v) in s.data.unwrap_or_default() {
            // Token Secrets: the token and the header built from it; other Secrets hold client
            // secrets.
            let secret = if managed {
                k == "access_token" || k == "authorization"
            } else {
                k.contains("secret") || k.ends_with(".key")
            };
            if let (true, Ok(v)) = (secret, std::str::from_utf8(&v.0)) {
                sensitive.insert(v.to_owned());
            }
        }
    }
    let ras: Api<RegistryAccess> = Api::namespaced(client.clone(), ns);
    let statuses = serde_json::to_string(
        &ras.list(&ListParams::default()).await?.items.iter().map(|r| &r.status).collect::<Vec<_>>(),
    )?;
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let events = serde_json::to_string(&events.list(&ListParams::default()).await?.items)?;
    // Whatever else: nothing shaped like a JWT (a ServiceAccount token, a client assertion, an
    // access token) in any of the three.
    for (what, text) in [("operator log", logs), ("status", statuses.as_str()), ("events", events.as_str())] {
        if let Some(at) = jwt_like(text) {
            return Err(format!("something shaped like a JWT appears in the {what} of {ns} at byte {at}").into());
        }
    }
    for s in &sensitive {
        let short = &s[..s.len().min(40)];
        for (what, text) in [("operator log", logs), ("status", statuses.as_str()), ("events", events.as_str())] {
            if text.contains(s.as_str()) || (s.len() > 40 && text.contains(short)) {
                return Err(
                    format!("a token or client secret ({} chars) appears in the {what} of {ns}", s.len()).into()
                );
            }
        }
    }
    Ok(())
}

/// Verifies a token's signature against the realm's JWKS; returns its claims.
pub async fn verified_claims(kc: &Keycloak, token: &str) -> Result<Value> {
    let header = jsonwebtoken::decode_header(token)?;
    let jwks = kc.jwks(REALM).await?;
    let kid = header.kid.ok_or("token has no kid")?;
    let jwk = jwks.find(&kid).ok_or("the token's key is not in the realm's JWKS")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.validate_aud = false;
    validation.set_issuer(&[format!("{}/realms/{REALM}", kc.base_url)]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &validation)?;
    Ok(data.claims)
}

pub fn ts(s: &str) -> Result<Timestamp> {
    Ok(s.parse()?)
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Timestamp::now().as_millisecond() % 1_000_000_000)
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, check: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let t = Instant::now();
    while !check().await {
        if t.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("[e2e] {what} after {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// The RegistryAccess objects of `ns` by name, each with whether it is Ready=True.
pub async fn readiness(client: &Client, ns: &str) -> Result<std::collections::BTreeMap<String, bool>> {
    let ras: Api<RegistryAccess> = Api::namespaced(client.clone(), ns);
    Ok(ras
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|r| {
            let ready = r.status.as_ref().and_then(|s| k8s::condition(s, "Ready")).is_some_and(|c| c.0 == "True");
            (r.metadata.name.unwrap_or_default(), ready)
        })
        .collect())
}

/// How many RegistryAccess objects of `ns` are Ready=True.
pub async fn ready_count(client: &Client, ns: &str) -> Result<usize> {
    Ok(readiness(client, ns).await?.values().filter(|r| **r).count())
}

/// Waits until every one of the objects `names` of `ns` is Ready=True; returns how long it took.
/// On timeout, the error names those still not Ready.
pub async fn wait_all_ready(client: &Client, ns: &str, names: &[String], timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let now = readiness(client, ns).await?;
        let waiting: Vec<&str> =
            names.iter().filter(|n| now.get(n.as_str()) != Some(&true)).map(String::as_str).collect();
        if waiting.is_empty() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            let shown = waiting.iter().take(10).copied().collect::<Vec<_>>().join(", ");
            let more = if waiting.len() > 10 { ", ..." } else { "" };
            return Err(format!(
                "only {} of {} objects of {ns} Ready after {timeout:?}; not Ready: {shown}{more}",
                names.len() - waiting.len(),
                names.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scrapes /metrics until `pred` holds for the text.
pub async fn scrape_until(port: u16, what: &str, pred: impl Fn(&str) -> bool) -> Result<String> {
    let http = reqwest::Client::new();
    let t = Instant::now();
    loop {
        let text = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await?.text().await?;
        if pred(&text) {
            return Ok(text);
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("metrics never showed {what}:\n{text}").into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The value of the first sample line that starts with `prefix`.
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// Events of a namespace: (type, reason) in order.
pub async fn events_of(c: &Case) -> Result<Vec<(String, String)>> {
    let events: Api<Event> = Api::namespaced(c.client.clone(), &c.ns);
    let mut list = events.list(&ListParams::default()).await?.items;
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    Ok(list.into_iter().map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default())).collect())
}

/// The holder of a Lease, if any.
pub async fn lease_holder(client: &Client, ns: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), ns);
    leases
        .get_opt("registry-access-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Runs the kubectl plugin with `kubeconfig`; returns (success, stdout, stderr).
pub fn plugin(kubeconfig: &std::path::Path, args: &[&str]) -> Result<(bool, String, String)> {
    // Given to tests by cargo; beside the operator's binary otherwise (the examples).
    let exe = option_env!("CARGO_BIN_EXE_kubectl-registry_access")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| super::operator::binary().with_file_name("kubectl-registry_access"));
    let out =
        std::process::Command::new(exe).arg(format!("--kubeconfig={}", kubeconfig.display())).args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
