//! The pod nudge's cost: apiserver writes per refresh with and without the nudge (pods that mount
//! the token Secret, made Running through their status: this environment has no kubelet), and the
//! operator's memory per pod it follows.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::measure::{apiserver_requests, breakdown, count, delta, proc_stat, writes};
use crate::objects::Kube;
use crate::support::keycloak::{Keycloak, REALM};
use crate::support::operator::Operator;
use crate::support::{Result, k8s};
use crate::{LONG_LIFESPAN, log};

/// Running pods per object in the writes measurement.
const MOUNTING_PODS: usize = 10;
/// Refreshes per object measured.
const REFRESHES: usize = 5;
/// Pods created for the memory measurement.
const MEMORY_PODS: usize = 1000;

pub struct PodCost {
    /// apiserver writes per refresh (Secrets, RegistryAccess status, pods), with the nudge.
    pub writes_with: f64,
    pub writes_without: f64,
    /// Pod patches per refresh with the nudge (one per running mounting pod).
    pub nudges_per: f64,
    /// Operator memory per pod followed, KiB.
    pub kib_per_pod: f64,
    pub json: Value,
}

fn pod(name: &str, secret: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "automountServiceAccountToken": false,
            "volumes": [{"name": "token", "secret": {"secretName": secret}}],
            "containers": [{"name": "app", "image": "busybox", "volumeMounts": [{"name": "token", "mountPath": "/t"}]}],
        },
    }))?)
}

async fn followed(probe_port: u16) -> Result<usize> {
    let text = reqwest::get(format!("http://127.0.0.1:{probe_port}/metrics")).await?.text().await?;
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("registry_access_pods_followed "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(v as usize)
}

async fn wait_followed(probe_port: u16, at_least: usize) -> Result<()> {
    let t = Instant::now();
    while followed(probe_port).await? < at_least {
        if t.elapsed() > Duration::from_secs(120) {
            return Err(format!("the operator never followed {at_least} pods").into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Refreshes `ra` on demand `REFRESHES` times; returns the apiserver writes per refresh and the
/// pod patches per refresh.
async fn refreshes(kube: &Kube, ns: &str, ra: &str) -> Result<(f64, f64, Value)> {
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(kube.client.clone(), ns);
    let token = |s: k8s_openapi::api::core::v1::Secret| {
        s.data.and_then(|d| d.get("access_token").map(|b| b.0.clone())).unwrap_or_default()
    };
    let before = apiserver_requests(&kube.client).await?;
    for i in 0..REFRESHES {
        let old = token(secrets.get(&format!("{ra}-token")).await?);
        let patch =
            json!({"metadata": {"annotations": {"registry-access.io/refresh-requested-at": format!("bench-{i}")}}});
        kube.ras(ns).patch(ra, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        let t = Instant::now();
        while token(secrets.get(&format!("{ra}-token")).await?) == old {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!("{ns}/{ra} was not refreshed on demand within 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Nudges go out right after the write, in a task of their own: let them land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = delta(&before, &apiserver_requests(&kube.client).await?);
    // Writes by the operator: the Secret, the status, the pods; the test's own annotation patches
    // of the RegistryAccess (not its status) are left out.
    let ours = writes(&d, "secrets") + count(&d, "registryaccesses", Some("status"), "PATCH") + writes(&d, "pods");
    let n = REFRESHES as f64;
    Ok((ours as f64 / n, count(&d, "pods", None, "PATCH") as f64 / n, breakdown(&d)))
}

/// Measures the nudge's writes per refresh with and without it, and the memory per pod followed.
pub async fn pod_cost(kube: &Kube, kc: &Keycloak, op: &Operator, probe_port: u16) -> Result<PodCost> {
    let ns = "bench-pods";
    let client = &kube.client;
    k8s::create_namespace(client, ns).await?;
    let kc_client = kc.create_client(REALM, "bench-pods", Some(LONG_LIFESPAN), true).await?;
    k8s::put_client_secret(client, ns, "creds", &[("client_secret", &kc_client.secret)]).await?;
    let spec = crate::objects::spec(kc, &kc_client.client_id, "creds");
    let mut quiet = spec.clone();
    quiet["nudgePods"] = json!(false);
    for (name, spec) in [("nudged", spec), ("quiet", quiet)] {
        let obj = json!({"apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
            "metadata": {"name": name, "namespace": ns}, "spec": spec});
        kube.ras(ns).create(&PostParams::default(), &serde_json::from_value(obj)?).await?;
    }
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), ns);
    let t = Instant::now();
    while secrets.get_opt("nudged-token").await?.is_none() || secrets.get_opt("quiet-token").await?.is_none() {
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the pod bench's objects got no token within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let running = json!({"status": {"phase": "Running"}});
    for (prefix, secret) in [("n", "nudged-token"), ("q", "quiet-token")] {
        for i in 0..MOUNTING_PODS {
            let name = format!("{prefix}-{i}");
            let t = Instant::now();
            // The namespace's default ServiceAccount may not exist yet.
            while let Err(e) = pods.create(&PostParams::default(), &pod(&name, secret)?).await {
                if t.elapsed() > Duration::from_secs(20) {
                    return Err(e.into());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&running)).await?;
        }
    }
    wait_followed(probe_port, 2 * MOUNTING_PODS).await?;
    log(format!("pods: {REFRESHES} refreshes with the nudge ({MOUNTING_PODS} running pods)..."));
    let (writes_with, nudges_per, with_breakdown) = refreshes(kube, ns, "nudged").await?;
    log(format!("pods: {REFRESHES} refreshes without the nudge..."));
    let (writes_without, _, without_breakdown) = refreshes(kube, ns, "quiet").await?;

    log(format!("pods: memory while following {MEMORY_PODS} more pods..."));
    let before = proc_stat(op)?.rss_mib();
    for i in 0..MEMORY_PODS {
        pods.create(&PostParams::default(), &pod(&format!("m-{i}"), "nudged-token")?).await?;
    }
    wait_followed(probe_port, 2 * MOUNTING_PODS + MEMORY_PODS).await?;
    let after = proc_stat(op)?.rss_mib();
    let kib_per_pod = ((after - before) * 1024.0 / MEMORY_PODS as f64).max(0.0);
    k8s_delete_namespace(kube, ns).await;
    Ok(PodCost {
        writes_with,
        writes_without,
        nudges_per,
        kib_per_pod,
        json: json!({
            "running_mounting_pods": MOUNTING_PODS,
            "refreshes": REFRESHES,
            "writes_per_refresh_with_nudge": writes_with,
            "writes_per_refresh_without_nudge": writes_without,
            "pod_patches_per_refresh": nudges_per,
            "requests_with_nudge": with_breakdown,
            "requests_without_nudge": without_breakdown,
            "memory_pods": MEMORY_PODS,
            "rss_before_mib": before,
            "rss_after_mib": after,
            "kib_per_pod_followed": kib_per_pod,
        }),
    })
}

async fn k8s_delete_namespace(kube: &Kube, ns: &str) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(kube.client.clone());
    let _ = api.delete(ns, &Default::default()).await;
}
