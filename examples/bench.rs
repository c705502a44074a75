//! The benchmark behind `make bench`: Keycloak's bare grant rate, a bare grant-and-write loop, and
//! the operator (first issuance with default and raised caps, restart, idle writes, memory, routine
//! refresh cost), measured side by side in one run on the end-to-end environment. The two bare
//! baselines run first and again last, so that they bracket the operator on a shared machine.
//!
//! Run with `make bench` (or `cargo run --release --example bench` after building the release
//! operator binary). Parameters, all optional, as environment variables:
//!
//! - `BENCH_N`: RegistryAccess objects (default 1000); `BENCH_K`: namespaces (default 10);
//! - `BENCH_WINDOW`: seconds of the routine-refresh measurement window (default 60);
//! - `BENCH_SHORT`: short-lived objects refreshed in that window (default N/10, 10 to 200);
//! - `BENCH_SHORT_LIFESPAN`: their token lifespan in seconds (default 60);
//! - `BENCH_IDLE`, `BENCH_RESTART_WAIT`: seconds of the idle and after-restart windows (20 each);
//! - `BENCH_RAISED_ARGS`: the operator flags of the raised-caps run, space-separated;
//! - `BENCH_OUT`: the JSON report (default `target/bench/bench.json`).
//!
//! A table goes to stdout, progress to stderr. No token or client secret is ever printed.
#![forbid(unsafe_code)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{StreamExt as _, TryStreamExt as _};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{Value, json};
use support::keycloak::{Keycloak, REALM};
use support::operator::{Operator, binary};
use support::process::free_port;
use support::{Env, Result, k8s, repo};

/// Concurrency of the bare loops (Keycloak alone, and grant + writes).
const BARE_CONCURRENCY: usize = 8;
/// Concurrency of the bench's own setup writes (creating objects).
const SETUP_CONCURRENCY: usize = 16;
/// Length of the Keycloak bare-rate measurement, after a warm-up.
const GRANT_WINDOW: Duration = Duration::from_secs(5);
/// Keycloak's JVM needs a warm-up after its start: grants in rounds of this length until the
/// rate stops rising by more than a tenth, for at most [`GRANT_WARMUP_MAX`].
const GRANT_WARMUP: Duration = Duration::from_secs(2);
const GRANT_WARMUP_MAX: Duration = Duration::from_secs(40);
/// Token lifespan of the objects measured for first issuance, restart and idle writes.
const LONG_LIFESPAN: u32 = 300;
/// Label of the operator's token Secrets, and its value.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=registry-access-operator";
/// Label of the bench's RegistryAccess objects: which set an object belongs to.
const SET_LABEL: &str = "bench.registry-access.io/set";
/// Field manager of the bench's own writes.
const BENCH_MANAGER: &str = "registry-access-bench";
/// Operator flags of the raised-caps run (each checked against `run --help`).
const RAISED_ARGS: &[&str] = &[
    "--max-requests-per-second-per-server=100000",
    "--max-requests-in-flight=64",
    "--max-requests-in-flight-per-namespace=64",
    "--max-requests-in-flight-per-server=64",
    "--concurrency=64",
];
/// apiserver_request_total verbs that write.
const WRITE_VERBS: &[&str] = &["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"];
/// Giving up on "all Ready" when the Ready count stands still this long.
const STALL: Duration = Duration::from_secs(60);
/// The operator's renewal lag histogram (added by the controller rework; may be absent).
const LAG_METRIC: &str = "registry_access_renewal_lag_seconds";

#[tokio::main]
async fn main() {
    // The kube client (rustls) and reqwest ("rustls-no-provider") need a process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = tokio::select! {
        r = bench() => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

/// The run's parameters, from the environment.
struct Config {
    n: usize,
    k: usize,
    window: Duration,
    short: usize,
    short_lifespan: u32,
    idle: Duration,
    restart_wait: Duration,
    out: PathBuf,
    raised: Vec<String>,
}

impl Config {
    fn from_env() -> Result<Self> {
        fn num(name: &str, default: u64) -> Result<u64> {
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => {
                    v.trim().parse().map_err(|_| format!("{name}={v} is not a whole number").into())
                }
                _ => Ok(default),
            }
        }
        let n = num("BENCH_N", 1000)? as usize;
        if n == 0 {
            return Err("BENCH_N must be at least 1".into());
        }
        let k = (num("BENCH_K", 10)? as usize).clamp(1, n);
        let short = (num("BENCH_SHORT", (n as u64 / 10).clamp(10, 200))? as usize).max(1);
        let out = std::env::var_os("BENCH_OUT")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join("target/bench/bench.json"));
        let raised = match std::env::var("BENCH_RAISED_ARGS") {
            Ok(v) if !v.trim().is_empty() => v.split_whitespace().map(str::to_owned).collect(),
            _ => RAISED_ARGS.iter().map(|s| s.to_string()).collect(),
        };
        Ok(Self {
            n,
            k,
            window: Duration::from_secs(num("BENCH_WINDOW", 60)?.max(5)),
            short,
            short_lifespan: u32::try_from(num("BENCH_SHORT_LIFESPAN", 60)?.max(10))?,
            idle: Duration::from_secs(num("BENCH_IDLE", 20)?),
            restart_wait: Duration::from_secs(num("BENCH_RESTART_WAIT", 20)?),
            out,
            raised,
        })
    }

    fn namespaces(&self, prefix: &str) -> Vec<String> {
        (0..self.k).map(|i| format!("{prefix}-{i}")).collect()
    }

    /// The RSS target at this scale, in MiB.
    fn rss_target_mib(&self) -> Option<f64> {
        match self.n {
            0..=1000 => Some(25.0),
            1001..=10000 => Some(64.0),
            _ => None,
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench {}] {}", Timestamp::now().strftime("%H:%M:%S"), msg.as_ref());
}

async fn bench() -> Result<()> {
    let started = Instant::now();
    let cfg = Config::from_env()?;
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
    check_flags(&help, &cfg.raised)?;
    let machine = machine();
    log(format!(
        "N={} objects, K={} namespaces, refresh window {}s with {} objects of {}s tokens; machine: {}",
        cfg.n,
        cfg.k,
        cfg.window.as_secs(),
        cfg.short.min(cfg.n),
        cfg.short_lifespan,
        machine["summary"].as_str().unwrap_or_default()
    ));

    log("starting etcd, kube-apiserver, kube-controller-manager and Keycloak...");
    let env = Env::start().await?;
    let client = env.cluster.client().await?;
    let kc = &env.keycloak;
    let versions = json!({
        "kubernetes": client.apiserver_version().await.map(|v| v.git_version).unwrap_or_default(),
        "keycloak": std::fs::read_to_string(env.tools.keycloak_home.join("version.txt"))
            .unwrap_or_default()
            .trim()
            .trim_start_matches("Keycloak - Version ")
            .to_owned(),
        "operator": git_describe(),
    });
    log(format!("environment up; {versions}"));
    let kube = Kube { client: client.clone(), ra: ra_resource() };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(BARE_CONCURRENCY * 2)
        .timeout(Duration::from_secs(30))
        .build()?;
    let token_url = kc.token_url(REALM);
    let mut report = Report::default();

    // Keycloak alone.
    log("1/9 Keycloak's bare client_credentials rate...");
    let raw = kc.create_client(REALM, "bench-raw", None, true).await?;
    let creds = Creds { url: token_url.clone(), id: raw.client_id.clone(), secret: raw.secret.clone() };
    warm_up(&http, &creds).await;
    let (kc_rate1, kc_run1) = keycloak_rate(&http, &creds).await?;

    // The operator's work per object, as a bare loop.
    log("2/9 bare loop: grant + Secret apply + status apply per object...");
    let (bare_rate1, bare_run1) = bare_loop(&cfg, &kube, kc, &http, 1).await?;

    // The operator with its default flags, N fresh objects.
    log("3/9 operator with default flags: N fresh objects...");
    let op_client = kc.create_client(REALM, "bench-op", Some(LONG_LIFESPAN), true).await?;
    let namespaces = cfg.namespaces("bench");
    let t = Instant::now();
    for ns in &namespaces {
        k8s::create_namespace(&client, ns).await?;
        k8s::put_client_secret(&client, ns, "creds", &[("client_secret", &op_client.secret)]).await?;
    }
    let objects: Vec<(String, String)> =
        (0..cfg.n).map(|i| (namespaces[i % cfg.k].clone(), format!("ra-{i:05}"))).collect();
    let spec = json!({
        "server": kc.base_url, "realm": REALM, "clientId": op_client.client_id, "clientSecretRef": {"name": "creds"},
    });
    create_ras(&kube, &objects, &spec, "long").await?;
    log(format!("  created {} RegistryAccess objects in {:.1}s", cfg.n, t.elapsed().as_secs_f64()));
    let probe_port = free_port()?;
    let base_args = vec![format!("--probe-addr=127.0.0.1:{probe_port}"), "--log-level=info".to_owned()];
    let expected = per_namespace(&objects);
    let timeout = Duration::from_secs(120 + cfg.n as u64 / 5);
    let (t0, since) = (Instant::now(), Timestamp::now());
    let mut op = start_operator(&env, "operator-default", &base_args).await?;
    let default_wait = wait_ready(&kube, "long", &expected, None, timeout, t0, &mut op).await?;
    let (default_secs, default_rate) = (default_wait.secs, default_wait.rate());
    let grants = kc.grant_times(REALM, &op_client.client_id).await?;
    let default_stat = proc_stat(&op)?;
    log(format!("  {} ({default_rate:.1} objects/s)", default_wait.describe()));
    report.json["operator_default"] = json!({
        "args": base_args,
        "seconds_to_all_ready": default_wait.why.is_none().then_some(default_secs),
        "objects_per_second": default_rate,
        "wait": default_wait.json(),
        "keycloak_grants": grants.len(), "keycloak_grant_span_seconds": grant_span(&grants, since),
        "cpu_seconds": default_stat.cpu_secs(), "vm_hwm_mib": default_stat.hwm_mib(),
    });

    // Every cap raised: the same objects issued again after their Secrets are deleted.
    log("4/9 operator with every cap raised: Secrets deleted, issued again...");
    op.stop();
    for ns in &namespaces {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        secrets.delete_collection(&DeleteParams::default(), &ListParams::default().labels(MANAGED_BY)).await?;
    }
    let left = count_token_secrets(&client, &namespaces).await?;
    if left != 0 {
        return Err(format!("{left} token Secrets left after deletecollection").into());
    }
    let mut raised_args = base_args.clone();
    raised_args.extend(cfg.raised.iter().cloned());
    let grants_before = kc.grants(REALM, &op_client.client_id).await?;
    // Tokens of this run are told from the previous run's by status.issuedAt (whole seconds):
    // let the clock pass into a later second than any of them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (t0, since) = (Instant::now(), Timestamp::now());
    let mut op = start_operator(&env, "operator-raised", &raised_args).await?;
    let raised_wait = wait_ready(&kube, "long", &expected, Some(since), timeout, t0, &mut op).await?;
    let (raised_secs, raised_rate) = (raised_wait.secs, raised_wait.rate());
    let grants = kc.grant_times(REALM, &op_client.client_id).await?;
    let raised_stat = proc_stat(&op)?;
    log(format!(
        "  {} ({raised_rate:.1} objects/s, {:.2} x the first bare loop)",
        raised_wait.describe(),
        raised_rate / bare_rate1
    ));
    report.json["operator_raised"] = json!({
        "args": raised_args,
        "seconds_to_all_ready": raised_wait.why.is_none().then_some(raised_secs),
        "objects_per_second": raised_rate,
        "wait": raised_wait.json(),
        "keycloak_grants": grants.len() - grants_before,
        "keycloak_grant_span_seconds": grant_span(&grants, since),
        "cpu_seconds": raised_stat.cpu_secs(), "vm_hwm_mib": raised_stat.hwm_mib(),
    });

    // A restart with valid tokens (back to the default flags, which the rest is measured with).
    log("5/9 restart with valid tokens: SIGTERM, start again (default flags)...");
    op.stop();
    drop(op);
    let grants_before = kc.grants(REALM, &op_client.client_id).await?;
    let mut op = start_operator(&env, "operator-restarted", &base_args).await?;
    let t = Instant::now();
    let mut min_ready = usize::MAX;
    while t.elapsed() < cfg.restart_wait {
        tokio::time::sleep(Duration::from_secs(5).min(cfg.restart_wait)).await;
        op.check_alive()?;
        min_ready = min_ready.min(count_ready(&kube, "long", &namespaces, None).await?);
    }
    let restart_grants = kc.grants(REALM, &op_client.client_id).await? - grants_before;
    let ready_after = count_ready(&kube, "long", &namespaces, None).await?;
    min_ready = min_ready.min(ready_after);
    log(format!(
        "  {restart_grants} grants in {}s after the restart; {ready_after}/{} Ready (lowest seen {min_ready})",
        cfg.restart_wait.as_secs(),
        cfg.n
    ));
    report.json["restart"] = json!({
        "seconds": cfg.restart_wait.as_secs(), "keycloak_grants": restart_grants,
        "ready_after": ready_after, "lowest_ready_seen": min_ready, "objects": cfg.n,
    });

    // Idle: long-lived tokens, nothing due.
    log(format!("6/9 idle writes over {}s...", cfg.idle.as_secs()));
    let pid = op.pid().ok_or("operator is not running")?;
    let (before, cpu_before) = (apiserver_requests(&client).await?, cpu_ticks(pid)?);
    tokio::time::sleep(cfg.idle).await;
    op.check_alive()?;
    let (after, cpu_after) = (apiserver_requests(&client).await?, cpu_ticks(pid)?);
    let idle = delta(&before, &after);
    let idle_writes = writes(&idle, "secrets") + writes(&idle, "registryaccesses");
    let idle_cpu = (cpu_after - cpu_before) as f64 / clock_ticks();
    // CPU seconds per second with nothing due: the baseline of the refresh window's CPU.
    let idle_cpu_rate = (!cfg.idle.is_zero()).then(|| idle_cpu / cfg.idle.as_secs_f64());
    log(format!("  {idle_writes} writes to secrets and registryaccesses; operator CPU {idle_cpu:.2} s"));
    report.json["idle"] = json!({
        "seconds": cfg.idle.as_secs(), "writes": idle_writes, "event_writes": writes(&idle, "events"),
        "operator_cpu_seconds": idle_cpu, "apiserver_requests": breakdown(&idle),
    });

    // Memory at steady state.
    let steady = proc_stat(&op)?;
    let peak_mib = [default_stat.hwm_mib(), raised_stat.hwm_mib(), steady.hwm_mib()].into_iter().fold(0.0, f64::max);
    log(format!("7/9 operator RSS {:.1} MiB at steady state, peak {peak_mib:.1} MiB", steady.rss_mib()));
    report.json["memory"] = json!({
        "steady_vm_rss_mib": steady.rss_mib(), "steady_vm_hwm_mib": steady.hwm_mib(), "peak_vm_hwm_mib": peak_mib,
        "peak_by_run": {
            "default": default_stat.hwm_mib(), "raised": raised_stat.hwm_mib(), "restarted": steady.hwm_mib(),
        },
    });

    // Routine refreshes: short-lived tokens for a subset, over a window.
    log("8/9 routine refresh cost...");
    let refresh = refresh_window(&cfg, &kube, kc, &namespaces, &mut op, probe_port, idle_cpu_rate).await?;
    let final_stat = proc_stat(&op)?;
    let peak_mib = peak_mib.max(final_stat.hwm_mib());
    report.json["memory"]["peak_vm_hwm_mib"] = json!(peak_mib);
    report.json["memory"]["after_refresh_window_vm_rss_mib"] = json!(final_stat.rss_mib());
    op.check_alive()?;
    op.stop();
    drop(op);

    // 1 and 2 again, with no operator running: the machine is shared, so the baselines bracket
    // the operator runs and the faster of each pair is the one compared against.
    log("9/9 Keycloak's bare rate and the bare loop again...");
    let (kc_rate2, kc_run2) = keycloak_rate(&http, &creds).await?;
    let (bare_rate2, bare_run2) = bare_loop(&cfg, &kube, kc, &http, 2).await?;
    let (kc_rate, bare_rate) = (kc_rate1.max(kc_rate2), bare_rate1.max(bare_rate2));
    let ratio = raised_rate / bare_rate;
    report.json["keycloak_bare"] = json!({"grants_per_second": kc_rate, "runs": [kc_run1, kc_run2]});
    report.json["bare_loop"] = json!({"objects_per_second": bare_rate, "runs": [bare_run1, bare_run2]});
    report.json["operator_raised"]["ratio_to_bare_loop"] = json!(ratio);

    // The table.
    let rss_target = cfg.rss_target_mib();
    let t = &mut report;
    t.row(
        "Keycloak bare grant rate (8 keep-alive connections, 5 s)",
        format!("{kc_rate:.0} grants/s (runs: {kc_rate1:.0}, {kc_rate2:.0})"),
        None,
    );
    t.row(
        "Bare loop: grant + Secret apply + status apply (8 concurrent)",
        format!("{bare_rate:.0} objects/s (runs: {bare_rate1:.0}, {bare_rate2:.0})"),
        None,
    );
    t.row(
        &format!("All {} Ready, default flags ({} namespaces)", cfg.n, cfg.k),
        format!("{} ({default_rate:.0} objects/s)", default_wait.describe()),
        Some(("<= 15 s", default_wait.why.is_none() && default_secs <= 15.0)),
    );
    t.row(
        "Issuance rate, every cap raised",
        format!("{raised_rate:.0} objects/s = {ratio:.2} x bare loop ({})", raised_wait.describe()),
        Some((">= 0.7 x bare loop", raised_wait.why.is_none() && ratio >= 0.7)),
    );
    let per = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "n/a (no refresh)".into());
    t.row(
        "apiserver writes per routine refresh",
        format!(
            "{} ({} secrets + {} registryaccesses / {} refreshes)",
            per(refresh.writes_per),
            refresh.secret_writes,
            refresh.ra_writes,
            refresh.refreshes
        ),
        refresh.writes_per.map(|v| ("<= 2.0", v <= 2.0)).or(Some(("<= 2.0", false))),
    );
    t.row(
        "Secret GETs per routine refresh",
        format!("{} ({} GETs)", per(refresh.gets_per), refresh.secret_gets),
        refresh.gets_per.map(|v| ("<= 1.0", v <= 1.0)).or(Some(("<= 1.0", false))),
    );
    t.row(
        "Keycloak grants per routine refresh",
        format!("{} ({} grants)", per(refresh.grants_per), refresh.grants),
        refresh.grants_per.map(|v| ("1.0", (v - 1.0).abs() <= 0.05)).or(Some(("1.0", false))),
    );
    t.row(
        "Operator CPU per routine refresh",
        match refresh.cpu_ms_per {
            Some(v) => format!(
                "{v:.2} ms ({:.2} s CPU in {} s{})",
                refresh.cpu_secs,
                cfg.window.as_secs(),
                refresh.cpu_ms_net.map(|n| format!("; {n:.2} ms above the idle rate")).unwrap_or_default()
            ),
            None => "n/a (no refresh)".into(),
        },
        refresh.cpu_ms_per.map(|v| ("<= 1 ms", v <= 1.0)).or(Some(("<= 1 ms", false))),
    );
    t.row("Renewal lag (mean / max bucket)", refresh.lag.clone(), None);
    t.row(
        &format!("apiserver writes while idle ({} s, 300 s tokens)", cfg.idle.as_secs()),
        idle_writes.to_string(),
        Some(("0", idle_writes == 0)),
    );
    t.row(
        &format!("Grants after a restart with valid tokens ({} s)", cfg.restart_wait.as_secs()),
        format!("{restart_grants} ({ready_after}/{} Ready, lowest {min_ready})", cfg.n),
        Some(("0", restart_grants == 0 && min_ready == cfg.n)),
    );
    let rss_label = |v: f64| format!("{v:.1} MiB");
    let rss_check = |v: f64| rss_target.map(|max| v <= max);
    let rss_target_text = match cfg.n {
        0..=1000 => "<= 25 MiB (at 1,000)",
        _ => "<= 64 MiB (at 10,000)",
    };
    let row_target = |v: f64| rss_check(v).map(|ok| (rss_target_text, ok));
    t.row(
        &format!("Operator RSS, steady, {} objects (after the idle window)", cfg.n),
        format!("{} ({} after the refresh window)", rss_label(steady.rss_mib()), rss_label(final_stat.rss_mib())),
        row_target(steady.rss_mib()),
    );
    t.row("Operator peak RSS (VmHWM, any run)", rss_label(peak_mib), row_target(peak_mib));

    let elapsed = started.elapsed().as_secs_f64();
    let notes = vec![
        format!(
            "Everything runs on this one machine: etcd, kube-apiserver, kube-controller-manager, Keycloak ({} realm, dev-mem database, events on), the operator and the bench.",
            REALM
        ),
        "Keycloak is the real token server (no stand-in token endpoint).".to_owned(),
        format!(
            "Routine refresh: {} objects with {} s tokens (their own Keycloak client) added beside the {} objects with {} s tokens, default flags; refreshes = token changes seen by a watch on all token Secrets in a {} s window ({} of the short-lived objects, {} renewals of long-lived ones that fell in the window).",
            refresh.objects,
            cfg.short_lifespan,
            cfg.n,
            LONG_LIFESPAN,
            cfg.window.as_secs(),
            refresh.short_refreshes,
            refresh.refreshes - refresh.short_refreshes,
        ),
        "Operator CPU = utime + stime of the operator process (/proc/<pid>/stat) over the window, divided by the refreshes; \"above the idle rate\" subtracts its CPU rate over the idle window.".to_owned(),
        "Writes count every write verb (POST, PUT, PATCH, APPLY, DELETE) on secrets and registryaccesses (all subresources), from kube-apiserver's apiserver_request_total.".to_owned(),
        format!(
            "Raised caps: {}. Restart, idle, memory and routine refresh use the default flags.",
            cfg.raised.join(" ")
        ),
    ];
    report.json["machine"] = machine.clone();
    report.json["versions"] = versions;
    report.json["parameters"] = json!({
        "n": cfg.n, "k": cfg.k, "window_seconds": cfg.window.as_secs(), "short_objects": refresh.objects,
        "short_lifespan_seconds": cfg.short_lifespan, "long_lifespan_seconds": LONG_LIFESPAN,
        "idle_seconds": cfg.idle.as_secs(), "restart_wait_seconds": cfg.restart_wait.as_secs(),
        "bare_concurrency": BARE_CONCURRENCY,
    });
    report.json["refresh"] = refresh.json.clone();
    report.json["notes"] = json!(notes);
    report.json["total_seconds"] = json!(elapsed);
    report.json["finished_at"] = json!(Timestamp::now().to_string());

    println!();
    println!("registry-access-operator benchmark: N={} objects in K={} namespaces", cfg.n, cfg.k);
    println!("machine: {}", machine["summary"].as_str().unwrap_or_default());
    println!(
        "versions: Kubernetes {}, Keycloak {}, operator {}",
        report.json["versions"]["kubernetes"].as_str().unwrap_or("?"),
        report.json["versions"]["keycloak"].as_str().unwrap_or("?"),
        report.json["versions"]["operator"].as_str().unwrap_or("?")
    );
    println!();
    print!("{}", report.table());
    println!();
    for n in &notes {
        println!("- {n}");
    }
    println!("total {elapsed:.0} s; JSON: {}", cfg.out.display());

    if let Some(dir) = cfg.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cfg.out, serde_json::to_string_pretty(&report.json)?)?;
    log("stopping and removing the environment...");
    drop(env);
    Ok(())
}

// ---- the table and the JSON report ----

#[derive(Default)]
struct Report {
    rows: Vec<[String; 4]>,
    json: Value,
}

impl Report {
    /// A row: figure, measured, and a target with whether it is met (`None`: information only).
    fn row(&mut self, figure: &str, measured: String, target: Option<(&str, bool)>) {
        let (target, verdict) = match target {
            Some((t, ok)) => (t.to_owned(), if ok { "met" } else { "NOT MET" }.to_owned()),
            None => ("-".to_owned(), "info".to_owned()),
        };
        if !self.json["table"].is_array() {
            self.json["table"] = json!([]);
        }
        if let Some(rows) = self.json["table"].as_array_mut() {
            rows.push(json!({"figure": figure, "measured": measured, "target": target, "verdict": verdict}));
        }
        self.rows.push([figure.to_owned(), measured, target, verdict]);
    }

    fn table(&self) -> String {
        let head = ["figure", "measured", "target", "verdict"];
        let mut width = head.map(str::len);
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: [&str; 4]| {
            let mut s = String::from("|");
            for (c, w) in cells.iter().zip(width) {
                s.push_str(&format!(" {c:<w$} |"));
            }
            s.push('\n');
            s
        };
        let mut out = line(head);
        out.push_str(&line(width.map(|w| "-".repeat(w)).each_ref().map(String::as_str)));
        for r in &self.rows {
            out.push_str(&line(r.each_ref().map(String::as_str)));
        }
        out
    }
}

// ---- phase 1 and 2: the bare loops ----

struct Creds {
    url: String,
    id: String,
    secret: String,
}

/// What a token response says (the token itself stays in memory only).
struct Grant {
    access_token: String,
    expires_in: i64,
    scope: Option<String>,
}

async fn grant(http: &reqwest::Client, c: &Creds) -> Result<Grant> {
    let resp = http
        .post(&c.url)
        .form(&[("grant_type", "client_credentials"), ("client_id", &c.id), ("client_secret", &c.secret)])
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("token request for {} failed: HTTP {status}", c.id).into());
    }
    let body: Value = resp.json().await?;
    Ok(Grant {
        access_token: body["access_token"].as_str().ok_or("no access_token in the token response")?.to_owned(),
        expires_in: body["expires_in"].as_i64().unwrap_or(300),
        scope: body["scope"].as_str().map(str::to_owned),
    })
}

/// Grants until Keycloak's rate levels off (a fresh JVM is several times slower at first).
async fn warm_up(http: &reqwest::Client, creds: &Creds) {
    let t = Instant::now();
    let mut previous = 0.0;
    for round in 1.. {
        let (ok, _) = grant_loop(http, creds, GRANT_WARMUP).await;
        let rate = ok as f64 / GRANT_WARMUP.as_secs_f64();
        if (round >= 3 && rate < previous * 1.1) || t.elapsed() > GRANT_WARMUP_MAX {
            log(format!(
                "  Keycloak warmed up in {:.0}s ({rate:.0} grants/s in the last round)",
                t.elapsed().as_secs_f64()
            ));
            return;
        }
        previous = rate;
    }
}

/// Keycloak's grant rate over [`GRANT_WINDOW`]: grants per second, and the run as JSON.
async fn keycloak_rate(http: &reqwest::Client, creds: &Creds) -> Result<(f64, Value)> {
    let t = Instant::now();
    let (ok, failed) = grant_loop(http, creds, GRANT_WINDOW).await;
    let secs = t.elapsed().as_secs_f64();
    if ok == 0 {
        return Err(format!("Keycloak granted no token in {secs:.1}s ({failed} requests failed)").into());
    }
    let rate = ok as f64 / secs;
    log(format!("  {ok} grants in {secs:.1}s ({failed} failed): {rate:.0} grants/s"));
    let run = json!({
        "concurrency": BARE_CONCURRENCY, "seconds": secs, "grants": ok, "failed": failed, "grants_per_second": rate,
    });
    Ok((rate, run))
}

/// Grants in a loop on [`BARE_CONCURRENCY`] keep-alive connections for `length`: (ok, failed).
async fn grant_loop(http: &reqwest::Client, c: &Creds, length: Duration) -> (u64, u64) {
    let deadline = Instant::now() + length;
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let worker = || async {
        while Instant::now() < deadline {
            match grant(http, c).await {
                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
        }
    };
    futures::future::join_all((0..BARE_CONCURRENCY).map(|_| worker())).await;
    (ok.into_inner(), failed.into_inner())
}

/// For each of N objects (created first, no operator running): one grant, one Secret apply and
/// one status apply, [`BARE_CONCURRENCY`] at a time. Returns objects per second.
async fn bare_loop(
    cfg: &Config,
    kube: &Kube,
    kc: &Keycloak,
    http: &reqwest::Client,
    round: usize,
) -> Result<(f64, Value)> {
    let bare = kc.create_client(REALM, &format!("bench-bare-{round}"), Some(LONG_LIFESPAN), true).await?;
    let namespaces = cfg.namespaces(&format!("bench-bare{round}"));
    for ns in &namespaces {
        k8s::create_namespace(&kube.client, ns).await?;
    }
    let objects: Vec<(String, String)> =
        (0..cfg.n).map(|i| (namespaces[i % cfg.k].clone(), format!("ra-{i:05}"))).collect();
    let spec = json!({
        "server": kc.base_url, "realm": REALM, "clientId": bare.client_id, "clientSecretRef": {"name": "creds"},
    });
    let t = Instant::now();
    let created = create_ras(kube, &objects, &spec, "bare").await?;
    log(format!("  created {} RegistryAccess objects in {:.1}s", cfg.n, t.elapsed().as_secs_f64()));
    let creds = Creds { url: kc.token_url(REALM), id: bare.client_id.clone(), secret: bare.secret.clone() };
    let t = Instant::now();
    futures::stream::iter(created.iter().map(|(ns, name, uid)| bare_one(kube, http, &creds, ns, name, uid)))
        .buffer_unordered(BARE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    let rate = cfg.n as f64 / secs;
    log(format!("  {} objects in {secs:.1}s: {rate:.0} objects/s", cfg.n));
    let run = json!({
        "concurrency": BARE_CONCURRENCY, "objects": cfg.n, "seconds": secs, "objects_per_second": rate,
    });
    // Gone before the operator (watching all namespaces) starts; Secrets first, so that the
    // garbage collector has nothing left to do.
    let t = Instant::now();
    for ns in &namespaces {
        let secrets: Api<Secret> = Api::namespaced(kube.client.clone(), ns);
        secrets.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
        let ras = kube.ras(ns);
        ras.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    }
    for ns in &namespaces {
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(kube.client.clone());
        api.delete(ns, &DeleteParams::default()).await?;
    }
    log(format!("  bare-loop objects deleted in {:.1}s", t.elapsed().as_secs_f64()));
    Ok((rate, run))
}

/// One object of the bare loop: what the operator does for a first token, minus its reads.
async fn bare_one(kube: &Kube, http: &reqwest::Client, creds: &Creds, ns: &str, name: &str, uid: &str) -> Result<()> {
    let issued = Timestamp::now();
    let g = grant(http, creds).await?;
    let expires = issued + jiff::SignedDuration::from_secs(g.expires_in);
    let renew = expires - jiff::SignedDuration::from_secs(g.expires_in / 3);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secret_name = format!("{name}-token");
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name,
            "namespace": ns,
            "labels": {"app.kubernetes.io/managed-by": BENCH_MANAGER},
            "annotations": {
                "registry-access.io/expires-at": rfc3339(expires),
                "registry-access.io/issued-at": rfc3339(issued),
                "registry-access.io/token-sha256": digest(&g.access_token),
                "registry-access.io/scope": g.scope.clone().unwrap_or_default(),
            },
            "ownerReferences": [{
                "apiVersion": kube.ra.api_version, "kind": kube.ra.kind, "name": name, "uid": uid,
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "type": "Opaque",
        "data": {
            "access_token": b64(&g.access_token),
            "token_type": b64("Bearer"),
            "expires_at": b64(&rfc3339(expires)),
            "authorization": b64(&format!("Bearer {}", g.access_token)),
        },
    });
    let apply = PatchParams::apply(BENCH_MANAGER).force();
    Api::<Secret>::namespaced(kube.client.clone(), ns).patch(&secret_name, &apply, &Patch::Apply(&secret)).await?;
    let status = json!({
        "apiVersion": kube.ra.api_version,
        "kind": kube.ra.kind,
        "status": {
            "observedGeneration": 1,
            "secretName": secret_name,
            "issuedAt": rfc3339(issued),
            "expiresAt": rfc3339(expires),
            "renewAt": rfc3339(renew),
            "scope": g.scope,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "TokenValid", "observedGeneration": 1,
                "message": format!("Secret {secret_name} holds a token valid until {}", rfc3339(expires)),
                "lastTransitionTime": rfc3339(issued),
            }],
        },
    });
    kube.ras(ns).patch_status(name, &apply, &Patch::Apply(&status)).await?;
    Ok(())
}

// ---- phase 5: routine refreshes ----

struct Refresh {
    objects: usize,
    refreshes: u64,
    short_refreshes: u64,
    grants: usize,
    secret_writes: u64,
    ra_writes: u64,
    secret_gets: u64,
    cpu_secs: f64,
    writes_per: Option<f64>,
    gets_per: Option<f64>,
    grants_per: Option<f64>,
    cpu_ms_per: Option<f64>,
    /// CPU per refresh above the idle baseline.
    cpu_ms_net: Option<f64>,
    lag: String,
    json: Value,
}

/// Adds short-lived objects beside the long-lived ones and measures a window of their routine
/// refreshes: apiserver requests, Keycloak grants, token changes, operator CPU and renewal lag.
async fn refresh_window(
    cfg: &Config,
    kube: &Kube,
    kc: &Keycloak,
    namespaces: &[String],
    op: &mut Operator,
    probe_port: u16,
    idle_cpu_rate: Option<f64>,
) -> Result<Refresh> {
    let s = cfg.short.min(cfg.n);
    let short = kc.create_client(REALM, "bench-short", Some(cfg.short_lifespan), true).await?;
    for ns in namespaces {
        k8s::put_client_secret(&kube.client, ns, "creds-short", &[("client_secret", &short.secret)]).await?;
    }
    let objects: Vec<(String, String)> =
        (0..s).map(|i| (namespaces[i % namespaces.len()].clone(), format!("short-{i:05}"))).collect();
    let spec = json!({
        "server": kc.base_url, "realm": REALM, "clientId": short.client_id, "clientSecretRef": {"name": "creds-short"},
    });
    create_ras(kube, &objects, &spec, "short").await?;
    let t0 = Instant::now();
    let w = wait_ready(kube, "short", &per_namespace(&objects), None, Duration::from_secs(180), t0, op).await?;
    log(format!("  {s} objects with {}s tokens: {}", cfg.short_lifespan, w.describe()));

    // Token changes: [all, of the short-lived objects].
    let changes = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let synced = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn(watch_token_changes(kube.client.clone(), changes.clone(), synced.clone()));
    let t = Instant::now();
    while !synced.load(Ordering::SeqCst) {
        if t.elapsed() > Duration::from_secs(120) {
            return Err("the watch of token Secrets did not sync in 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the first issuance's trailing writes (status, Events) pass; the first renewal comes
    // no earlier than about two thirds of the lifetime after issuance.
    let settle = Duration::from_secs(u64::from(cfg.short_lifespan) / 3).min(Duration::from_secs(30));
    tokio::time::sleep(settle.saturating_sub(t0.elapsed())).await;

    let http = reqwest::Client::new();
    let scrape = |http: reqwest::Client| async move {
        http.get(format!("http://127.0.0.1:{probe_port}/metrics")).send().await?.text().await
    };
    let pid = op.pid().ok_or("operator is not running")?;
    let (api_before, op_before, cpu_before) =
        (apiserver_requests(&kube.client).await?, scrape(http.clone()).await?, cpu_ticks(pid)?);
    let load = |c: &[AtomicU64; 2]| [c[0].load(Ordering::SeqCst), c[1].load(Ordering::SeqCst)];
    let (changes_before, wall_before) = (load(&changes), Timestamp::now());
    log(format!("  measuring {}s of routine refreshes...", cfg.window.as_secs()));
    tokio::time::sleep(cfg.window).await;
    let (changes_after, wall_after) = (load(&changes), Timestamp::now());
    let window_secs = (wall_after.as_millisecond() - wall_before.as_millisecond()) as f64 / 1000.0;
    let cpu_after = cpu_ticks(pid)?;
    let op_after = scrape(http.clone()).await?;
    let api_after = apiserver_requests(&kube.client).await?;
    watch.abort();
    op.check_alive()?;

    let (from, to) = (wall_before.as_millisecond(), wall_after.as_millisecond());
    let mut grants = 0;
    for id in ["bench-op", short.client_id.as_str()] {
        grants += kc.grant_times(REALM, id).await?.into_iter().filter(|t| (from..to).contains(t)).count();
    }
    let d = delta(&api_before, &api_after);
    let refreshes = changes_after[0] - changes_before[0];
    let short_refreshes = changes_after[1] - changes_before[1];
    let (secret_writes, ra_writes) = (writes(&d, "secrets"), writes(&d, "registryaccesses"));
    let secret_gets = count(&d, "secrets", None, "GET");
    let cpu_secs = (cpu_after - cpu_before) as f64 / clock_ticks();
    let per = |v: f64| (refreshes > 0).then(|| v / refreshes as f64);
    let lag = renewal_lag(&op_before, &op_after);
    let lag_text = match &lag {
        Some(l) => format!(
            "{:.2} s mean / <= {} s max bucket ({} renewals)",
            l.mean,
            l.max_bucket.map(|b| format!("{b}")).unwrap_or_else(|| "+Inf".into()),
            l.count
        ),
        None => "n/a".to_owned(),
    };
    let r = Refresh {
        objects: s,
        refreshes,
        short_refreshes,
        grants,
        secret_writes,
        ra_writes,
        secret_gets,
        cpu_secs,
        writes_per: per((secret_writes + ra_writes) as f64),
        gets_per: per(secret_gets as f64),
        grants_per: per(grants as f64),
        cpu_ms_per: per(cpu_secs * 1000.0),
        cpu_ms_net: idle_cpu_rate.and_then(|rate| per((cpu_secs - rate * window_secs).max(0.0) * 1000.0)),
        lag: lag_text,
        json: Value::Null,
    };
    log(format!(
        "  {refreshes} refreshes, {grants} grants, {secret_writes} Secret + {ra_writes} RegistryAccess writes, {secret_gets} Secret GETs, {cpu_secs:.2} s CPU; lag {}",
        r.lag
    ));
    let json = json!({
        "objects": s, "lifespan_seconds": cfg.short_lifespan, "window_seconds": cfg.window.as_secs(),
        "refreshes": refreshes, "short_lived_refreshes": short_refreshes, "keycloak_grants": grants,
        "secret_writes": secret_writes, "registryaccess_writes": ra_writes, "event_writes": writes(&d, "events"),
        "secret_gets": secret_gets, "operator_cpu_seconds": cpu_secs,
        "writes_per_refresh": r.writes_per, "secret_gets_per_refresh": r.gets_per,
        "grants_per_refresh": r.grants_per, "cpu_ms_per_refresh": r.cpu_ms_per,
        "cpu_ms_per_refresh_above_idle": r.cpu_ms_net, "settle_seconds": settle.as_secs(),
        "renewal_lag": lag.map(|l| json!({
            "count": l.count, "mean_seconds": l.mean, "max_bucket_seconds": l.max_bucket,
        })),
        "apiserver_requests": breakdown(&d),
    });
    Ok(Refresh { json, ..r })
}

/// Counts changes of the `access_token` of the operator's token Secrets (by digest), after the
/// initial listing; sets `synced` once listed.
async fn watch_token_changes(client: Client, changes: Arc<[AtomicU64; 2]>, synced: Arc<AtomicBool>) {
    let api: Api<Secret> = Api::all(client);
    let mut seen: HashMap<String, String> = HashMap::new();
    let stream = watcher(api, watcher::Config::default().labels(MANAGED_BY));
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let (s, initial) = match event {
            Ok(watcher::Event::Apply(s)) => (s, false),
            Ok(watcher::Event::InitApply(s)) => (s, true),
            Ok(watcher::Event::InitDone) => {
                synced.store(true, Ordering::SeqCst);
                continue;
            }
            _ => continue,
        };
        let name = s.metadata.name.as_deref().unwrap_or_default();
        let key = format!("{}/{name}", s.metadata.namespace.as_deref().unwrap_or_default());
        let token = s.data.as_ref().and_then(|d| d.get("access_token")).map(|v| digest_bytes(&v.0)).unwrap_or_default();
        let previous = seen.insert(key, token.clone());
        if !initial && previous.is_some_and(|p| p != token) {
            changes[0].fetch_add(1, Ordering::SeqCst);
            if name.starts_with("short-") {
                changes[1].fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

struct Lag {
    count: f64,
    mean: f64,
    max_bucket: Option<f64>,
}

/// The renewal lag histogram's change between two scrapes (summed over any labels), if the
/// operator has the metric.
fn renewal_lag(before: &str, after: &str) -> Option<Lag> {
    let (s0, c0, b0) = read_histogram(before, LAG_METRIC).unwrap_or_default();
    let (s1, c1, b1) = read_histogram(after, LAG_METRIC)?;
    let count = c1 - c0;
    if count <= 0.0 {
        return Some(Lag { count: 0.0, mean: 0.0, max_bucket: None });
    }
    // The smallest bucket that holds every observation of the window: an upper bound of the max.
    let max_bucket = b1
        .iter()
        .filter(|(le, _)| le.is_finite())
        .find(|(le, v)| *v - b0.iter().find(|(l, _)| l == le).map(|(_, v)| *v).unwrap_or(0.0) >= count)
        .map(|(le, _)| *le);
    Some(Lag { count, mean: (s1 - s0) / count, max_bucket })
}

/// A histogram's sum, count and cumulative buckets `(le, count)`.
type Histogram = (f64, f64, Vec<(f64, f64)>);

/// A histogram's sum, count and cumulative buckets `(le, count)` in ascending `le`, each summed
/// over the label sets; `None` when the text has no such histogram.
fn read_histogram(text: &str, name: &str) -> Option<Histogram> {
    let mut found = false;
    let (mut sum, mut count) = (0.0, 0.0);
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.find('}') {
            Some(i) => (&line[..=i], &line[i + 1..]),
            None => line.split_at(line.find(' ').unwrap_or(line.len())),
        };
        let Some(value) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let metric = series.split('{').next().unwrap_or_default();
        match metric.strip_prefix(name) {
            Some("_sum") => sum += value,
            Some("_count") => {
                found = true;
                count += value;
            }
            Some("_bucket") => {
                let Some(le) = parse_labels(series.split_once('{')?.1.trim_end_matches('}')).remove("le") else {
                    continue;
                };
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                match buckets.iter_mut().find(|(l, _)| *l == le) {
                    Some((_, v)) => *v += value,
                    None => buckets.push((le, value)),
                }
            }
            _ => {}
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    found.then_some((sum, count, buckets))
}

// ---- RegistryAccess objects ----

/// The admin client and the RegistryAccess resource, which travel together.
struct Kube {
    client: Client,
    ra: ApiResource,
}

impl Kube {
    /// RegistryAccess objects of a namespace, untyped (the bench reads status fields by name).
    fn ras(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &self.ra)
    }
}

fn ra_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("registry-access.io", "v1alpha1", "RegistryAccess"),
        "registryaccesses",
    )
}

/// Creates RegistryAccess objects with `spec` and the set label; returns (namespace, name, uid).
async fn create_ras(
    kube: &Kube,
    objects: &[(String, String)],
    spec: &Value,
    set: &str,
) -> Result<Vec<(String, String, String)>> {
    futures::stream::iter(objects.iter().map(|(ns, name)| async move {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": kube.ra.api_version,
            "kind": kube.ra.kind,
            "metadata": {"name": name, "namespace": ns, "labels": {SET_LABEL: set}},
            "spec": spec,
        }))?;
        let api = kube.ras(ns);
        let created = api.create(&PostParams::default(), &obj).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
            ns.clone(),
            name.clone(),
            created.metadata.uid.unwrap_or_default(),
        ))
    }))
    .buffer_unordered(SETUP_CONCURRENCY)
    .try_collect()
    .await
}

fn per_namespace(objects: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (ns, _) in objects {
        *m.entry(ns.clone()).or_insert(0) += 1;
    }
    m
}

/// True when the object's Ready condition is True and, with `since`, its token was issued then
/// or later (status.issuedAt, else expiresAt minus the long lifespan).
fn ready(obj: &DynamicObject, since: Option<Timestamp>) -> bool {
    let status = &obj.data["status"];
    let is_ready = status["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
    let fresh = match since {
        None => true,
        Some(since) => {
            let at = |k: &str| status[k].as_str().and_then(|s| s.parse::<Timestamp>().ok());
            let issued = at("issuedAt")
                .or_else(|| at("expiresAt").map(|e| e - jiff::SignedDuration::from_secs(i64::from(LONG_LIFESPAN))));
            issued.is_some_and(|i| i.as_second() >= since.as_second())
        }
    };
    is_ready && fresh
}

/// Ready objects of a set over the namespaces, one LIST per namespace.
async fn count_ready(kube: &Kube, set: &str, namespaces: &[String], since: Option<Timestamp>) -> Result<usize> {
    let mut n = 0;
    for ns in namespaces {
        let api = kube.ras(ns);
        let list = api.list(&ListParams::default().labels(&format!("{SET_LABEL}={set}"))).await?;
        n += list.items.iter().filter(|o| ready(o, since)).count();
    }
    Ok(n)
}

/// The outcome of [`wait_ready`].
struct Waited {
    /// Seconds from the operator's start to all Ready (or to giving up).
    secs: f64,
    ready: usize,
    total: usize,
    /// Why not all objects became Ready (a timeout or a stall); `None` when they did.
    why: Option<String>,
}

impl Waited {
    /// Objects Ready per second.
    fn rate(&self) -> f64 {
        self.ready as f64 / self.secs
    }

    /// "12.3 s", or what stopped short of all Ready.
    fn describe(&self) -> String {
        match &self.why {
            None => format!("{:.1} s", self.secs),
            Some(why) => format!("NOT all Ready: {}/{} after {:.1} s ({why})", self.ready, self.total, self.secs),
        }
    }

    fn json(&self) -> Value {
        json!({"seconds": self.secs, "ready": self.ready, "total": self.total, "incomplete": self.why})
    }
}

/// Polls (a LIST per namespace not yet complete) until every object of the set is Ready, or
/// `timeout` passes, or the Ready count stands still for [`STALL`]. Fails when the operator exits.
async fn wait_ready(
    kube: &Kube,
    set: &str,
    expected: &BTreeMap<String, usize>,
    since: Option<Timestamp>,
    timeout: Duration,
    t0: Instant,
    op: &mut Operator,
) -> Result<Waited> {
    let total: usize = expected.values().sum();
    let mut pending: BTreeMap<String, usize> = expected.clone();
    let mut done = 0;
    let mut last_log = Instant::now();
    let (mut last_count, mut last_change) = (usize::MAX, Instant::now());
    let poll = Duration::from_millis(match total {
        0..=2000 => 250,
        2001..=5000 => 500,
        _ => 1000,
    });
    loop {
        let mut ready_now = done;
        for (ns, want) in pending.clone() {
            let api = kube.ras(&ns);
            let list = api.list(&ListParams::default().labels(&format!("{SET_LABEL}={set}"))).await?;
            let n = list.items.iter().filter(|o| ready(o, since)).count();
            if n >= want {
                pending.remove(&ns);
                done += want;
                ready_now += want;
            } else {
                ready_now += n;
            }
        }
        if pending.is_empty() {
            return Ok(Waited { secs: t0.elapsed().as_secs_f64(), ready: total, total, why: None });
        }
        op.check_alive()?;
        if ready_now != last_count {
            (last_count, last_change) = (ready_now, Instant::now());
        }
        let why = if t0.elapsed() > timeout {
            Some(format!("timed out after {:.0} s", timeout.as_secs_f64()))
        } else if last_change.elapsed() > STALL {
            Some(format!("no progress for {} s", STALL.as_secs()))
        } else {
            None
        };
        if let Some(why) = why {
            log(format!("  NOT all Ready: {ready_now}/{total} Ready, {why}; going on"));
            return Ok(Waited { secs: t0.elapsed().as_secs_f64(), ready: ready_now, total, why: Some(why) });
        }
        if last_log.elapsed() > Duration::from_secs(10) {
            log(format!("  {ready_now}/{total} Ready after {:.0}s", t0.elapsed().as_secs_f64()));
            last_log = Instant::now();
        }
        tokio::time::sleep(poll).await;
    }
}

async fn count_token_secrets(client: &Client, namespaces: &[String]) -> Result<usize> {
    let mut n = 0;
    for ns in namespaces {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        n += api.list_metadata(&ListParams::default().labels(MANAGED_BY)).await?.items.len();
    }
    Ok(n)
}

/// Seconds from `since` to the last grant after it.
fn grant_span(times: &[i64], since: Timestamp) -> Option<f64> {
    let from = since.as_millisecond();
    times.iter().rfind(|t| **t >= from).map(|last| (last - from) as f64 / 1000.0)
}

// ---- the operator process ----

/// Starts the operator binary with `args` (watching all namespaces), logging to `<name>.log` in
/// the environment's directory.
async fn start_operator(env: &Env, name: &str, args: &[String]) -> Result<Operator> {
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

struct ProcStat {
    cpu_ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
}

impl ProcStat {
    fn cpu_secs(&self) -> f64 {
        self.cpu_ticks as f64 / clock_ticks()
    }
    fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
    fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

fn proc_stat(op: &Operator) -> Result<ProcStat> {
    let pid = op.pid().ok_or("operator is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcStat { cpu_ticks: cpu_ticks(pid)?, rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:") })
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("unreadable /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok()).ok_or("unreadable /proc/<pid>/stat");
    Ok(field(14)? + field(15)?)
}

/// Clock ticks per second of /proc/<pid>/stat.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

// ---- kube-apiserver's request counts ----

/// apiserver_request_total summed by (resource, subresource, verb), for the resources measured.
type Requests = BTreeMap<(String, String, String), u64>;

async fn apiserver_requests(client: &Client) -> Result<Requests> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = Requests::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let labels = parse_labels(labels);
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let resource = get("resource");
        if !["secrets", "registryaccesses", "events"].contains(&resource.as_str()) {
            continue;
        }
        let v = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        *out.entry((resource, get("subresource"), get("verb"))).or_insert(0) += v;
    }
    Ok(out)
}

/// Prometheus labels `a="x",b="y"` (with `\"` and `\\` escapes).
fn parse_labels(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.extend(chars.next()),
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_owned(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

fn delta(before: &Requests, after: &Requests) -> Requests {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn count(d: &Requests, resource: &str, subresource: Option<&str>, verb: &str) -> u64 {
    d.iter()
        .filter(|((r, s, v), _)| r == resource && subresource.is_none_or(|x| x == s) && v == verb)
        .map(|(_, n)| n)
        .sum()
}

/// Writes to a resource, all subresources.
fn writes(d: &Requests, resource: &str) -> u64 {
    WRITE_VERBS.iter().map(|v| count(d, resource, None, v)).sum()
}

fn breakdown(d: &Requests) -> Value {
    let m: BTreeMap<String, u64> = d
        .iter()
        .map(|((r, s, v), n)| (if s.is_empty() { format!("{v} {r}") } else { format!("{v} {r}/{s}") }, *n))
        .collect();
    json!(m)
}

// ---- small helpers ----

fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn digest(s: &str) -> String {
    digest_bytes(s.as_bytes())[..32].to_owned()
}

fn digest_bytes(b: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).iter().map(|b| format!("{b:02x}")).collect()
}

/// nproc, CPU model and memory of this machine, and the load when the bench started.
fn machine() -> Value {
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
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
