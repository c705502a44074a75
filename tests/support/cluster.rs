//! A real Kubernetes control plane on loopback: etcd, kube-apiserver (TLS, RBAC) and
//! kube-controller-manager (garbage collector, namespace and service account controllers).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Api;
use kube::api::PostParams;

use super::Result;
use super::pki::{self, Ca, Pair};
use super::process::{Proc, free_port, wait_for};

/// Controllers the tests need: ownerReference garbage collection, namespace deletion, the
/// service accounts whose tokens the chart tests use, and the aggregation of the chart's tenant
/// roles into `edit`, `admin` and `view`. Each runs under its own service account
/// (--use-service-account-credentials), with the permissions the RBAC bootstrap gives it, as in
/// a real cluster.
const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,\
     clusterrole-aggregation-controller";
/// What pods on a node need as well (the node suite): Deployments and their ReplicaSets, and the
/// `kube-root-ca.crt` ConfigMap that ServiceAccount token volumes mount, and the node lifecycle
/// controller, which lifts the not-ready taint a kubelet registers its node with.
pub const NODE_CONTROLLERS: &str =
    "deployment-controller,replicaset-controller,root-ca-certificate-publisher-controller,node-lifecycle-controller";
/// Time allowed for each component to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The ClusterRoleBinding that lets anyone read the service account issuer's discovery document
/// and keys (the built-in ClusterRole `system:service-account-issuer-discovery`), as a cluster
/// does for an identity provider outside it: Keycloak fetches them anonymously.
pub const ISSUER_DISCOVERY_BINDING: &str = "e2e-service-account-issuer-discovery";

/// The cluster's certificate authority, made before anything starts so that Keycloak, started
/// at the same time as the cluster, can trust the API server (it fetches the service account
/// issuer's discovery document and keys over TLS).
pub struct ClusterCa {
    ca: Ca,
    /// The CA certificate, PEM (`<dir>/ca.crt`).
    pub file: PathBuf,
}

impl ClusterCa {
    /// Creates the CA and writes its certificate to `<dir>/ca.crt`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca = Ca::new("registry-access-e2e-ca")?;
        let file = dir.join("ca.crt");
        std::fs::write(&file, &ca.cert)?;
        Ok(Self { ca, file })
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub server: String,
    /// Kubeconfig of a cluster admin (group system:masters).
    pub kubeconfig: PathBuf,
    pub ca_pem: String,
    /// The CA certificate file (PEM), also Keycloak's trust store.
    pub ca_file: PathBuf,
    /// The cluster's CA, to issue further certificates (the node suite's kubelets).
    pub ca: Ca,
    /// The API server's port on 127.0.0.1.
    pub api_port: u16,
    /// Controllers started besides [`CONTROLLERS`] (comma-separated), set before
    /// [`Cluster::start_controller_manager`].
    pub extra_controllers: String,
    etcd_port: u16,
    // Behind locks so that a test holding the shared environment can restart them.
    etcd: std::sync::Mutex<Proc>,
    apiserver: std::sync::Mutex<Proc>,
    controller_manager: Option<Proc>,
}

impl Cluster {
    /// Starts etcd and kube-apiserver in `dir` (where `ca` wrote its certificate). The service
    /// account issuer is the API server's own URL, its discovery document and keys readable
    /// anonymously.
    pub async fn start(bin: &Path, dir: &Path, ca: ClusterCa) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ClusterCa { ca, file: ca_file } = ca;
        let write = |name: &str, content: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, content)?;
            Ok(p)
        };
        let serving = ca.server(&["localhost", "127.0.0.1", "10.0.0.1", "kubernetes", "kubernetes.default.svc"])?;
        let serving_cert = write("apiserver.crt", &serving.cert)?;
        let serving_key = write("apiserver.key", &serving.key)?;
        let (sa_private, sa_public) = pki::signing_key()?;
        let sa_key = write("sa.key", &sa_private)?;
        let sa_pub = write("sa.pub", &sa_public)?;
        // The API server's identity towards kubelets (logs, exec).
        let kubelet_client = ca.client("kube-apiserver-kubelet-client", &["system:masters"])?;
        let kubelet_client_cert = write("apiserver-kubelet-client.crt", &kubelet_client.cert)?;
        let kubelet_client_key = write("apiserver-kubelet-client.key", &kubelet_client.key)?;

        let etcd_port = free_port()?;
        let etcd_peer = free_port()?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");

        let mut cmd = Command::new(bin.join("etcd"));
        cmd.arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let mut etcd = Proc::start("etcd", cmd, &dir.join("etcd.log"))?;
        let http = reqwest::Client::new();
        wait_for("etcd", READY_TIMEOUT, || {
            let http = http.clone();
            async move {
                let url = format!("http://127.0.0.1:{etcd_port}/health");
                matches!(http.get(url).send().await, Ok(r) if r.status().is_success())
            }
        })
        .await
        .map_err(|e| format!("{e}: {}", etcd.check_alive().err().map(|e| e.to_string()).unwrap_or_default()))?;

        let mut cmd = Command::new(bin.join("kube-apiserver"));
        cmd.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--tls-cert-file={}", serving_cert.display()))
            .arg(format!("--tls-private-key-file={}", serving_key.display()))
            .arg(format!("--client-ca-file={}", ca_file.display()))
            .arg(format!("--cert-dir={}", dir.join("apiserver-certs").display()))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            // Node authorization and NodeRestriction, as a cluster with kubelets has them.
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg(format!("--kubelet-client-certificate={}", kubelet_client_cert.display()))
            .arg(format!("--kubelet-client-key={}", kubelet_client_key.display()))
            // Kubelets are reached at their node's address, never by resolving the node's name.
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--allow-privileged=true")
            .arg(format!("--service-account-issuer={server}"))
            // Without it the discovery document names the advertise address, not the loopback URL.
            .arg(format!("--service-account-jwks-uri={server}/openid/v1/jwks"))
            .arg("--anonymous-auth=true")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
            .arg("--v=1");
        let apiserver = Proc::start("kube-apiserver", cmd, &dir.join("kube-apiserver.log"))?;

        let admin = ca.client("e2e-admin", &["system:masters"])?;
        let kubeconfig = write("admin.kubeconfig", &kubeconfig_with_cert(&server, &ca.cert, "e2e-admin", &admin))?;
        let kcm = ca.client("system:kube-controller-manager", &[])?;
        write("kcm.kubeconfig", &kubeconfig_with_cert(&server, &ca.cert, "kcm", &kcm))?;

        let cluster = Self {
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            server,
            kubeconfig,
            ca_pem: ca.cert.clone(),
            ca_file,
            ca,
            api_port,
            extra_controllers: String::new(),
            etcd_port,
            etcd: std::sync::Mutex::new(etcd),
            apiserver: std::sync::Mutex::new(apiserver),
            controller_manager: None,
        };
        cluster.wait_ready().await?;
        cluster.allow_anonymous_issuer_discovery().await?;
        Ok(cluster)
    }

    /// Binds `system:service-account-issuer-discovery` to `system:unauthenticated`.
    async fn allow_anonymous_issuer_discovery(&self) -> Result<()> {
        let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": ISSUER_DISCOVERY_BINDING},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:service-account-issuer-discovery",
            },
            "subjects": [{
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": "system:unauthenticated",
            }],
        }))?;
        Api::<ClusterRoleBinding>::all(self.client().await?).create(&PostParams::default(), &binding).await?;
        Ok(())
    }

    /// Starts kube-controller-manager. Started after the CRDs are installed, so that the garbage
    /// collector knows them from its first discovery.
    pub async fn start_controller_manager(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        let (bin, kcm_kubeconfig) = (self.bin.clone(), dir.join("kcm.kubeconfig"));
        let (sa_key, ca_file) = (dir.join("sa.key"), self.ca_file.clone());
        let kcm_port = free_port()?;
        let mut cmd = Command::new(bin.join("kube-controller-manager"));
        cmd.arg(format!("--kubeconfig={}", kcm_kubeconfig.display()))
            .arg(format!("--authentication-kubeconfig={}", kcm_kubeconfig.display()))
            .arg(format!("--authorization-kubeconfig={}", kcm_kubeconfig.display()))
            .arg(format!(
                "--controllers={CONTROLLERS}{}{}",
                if self.extra_controllers.is_empty() { "" } else { "," },
                self.extra_controllers
            ))
            .arg(format!("--service-account-private-key-file={}", sa_key.display()))
            .arg(format!("--root-ca-file={}", ca_file.display()))
            .arg("--leader-elect=false")
            .arg("--use-service-account-credentials=true")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={kcm_port}"))
            .arg(format!("--cert-dir={}", dir.join("kcm-certs").display()))
            .arg("--v=1");
        let kcm_proc = self.controller_manager.insert(Proc::start(
            "kube-controller-manager",
            cmd,
            &dir.join("kube-controller-manager.log"),
        )?);
        let insecure = reqwest::Client::builder().danger_accept_invalid_certs(true).build()?;
        wait_for("kube-controller-manager /healthz", READY_TIMEOUT, || {
            let http = insecure.clone();
            async move {
                let url = format!("https://127.0.0.1:{kcm_port}/healthz");
                matches!(http.get(url).send().await, Ok(r) if r.status().is_success())
            }
        })
        .await
        .map_err(|e| format!("{e}: {}", kcm_proc.check_alive().err().map(|e| e.to_string()).unwrap_or_default()))?;
        Ok(())
    }

    /// Stops kube-apiserver and etcd (SIGTERM; etcd keeps its data) and starts both again on
    /// the same ports, as a control-plane restart does.
    pub async fn restart_control_plane(&self) -> Result<()> {
        lock(&self.apiserver).stop();
        lock(&self.etcd).stop();
        lock(&self.etcd).respawn()?;
        let http = reqwest::Client::new();
        let port = self.etcd_port;
        wait_for("etcd after restart", READY_TIMEOUT, || {
            let http = http.clone();
            async move {
                matches!(http.get(format!("http://127.0.0.1:{port}/health")).send().await, Ok(r) if r.status().is_success())
            }
        })
        .await?;
        lock(&self.apiserver).respawn()?;
        self.wait_ready().await
    }

    /// Waits until kube-apiserver answers /readyz.
    pub async fn wait_ready(&self) -> Result<()> {
        let client = self.client().await?;
        let result = wait_for("kube-apiserver /readyz", READY_TIMEOUT, || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
                matches!(client.request_text(req).await, Ok(t) if t.trim() == "ok")
            }
        })
        .await;
        if let Err(e) = result {
            lock(&self.apiserver).check_alive()?;
            return Err(e);
        }
        Ok(())
    }

    /// An admin client.
    pub async fn client(&self) -> Result<kube::Client> {
        client_for(&self.kubeconfig).await
    }

    /// Runs the built kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// Runs the built kubectl with the given kubeconfig; fails with stderr on a non-zero exit.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(format!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the built kubectl with the admin kubeconfig and `input` on its standard input.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        let (ok, stdout, stderr) = self.kubectl_full(&self.kubeconfig, args, input)?;
        if !ok {
            return Err(format!("kubectl {} failed: {stderr}", args.join(" ")).into());
        }
        Ok(stdout)
    }

    /// Runs the built kubectl with `kubeconfig` and `input` on its standard input: whether it
    /// succeeded, its stdout and its stderr (where warnings go, also on success).
    pub fn kubectl_full(&self, kubeconfig: &Path, args: &[&str], input: &str) -> Result<(bool, String, String)> {
        use std::io::Write as _;
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().ok_or("no stdin")?.write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Writes a kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's).
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority-data: {}\n\
             users:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: e2e\n    user: {name}\n\
             current-context: {name}\n",
            self.server,
            STANDARD.encode(&self.ca_pem)
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    pub fn stop(&mut self) {
        if let Some(kcm) = &mut self.controller_manager {
            kcm.stop();
        }
        lock(&self.apiserver).stop();
        lock(&self.etcd).stop();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A kubeconfig that authenticates with a client certificate.
pub fn kubeconfig_with_cert(server: &str, ca: &str, user: &str, pair: &Pair) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\n\
         users:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
         contexts:\n- name: {user}\n  context:\n    cluster: e2e\n    user: {user}\ncurrent-context: {user}\n",
        STANDARD.encode(ca),
        STANDARD.encode(&pair.cert),
        STANDARD.encode(&pair.key)
    )
}

fn lock(p: &std::sync::Mutex<Proc>) -> std::sync::MutexGuard<'_, Proc> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}
