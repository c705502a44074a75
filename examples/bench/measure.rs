//! What the bench reads off the processes it measures: the operator's and Keycloak's CPU time and
//! the operator's memory from /proc, kube-apiserver's request counts from its metrics, the
//! operator's renewal lag histogram, and the span of Keycloak's grant events.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::Client;
use serde_json::{Value, json};

use crate::support::Result;
use crate::support::operator::Operator;

/// apiserver_request_total verbs that write.
const WRITE_VERBS: &[&str] = &["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"];
/// The operator's renewal lag histogram (added by the controller rework; may be absent).
const LAG_METRIC: &str = "registry_access_renewal_lag_seconds";

// ---- the operator process, from /proc ----

pub struct ProcStat {
    cpu_ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
}

impl ProcStat {
    pub fn cpu_secs(&self) -> f64 {
        self.cpu_ticks as f64 / clock_ticks()
    }
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

pub fn proc_stat(op: &Operator) -> Result<ProcStat> {
    let pid = op.pid().ok_or("operator is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| kib(&status, key).unwrap_or(0);
    Ok(ProcStat { cpu_ticks: cpu_ticks(pid)?, rss_kib: kib("VmRSS:"), hwm_kib: kib("VmHWM:") })
}

/// The KiB figure of a `Key:   123 kB` line of a /proc file (/proc/<pid>/status, /proc/meminfo).
pub fn kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    cpu_ticks_of(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// utime + stime of each thread of a process, in clock ticks, by thread id, with its name.
fn thread_ticks(pid: u32) -> HashMap<u32, (String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return HashMap::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let (head, _) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1.to_owned();
        Some((tid, (name, cpu_ticks_of(&stat).ok()?)))
    })
    .collect()
}

/// utime + stime from the text of a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat.
fn cpu_ticks_of(stat: &str) -> Result<u64> {
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("unreadable /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok()).ok_or("unreadable /proc/<pid>/stat");
    Ok(field(14)? + field(15)?)
}

/// Clock ticks per second of /proc/<pid>/stat.
pub fn clock_ticks() -> f64 {
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

// ---- Keycloak's CPU (its JVM, from /proc) ----

/// A reading of Keycloak's CPU time, to be compared with a later one.
pub struct KeycloakCpu {
    pid: u32,
    at: Instant,
    ticks: u64,
    threads: HashMap<u32, (String, u64)>,
}

/// Keycloak's CPU over a stretch of time, and where it went.
#[derive(Clone, Debug)]
pub struct CpuUse {
    pub cpu_secs: f64,
    pub secs: f64,
    /// CPU seconds by kind of thread (request handling, HTTP I/O, JIT compiler, GC, other, and
    /// threads that ended within the stretch).
    pub by_thread: BTreeMap<&'static str, f64>,
    /// CPU seconds of the "other" threads by name (digits left out), those of 10 ms or more.
    pub other: BTreeMap<String, f64>,
}

/// The kind of JVM thread that compiles code (C1, C2 and the code cache sweeper).
const JIT: &str = "jit compiler";

/// What a JVM thread of Keycloak does, from its name.
fn thread_kind(name: &str) -> &'static str {
    if name.starts_with("executor-thread") {
        "requests (executor-thread)"
    } else if name.starts_with("vert.x-") {
        // Thread names are cut to 15 characters: "vert.x-eventloo", "vert.x-acceptor".
        "http i/o (vert.x)"
    } else if name.contains("CompilerThre") || name.starts_with("Sweeper") {
        JIT
    } else if name.starts_with("GC Thread") || name.starts_with("G1 ") || name.starts_with("VM Thread") {
        "gc and vm"
    } else {
        "other"
    }
}

impl KeycloakCpu {
    pub fn read(pid: u32) -> Result<Self> {
        Ok(Self { pid, at: Instant::now(), ticks: cpu_ticks(pid)?, threads: thread_ticks(pid) })
    }

    /// Keycloak's CPU since this reading.
    pub fn since(&self) -> Result<CpuUse> {
        let (secs, ticks, threads) = (self.at.elapsed().as_secs_f64(), cpu_ticks(self.pid)?, thread_ticks(self.pid));
        let cpu = |t: u64| t as f64 / clock_ticks();
        let mut by_thread: BTreeMap<&'static str, f64> = BTreeMap::new();
        let mut other: BTreeMap<String, f64> = BTreeMap::new();
        let mut live = 0;
        for (tid, (name, now)) in &threads {
            let before = self.threads.get(tid).filter(|(n, _)| n == name).map_or(0, |(_, t)| *t);
            let d = now.saturating_sub(before);
            live += d;
            let kind = thread_kind(name);
            *by_thread.entry(kind).or_insert(0.0) += cpu(d);
            if kind == "other" {
                *other.entry(name.replace(|c: char| c.is_ascii_digit(), "")).or_insert(0.0) += cpu(d);
            }
        }
        other.retain(|_, v| *v >= 0.01);
        let total = ticks.saturating_sub(self.ticks);
        by_thread.insert("threads that ended", cpu(total.saturating_sub(live)));
        Ok(CpuUse { cpu_secs: cpu(total), secs, by_thread, other })
    }
}

/// Keycloak's CPU rate with nothing to do, in CPU seconds per second, outside its JIT compiler
/// threads: its steady background (timers, expiry tasks, GC). Compiling is left out because it is
/// not steady: after a start it goes on while the JVM is idle too, and fades.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdleRate(pub f64);

/// Keycloak's CPU per grant in milliseconds, its idle rate subtracted: in all, and outside its
/// JIT compiler threads (compiling is the JVM warming up, which lands in whichever run is going
/// on when it happens, not a cost of each grant).
#[derive(Clone, Copy, Debug)]
pub struct PerGrant {
    pub all: f64,
    pub without_jit: f64,
}

impl CpuUse {
    /// CPU seconds of the JIT compiler threads.
    pub fn jit_secs(&self) -> f64 {
        self.by_thread.get(JIT).copied().unwrap_or(0.0)
    }

    /// CPU seconds per second over the stretch outside the JIT compiler threads.
    pub fn rate(&self) -> IdleRate {
        IdleRate((self.cpu_secs - self.jit_secs()) / self.secs.max(1e-9))
    }

    pub fn per_grant(&self, grants: usize, idle: IdleRate) -> Option<PerGrant> {
        let per = |cpu: f64| (cpu - idle.0 * self.secs).max(0.0) * 1000.0 / grants as f64;
        (grants > 0).then(|| PerGrant { all: per(self.cpu_secs), without_jit: per(self.cpu_secs - self.jit_secs()) })
    }

    pub fn json(&self) -> Value {
        json!({
            "seconds": self.secs, "cpu_seconds": self.cpu_secs, "cpu_seconds_by_thread": self.by_thread,
            "other_threads_cpu_seconds": self.other,
        })
    }
}

/// Keycloak's CPU over a stretch of grants, and the grants it recorded in it.
#[derive(Clone, Debug)]
pub struct KeycloakGrants {
    pub cpu: CpuUse,
    pub grants: usize,
}

impl KeycloakGrants {
    pub fn per_grant(&self, idle: IdleRate) -> Option<PerGrant> {
        self.cpu.per_grant(self.grants, idle)
    }

    /// Grants per second over the stretch.
    pub fn grant_rate(&self) -> f64 {
        self.grants as f64 / self.cpu.secs.max(1e-9)
    }

    pub fn json(&self, idle: IdleRate) -> Value {
        let per = self.per_grant(idle);
        let mut v = self.cpu.json();
        v["grants"] = json!(self.grants);
        v["grants_per_second"] = json!(self.grant_rate());
        v["idle_cpu_seconds_subtracted"] = json!(idle.0 * self.cpu.secs);
        v["cpu_ms_per_grant"] = json!(per.map(|p| p.all));
        v["cpu_ms_per_grant_without_jit"] = json!(per.map(|p| p.without_jit));
        v
    }
}

/// Keycloak's CPU rate while it has nothing to do, over `length`.
pub async fn keycloak_idle_rate(pid: u32, length: Duration) -> Result<(IdleRate, CpuUse)> {
    let before = KeycloakCpu::read(pid)?;
    tokio::time::sleep(length).await;
    let used = before.since()?;
    Ok((used.rate(), used))
}

// ---- kube-apiserver's request counts ----

/// apiserver_request_total summed by (resource, subresource, verb), for the resources measured.
pub type Requests = BTreeMap<(String, String, String), u64>;

pub async fn apiserver_requests(client: &Client) -> Result<Requests> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = Requests::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let labels = parse_labels(labels);
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let resource = get("resource");
        if !["secrets", "registryaccesses", "events", "pods"].contains(&resource.as_str()) {
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

pub fn delta(before: &Requests, after: &Requests) -> Requests {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

pub fn count(d: &Requests, resource: &str, subresource: Option<&str>, verb: &str) -> u64 {
    d.iter()
        .filter(|((r, s, v), _)| r == resource && subresource.is_none_or(|x| x == s) && v == verb)
        .map(|(_, n)| n)
        .sum()
}

/// Writes to a resource, all subresources.
pub fn writes(d: &Requests, resource: &str) -> u64 {
    WRITE_VERBS.iter().map(|v| count(d, resource, None, v)).sum()
}

pub fn breakdown(d: &Requests) -> Value {
    let m: BTreeMap<String, u64> = d
        .iter()
        .map(|((r, s, v), n)| (if s.is_empty() { format!("{v} {r}") } else { format!("{v} {r}/{s}") }, *n))
        .collect();
    json!(m)
}

// ---- Keycloak's grants (from its events) ----

/// Seconds from `since` to the last grant after it.
pub fn grant_span(times: &[i64], since: Timestamp) -> Option<f64> {
    let from = since.as_millisecond();
    times.iter().rfind(|t| **t >= from).map(|last| (last - from) as f64 / 1000.0)
}

// ---- the operator's renewal lag, from its metrics ----

pub struct Lag {
    pub count: f64,
    pub mean: f64,
    pub max_bucket: Option<f64>,
}

/// The renewal lag histogram's change between two scrapes (summed over any labels), if the
/// operator has the metric.
pub fn renewal_lag(before: &str, after: &str) -> Option<Lag> {
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
