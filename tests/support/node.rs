//! Real nodes for the node suite: a sandbox (network, mount and PID namespaces of its own, the
//! machine restored afterwards), containerd, kubelets and kube-scheduler, and the locally built images.
//!
//! The suite's process re-runs itself under `unshare --net --mount --pid --fork`: every server
//! of the environment (etcd, kube-apiserver, Keycloak, containerd, kubelets, and the pods, which
//! use the host network) lives in that network namespace, on its loopback and on two addresses
//! of a veth pair whose ends both stay inside, so no traffic can leave. Mounts made inside
//! (tmpfs over the kubelet's and containerd's fixed paths, Secret volumes, container root file
//! systems) vanish with the mount namespace, and every process (container shims and pods
//! included) dies with the PID namespace. What the namespaces cannot hold back is undone by
//! the outer process: the kubelet's sysctls, its cgroups and the directories created for the
//! fixed paths.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kube::Api;
use serde_json::json;

use super::cluster::{Cluster, kubeconfig_with_cert};
use super::process::{Proc, free_port, tail, wait_for};
use super::{Result, run_script};

/// Set (to the cgroup prefix) in the environment of the suite's process inside the sandbox.
pub const INSIDE: &str = "RAO_NODE_SANDBOX";
/// Nodes of the suite: two, so that a second operator replica has somewhere to run.
pub const NODES: usize = 2;
/// The nodes' addresses, on the two ends of the sandbox's veth pair.
pub const NODE_IPS: [&str; NODES] = ["10.97.0.1", "10.97.0.2"];
/// Sysctls the kubelet sets at start (protectKernelDefaults is off): restored afterwards.
const KUBELET_SYSCTLS: &[&str] = &["vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"];
/// Paths the kubelet and containerd use whatever their configuration says: a tmpfs inside the
/// sandbox; created (and removed afterwards) when missing.
const FIXED_DIRS: &[&str] = &["/var/log/containers", "/var/log/pods", "/run/containerd", "/var/lib/kubelet"];
/// Time allowed for a node to become Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Programs the sandbox and the nodes need, with where they come from.
const PROGRAMS: &[(&str, &str)] = &[
    ("unshare", "util-linux"),
    ("ip", "iproute2"),
    ("mount", "mount"),
    ("containerd", "Debian package containerd"),
    ("containerd-shim-runc-v2", "Debian package containerd"),
    ("ctr", "Debian package containerd"),
    ("runc", "Debian package runc"),
    ("buildah", "Debian package buildah"),
];

/// Set to the pid of the process that started the sandbox, in the sandbox's first process.
pub const OUTER_PID: &str = "RAO_NODE_OUTER_PID";

/// True in the suite's process inside the sandbox.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// What is missing for a node on this machine, if anything (the node suite fails with it; the
/// demo runs without a node).
pub fn unavailable() -> Option<String> {
    let mut missing: Vec<String> = PROGRAMS
        .iter()
        .filter(|(p, _)| !on_path(p))
        .map(|(p, from)| format!("{p} ({from})"))
        .chain(
            (!Path::new("/usr/lib/cni/loopback").exists())
                .then(|| "/usr/lib/cni/loopback (Debian package containernetworking-plugins)".to_owned()),
        )
        .collect();
    if !nix_is_root() {
        missing.push("root (a kubelet and containerd run as root)".to_owned());
    }
    (!missing.is_empty())
        .then(|| format!("missing: {}; hack/prerequisites.sh installs the programs", missing.join(", ")))
}

/// Runs this test binary again inside the sandbox with the same arguments, restores the machine
/// afterwards, and returns the exit code. Fails loudly (never skips) when something is missing.
pub fn run_sandboxed() -> i32 {
    if let Some(why) = unavailable() {
        eprintln!("[node] {why}");
        return 1;
    }
    let sysctls: Vec<(PathBuf, String)> = KUBELET_SYSCTLS
        .iter()
        .map(|s| Path::new("/proc/sys").join(s))
        .filter_map(|p| std::fs::read_to_string(&p).ok().map(|v| (p, v)))
        .collect();
    let created: Vec<&str> = FIXED_DIRS.iter().copied().filter(|d| !Path::new(d).exists()).collect();
    for d in &created {
        if let Err(e) = std::fs::create_dir_all(d) {
            eprintln!("[node] cannot create {d}: {e}");
        }
    }
    let prefix = format!("rao-node-{}", std::process::id());
    let hierarchies = cgroup_hierarchies();
    for i in 0..NODES {
        for h in &hierarchies {
            if let Err(e) = make_cgroup(h, &format!("{prefix}-{i}")) {
                eprintln!("[node] cannot create cgroup {prefix}-{i} in {}: {e}", h.display());
            }
        }
    }

    // The sandbox's temporary files (the environment's directory) go in a directory of this
    // process: inside, some of them are mount points until the mount namespace ends, so only
    // afterwards can they be removed. RAO_E2E_KEEP=1 keeps it.
    let keep = std::env::var_os("RAO_E2E_KEEP").is_some();
    let tmp = match tempfile::Builder::new().prefix("registry-access-node-").disable_cleanup(keep).tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("[node] cannot create a temporary directory: {e}");
            return 1;
        }
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    // In a process group of its own, so that Ctrl-C reaches only this process: it is passed on
    // to the sandbox's first process, and this one stays to restore the machine.
    let child = Command::new("unshare")
        .args(["--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "--"])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(INSIDE, &prefix)
        .env(OUTER_PID, std::process::id().to_string())
        .env("TMPDIR", tmp.path())
        .process_group(0)
        .spawn();
    let code = match child {
        Ok(mut child) => {
            forward_interrupts(child.id());
            child.wait().ok().and_then(|s| s.code()).unwrap_or(1)
        }
        Err(e) => {
            eprintln!("[node] cannot start the sandbox with unshare: {e}");
            1
        }
    };

    // Restore the machine, whatever happened inside.
    let mut clean = true;
    for h in &hierarchies {
        for i in 0..NODES {
            if let Err(e) = remove_cgroup_tree(&h.join(format!("{prefix}-{i}"))) {
                eprintln!("[node] cgroup {prefix}-{i} in {} not removed: {e}", h.display());
                clean = false;
            }
        }
    }
    for (path, value) in &sysctls {
        if std::fs::read_to_string(path).ok().as_deref() != Some(value.as_str())
            && let Err(e) = std::fs::write(path, value)
        {
            eprintln!("[node] cannot restore {}: {e}", path.display());
            clean = false;
        }
    }
    if !keep && let Err(e) = std::fs::remove_dir_all(tmp.path()) {
        eprintln!("[node] cannot remove {}: {e}", tmp.path().display());
        clean = false;
    }
    for d in &created {
        if let Err(e) = std::fs::remove_dir_all(d) {
            eprintln!("[node] cannot remove {d}: {e}");
            clean = false;
        }
    }
    if code == 0 && !clean { 1 } else { code }
}

/// Passes SIGINT and SIGTERM on to the sandbox's first process (the child of `unshare`), which
/// stops the environment; if it has not ended 30 s later, `unshare` is killed, and with it every
/// process of the sandbox.
fn forward_interrupts(unshare: u32) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
                return;
            };
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            let inner = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap_or_default();
            for pid in inner.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT);
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(unshare as i32), nix::sys::signal::Signal::SIGKILL);
        });
    });
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn nix_is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The mounted cgroup v1 hierarchies (each a directory with `cgroup.procs`).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else { return Vec::new() };
    let mut dirs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("cgroup.procs").is_file()).collect();
    dirs.sort();
    dirs.dedup_by(|a, b| std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok());
    dirs
}

/// Creates a top-level cgroup (the kubelet's cgroupRoot must exist); in the cpuset hierarchy it
/// gets its parent's CPUs and memory nodes, without which no task may join.
fn make_cgroup(hierarchy: &Path, name: &str) -> std::io::Result<()> {
    let dir = hierarchy.join(name);
    std::fs::create_dir_all(&dir)?;
    for file in ["cpuset.cpus", "cpuset.mems"] {
        if let Ok(v) = std::fs::read_to_string(hierarchy.join(file)) {
            std::fs::write(dir.join(file), v.trim())?;
        }
    }
    Ok(())
}

/// Removes a cgroup and its descendants, deepest first, waiting for their tasks to go.
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            remove_cgroup_tree(&path)?;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Inside the sandbox: the network (loopback up, a veth pair holding the node addresses, a
/// default route into it so that components that look for one find it) and a tmpfs over each
/// fixed path.
pub fn prepare_sandbox() -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(args[0]).args(&args[1..]).output()?;
        if !out.status.success() {
            return Err(format!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(())
    };
    run(&["ip", "link", "set", "lo", "up"])?;
    run(&["ip", "link", "add", "rao-node0", "type", "veth", "peer", "name", "rao-node1"])?;
    for (i, ip) in NODE_IPS.iter().enumerate() {
        run(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &format!("rao-node{i}")])?;
        run(&["ip", "link", "set", &format!("rao-node{i}"), "up"])?;
    }
    run(&["ip", "route", "add", "default", "dev", "rao-node0"])?;
    for d in FIXED_DIRS {
        run(&["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d])?;
    }
    Ok(())
}

/// The images the nodes run, built by hack/node-images.sh.
pub struct Images {
    pub dir: PathBuf,
    pub pause: String,
    pub operator: String,
    pub workload: String,
}

impl Images {
    /// Runs hack/node-images.sh (seconds when nothing changed) and reads what it built.
    pub fn build() -> Result<Self> {
        let get = run_script("hack/node-images.sh")?;
        Ok(Self {
            dir: PathBuf::from(get("images")?),
            pause: get("pause_image")?,
            operator: get("operator_image")?,
            workload: get("workload_image")?,
        })
    }
}

/// kube-scheduler, so that Deployments place their pods as in a real cluster (the operator's
/// replicas on different nodes, through their host port).
pub struct Scheduler {
    proc: Proc,
}

impl Scheduler {
    pub async fn start(cluster: &Cluster, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pair = cluster.ca.client("system:kube-scheduler", &[])?;
        let kubeconfig = dir.join("scheduler.kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_with_cert(&cluster.server, &cluster.ca_pem, "scheduler", &pair))?;
        let port = free_port()?;
        let mut cmd = Command::new(cluster.bin.join("kube-scheduler"));
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--authentication-kubeconfig={}", kubeconfig.display()))
            .arg(format!("--authorization-kubeconfig={}", kubeconfig.display()))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg("--v=1");
        let mut proc = Proc::start("kube-scheduler", cmd, &dir.join("kube-scheduler.log"))?;
        let insecure = reqwest::Client::builder().danger_accept_invalid_certs(true).build()?;
        wait_for("kube-scheduler /healthz", READY_TIMEOUT, || {
            let http = insecure.clone();
            async move {
                matches!(http.get(format!("https://127.0.0.1:{port}/healthz")).send().await, Ok(r) if r.status().is_success())
            }
        })
        .await
        .map_err(|e| format!("{e}: {}", proc.check_alive().err().map(|e| e.to_string()).unwrap_or_default()))?;
        Ok(Self { proc })
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.proc.stop();
    }
}

/// One node: its containerd and its kubelet.
pub struct Node {
    pub name: String,
    pub ip: String,
    pub dir: PathBuf,
    socket: PathBuf,
    // Field order is drop order: the kubelet stops before its runtime.
    kubelet: Proc,
    containerd: Proc,
}

impl Node {
    /// Starts node `index` (its own containerd with the images imported, its kubelet with
    /// `sync_frequency`) and waits until it is Ready.
    pub async fn start(
        cluster: &Cluster,
        images: &Images,
        dir: &Path,
        index: usize,
        sync_frequency: &str,
    ) -> Result<Self> {
        let name = format!("node-{index}");
        let ip = NODE_IPS[index].to_owned();
        let cgroup_root = format!("/{}-{index}", std::env::var(INSIDE)?);
        std::fs::create_dir_all(dir)?;
        let d = |p: &str| dir.join(p);

        // containerd: CRI on, cgroupfs, no negative OOM scores (this machine's root lacks
        // CAP_SYS_RESOURCE), the local sandbox image, a loopback-only CNI configuration (pods
        // use the host network; the runtime reports its network ready once one is loaded).
        let socket = d("containerd.sock");
        std::fs::create_dir_all(d("cni"))?;
        std::fs::write(
            d("cni/10-loopback.conflist"),
            r#"{"cniVersion": "0.4.0", "name": "loopback", "plugins": [{"type": "loopback"}]}"#,
        )?;
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            root = d("containerd/root").display(),
            state = d("containerd/state").display(),
            socket = socket.display(),
            opt = d("containerd/opt").display(),
            pause = images.pause,
            cni = d("cni").display(),
        );
        std::fs::write(d("containerd.toml"), config)?;
        let mut cmd = Command::new("containerd");
        cmd.arg(format!("--config={}", d("containerd.toml").display())).arg("--log-level=warn");
        let mut containerd = Proc::start(&format!("containerd ({name})"), cmd, &d("containerd.log"))?;
        let sock = socket.clone();
        wait_for(&format!("containerd of {name}"), READY_TIMEOUT, || {
            let sock = sock.clone();
            async move { sock.exists() }
        })
        .await
        .map_err(|e| format!("{e}: {}", containerd.check_alive().err().map(|e| e.to_string()).unwrap_or_default()))?;
        for tarball in ["pause.tar", "operator.tar", "workload.tar"] {
            let out = Command::new("ctr")
                .arg(format!("--address={}", socket.display()))
                .args(["--namespace=k8s.io", "images", "import", "--snapshotter=overlayfs"])
                .arg(images.dir.join(tarball))
                .output()?;
            if !out.status.success() {
                return Err(
                    format!("ctr images import {tarball} on {name}: {}", String::from_utf8_lossy(&out.stderr)).into()
                );
            }
        }

        // The kubelet: a client certificate for system:node:<name>, webhook authentication and
        // authorization, cgroupfs under its own cgroup root, no image garbage collection (the
        // images cannot be pulled again) and no disk-pressure eviction on a developer's disk.
        let pair = cluster.ca.client(&format!("system:node:{name}"), &["system:nodes"])?;
        let kubeconfig = d("kubelet.kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_with_cert(&cluster.server, &cluster.ca_pem, &name, &pair))?;
        let kubelet_config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: {ip}
healthzPort: 10248
syncFrequency: {sync_frequency}
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
podLogsDir: {logs}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
serializeImagePulls: false
"#,
            socket = socket.display(),
            logs = d("pod-logs").display(),
            ca = cluster.ca_file.display(),
        );
        std::fs::write(d("kubelet.yaml"), kubelet_config)?;
        let mut cmd = Command::new(cluster.bin.join("kubelet"));
        cmd.arg(format!("--config={}", d("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", d("kubelet").display()))
            .arg(format!("--cert-dir={}", d("kubelet-pki").display()))
            .arg(format!("--hostname-override={name}"))
            .arg(format!("--node-ip={ip}"))
            .arg("--v=1");
        let mut kubelet = Proc::start(&format!("kubelet ({name})"), cmd, &d("kubelet.log"))?;
        let nodes: Api<NodeObject> = Api::all(cluster.client().await?);
        let ready = wait_for(&format!("node {name} Ready"), READY_TIMEOUT, || {
            let (nodes, name) = (nodes.clone(), name.clone());
            async move {
                nodes.get_opt(&name).await.ok().flatten().is_some_and(|n| {
                    n.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            }
        })
        .await;
        if let Err(e) = ready {
            kubelet.check_alive()?;
            return Err(format!("{e}; kubelet log:\n{}", tail(&d("kubelet.log"), 30)).into());
        }
        Ok(Self { name, ip, dir: dir.to_owned(), socket, kubelet, containerd })
    }

    /// Runs `ctr` against this node's containerd, in the CRI's namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ctr")
            .arg(format!("--address={}", self.socket.display()))
            .arg("--namespace=k8s.io")
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(format!("ctr {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The end of the kubelet's log.
    pub fn kubelet_log(&self, lines: usize) -> String {
        tail(&self.kubelet.log, lines)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kubelet.stop();
        self.containerd.stop();
    }
}

/// A pod `name` on `node` running examples/workload, which reads the token of Secret `secret`
/// `how`: "volume" (the Secret mounted as a volume), "subpath" (its `access_token` key mounted
/// with `subPath`) or "env" (an environment variable from the key). On the host network, as uid
/// 65532 with a read-only root file system.
pub fn workload_pod(image: &str, how: &str, secret: &str, name: &str, node: &str) -> Result<Pod> {
    let mut container = json!({
        "name": "workload",
        "image": image,
        "imagePullPolicy": "Never",
        "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false, "runAsNonRoot": true},
    });
    match how {
        "volume" => {
            container["volumeMounts"] =
                json!([{"name": "token", "mountPath": "/var/run/registry-access", "readOnly": true}])
        }
        "subpath" => {
            container["volumeMounts"] = json!([{
                "name": "token", "mountPath": "/var/run/registry-access/access_token", "subPath": "access_token", "readOnly": true,
            }])
        }
        _ => {
            container["args"] = json!(["--env", "ACCESS_TOKEN"]);
            container["env"] = json!([{"name": "ACCESS_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "access_token"}}}]);
        }
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
            "containers": [container],
            "volumes": [{"name": "token", "secret": {"secretName": secret}}],
        },
    }))?)
}
