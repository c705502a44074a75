//! Pods and the token Secrets they use: a running pod that mounts one as a volume is nudged after
//! each new token (one annotation changed); a pod that reads the token once (an environment
//! variable, a subPath mount) makes its RegistryAccess Degraded with a Warning Event naming it.
//! This environment has no kubelet: pods are made Running through their status, as a kubelet
//! would; the node suite measures real delivery.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::case::*;
use crate::support::k8s::{condition, wait_condition};
use crate::support::{Env, Result};

const NUDGE_ANNOTATION: &str = "registry-access.io/token-written";

/// A pod of `ns` running `containers` with `volumes`, made Running through its status.
async fn running_pod(c: &Case, name: &str, volumes: Value, containers: Value, running: bool) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"automountServiceAccountToken": false, "volumes": volumes, "containers": containers},
    }))?;
    // The namespace's default ServiceAccount may not exist yet.
    wait_until("the pod created", Duration::from_secs(20), || async {
        pods.create(&PostParams::default(), &pod).await.is_ok()
    })
    .await?;
    if running {
        let status = json!({"status": {"phase": "Running"}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    }
    Ok(())
}

fn mounting(secret: &str) -> (Value, Value) {
    (
        json!([{"name": "token", "secret": {"secretName": secret}}]),
        json!([{"name": "app", "image": "busybox", "volumeMounts": [{"name": "token", "mountPath": "/var/run/token"}]}]),
    )
}

async fn nudge_of(c: &Case, pod: &str) -> Option<String> {
    let p = Api::<Pod>::namespaced(c.client.clone(), &c.ns).get(pod).await.ok()?;
    p.metadata.annotations?.get(NUDGE_ANNOTATION).cloned()
}

async fn secret_version(c: &Case, name: &str) -> String {
    let s = Api::<Secret>::namespaced(c.client.clone(), &c.ns).get(name).await;
    s.ok().and_then(|s| s.metadata.resource_version).unwrap_or_default()
}

async fn refresh(c: &Case, ra: &str, value: &str) -> Result<()> {
    let before = c.access_token(&format!("{ra}-token")).await?;
    c.env.cluster.kubectl(&[
        "annotate",
        "-n",
        &c.ns,
        "registryaccess",
        ra,
        &format!("registry-access.io/refresh-requested-at={value}"),
        "--overwrite",
    ])?;
    wait_until("a token refreshed on demand", Duration::from_secs(20), || async {
        c.access_token(&format!("{ra}-token")).await.unwrap_or_default() != before
    })
    .await
}

/// After each new token, the running pods that mount its Secret get the annotation naming the
/// Secret's new version; a pod that is not Running, and the pods of an object with
/// spec.nudgePods false, get nothing.
pub async fn mounting_pods_are_nudged_after_each_new_token(env: Arc<Env>) -> Result<()> {
    let (c, port) = Case::with_metrics(env, "nudge", &[]).await?;
    let (client_id, _) = c.client_with_creds("nudge", None).await?;
    c.ra("nudged", c.spec(c.kc(), &client_id, "creds")).await?;
    let mut quiet = c.spec(c.kc(), &client_id, "creds");
    quiet["nudgePods"] = json!(false);
    c.ra("quiet", quiet).await?;
    c.ready("nudged").await?;
    c.ready("quiet").await?;
    let (volumes, containers) = mounting("nudged-token");
    running_pod(&c, "mounts", volumes.clone(), containers.clone(), true).await?;
    running_pod(&c, "pending", volumes, containers, false).await?;
    let (volumes, containers) = mounting("quiet-token");
    running_pod(&c, "mounts-quiet", volumes, containers, true).await?;
    // The operator has seen the pods: they are kept (each names a Secret).
    scrape_until(port, "the pods followed", |m| sample(m, "registry_access_pods_followed") == Some(3.0)).await?;

    // The object that opted out is refreshed first, then the other: once the second's pod is
    // nudged, the first's write is long past.
    refresh(&c, "quiet", "first").await?;
    for round in ["1", "2"] {
        refresh(&c, "nudged", round).await?;
        let version = secret_version(&c, "nudged-token").await;
        wait_until("the mounting pod nudged with the new version", Duration::from_secs(10), || async {
            nudge_of(&c, "mounts").await == Some(format!("nudged-token@{version}"))
        })
        .await?;
    }
    assert_eq!(nudge_of(&c, "pending").await, None, "a pod that is not Running was nudged");
    assert_eq!(nudge_of(&c, "mounts-quiet").await, None, "a pod of an object with nudgePods: false was nudged");
    let m = scrape_until(port, "nudges counted", |m| {
        sample(m, "registry_access_pod_nudges_total{outcome=\"sent\"}") == Some(2.0)
    })
    .await?;
    assert_eq!(sample(&m, "registry_access_pod_nudges_total{outcome=\"failed\"}"), Some(0.0));
    c.finish().await
}

/// A running pod that reads the token through an environment variable makes its object Degraded
/// (TokenReadOnce, Ready stays True) with a Warning Event naming the pod and container; when the
/// pod goes, so does the warning.
pub async fn a_pod_that_reads_the_token_once_is_reported(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "read-once").await?;
    let (client_id, _) = c.client_with_creds("readonce", None).await?;
    c.ra("ro", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("ro").await?;
    let env_read = json!([{"name": "caller", "image": "busybox",
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "ro-token", "key": "access_token"}}}]}]);
    running_pod(&c, "reads-env", json!([]), env_read, true).await?;
    let s =
        wait_condition(&c.client, &c.ns, "ro", "Degraded", "True", "TokenReadOnce", Duration::from_secs(20)).await?;
    let (_, _, message) = condition(&s, "Degraded").unwrap_or_default();
    assert!(
        message.contains("pod reads-env (container caller)") && message.contains("key access_token"),
        "the message does not name the pod, container and key: {message}"
    );
    assert_eq!(condition(&s, "Ready").map(|r| r.0).as_deref(), Some("True"), "Ready must stay True");
    wait_until("a Warning Event naming the pod", Duration::from_secs(10), || async {
        events_of(&c).await.unwrap_or_default().iter().any(|(t, r)| t == "Warning" && r == "TokenReadOnce")
    })
    .await?;

    Api::<Pod>::namespaced(c.client.clone(), &c.ns)
        .delete("reads-env", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() })
        .await?;
    wait_condition(&c.client, &c.ns, "ro", "Degraded", "False", "RefreshSucceeded", Duration::from_secs(20)).await?;
    c.finish().await
}
