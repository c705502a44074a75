//! The setting of a run: the operator binary (present, fresh, offering the raised flags), starting
//! it on the end-to-end environment, and the machine and versions the report names.

use std::time::Duration;

use kube::Client;
use serde_json::{Value, json};

use crate::log;
use crate::measure::kib;
use crate::support::operator::{Operator, binary};
use crate::support::{Env, Result, repo};

/// Fails unless the operator binary is built and offers every raised flag; warns when it is older
/// than src/.
pub fn check_operator(raised: &[String]) -> Result<()> {
    let op_bin = binary();
    if !op_bin.exists() {
        return Err(format!(
            "no operator binary at {}: build it with `cargo build --release --bin registry-access-operator` (make bench does)",
            op_bin.display()
        )
        .into());
    }
    warn_if_stale(&op_bin);
    let help = operator_help()?;
    check_flags(&help, raised)
}

/// Starts the operator binary with `args` (watching all namespaces), logging to `<name>.log` in
/// the environment's directory.
pub async fn start_operator(env: &Env, name: &str, args: &[String]) -> Result<Operator> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log_file = env.path().join(format!("{name}.log"));
    let mut op = Operator::start(&env.cluster.kubeconfig, &log_file, &args)?;
    // A rejected flag ends the process at once: fail loudly with what it said.
    tokio::time::sleep(Duration::from_millis(300)).await;
    op.check_alive().map_err(|e| format!("the operator ({name}, {}) did not start: {e}", args.join(" ")))?;
    log(format!("  operator started: {}", args.join(" ")));
    Ok(op)
}

fn operator_help() -> Result<String> {
    let out = std::process::Command::new(binary()).args(["run", "--help"]).output()?;
    if !out.status.success() {
        return Err(
            format!("registry-access-operator run --help failed: {}", String::from_utf8_lossy(&out.stderr)).into()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every raised flag must be one the operator offers; `--max-*` flags the bench does not know are
/// reported, not guessed at.
fn check_flags(help: &str, raised: &[String]) -> Result<()> {
    let offered: Vec<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '<')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    for arg in raised {
        let flag = arg.split('=').next().unwrap_or(arg);
        if !offered.contains(&flag) {
            return Err(format!("the operator does not offer {flag} (see registry-access-operator run --help)").into());
        }
    }
    for flag in offered.iter().filter(|f| f.starts_with("--max-") || f.ends_with("-qps") || f.ends_with("-burst")) {
        if !raised.iter().any(|a| a.split('=').next() == Some(*flag)) {
            log(format!("note: the operator offers {flag}, which the raised-caps run leaves at its default"));
        }
    }
    Ok(())
}

/// Warns when a file under src/ is newer than the operator binary.
fn warn_if_stale(bin: &std::path::Path) {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else { return };
    let newer = std::fs::read_dir(repo().join("src"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .any(|m| m > built);
    if newer {
        log("warning: src/ changed after the operator binary was built; `make bench` rebuilds it");
    }
}

/// The versions of Kubernetes, Keycloak and the operator the run measured.
pub async fn versions(env: &Env, client: &Client) -> Value {
    json!({
        "kubernetes": client.apiserver_version().await.map(|v| v.git_version).unwrap_or_default(),
        "keycloak": std::fs::read_to_string(env.tools.keycloak_home.join("version.txt"))
            .unwrap_or_default()
            .trim()
            .trim_start_matches("Keycloak - Version ")
            .to_owned(),
        "operator": git_describe(),
    })
}

/// nproc, CPU model and memory of this machine, and the load when the bench started.
pub fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = kib(&meminfo, "MemTotal:").unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: String = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let mem_gib = mem_kib as f64 / 1024.0 / 1024.0;
    json!({
        "nproc": nproc,
        "cpu_model": model,
        "memory_gib": mem_gib,
        "load_average_at_start": load,
        "summary": format!("{nproc} CPUs ({model}), {mem_gib:.1} GiB memory, load average {load} at start"),
    })
}

fn git_describe() -> String {
    std::process::Command::new("git")
        .args(["-C", &repo().display().to_string(), "describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}
