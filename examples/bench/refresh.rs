//! The operator's routine refresh cost: short-lived objects added beside the long-lived ones, and
//! a window of their refreshes measured in apiserver requests, Keycloak grants, token changes,
//! operator CPU and renewal lag.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::{Api, Client};
use registry_access_operator::secret::{KEY_ACCESS_TOKEN, token_digest};
use serde_json::{Value, json};

use crate::measure::{apiserver_requests, breakdown, clock_ticks, count, cpu_ticks, delta, renewal_lag, writes};
use crate::objects::{self, Kube, create_ras, per_namespace, wait_ready};
use crate::support::keycloak::{Keycloak, REALM};
use crate::support::operator::Operator;
use crate::support::{Result, k8s};
use crate::{Config, log, managed_by};

pub struct Refresh {
    pub objects: usize,
    pub refreshes: u64,
    pub short_refreshes: u64,
    pub grants: usize,
    pub secret_writes: u64,
    pub ra_writes: u64,
    pub secret_gets: u64,
    pub cpu_secs: f64,
    pub writes_per: Option<f64>,
    pub gets_per: Option<f64>,
    pub grants_per: Option<f64>,
    pub cpu_ms_per: Option<f64>,
    /// CPU per refresh above the idle baseline.
    pub cpu_ms_net: Option<f64>,
    pub lag: String,
    pub json: Value,
}

/// Adds short-lived objects beside the long-lived ones and measures a window of their routine
/// refreshes: apiserver requests, Keycloak grants, token changes, operator CPU and renewal lag.
pub async fn refresh_window(
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
    let objects = objects::spread(namespaces, s, "short");
    let spec = objects::spec(kc, &short.client_id, "creds-short");
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
    let stream = watcher(api, watcher::Config::default().labels(&managed_by()));
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
        let token = s
            .data
            .as_ref()
            .and_then(|d| d.get(KEY_ACCESS_TOKEN))
            .map(|v| token_digest(&String::from_utf8_lossy(&v.0)))
            .unwrap_or_default();
        let previous = seen.insert(key, token.clone());
        if !initial && previous.is_some_and(|p| p != token) {
            changes[0].fetch_add(1, Ordering::SeqCst);
            if name.starts_with("short-") {
                changes[1].fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}
