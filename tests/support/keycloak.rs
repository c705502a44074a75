//! A real Keycloak server from the official distribution, started in its own home directory with
//! the test realm imported, and a small client of its admin REST API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use super::Result;
use super::pki::ClientKey;
use super::process::{Proc, free_port, wait_for};

/// The realm of the platform's documented example.
pub const REALM: &str = "consent-01-external-system";
/// The documented client and its secret, as imported from the realm file.
pub const TEST_EXT: &str = "test-ext";
pub const TEST_EXT_SECRET: &str = "u43exi9l6kc4gcm6ksjbbsg7gu2dyocyjey1";
/// A client with 20 s tokens, for refresh tests.
pub const SHORT_LIVED: &str = "short-lived";
pub const SHORT_LIVED_SECRET: &str = "short-lived-secret-0000000000000000";
/// The realm role granted to the clients' service accounts.
pub const ROLE: &str = "trembita-invoker";
/// Alias of the realm's Kubernetes identity provider (the test cluster's service account
/// issuer), named by federated clients in their attribute `jwt.credential.issuer`.
pub const K8S_IDP: &str = "kubernetes";
/// `client_assertion_type` of every signed-JWT client authentication (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const ADMIN_USER: &str = "admin";
const ADMIN_PASSWORD: &str = "e2e-admin-password";
/// Keycloak needs tens of seconds to start on two cores.
const READY_TIMEOUT: Duration = Duration::from_secs(240);

pub struct Keycloak {
    home: PathBuf,
    /// Serves HTTPS only, with this certificate and key (PEM files in the home directory).
    tls: bool,
    /// Trusted CA certificates (`--truststore-paths`), e.g. the test cluster's.
    truststore: Option<PathBuf>,
    /// Identity providers added through the admin API (realm, representation), added again
    /// after a restart (the database is in memory).
    identity_providers: std::sync::Mutex<Vec<(String, Value)>>,
    http_port: u16,
    management_port: u16,
    proc: Option<Proc>,
    http: reqwest::Client,
    /// Base URL with the legacy context path, e.g. `http://127.0.0.1:8080/auth`.
    pub base_url: String,
}

/// A client created through the admin API.
pub struct ClientInfo {
    pub id: String,
    pub client_id: String,
    pub secret: String,
}

impl Keycloak {
    /// Lays out a home directory under `dir` that shares the distribution's jars and imports
    /// `realm_file`, then starts the server, trusting the CA certificates in `truststore` (a PEM
    /// file) for its outgoing calls when given.
    pub async fn start(dist: &Path, dir: &Path, realm_file: &Path, truststore: Option<&Path>) -> Result<Self> {
        Self::start_with(dist, dir, realm_file, None, truststore).await
    }

    /// [`Keycloak::start`], HTTPS-only with the given certificate and key (PEM) when `tls` is set.
    pub async fn start_with(
        dist: &Path,
        dir: &Path,
        realm_file: &Path,
        tls: Option<(&str, &str)>,
        truststore: Option<&Path>,
    ) -> Result<Self> {
        let home = dir.to_owned();
        std::fs::create_dir_all(home.join("data/import"))?;
        std::fs::create_dir_all(home.join("lib"))?;
        std::fs::create_dir_all(home.join("bin"))?;
        // kc.sh finds its home from its own path, and the start-up build step rewrites
        // lib/quarkus: both are per instance, the large jar folders are shared.
        for d in ["themes", "providers", "lib/lib", "lib/app", "bin/client"] {
            let target = dist.join(d);
            if target.exists() {
                std::os::unix::fs::symlink(&target, home.join(d))?;
            }
        }
        for f in ["bin/kc.sh", "lib/quarkus-run.jar", "version.txt"] {
            std::fs::copy(dist.join(f), home.join(f))?;
        }
        copy_dir(&dist.join("conf"), &home.join("conf"))?;
        // The start-up build step ("augmentation", about 20 s of 26.7's start on two cores) is
        // skipped when lib/quarkus already holds a build with the same build options: start from
        // the one saved after an earlier start, if any. Keycloak builds again when the options differ.
        let saved = saved_build(dist);
        let quarkus = if saved.join("quarkus-application.dat").exists() { saved } else { dist.join("lib/quarkus") };
        copy_dir(&quarkus, &home.join("lib/quarkus"))?;
        std::fs::copy(realm_file, home.join("data/import").join(realm_file.file_name().unwrap()))?;
        if let Some((cert, key)) = tls {
            std::fs::write(home.join("tls.crt"), cert)?;
            std::fs::write(home.join("tls.key"), key)?;
        }
        let http_port = free_port()?;
        let management_port = free_port()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut kc = Self {
            home,
            tls: tls.is_some(),
            truststore: truststore.map(Path::to_owned),
            identity_providers: std::sync::Mutex::new(Vec::new()),
            http_port,
            management_port,
            proc: None,
            // The test's own client of its own Keycloak: it does not check the certificate; the
            // operator does.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .danger_accept_invalid_certs(true)
                .build()?,
            base_url: format!("{scheme}://127.0.0.1:{http_port}/auth"),
        };
        kc.start_again().await?;
        save_build(dist, &kc.home.join("lib/quarkus"));
        Ok(kc)
    }

    /// Starts the server (again) on the same ports. The database is in memory: a restart
    /// re-imports the realm file and the identity providers are added again.
    pub async fn start_again(&mut self) -> Result<()> {
        let mut cmd = Command::new(self.home.join("bin/kc.sh"));
        cmd.arg("start-dev").arg("--http-host=127.0.0.1");
        if self.tls {
            cmd.arg("--http-enabled=false")
                .arg(format!("--https-port={}", self.http_port))
                .arg(format!("--https-certificate-file={}", self.home.join("tls.crt").display()))
                .arg(format!("--https-certificate-key-file={}", self.home.join("tls.key").display()));
        } else {
            cmd.arg(format!("--http-port={}", self.http_port));
        }
        if let Some(t) = &self.truststore {
            cmd.arg(format!("--truststore-paths={}", t.display()));
        }
        cmd.arg("--http-relative-path=/auth")
            .arg(format!("--http-management-port={}", self.management_port))
            .arg("--health-enabled=true")
            .arg("--db=dev-mem")
            .arg("--import-realm")
            .env("KC_BOOTSTRAP_ADMIN_USERNAME", ADMIN_USER)
            .env("KC_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("JAVA_OPTS_KC_HEAP", "-Xms128m -Xmx768m");
        let log = self.home.join("keycloak.log");
        let proc = self.proc.insert(Proc::start("keycloak", cmd, &log)?);
        let scheme = if self.tls { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{}/auth/health/ready", self.management_port);
        let http = self.http.clone();
        let ready = wait_for("Keycloak /health/ready", READY_TIMEOUT, || {
            let (http, url) = (http.clone(), url.clone());
            async move { matches!(http.get(url).send().await, Ok(r) if r.status().is_success()) }
        })
        .await;
        if let Err(e) = ready {
            proc.check_alive()?;
            return Err(e);
        }
        let providers = self.identity_providers.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (realm, provider) in providers {
            self.post_identity_provider(&realm, provider).await?;
        }
        Ok(())
    }

    /// Stops the server (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// The server's JVM process id, while it runs: kc.sh runs the JVM as its child (or execs it
    /// after a rebuild), so it is the `java` process among kc.sh and its descendants.
    pub fn jvm_pid(&self) -> Option<u32> {
        let root = self.proc.as_ref().and_then(Proc::pid)?;
        let mut todo = vec![root];
        while let Some(pid) = todo.pop() {
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "java") {
                return Some(pid);
            }
            todo.extend(super::process::children(pid));
        }
        None
    }

    pub fn token_url(&self, realm: &str) -> String {
        format!("{}/realms/{realm}/protocol/openid-connect/token", self.base_url)
    }

    /// The realm's issuer (`iss` of its tokens): the audience a client assertion must name, and
    /// exactly the audience of a ServiceAccount token presented to it.
    pub fn issuer(&self, realm: &str) -> String {
        format!("{}/realms/{realm}", self.base_url)
    }

    async fn admin_token(&self) -> Result<String> {
        let r: Value = self
            .http
            .post(self.token_url("master"))
            .form(&[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                ("username", ADMIN_USER),
                ("password", ADMIN_PASSWORD),
            ])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(r["access_token"].as_str().ok_or("no admin access_token")?.to_owned())
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<reqwest::Response> {
        let token = self.admin_token().await?;
        let mut req =
            self.http.request(method.clone(), format!("{}/admin/realms/{path}", self.base_url)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(format!(
                "Keycloak admin {method} {path}: {status} {}",
                body.chars().take(300).collect::<String>()
            )
            .into());
        }
        Ok(resp)
    }

    /// Adds a Kubernetes identity provider with the alias [`K8S_IDP`] for the service account
    /// issuer `issuer` (the API server's `--service-account-issuer`) to `realm`; added again
    /// whenever this Keycloak restarts.
    pub async fn add_kubernetes_identity_provider(&self, realm: &str, issuer: &str) -> Result<()> {
        let provider = json!({
            "alias": K8S_IDP,
            "providerId": "kubernetes",
            "enabled": true,
            "config": {"issuer": issuer},
        });
        self.post_identity_provider(realm, provider.clone()).await?;
        self.identity_providers.lock().unwrap_or_else(|e| e.into_inner()).push((realm.to_owned(), provider));
        Ok(())
    }

    async fn post_identity_provider(&self, realm: &str, provider: Value) -> Result<()> {
        self.admin(reqwest::Method::POST, &format!("{realm}/identity-provider/instances"), Some(provider)).await?;
        Ok(())
    }

    /// Creates a confidential client with service accounts (or without), an optional access
    /// token lifespan, and the test role granted to its service account.
    pub async fn create_client(
        &self,
        realm: &str,
        client_id: &str,
        lifespan_secs: Option<u32>,
        service_accounts: bool,
    ) -> Result<ClientInfo> {
        let id = self
            .create_client_as(realm, client_id, "client-secret", lifespan_secs, json!({}), service_accounts)
            .await?;
        let secret = self.client_secret(realm, &id).await?;
        Ok(ClientInfo { id, client_id: client_id.to_owned(), secret })
    }

    /// Creates a client that authenticates with the token of the Kubernetes ServiceAccount
    /// `namespace`/`service_account` (`federated-jwt`, issuer [`K8S_IDP`]), with the test role
    /// and an optional access token lifespan. Returns the client's internal id.
    pub async fn create_federated_client(
        &self,
        realm: &str,
        client_id: &str,
        namespace: &str,
        service_account: &str,
        lifespan_secs: Option<u32>,
    ) -> Result<String> {
        let attributes = json!({
            "jwt.credential.issuer": K8S_IDP,
            "jwt.credential.sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        });
        self.create_client_as(realm, client_id, "federated-jwt", lifespan_secs, attributes, true).await
    }

    /// Creates a client that authenticates with a JWT signed by `key` (`client-jwt`,
    /// private_key_jwt), its public key registered as the self-signed certificate, with the test
    /// role and an optional access token lifespan. Returns the client's internal id.
    pub async fn create_private_key_jwt_client(
        &self,
        realm: &str,
        client_id: &str,
        key: &ClientKey,
        lifespan_secs: Option<u32>,
    ) -> Result<String> {
        let attributes = json!({"jwt.credential.certificate": STANDARD.encode(&key.certificate_der)});
        self.create_client_as(realm, client_id, "client-jwt", lifespan_secs, attributes, true).await
    }

    /// Creates a client that authenticates with a JWT signed with its secret
    /// (`client-secret-jwt`, HMAC), with the test role and an optional access token lifespan.
    pub async fn create_client_secret_jwt_client(
        &self,
        realm: &str,
        client_id: &str,
        lifespan_secs: Option<u32>,
    ) -> Result<ClientInfo> {
        let id = self.create_client_as(realm, client_id, "client-secret-jwt", lifespan_secs, json!({}), true).await?;
        let secret = self.client_secret(realm, &id).await?;
        Ok(ClientInfo { id, client_id: client_id.to_owned(), secret })
    }

    /// Creates a confidential client authenticated by `authenticator` with `attributes` (and
    /// the lifespan), with service accounts that hold the test role, or a browser client
    /// without; returns its internal id.
    async fn create_client_as(
        &self,
        realm: &str,
        client_id: &str,
        authenticator: &str,
        lifespan_secs: Option<u32>,
        mut attributes: Value,
        service_accounts: bool,
    ) -> Result<String> {
        if let Some(l) = lifespan_secs {
            attributes["access.token.lifespan"] = json!(l.to_string());
        }
        self.admin(
            reqwest::Method::POST,
            &format!("{realm}/clients"),
            Some(json!({
                "clientId": client_id,
                "enabled": true,
                "publicClient": false,
                "clientAuthenticatorType": authenticator,
                "serviceAccountsEnabled": service_accounts,
                "standardFlowEnabled": !service_accounts,
                "redirectUris": ["http://127.0.0.1/*"],
                "attributes": attributes,
            })),
        )
        .await?;
        let id = self.client_uuid(realm, client_id).await?;
        if service_accounts {
            let user: Value = self
                .admin(reqwest::Method::GET, &format!("{realm}/clients/{id}/service-account-user"), None)
                .await?
                .json()
                .await?;
            let user_id = user["id"].as_str().ok_or("no service account user")?;
            let role: Value =
                self.admin(reqwest::Method::GET, &format!("{realm}/roles/{ROLE}"), None).await?.json().await?;
            self.admin(
                reqwest::Method::POST,
                &format!("{realm}/users/{user_id}/role-mappings/realm"),
                Some(json!([role])),
            )
            .await?;
        }
        Ok(id)
    }

    pub async fn client_uuid(&self, realm: &str, client_id: &str) -> Result<String> {
        let clients: Value = self
            .admin(reqwest::Method::GET, &format!("{realm}/clients?clientId={client_id}"), None)
            .await?
            .json()
            .await?;
        Ok(clients[0]["id"].as_str().ok_or_else(|| format!("client {client_id} not found"))?.to_owned())
    }

    /// The client's secret: read (`GET`) or regenerated (`POST`) through the admin API.
    async fn secret_call(&self, method: reqwest::Method, realm: &str, id: &str) -> Result<String> {
        let s: Value = self.admin(method, &format!("{realm}/clients/{id}/client-secret"), None).await?.json().await?;
        Ok(s["value"].as_str().ok_or("no client secret")?.to_owned())
    }

    async fn client_secret(&self, realm: &str, id: &str) -> Result<String> {
        self.secret_call(reqwest::Method::GET, realm, id).await
    }

    /// Regenerates a client's secret, as an administrator rotating it would; returns the new one.
    pub async fn regenerate_secret(&self, realm: &str, id: &str) -> Result<String> {
        self.secret_call(reqwest::Method::POST, realm, id).await
    }

    /// How many client_credentials grants Keycloak recorded for a client (CLIENT_LOGIN events).
    pub async fn grants(&self, realm: &str, client_id: &str) -> Result<usize> {
        Ok(self.grant_times(realm, client_id).await?.len())
    }

    /// When Keycloak recorded each client_credentials grant of a client (Unix milliseconds).
    pub async fn grant_times(&self, realm: &str, client_id: &str) -> Result<Vec<i64>> {
        let events = self.grant_events(realm, client_id).await?;
        let mut times: Vec<i64> = events.iter().filter_map(|e| e["time"].as_i64()).collect();
        times.sort_unstable();
        Ok(times)
    }

    /// The client's client_credentials grants as Keycloak recorded them (`CLIENT_LOGIN`
    /// events, newest first), each with its `details`, e.g. `client_auth_method`
    /// (`client-secret`, `federated-jwt`, `client-jwt`, `client-secret-jwt`).
    pub async fn grant_events(&self, realm: &str, client_id: &str) -> Result<Vec<Value>> {
        let events: Value = self
            .admin(
                reqwest::Method::GET,
                &format!("{realm}/events?type=CLIENT_LOGIN&client={client_id}&max=100000"),
                None,
            )
            .await?
            .json()
            .await?;
        match events {
            Value::Array(events) => Ok(events),
            other => Err(format!("Keycloak events: not a list: {other}").into()),
        }
    }

    /// A client_credentials grant authenticated by `assertion` alone (`client_assertion` of
    /// type [`JWT_BEARER`], no `client_id`): the token response, or an error with Keycloak's
    /// status and answer.
    pub async fn grant_with_assertion(&self, realm: &str, assertion: &str) -> Result<Value> {
        let resp = self
            .http
            .post(self.token_url(realm))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion),
            ])
            .send()
            .await?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            return Err(format!("Keycloak refused the client assertion: {status} {body}").into());
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The realm's published signing keys.
    pub async fn jwks(&self, realm: &str) -> Result<jsonwebtoken::jwk::JwkSet> {
        let url = format!("{}/realms/{realm}/protocol/openid-connect/certs", self.base_url);
        Ok(self.http.get(url).send().await?.error_for_status()?.json().await?)
    }
}

/// A client assertion (RFC 7523) as private_key_jwt and client_secret_jwt clients send it:
/// `iss` = `sub` = the client id, `aud` the realm issuer, a unique `jti`, issued now, valid 60 s.
pub fn client_assertion(
    client_id: &str,
    audience: &str,
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
) -> Result<String> {
    let now = jiff::Timestamp::now().as_second();
    let claims = json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": format!("{:032x}", rand::random::<u128>()),
        "iat": now,
        "exp": now + 60,
    });
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, key)?)
}

impl Drop for Keycloak {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the start-dev build of the distribution `dist` is kept: next to it, in the tools cache.
fn saved_build(dist: &Path) -> PathBuf {
    let name = dist.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dist.with_file_name(format!("{name}.start-dev-build"))
}

/// Keeps the build a started instance made (its lib/quarkus) for the next instances, once;
/// written aside and renamed, so a concurrent start never sees half of it. Best effort: without
/// it Keycloak builds again.
fn save_build(dist: &Path, built: &Path) {
    let saved = saved_build(dist);
    if saved.exists() {
        return;
    }
    let tmp = saved.with_extension(format!("tmp-{}-{:x}", std::process::id(), rand::random::<u32>()));
    if copy_dir(built, &tmp).is_err() || std::fs::rename(&tmp, &saved).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
