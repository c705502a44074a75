//! What operators see: metrics and Events, and the chart's dashboard and alerts checked against the
//! live /metrics.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::support::case::*;
use crate::support::k8s::wait_condition;
use crate::support::{self, Env, Result};

/// Metrics and Events follow tokens and failures; routine refreshes write no Event.
pub async fn metrics_and_events_follow_tokens_and_failures(env: Arc<Env>) -> Result<()> {
    // 20 s tokens, read through the API here: no warning about the kubelet's sync period.
    let (c, port) = Case::with_metrics(env, "observe", &["--kubelet-sync-period=0s"]).await?;
    let (client_id, client) = c.client_with_creds("observe", Some(20)).await?;
    c.ra("obs", c.spec(c.kc(), &client_id, "creds")).await?;
    let status = c.ready("obs").await?;
    let expiry = status.expires_at.ok_or("no expiresAt")?.0.as_second();
    let ready = r#"registry_access_ready{namespace="e2e-observe",name="obs"}"#;
    let expiry_line = r#"registry_access_token_expiry_timestamp_seconds{namespace="e2e-observe",name="obs"}"#;
    let text = scrape_until(port, "the object ready", |t| sample(t, ready) == Some(1.0)).await?;
    assert!(sample(&text, expiry_line).is_some_and(|v| v as i64 >= expiry), "{text}");
    assert!(sample(&text, r#"registry_access_token_requests_total{result="success""#).is_some_and(|v| v >= 1.0));
    assert!(sample(&text, "registry_access_managed_objects").is_some_and(|v| v >= 1.0));
    assert!(sample(&text, "registry_access_reconciles_total").is_some_and(|v| v >= 1.0));
    assert!(sample(&text, "registry_access_keycloak_request_duration_seconds_count").is_some_and(|v| v >= 1.0));

    // A routine refresh moves the expiry gauge and writes no Event.
    let first = c.access_token("obs-token").await?;
    wait_until("a routine refresh", Duration::from_secs(30), || async {
        c.access_token("obs-token").await.unwrap_or_default() != first
    })
    .await?;
    scrape_until(port, "the expiry moved", |t| sample(t, expiry_line).is_some_and(|v| v as i64 > expiry)).await?;
    assert_eq!(events_of(&c).await?, vec![("Normal".to_owned(), "TokenIssued".to_owned())]);

    // Failing: counted by reason, one Warning Event however many retries.
    c.client_secret("creds", "not-the-secret").await?;
    wait_condition(&c.client, &c.ns, "obs", "Degraded", "True", "InvalidClientCredentials", Duration::from_secs(20))
        .await?;
    scrape_until(port, "the failure counted", |t| {
        sample(t, r#"registry_access_token_requests_total{result="failure",reason="InvalidClientCredentials"}"#)
            .is_some_and(|v| v >= 2.0)
    })
    .await?;
    let warnings = events_of(&c).await?.into_iter().filter(|e| e.0 == "Warning").count();
    assert_eq!(warnings, 1, "{:?}", events_of(&c).await?);

    // Fixed (the value the current token was issued with): recovered, announced once, no new
    // token needed.
    c.client_secret("creds", &client.secret).await?;
    wait_condition(&c.client, &c.ns, "obs", "Degraded", "False", "RefreshSucceeded", Duration::from_secs(20)).await?;
    // The Events of a transition are written right after its status.
    wait_until("the Recovered Event", Duration::from_secs(5), || async {
        events_of(&c).await.is_ok_and(|e| e.iter().any(|(_, r)| r == "Recovered"))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = events_of(&c).await?;
    let reasons: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(reasons, ["TokenIssued", "InvalidClientCredentials", "Recovered"], "{events:?}");
    c.finish().await
}

/// The series names a `/metrics` text offers, from its `# TYPE` lines: counters as `_total`,
/// histograms as `_bucket`, `_sum` and `_count`, gauges as they are.
fn exported_series(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            match kind {
                "counter" => names.extend([format!("{name}_total"), format!("{name}_created")]),
                "histogram" => names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
                _ => {
                    names.insert(name.to_owned());
                }
            }
        }
    }
    names
}

/// The metric names a PromQL expression reads: identifiers outside label matchers, strings and
/// `by (...)` lists that are neither functions nor keywords.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut plain = String::new();
    let (mut depth, mut quoted) = (0, false);
    for ch in expr.chars() {
        match ch {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth -= 1,
            c if !quoted && depth == 0 => plain.push(c),
            _ => {}
        }
    }
    let plain = regex_lite_by(&plain);
    let keywords =
        ["by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"];
    let mut names = BTreeSet::new();
    let chars: Vec<char> = plain.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let after_digit = start > 0 && chars[start - 1].is_ascii_digit();
            if next != Some(&'(') && !keywords.contains(&word.as_str()) && !after_digit {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Drops `by (...)` and `without (...)` lists, whose words are label names.
fn regex_lite_by(expr: &str) -> String {
    let mut out = expr.to_owned();
    for kw in ["by", "without"] {
        while let Some(at) = out.find(&format!("{kw} (")).or_else(|| out.find(&format!("{kw}("))) {
            let Some(close) = out[at..].find(')') else { break };
            out.replace_range(at..at + close + 1, " ");
        }
    }
    out
}

/// Every query of the chart's Grafana dashboard and every alert rule reads only metrics that a
/// live operator's `/metrics` offers.
pub async fn dashboard_and_alerts_use_only_exported_metrics(env: Arc<Env>) -> Result<()> {
    let (c, port) = Case::with_metrics(env, "dashboard", &["--kubelet-sync-period=0s"]).await?;
    let (client_id, _) = c.client_with_creds("dashboard", None).await?;
    c.ra("dash", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("dash").await?;
    // A Degraded object too: its reason series exists only while one is.
    c.client_secret("wrong", "not-the-secret").await?;
    c.ra("dash-wrong", c.spec(c.kc(), &client_id, "wrong")).await?;
    let text = scrape_until(port, "a Degraded object", |t| t.contains("registry_access_degraded{")).await?;
    let exported = exported_series(&text);
    assert!(
        exported.contains("registry_access_token_requests_total") && exported.contains("registry_access_leader"),
        "{exported:?}"
    );

    let chart = support::repo().join("charts/registry-access-operator/files");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(chart.join("dashboard.json"))?)?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().ok_or("no panels")? {
        let targets = panel["targets"].as_array().ok_or("a panel without targets")?;
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        queries.extend(
            targets
                .iter()
                .map(|t| (format!("panel {}", panel["title"]), t["expr"].as_str().unwrap_or_default().to_owned())),
        );
    }
    let rules: Value = serde_yaml::from_str(&std::fs::read_to_string(chart.join("prometheus-rules.yaml"))?)?;
    for rule in rules["groups"][0]["rules"].as_array().ok_or("no rules")? {
        queries.push((format!("alert {}", rule["alert"]), rule["expr"].as_str().unwrap_or_default().to_owned()));
    }
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for (what, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what} reads no metric: {expr}");
        let unknown: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(unknown.is_empty(), "{what} reads {unknown:?}, which the operator does not export: {expr}");
    }
    // The check itself catches a name the operator does not export.
    assert!(
        metric_names("sum(rate(registry_access_tokens_total[5m])) by (reason)")
            .contains("registry_access_tokens_total")
    );
    c.finish().await
}
