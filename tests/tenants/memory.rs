//! The largest objects the API server and the CRD take cost the operator a bounded amount of
//! memory.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

use crate::origins::LIFETIME_SECS;
use crate::support::case::*;
use crate::support::k8s::{self, condition, wait_condition};
use crate::support::keycloak::REALM;
use crate::support::{self, Env, Result};

/// The operator's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// Largest annotation value the API server takes in one object (its limit is 256 KiB for all).
pub const HUGE: usize = 250 * 1024;
/// How much the operator's RSS may grow for the whole hostile set below.
pub const RSS_BOUND_KIB: u64 = 16 * 1024;

/// ServiceAccounts and RegistryAccess objects with the largest annotations, labels and lists the
/// API server and the CRD take, in a namespace nobody else uses: the operator's RSS grows by less
/// than a fixed bound, it never restarts, another namespace's tokens keep renewing, and objects
/// over the CRD's bounds are refused at `kubectl apply`.
pub async fn the_largest_objects_cost_a_bounded_amount_of_memory(env: Arc<Env>) -> Result<()> {
    let honest = "e2e-ten-mem-honest";
    let client = env.cluster.client().await?;
    k8s::create_namespace(&client, honest).await?;
    let port = support::process::free_port()?;
    let probe = format!("--probe-addr=127.0.0.1:{port}");
    let watch_honest = format!("--namespace={honest}");
    let mut c = Case::with_operator_args(
        env.clone(),
        "ten-mem",
        &[watch_honest.as_str(), probe.as_str(), "--kubelet-sync-period=0s"],
    )
    .await?;
    let honest_client = unique("mem-honest");
    let info = c.kc().create_client(REALM, &honest_client, Some(LIFETIME_SECS), true).await?;
    c.sensitive(&info.secret);
    k8s::put_client_secret(&c.client, honest, "creds", &[("client_secret", &info.secret)]).await?;
    k8s::apply_ra(&c.client, honest, "steady", c.spec(c.kc(), &honest_client, "creds")).await?;
    let first =
        wait_condition(&c.client, honest, "steady", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    let pid = c.operator.pid().ok_or("operator not running")?;
    let metrics = scrape_until(port, "the ServiceAccount watch", |t| {
        sample(t, "registry_access_watch_events_total{resource=\"serviceaccounts\"}").is_some()
    })
    .await?;
    let sa_events_before =
        sample(&metrics, "registry_access_watch_events_total{resource=\"serviceaccounts\"}").unwrap_or(0.0);
    let before = rss_kib(pid)?;

    // 20 ServiceAccounts with a 250 KiB issuers annotation of single letters (nobody names 15 of
    // them; 5 are named by objects that authenticate with them).
    let letters: String = (0..HUGE / 2).map(|i| if i % 2 == 0 { 'a' } else { ',' }).collect();
    let sas: Api<ServiceAccount> = Api::namespaced(c.client.clone(), &c.ns);
    for i in 0..20 {
        let sa: ServiceAccount = serde_json::from_value(json!({
            "metadata": {"name": format!("sa-{i:02}"), "annotations": {"registry-access.io/keycloak-issuers": letters}}
        }))?;
        sas.create(&PostParams::default(), &sa).await?;
    }
    // 20 RegistryAccess objects at every bound of the CRD with a 250 KiB annotation of their own,
    // on a Secret that did not opt in (nothing is sent), and 5 naming the huge ServiceAccounts.
    let unsent = unique("never-sent-value");
    c.sensitive(&unsent);
    k8s::put_secret(&c.client, &c.ns, "not-opted-in", &[("client_secret", &unsent)]).await?;
    let pad = |n: usize, c: char| std::iter::repeat_n(c, n).collect::<String>();
    let labels: serde_json::Map<String, Value> = (0..16).map(|i| (format!("l{i:02}"), json!(pad(63, 'v')))).collect();
    let annotations: serde_json::Map<String, Value> =
        (0..8).map(|i| (format!("a{i}"), json!(pad(1024, 'v')))).collect();
    let scopes: Vec<String> = (0..32).map(|i| format!("{i:02}{}", pad(126, 's'))).collect();
    let roles: Vec<String> = (0..32).map(|i| format!("{i:02}{}", pad(126, 'r'))).collect();
    let ras: Api<registry_access_operator::api::RegistryAccess> = Api::namespaced(c.client.clone(), &c.ns);
    for i in 0..25 {
        let mut spec = json!({
            "server": c.kc().base_url, "realm": REALM, "clientId": pad(255, 'c'),
            "clientSecretRef": {"name": "not-opted-in"},
            "scopes": scopes, "requiredRoles": roles,
            "secret": {"labels": labels, "annotations": annotations},
            "tls": {"caBundle": pad(16384, 'p')},
        });
        if i >= 20 {
            spec["clientAuthMethod"] = json!("service_account");
            spec["serviceAccountRef"] = json!({"name": format!("sa-{:02}", i - 20)});
            spec.as_object_mut().ok_or("spec")?.remove("clientSecretRef");
        }
        let ra: registry_access_operator::api::RegistryAccess = serde_json::from_value(json!({
            "apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
            "metadata": {"name": format!("big-{i:02}"), "annotations": {"padding": pad(HUGE, 'x')}},
            "spec": spec,
        }))?;
        ras.create(&PostParams::default(), &ra).await?;
    }
    // Positive signs that the operator has seen all of it: every object reconciled, and the
    // ServiceAccount watch past the 20 events.
    let names: Vec<String> = (0..25).map(|i| format!("big-{i:02}")).collect();
    wait_until("every big object reconciled", Duration::from_secs(60), || async {
        let list = ras.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
        names.iter().all(|n| {
            list.iter().any(|r| {
                r.metadata.name.as_deref() == Some(n)
                    && r.status.as_ref().is_some_and(|s| s.observed_generation.is_some())
            })
        })
    })
    .await?;
    scrape_until(port, "20 ServiceAccount events", |t| {
        sample(t, "registry_access_watch_events_total{resource=\"serviceaccounts\"}")
            .is_some_and(|v| v >= sa_events_before + 20.0)
    })
    .await?;
    let after = rss_kib(pid)?;
    let grown = after.saturating_sub(before);
    eprintln!(
        "[tenants] RSS {before} KiB before, {after} KiB after 20 ServiceAccounts with {HUGE}-byte annotations and \
         25 RegistryAccess objects at the CRD's bounds with {HUGE}-byte annotations (grew {grown} KiB; bound {RSS_BOUND_KIB} KiB)"
    );
    assert!(grown < RSS_BOUND_KIB, "the operator's RSS grew {grown} KiB");
    let s = k8s::ra_status(&c.client, &c.ns, "big-20").await?.ok_or("no status")?;
    let (_, reason, message) = condition(&s, "Ready").ok_or("no Ready")?;
    assert_eq!(reason, "ServiceAccountNotOptedIn", "{message}");
    assert!(message.contains("longer than"), "{message}");

    c.operator.check_alive()?;

    // Over the CRD's bounds: refused at kubectl apply.
    let too_many: serde_json::Map<String, Value> = (0..17).map(|i| (format!("l{i:02}"), json!("v"))).collect();
    let over = json!({
        "apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
        "metadata": {"name": "over", "namespace": c.ns},
        "spec": {"server": c.kc().base_url, "realm": REALM, "clientId": "x", "clientSecretRef": {"name": "creds"},
                 "secret": {"labels": too_many}},
    });
    let refused = c.env.cluster.kubectl_stdin(&["apply", "-f", "-"], &over.to_string()).unwrap_err().to_string();
    assert!(refused.contains("spec.secret.labels") && refused.contains("16"), "{refused}");
    let mut long_scope = over.clone();
    long_scope["spec"]["secret"] = json!({});
    long_scope["spec"]["scopes"] = json!([pad(129, 's')]);
    let refused = c.env.cluster.kubectl_stdin(&["apply", "-f", "-"], &long_scope.to_string()).unwrap_err().to_string();
    assert!(refused.contains("spec.scopes"), "{refused}");

    // The other namespace's token kept renewing meanwhile.
    let first_issued = first.issued_at.ok_or("no issuedAt")?.0;
    wait_until("the honest token renewed", Duration::from_secs(40), || async {
        k8s::ra_status(&c.client, honest, "steady")
            .await
            .ok()
            .flatten()
            .and_then(|s| s.issued_at)
            .is_some_and(|t| t.0 > first_issued)
    })
    .await?;
    c.finish_with_namespaces(&[honest]).await
}
