//! The chart's pod policies on the real API server: with the operator's own credentials (a token
//! of the chart's ServiceAccount), a pod's image, labels and other annotations cannot be changed,
//! only the nudge annotation; and `kubectl apply` of a workload that reads a token once prints the
//! warning.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::{Env, Result, k8s};

const NUDGE_ANNOTATION: &str = "registry-access.io/token-written";

/// With the chart's pod nudge on, the operator's ServiceAccount may patch pods, and the chart's
/// admission policy refuses every change it makes to a pod but the nudge annotation.
pub async fn the_operator_may_change_only_the_nudge_annotation_of_a_pod(env: Arc<Env>) -> Result<()> {
    let team = "nudge-team";
    let admin = env.cluster.client().await?;
    k8s::create_namespace(&admin, team).await?;
    let release = Release::install(&env, "rao-pods", "rao-pods-system", &[&format!("watchNamespaces={{{team}}}")])?;
    assert!(release.can_i(&["patch", "pods", "-n", team])?, "the chart does not grant patch on pods");
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: {team}, labels: {{app: p}}}}\n\
         spec: {{automountServiceAccountToken: false, containers: [{{name: app, image: busybox}}]}}\n"
    );
    let t = Instant::now();
    while let Err(e) = env.cluster.kubectl_stdin(&["create", "-f", "-"], &pod) {
        // The namespace's default ServiceAccount may not exist yet.
        if t.elapsed() > Duration::from_secs(20) {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let uid = env.cluster.kubectl(&["get", "pod", "p", "-n", team, "-o", "jsonpath={.metadata.uid}"])?;
    let token = env.cluster.kubectl(&["create", "token", &release.sa, "-n", &release.ns, "--duration=1h"])?;
    let operator = env.cluster.kubeconfig_with_token("rao-pods-operator", token.trim())?;
    let as_operator = |args: &[&str]| env.cluster.kubectl_full(&operator, args, "");

    // Policies reach the API server's admission asynchronously: try until the refusal comes. A
    // label set before the policy is loaded is taken off again (as the cluster admin) and tried
    // once more; without the policy no refusal ever comes and the test fails below.
    let t = Instant::now();
    let refusal = loop {
        let (ok, _, err) = as_operator(&["label", "pod", "p", "-n", team, "changed=yes"])?;
        if !ok && err.contains("denied request") {
            break err;
        }
        if ok {
            env.cluster.kubectl(&["label", "pod", "p", "-n", team, "changed-"])?;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("no admission refusal of a label change within 30 s (last: ok={ok}, {err})").into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("[e2e] pod admission policy active after {:.1}s", t.elapsed().as_secs_f64());
    assert!(refusal.contains("may not change a pod's labels"), "{refusal}");
    let (ok, _, err) = as_operator(&["set", "image", "pod/p", "-n", team, "app=nginx"])?;
    assert!(!ok && err.contains("may not change a pod's spec"), "an image change was not refused: {err}");
    let (ok, _, err) = as_operator(&["annotate", "pod", "p", "-n", team, "other=1"])?;
    assert!(!ok && err.contains("no pod annotation but"), "another annotation was not refused: {err}");
    let (ok, _, err) = as_operator(&["delete", "pod", "p", "-n", team, "--wait=false"])?;
    assert!(!ok, "the operator's identity deleted a pod: {err}");
    // The nudge itself, as the operator sends it: a merge patch with the uid as precondition.
    let nudge = format!(r#"{{"metadata":{{"uid":"{uid}","annotations":{{"{NUDGE_ANNOTATION}":"t-token@1"}}}}}}"#);
    let (ok, _, err) = as_operator(&["patch", "pod", "p", "-n", team, "--type=merge", "-p", &nudge])?;
    assert!(ok, "the nudge was refused: {err}");
    let seen = env.cluster.kubectl(&["get", "pod", "p", "-n", team, "-o", "json"])?;
    let seen: serde_json::Value = serde_json::from_str(&seen)?;
    assert_eq!(seen["metadata"]["annotations"][NUDGE_ANNOTATION], "t-token@1");
    assert_eq!(seen["spec"]["containers"][0]["image"], "busybox");
    assert!(
        seen["metadata"]["labels"].get("changed").is_none() && seen["metadata"]["annotations"].get("other").is_none()
    );

    // A workload that reads a token once: `kubectl apply` warns and creates it all the same.
    let deployment = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: reads-once, namespace: {team}}}\nspec:\n  \
         selector: {{matchLabels: {{app: r}}}}\n  template:\n    metadata: {{labels: {{app: r}}}}\n    spec:\n      \
         containers: [{{name: caller, image: busybox, env: [{{name: TOKEN, valueFrom: {{secretKeyRef: {{name: ra-token, key: access_token}}}}}}]}}]\n"
    );
    // The warning comes from a second policy, loaded on its own: a server-side dry run first, until
    // it warns (without the policy no warning ever comes and the assertion below fails).
    let t = Instant::now();
    let apply = |extra: &[&str]| {
        let args: Vec<&str> = ["apply", "-f", "-"].iter().chain(extra).copied().collect();
        env.cluster.kubectl_full(&env.cluster.kubeconfig, &args, &deployment)
    };
    while !apply(&["--dry-run=server"])?.2.contains("Warning") && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (ok, _, err) = apply(&[])?;
    assert!(ok, "the workload was refused: {err}");
    assert!(
        err.contains("Warning") && err.contains("caller") && err.contains("environment variable"),
        "kubectl apply printed no warning for a token read from an environment variable: {err}"
    );
    release.uninstall()?;
    Ok(())
}
