//! What the bench reads off the processes it measures: the operator's CPU time and memory from
//! /proc, kube-apiserver's request counts from its metrics, the operator's renewal lag histogram,
//! and the span of Keycloak's grant events.

use std::collections::{BTreeMap, HashMap};

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
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
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
