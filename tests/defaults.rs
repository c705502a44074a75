//! The chart's defaults are the operator's own: every value of `values.yaml` that the chart passes
//! as a flag has the default the binary's `--help` shows (which comes from the library's
//! constants), so a default changed in one place and not the other fails here.

use std::collections::BTreeMap;
use std::process::Command;

/// The `[default: ...]` of each long flag in `registry-access-operator run --help`.
fn binary_defaults() -> BTreeMap<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_registry-access-operator"))
        .args(["run", "--help"])
        .output()
        .expect("the operator binary runs");
    assert!(out.status.success(), "run --help failed");
    let help = String::from_utf8(out.stdout).expect("utf-8");
    let mut defaults = BTreeMap::new();
    let mut flag: Option<String> = None;
    for line in help.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("--") {
            flag = Some(rest.split([' ', '=', '<']).next().unwrap_or_default().to_owned());
        }
        if let (Some(f), Some(i)) = (&flag, line.find("[default: ")) {
            let value = &line[i + "[default: ".len()..];
            defaults.insert(f.clone(), value[..value.find(']').unwrap_or(value.len())].to_owned());
        }
    }
    defaults
}

fn value<'a>(values: &'a serde_yaml::Value, path: &str) -> &'a serde_yaml::Value {
    path.split('.').fold(values, |v, k| &v[k])
}

fn text(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

#[test]
fn the_charts_defaults_are_the_operators() {
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/registry-access-operator/values.yaml"))
            .expect("values.yaml"),
    )
    .expect("values.yaml is YAML");
    let defaults = binary_defaults();
    let pairs = [
        ("logLevel", "log-level"),
        ("concurrency", "concurrency"),
        ("connectTimeout", "connect-timeout"),
        ("requestTimeout", "request-timeout"),
        ("apiTimeout", "api-timeout"),
        ("tokenRequests.maxInFlight", "max-requests-in-flight"),
        ("tokenRequests.maxInFlightPerNamespace", "max-requests-in-flight-per-namespace"),
        ("tokenRequests.maxInFlightPerServer", "max-requests-in-flight-per-server"),
        ("tokenRequests.maxPerSecondPerServer", "max-requests-per-second-per-server"),
        ("leaderElection.leaseDuration", "leader-election-lease-duration"),
        ("leaderElection.renewGrace", "leader-election-renew-grace"),
        ("podNudge.enabled", "nudge-pods"),
    ];
    let differ: Vec<String> = pairs
        .iter()
        .filter_map(|(key, flag)| {
            let chart = text(value(&values, key));
            let binary = defaults.get(*flag).unwrap_or_else(|| panic!("--{flag} has no default in --help"));
            (&chart != binary).then(|| format!("{key}: {chart} in values.yaml, --{flag} defaults to {binary}"))
        })
        .collect();
    assert!(differ.is_empty(), "the chart's defaults differ from the operator's:\n{}", differ.join("\n"));
}
