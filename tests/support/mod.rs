//! The end-to-end environment: real etcd, kube-apiserver, kube-controller-manager and Keycloak,
//! provisioned by hack/provision.sh and started on loopback in a temporary directory.
#![allow(dead_code)]

pub mod case;
pub mod cluster;
pub mod harness;
pub mod http;
pub mod k8s;
pub mod keycloak;
pub mod metrics;
pub mod node;
pub mod operator;
pub mod pki;
pub mod process;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cluster::{Cluster, ClusterCa};
use keycloak::{Keycloak, REALM};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The repository's root directory.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the provisioned tools are.
pub struct Tools {
    pub bin: PathBuf,
    pub keycloak_home: PathBuf,
}

impl Tools {
    /// Runs hack/provision.sh (seconds when the cache is warm) and reads where it put the tools.
    pub fn provision() -> Result<Self> {
        let get = run_script("hack/provision.sh")?;
        Ok(Self { bin: get("bin")?.into(), keycloak_home: get("keycloak_home")?.into() })
    }
}

/// Runs a script of the repository (`hack/...`) and returns a lookup of the `key=value` lines it
/// printed; fails with its stderr when it fails.
pub fn run_script(script: &str) -> Result<impl Fn(&str) -> Result<String>> {
    let out = Command::new("bash").arg(repo().join(script)).output()?;
    if !out.status.success() {
        return Err(format!("{script} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr)).into());
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let script = script.to_owned();
    Ok(move |key: &str| -> Result<String> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .ok_or_else(|| format!("{script} did not print {key}=").into())
    })
}

/// Prints how long a phase took, on stderr.
pub fn phase(name: &str, start: Instant) {
    eprintln!("[e2e] {name}: {:.1}s", start.elapsed().as_secs_f64());
}

/// A running environment. Dropping it stops every process and removes its directory.
pub struct Env {
    // Field order is drop order: processes stop before the directory goes.
    pub keycloak: Keycloak,
    pub cluster: Cluster,
    pub tools: Tools,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn start() -> Result<Self> {
        Self::start_with_controllers("").await
    }

    /// [`Env::start`] with more kube-controller-manager controllers (comma-separated).
    pub async fn start_with_controllers(extra_controllers: &str) -> Result<Self> {
        let t = Instant::now();
        let tools = Tools::provision()?;
        phase("provision", t);
        // RAO_E2E_KEEP=1 keeps the directory (logs, kubeconfig) for a post-mortem.
        let keep = std::env::var_os("RAO_E2E_KEEP").is_some();
        let dir = tempfile::Builder::new().prefix("registry-access-e2e-").disable_cleanup(keep).tempdir()?;
        eprintln!("[e2e] environment directory: {}", dir.path().display());
        let t = Instant::now();
        let realm = repo().join("tests/fixtures/consent-01-external-system-realm.json");
        let (cluster_dir, keycloak_dir) = (dir.path().join("cluster"), dir.path().join("keycloak"));
        // The cluster's CA first: Keycloak, started at the same time, trusts it to fetch the
        // service account issuer's keys from the API server.
        let ca = ClusterCa::create(&cluster_dir)?;
        let ca_file = ca.file.clone();
        let (cluster, keycloak) = tokio::join!(
            Cluster::start(&tools.bin, &cluster_dir, ca),
            Keycloak::start(&tools.keycloak_home, &keycloak_dir, &realm, Some(&ca_file))
        );
        let (mut cluster, keycloak) = (cluster?, keycloak?);
        phase("kube-apiserver and Keycloak up", t);
        let t = Instant::now();
        // The test realm accepts the cluster's ServiceAccount tokens as client credentials.
        keycloak.add_kubernetes_identity_provider(REALM, &cluster.server).await?;
        phase("Kubernetes identity provider in the test realm", t);
        let t = Instant::now();
        cluster.kubectl(&["apply", "-f", &repo().join("crds").display().to_string()])?;
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/registryaccesses.registry-access.io",
            "--timeout=60s",
        ])?;
        phase("CRD installed with kubectl apply -f crds/", t);
        let t = Instant::now();
        cluster.extra_controllers = extra_controllers.to_owned();
        cluster.start_controller_manager().await?;
        phase("kube-controller-manager up", t);
        Ok(Self { keycloak, cluster, tools, dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the built helm against the test cluster, with its state kept in the environment.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let home = self.path().join("helm");
        let out = Command::new(self.tools.bin.join("helm"))
            .args(args)
            .arg(format!("--kubeconfig={}", self.cluster.kubeconfig.display()))
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

    /// Starts another Keycloak with the test realm, HTTPS-only with the given certificate and key;
    /// like the main one, it trusts the cluster's CA and has the Kubernetes identity provider.
    pub async fn extra_keycloak_tls(&self, name: &str, cert: &str, key: &str) -> Result<Keycloak> {
        let realm = repo().join("tests/fixtures/consent-01-external-system-realm.json");
        let dir = self.path().join(name);
        let kc = Keycloak::start_with(
            &self.tools.keycloak_home,
            &dir,
            &realm,
            Some((cert, key)),
            Some(&self.cluster.ca_file),
        )
        .await?;
        kc.add_kubernetes_identity_provider(REALM, &self.cluster.server).await?;
        Ok(kc)
    }

    /// Starts another Keycloak with the test realm (for tests that stop it); like the main one,
    /// it trusts the cluster's CA and has the Kubernetes identity provider.
    pub async fn extra_keycloak(&self, name: &str) -> Result<Keycloak> {
        let realm = repo().join("tests/fixtures/consent-01-external-system-realm.json");
        let kc =
            Keycloak::start(&self.tools.keycloak_home, &self.path().join(name), &realm, Some(&self.cluster.ca_file))
                .await?;
        kc.add_kubernetes_identity_provider(REALM, &self.cluster.server).await?;
        Ok(kc)
    }
}
