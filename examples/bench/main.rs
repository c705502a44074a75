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
//! - `BENCH_KEYCLOAK_QUIET`: seconds of the quiet window that measures Keycloak's idle CPU rate
//!   (default 15), subtracted from its CPU per grant;
//! - `BENCH_RAISED_ARGS`: the operator flags of the raised-caps run, space-separated;
//! - `BENCH_OUT`: the JSON report (default `target/bench/bench.json`).
//!
//! A table goes to stdout, progress to stderr. No token or client secret is ever printed.
//!
//! This file holds the parameters, the order of the phases, the table and the JSON report; the
//! measuring is in the modules: [`baseline`] (the bare loops), [`operator`] (issuance, restart,
//! idle, memory), [`refresh`] (routine refreshes), [`pods`] (the pod nudge's writes and memory), [`measure`] (/proc, kube-apiserver's and the
//! operator's metrics), [`objects`] (the RegistryAccess objects) and [`env`] (the operator binary,
//! the machine, the versions).
#![forbid(unsafe_code)]

#[path = "../../tests/support/mod.rs"]
mod support;

mod baseline;
mod env;
mod measure;
mod objects;
mod operator;
mod pods;
mod refresh;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use registry_access_operator::secret::{MANAGED_BY_LABEL, MANAGER};
use serde_json::{Value, json};
use support::keycloak::REALM;
use support::{Env, Result, repo};

use crate::baseline::{BARE_CONCURRENCY, Creds, bare_loop, keycloak_rate, paced_grants, warm_up};
use crate::measure::{IdleRate, KeycloakGrants, PerGrant, keycloak_idle_rate};
use crate::objects::Kube;

/// Token lifespan of the objects measured for first issuance, restart and idle writes.
const LONG_LIFESPAN: u32 = 300;
/// Operator flags of the raised-caps run (each checked against `run --help`).
const RAISED_ARGS: &[&str] = &[
    "--max-requests-per-second-per-server=100000",
    "--max-requests-in-flight=64",
    "--max-requests-in-flight-per-namespace=64",
    "--max-requests-in-flight-per-server=64",
    "--concurrency=64",
];

/// Label selector of the operator's token Secrets.
fn managed_by() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGER}")
}

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
    keycloak_quiet: Duration,
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
            keycloak_quiet: Duration::from_secs(num("BENCH_KEYCLOAK_QUIET", 15)?.max(5)),
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
    env::check_operator(&cfg.raised)?;
    let machine = env::machine();
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
    let versions = env::versions(&env, &client).await;
    log(format!("environment up; {versions}"));
    let kube = Kube::new(client.clone());
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
    let kc_pid = kc.jvm_pid().ok_or("Keycloak's JVM is not running")?;
    warm_up(&http, &creds, kc_pid).await?;
    let (kc_rate1, kc_run1) = keycloak_rate(&http, &creds).await?;
    // Keycloak's CPU with nothing to do, subtracted from its CPU per grant below.
    let (kc_idle_rate, kc_idle) = keycloak_idle_rate(kc_pid, cfg.keycloak_quiet).await?;
    log(format!(
        "  Keycloak idle: {:.1} ms CPU per second outside JIT compiling ({:.2} s compiling) over {} s",
        kc_idle_rate.0 * 1000.0,
        kc_idle.jit_secs(),
        cfg.keycloak_quiet.as_secs()
    ));

    // The operator's work per object, as a bare loop.
    log("2/9 bare loop: grant + Secret apply + status apply per object...");
    let (bare_rate1, bare_run1, bare_kc1) = bare_loop(&cfg, &kube, kc, &http, 1).await?;

    // The operator with its default flags, N fresh objects.
    log("3/9 operator with default flags: N fresh objects...");
    let (fleet, op, default) = operator::first_issuance(&env, &cfg, &kube).await?;
    let (default_wait, default_stat, default_kc) = (default.wait, default.stat, default.keycloak);
    let default_pace = default.grant_rate;
    let (default_secs, default_rate) = (default_wait.secs, default_wait.rate());
    report.json["operator_default"] = default.json;

    // Every cap raised: the same objects issued again after their Secrets are deleted.
    log("4/9 operator with every cap raised: Secrets deleted, issued again...");
    let (op, raised) = operator::raised_caps(&env, &cfg, &kube, &fleet, op, bare_rate1).await?;
    let (raised_wait, raised_stat, raised_kc) = (raised.wait, raised.stat, raised.keycloak);
    let raised_rate = raised_wait.rate();
    report.json["operator_raised"] = raised.json;

    // A restart with valid tokens (back to the default flags, which the rest is measured with).
    log("5/9 restart with valid tokens: SIGTERM, start again (default flags)...");
    let (mut op, restart) = operator::restart(&env, &cfg, &kube, &fleet, op).await?;
    let (restart_grants, ready_after, min_ready) = (restart.grants, restart.ready_after, restart.min_ready);
    report.json["restart"] = restart.json;

    // Idle: long-lived tokens, nothing due.
    log(format!("6/9 idle writes over {}s...", cfg.idle.as_secs()));
    let idle = operator::idle(&cfg, &kube, &mut op).await?;
    let idle_writes = idle.writes;
    report.json["idle"] = idle.json;

    // Memory at steady state.
    let memory = operator::memory(&op, &default_stat, &raised_stat)?;
    let (steady, peak_mib) = (memory.steady, memory.peak_mib);
    report.json["memory"] = memory.json;

    // Routine refreshes: short-lived tokens for a subset, over a window.
    log("8/9 routine refresh cost...");
    let refresh =
        refresh::refresh_window(&cfg, &kube, kc, &fleet.namespaces, &mut op, fleet.probe_port, idle.cpu_rate).await?;
    log("8/9 (b) the pod nudge's cost: writes per refresh with and without it, memory per pod...");
    let pod_cost = pods::pod_cost(&kube, kc, &op, fleet.probe_port).await?;
    report.json["pods"] = pod_cost.json;
    let final_stat = measure::proc_stat(&op)?;
    let peak_mib = peak_mib.max(final_stat.hwm_mib());
    report.json["memory"]["peak_vm_hwm_mib"] = json!(peak_mib);
    report.json["memory"]["after_refresh_window_vm_rss_mib"] = json!(final_stat.rss_mib());
    op.check_alive()?;
    op.stop();
    drop(op);

    // 1 and 2 again, with no operator running: the machine is shared, so the baselines bracket
    // the operator runs and the faster of each pair is the one compared against.
    log("9/9 Keycloak's bare rate and the bare loop again; bare grants at the operator's pace...");
    let (kc_rate2, kc_run2) = keycloak_rate(&http, &creds).await?;
    let (bare_rate2, bare_run2, bare_kc2) = bare_loop(&cfg, &kube, kc, &http, 2).await?;
    // As many grants as the operator's default run made, at its pace (at most a minute of them):
    // Keycloak's CPU per grant depends on how fast grants come.
    let paced_kc = match default_pace {
        Some(rate) => {
            let count = default_kc.grants.min((rate * 60.0) as usize).max(1);
            Some(paced_grants(kc, &http, rate, count, "bench-paced").await?)
        }
        None => None,
    };
    let (kc_rate, bare_rate) = (kc_rate1.max(kc_rate2), bare_rate1.max(bare_rate2));
    let ratio = raised_rate / bare_rate;
    report.json["keycloak_bare"] = json!({"grants_per_second": kc_rate, "runs": [kc_run1, kc_run2]});
    report.json["bare_loop"] = json!({"objects_per_second": bare_rate, "runs": [bare_run1, bare_run2]});
    report.json["operator_raised"]["ratio_to_bare_loop"] = json!(ratio);

    // Keycloak's CPU per grant: the operator's against the bare loop's (the mean of its two runs,
    // which bracket the operator's in time, as Keycloak's JVM warms up), its idle rate
    // subtracted from each.
    let kc_cpu =
        KeycloakCpuPerGrant::new(kc_idle_rate, [&bare_kc1, &bare_kc2], &default_kc, &raised_kc, paced_kc.as_ref());
    let per_json = |p: Option<PerGrant>| json!(p.map(|p| json!({"all": p.all, "without_jit": p.without_jit})));
    let ratio_json = |p: Option<PerGrant>| json!({"all": kc_cpu.ratio(p, |p| p.all), "without_jit": kc_cpu.ratio(p, |p| p.without_jit)});
    report.json["keycloak_cpu_per_grant"] = json!({
        "idle": {"cpu_seconds_per_second_without_jit": kc_idle_rate.0, "window": kc_idle.json()},
        "ms": {
            "bare_loop": per_json(kc_cpu.bare), "operator_default": per_json(kc_cpu.default),
            "operator_raised": per_json(kc_cpu.raised), "bare_at_operator_pace": per_json(kc_cpu.paced),
        },
        "ratio_to_bare_loop": {
            "operator_default": ratio_json(kc_cpu.default), "operator_raised": ratio_json(kc_cpu.raised),
            "bare_at_operator_pace": ratio_json(kc_cpu.paced),
        },
        "runs": {
            "bare_loop": [bare_kc1.json(kc_idle_rate), bare_kc2.json(kc_idle_rate)],
            "operator_default": default_kc.json(kc_idle_rate),
            "operator_raised": raised_kc.json(kc_idle_rate),
            "bare_at_operator_pace": paced_kc.as_ref().map(|k| k.json(kc_idle_rate)),
        },
    });

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
    let grants = |k: &KeycloakGrants| format!("{} grants at {:.0}/s", k.grants, k.grant_rate());
    let kc_row = |p: Option<PerGrant>, what: String| match p {
        None => format!("n/a (no grant; {what})"),
        Some(p) => {
            let vs = |r: Option<f64>| r.map(|r| format!(" = {r:.2} x bare loop")).unwrap_or_default();
            format!(
                "{:.2} ms{} ({:.2} ms{} outside JIT compiling; {what})",
                p.all,
                vs(kc_cpu.ratio(Some(p), |p| p.all)),
                p.without_jit,
                vs(kc_cpu.ratio(Some(p), |p| p.without_jit)),
            )
        }
    };
    let run = |k: &KeycloakGrants| match k.per_grant(kc_idle_rate) {
        Some(p) => format!("{:.2} / {:.2} ms, {}", p.all, p.without_jit, grants(k)),
        None => "no grant".to_owned(),
    };
    t.row(
        "Keycloak CPU per grant, bare loop (mean of 2 runs, idle subtracted)",
        match kc_cpu.bare {
            Some(p) => format!(
                "{:.2} ms ({:.2} ms outside JIT compiling; runs: {}; {}; idle {:.1} ms/s)",
                p.all,
                p.without_jit,
                run(&bare_kc1),
                run(&bare_kc2),
                kc_idle_rate.0 * 1000.0
            ),
            None => "n/a (no grant)".to_owned(),
        },
        None,
    );
    t.row("Keycloak CPU per grant, operator, default flags", kc_row(kc_cpu.default, grants(&default_kc)), None);
    t.row("Keycloak CPU per grant, operator, every cap raised", kc_row(kc_cpu.raised, grants(&raised_kc)), None);
    t.row(
        "Keycloak CPU per grant, bare grants at the default run's pace",
        match &paced_kc {
            Some(k) => kc_row(kc_cpu.paced, grants(k)),
            None => "n/a (the default run's pace is unknown)".to_owned(),
        },
        None,
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
        "apiserver writes per refresh, 10 running pods mount the Secret: nudge on / off",
        format!(
            "{:.2} / {:.2} ({:.2} pod patches per refresh)",
            pod_cost.writes_with, pod_cost.writes_without, pod_cost.nudges_per
        ),
        Some(("one patch per pod", (pod_cost.nudges_per - 10.0).abs() < 0.05)),
    );
    t.row("Operator memory per pod followed (1,000 pods)", format!("{:.2} KiB", pod_cost.kib_per_pod), None);
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
        format!(
            "Keycloak CPU per grant = utime + stime of Keycloak's JVM (/proc/<pid>/stat) from the start to the end of a run (the bare loop's grant-and-write loop; the operator's start to all Ready; the paced grants), less Keycloak's idle rate (outside compiling, over a {} s quiet window after its warm-up) times the run's length, divided by the run's client's CLIENT_LOGIN events in Keycloak (its admin API is asked only after the reading). \"Outside JIT compiling\" leaves out the JVM's compiler threads (/proc/<pid>/task/*/stat): compiling is Keycloak's JVM warming up, which lands in whichever run is going on, most in the early and the long ones. The bare loop figure is the mean of its two runs (before and after the operator's; each run: in all / outside JIT compiling); the paced grants are bare grants (8 keep-alive connections, one client) spread evenly at the default run's pace, from its first to its last grant event.",
            cfg.keycloak_quiet.as_secs()
        ),
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

/// Keycloak's CPU per grant (its idle rate subtracted) under the bare loop, the operator, and
/// bare grants at the operator's pace.
struct KeycloakCpuPerGrant {
    bare: Option<PerGrant>,
    default: Option<PerGrant>,
    raised: Option<PerGrant>,
    paced: Option<PerGrant>,
}

impl KeycloakCpuPerGrant {
    fn new(
        idle: IdleRate,
        bare: [&KeycloakGrants; 2],
        default: &KeycloakGrants,
        raised: &KeycloakGrants,
        paced: Option<&KeycloakGrants>,
    ) -> Self {
        // The mean of the two bare runs: they bracket the operator's runs, and Keycloak's JVM is
        // warmer at the second (less compiling, more of its code compiled).
        let runs: Vec<PerGrant> = bare.iter().filter_map(|k| k.per_grant(idle)).collect();
        let n = runs.len() as f64;
        let bare = (!runs.is_empty()).then(|| PerGrant {
            all: runs.iter().map(|p| p.all).sum::<f64>() / n,
            without_jit: runs.iter().map(|p| p.without_jit).sum::<f64>() / n,
        });
        Self {
            bare,
            default: default.per_grant(idle),
            raised: raised.per_grant(idle),
            paced: paced.and_then(|k| k.per_grant(idle)),
        }
    }

    /// A figure against the bare loop's.
    fn ratio(&self, p: Option<PerGrant>, figure: impl Fn(PerGrant) -> f64) -> Option<f64> {
        Some(figure(p?) / self.bare.map(&figure).filter(|b| *b > 0.0)?)
    }
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
