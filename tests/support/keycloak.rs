//! A real Keycloak server from the official distribution, started in its own home directory with
//! the test realm imported, and a small client of its admin REST API.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::Result;
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
const ADMIN_USER: &str = "admin";
const ADMIN_PASSWORD: &str = "e2e-admin-password";
/// Keycloak needs tens of seconds to start on two cores.
const READY_TIMEOUT: Duration = Duration::from_secs(240);

pub struct Keycloak {
    home: PathBuf,
    /// Serves HTTPS only, with this certificate and key (PEM files in the home directory).
    tls: bool,
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
    /// `realm_file`, then starts the server.
    pub async fn start(dist: &Path, dir: &Path, realm_file: &Path) -> Result<Self> {
        Self::start_with(dist, dir, realm_file, None).await
    }

    /// [`Keycloak::start`], HTTPS-only with the given certificate and key (PEM) when `tls` is set.
    pub async fn start_with(dist: &Path, dir: &Path, realm_file: &Path, tls: Option<(&str, &str)>) -> Result<Self> {
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
        copy_dir(&dist.join("lib/quarkus"), &home.join("lib/quarkus"))?;
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
        Ok(kc)
    }

    /// Starts the server (again) on the same ports. The database is in memory: a restart
    /// re-imports the realm file.
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
        Ok(())
    }

    /// Stops the server (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    pub fn token_url(&self, realm: &str) -> String {
        format!("{}/realms/{realm}/protocol/openid-connect/token", self.base_url)
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
            return Err(format!("Keycloak admin {method} {path}: {}", resp.status()).into());
        }
        Ok(resp)
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
        let mut attributes = json!({});
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
                "clientAuthenticatorType": "client-secret",
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
        let secret = self.client_secret(realm, &id).await?;
        Ok(ClientInfo { id, client_id: client_id.to_owned(), secret })
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
        let events: Value = self
            .admin(
                reqwest::Method::GET,
                &format!("{realm}/events?type=CLIENT_LOGIN&client={client_id}&max=100000"),
                None,
            )
            .await?
            .json()
            .await?;
        let mut times: Vec<i64> = events.as_array().into_iter().flatten().filter_map(|e| e["time"].as_i64()).collect();
        times.sort_unstable();
        Ok(times)
    }

    /// The realm's published signing keys.
    pub async fn jwks(&self, realm: &str) -> Result<jsonwebtoken::jwk::JwkSet> {
        let url = format!("{}/realms/{realm}/protocol/openid-connect/certs", self.base_url);
        Ok(self.http.get(url).send().await?.error_for_status()?.json().await?)
    }
}

impl Drop for Keycloak {
    fn drop(&mut self) {
        self.stop();
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
