//! The operator on N long-lived objects: first issuance with its default flags and with every cap
//! raised, a restart with valid tokens, its writes and CPU while idle, and its memory at rest.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use serde_json::{Value, json};

use crate::env::start_operator;
use crate::measure::{
    KeycloakCpu, KeycloakGrants, ProcStat, apiserver_requests, breakdown, clock_ticks, cpu_ticks, delta, grant_span,
    proc_stat, writes,
};
use crate::objects::{self, Kube, Waited, count_ready, count_token_secrets, create_ras, per_namespace, wait_ready};
use crate::support::keycloak::REALM;
use crate::support::operator::Operator;
use crate::support::process::free_port;
use crate::support::{Env, Result, k8s};
use crate::{Config, LONG_LIFESPAN, log, managed_by};

/// The long-lived objects the operator runs are measured on, and what those runs share.
pub struct Fleet {
    pub namespaces: Vec<String>,
    /// The Keycloak client of the objects.
    client_id: String,
    /// Objects per namespace.
    expected: BTreeMap<String, usize>,
    /// The operator's flags of every run but the raised-caps one.
    pub base_args: Vec<String>,
    /// Where the operator serves its metrics.
    pub probe_port: u16,
    /// How long to wait for all Ready.
    timeout: Duration,
}

/// A run from the operator's start to all objects Ready (or to giving up).
pub struct Issued {
    pub wait: Waited,
    /// The operator's CPU and memory when all were Ready.
    pub stat: ProcStat,
    /// Keycloak's CPU from the operator's start to all Ready, and the grants it recorded then.
    pub keycloak: KeycloakGrants,
    /// The operator's pace: grants per second from Keycloak's first to its last grant event.
    pub grant_rate: Option<f64>,
    pub json: Value,
}

/// Creates the N objects and starts the operator with its default flags; measures until all are
/// Ready. The operator is left running.
pub async fn first_issuance(env: &Env, cfg: &Config, kube: &Kube) -> Result<(Fleet, Operator, Issued)> {
    let (client, kc) = (&kube.client, &env.keycloak);
    let op_client = kc.create_client(REALM, "bench-op", Some(LONG_LIFESPAN), true).await?;
    let namespaces = cfg.namespaces("bench");
    let t = Instant::now();
    for ns in &namespaces {
        k8s::create_namespace(client, ns).await?;
        k8s::put_client_secret(client, ns, "creds", &[("client_secret", &op_client.secret)]).await?;
    }
    let objects = objects::spread(&namespaces, cfg.n, "ra");
    let spec = objects::spec(kc, &op_client.client_id, "creds");
    create_ras(kube, &objects, &spec, "long").await?;
    log(format!("  created {} RegistryAccess objects in {:.1}s", cfg.n, t.elapsed().as_secs_f64()));
    let probe_port = free_port()?;
    let base_args = vec![format!("--probe-addr=127.0.0.1:{probe_port}"), "--log-level=info".to_owned()];
    let expected = per_namespace(&objects);
    let timeout = Duration::from_secs(120 + cfg.n as u64 / 5);
    let kc_before = KeycloakCpu::read(kc.jvm_pid().ok_or("Keycloak is not running")?)?;
    let (t0, since) = (Instant::now(), Timestamp::now());
    let mut op = start_operator(env, "operator-default", &base_args).await?;
    let wait = wait_ready(kube, "long", &expected, None, timeout, t0, &mut op).await?;
    // Keycloak's CPU is read before its admin API is asked for the grants.
    let kc_cpu = kc_before.since()?;
    let grants = kc.grant_times(REALM, &op_client.client_id).await?;
    let keycloak = KeycloakGrants { cpu: kc_cpu, grants: grants.len() };
    let grant_rate = pace(&grants);
    let stat = proc_stat(&op)?;
    log(format!("  {} ({:.1} objects/s)", wait.describe(), wait.rate()));
    let json = json!({
        "args": base_args,
        "seconds_to_all_ready": wait.why.is_none().then_some(wait.secs),
        "objects_per_second": wait.rate(),
        "wait": wait.json(),
        "keycloak_grants": grants.len(), "keycloak_grant_span_seconds": grant_span(&grants, since),
        "cpu_seconds": stat.cpu_secs(), "vm_hwm_mib": stat.hwm_mib(),
    });
    let fleet = Fleet { namespaces, client_id: op_client.client_id, expected, base_args, probe_port, timeout };
    Ok((fleet, op, Issued { wait, stat, keycloak, grant_rate, json }))
}

/// Every cap raised: stops `op`, deletes the token Secrets and starts the operator with the raised
/// flags; measures until all objects hold a token issued by it. The operator is left running.
pub async fn raised_caps(
    env: &Env,
    cfg: &Config,
    kube: &Kube,
    fleet: &Fleet,
    mut op: Operator,
    bare_rate: f64,
) -> Result<(Operator, Issued)> {
    let kc = &env.keycloak;
    op.stop();
    for ns in &fleet.namespaces {
        let secrets: Api<Secret> = Api::namespaced(kube.client.clone(), ns);
        secrets.delete_collection(&DeleteParams::default(), &ListParams::default().labels(&managed_by())).await?;
    }
    let left = count_token_secrets(&kube.client, &fleet.namespaces).await?;
    if left != 0 {
        return Err(format!("{left} token Secrets left after deletecollection").into());
    }
    let mut raised_args = fleet.base_args.clone();
    raised_args.extend(cfg.raised.iter().cloned());
    let grants_before = kc.grants(REALM, &fleet.client_id).await?;
    // Tokens of this run are told from the previous run's by status.issuedAt (whole seconds):
    // let the clock pass into a later second than any of them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let kc_before = KeycloakCpu::read(kc.jvm_pid().ok_or("Keycloak is not running")?)?;
    let (t0, since) = (Instant::now(), Timestamp::now());
    let mut op = start_operator(env, "operator-raised", &raised_args).await?;
    let wait = wait_ready(kube, "long", &fleet.expected, Some(since), fleet.timeout, t0, &mut op).await?;
    let kc_cpu = kc_before.since()?;
    let grants = kc.grant_times(REALM, &fleet.client_id).await?;
    let keycloak = KeycloakGrants { cpu: kc_cpu, grants: grants.len().saturating_sub(grants_before) };
    let grant_rate = pace(&grants[grants_before.min(grants.len())..]);
    let stat = proc_stat(&op)?;
    log(format!(
        "  {} ({:.1} objects/s, {:.2} x the first bare loop)",
        wait.describe(),
        wait.rate(),
        wait.rate() / bare_rate
    ));
    let json = json!({
        "args": raised_args,
        "seconds_to_all_ready": wait.why.is_none().then_some(wait.secs),
        "objects_per_second": wait.rate(),
        "wait": wait.json(),
        "keycloak_grants": grants.len() - grants_before,
        "keycloak_grant_span_seconds": grant_span(&grants, since),
        "cpu_seconds": stat.cpu_secs(), "vm_hwm_mib": stat.hwm_mib(),
    });
    Ok((op, Issued { wait, stat, keycloak, grant_rate, json }))
}

/// Grants per second from the first to the last of sorted grant times (Unix milliseconds).
fn pace(times: &[i64]) -> Option<f64> {
    let (first, last) = (times.first()?, times.last()?);
    (last > first).then(|| (times.len() - 1) as f64 * 1000.0 / (last - first) as f64)
}

/// What a restart with valid tokens cost.
pub struct Restart {
    /// Keycloak grants in the window after the restart.
    pub grants: usize,
    /// Ready objects at the end of the window, and the fewest seen during it.
    pub ready_after: usize,
    pub min_ready: usize,
    pub json: Value,
}

/// Stops `op` and starts the operator again with the default flags; counts grants and Ready
/// objects over the restart window. The operator is left running.
pub async fn restart(
    env: &Env,
    cfg: &Config,
    kube: &Kube,
    fleet: &Fleet,
    mut op: Operator,
) -> Result<(Operator, Restart)> {
    let kc = &env.keycloak;
    op.stop();
    drop(op);
    let grants_before = kc.grants(REALM, &fleet.client_id).await?;
    let mut op = start_operator(env, "operator-restarted", &fleet.base_args).await?;
    let t = Instant::now();
    let mut min_ready = usize::MAX;
    while t.elapsed() < cfg.restart_wait {
        tokio::time::sleep(Duration::from_secs(5).min(cfg.restart_wait)).await;
        op.check_alive()?;
        min_ready = min_ready.min(count_ready(kube, "long", &fleet.namespaces, None).await?);
    }
    let grants = kc.grants(REALM, &fleet.client_id).await? - grants_before;
    let ready_after = count_ready(kube, "long", &fleet.namespaces, None).await?;
    min_ready = min_ready.min(ready_after);
    log(format!(
        "  {grants} grants in {}s after the restart; {ready_after}/{} Ready (lowest seen {min_ready})",
        cfg.restart_wait.as_secs(),
        cfg.n
    ));
    let json = json!({
        "seconds": cfg.restart_wait.as_secs(), "keycloak_grants": grants,
        "ready_after": ready_after, "lowest_ready_seen": min_ready, "objects": cfg.n,
    });
    Ok((op, Restart { grants, ready_after, min_ready, json }))
}

/// The operator with nothing due.
pub struct Idle {
    /// Writes to secrets and registryaccesses.
    pub writes: u64,
    /// CPU seconds per second with nothing due: the baseline of the refresh window's CPU.
    pub cpu_rate: Option<f64>,
    pub json: Value,
}

/// Long-lived tokens, nothing due: the operator's apiserver writes and CPU over the idle window.
pub async fn idle(cfg: &Config, kube: &Kube, op: &mut Operator) -> Result<Idle> {
    let client = &kube.client;
    let pid = op.pid().ok_or("operator is not running")?;
    let (before, cpu_before) = (apiserver_requests(client).await?, cpu_ticks(pid)?);
    tokio::time::sleep(cfg.idle).await;
    op.check_alive()?;
    let (after, cpu_after) = (apiserver_requests(client).await?, cpu_ticks(pid)?);
    let idle = delta(&before, &after);
    let idle_writes = writes(&idle, "secrets") + writes(&idle, "registryaccesses");
    let idle_cpu = (cpu_after - cpu_before) as f64 / clock_ticks();
    let cpu_rate = (!cfg.idle.is_zero()).then(|| idle_cpu / cfg.idle.as_secs_f64());
    log(format!("  {idle_writes} writes to secrets and registryaccesses; operator CPU {idle_cpu:.2} s"));
    let json = json!({
        "seconds": cfg.idle.as_secs(), "writes": idle_writes, "event_writes": writes(&idle, "events"),
        "operator_cpu_seconds": idle_cpu, "apiserver_requests": breakdown(&idle),
    });
    Ok(Idle { writes: idle_writes, cpu_rate, json })
}

/// The operator's memory at rest.
pub struct Memory {
    pub steady: ProcStat,
    /// The highest VmHWM of the runs so far, in MiB.
    pub peak_mib: f64,
    pub json: Value,
}

/// The operator's memory now (after the idle window), and the peak over it and the two issuance
/// runs (`default` and `raised`: the operator's readings when they were all Ready).
pub fn memory(op: &Operator, default: &ProcStat, raised: &ProcStat) -> Result<Memory> {
    let steady = proc_stat(op)?;
    let peak_mib = [default.hwm_mib(), raised.hwm_mib(), steady.hwm_mib()].into_iter().fold(0.0, f64::max);
    log(format!("7/9 operator RSS {:.1} MiB at steady state, peak {peak_mib:.1} MiB", steady.rss_mib()));
    let json = json!({
        "steady_vm_rss_mib": steady.rss_mib(), "steady_vm_hwm_mib": steady.hwm_mib(), "peak_vm_hwm_mib": peak_mib,
        "peak_by_run": {
            "default": default.hwm_mib(), "raised": raised.hwm_mib(), "restarted": steady.hwm_mib(),
        },
    });
    Ok(Memory { steady, peak_mib, json })
}
