//! Client Secrets: rotation and wrong values, the opt-in label, what counts as a new value, and the
//! namespace boundary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;

use crate::support::case::*;
use crate::support::k8s::{self, condition, wait_condition};
use crate::support::keycloak::REALM;
use crate::support::metrics::wait_idle;
use crate::support::{Env, Result};

/// A rotated client secret is used at once; a wrong one keeps the last good token.
pub async fn rotated_and_wrong_client_secrets(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "rotate").await?;
    let (client_id, client) = c.client_with_creds("rotate", None).await?;
    c.ra("rot", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("rot").await?;
    let first = c.access_token("rot-token").await?;

    let rotated = c.kc().regenerate_secret(REALM, &client.id).await?;
    let t = Instant::now();
    c.client_secret("creds", &rotated).await?;
    let mut second = first.clone();
    while second == first {
        if t.elapsed() > Duration::from_secs(15) {
            return Err("no new token within 15 s of the client secret's rotation".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        second = c.access_token("rot-token").await?;
    }
    eprintln!("[e2e] new token {:.1}s after rotation", t.elapsed().as_secs_f64());
    verified_claims(c.kc(), &second).await?;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 2);

    c.client_secret("creds", "definitely-not-the-secret").await?;
    let s = wait_condition(
        &c.client,
        &c.ns,
        "rot",
        "Degraded",
        "True",
        "InvalidClientCredentials",
        Duration::from_secs(20),
    )
    .await?;
    assert_eq!(condition(&s, "Ready").map(|c| c.0), Some("True".into()), "the last good token is still valid");
    assert!(c.access_token("rot-token").await? == second, "a failed refresh replaced the last good token");

    k8s::put_client_secret(&c.client, &c.ns, "creds", &[("password", "x")]).await?;
    wait_condition(&c.client, &c.ns, "rot", "Degraded", "True", "ClientSecretKeyMissing", Duration::from_secs(20))
        .await?;
    Api::<Secret>::namespaced(c.client.clone(), &c.ns).delete("creds", &DeleteParams::default()).await?;
    wait_condition(&c.client, &c.ns, "rot", "Degraded", "True", "ClientSecretNotFound", Duration::from_secs(20))
        .await?;
    assert!(c.access_token("rot-token").await? == second, "the token was replaced or removed");

    c.ra("never", c.spec(c.kc(), &client_id, "no-such-secret")).await?;
    let s =
        wait_condition(&c.client, &c.ns, "never", "Ready", "False", "ClientSecretNotFound", Duration::from_secs(20))
            .await?;
    let (_, _, message) = condition(&s, "Ready").ok_or("no Ready")?;
    assert!(message.contains("no-such-secret"), "{message}");
    c.finish().await
}

/// A RegistryAccess cannot make the operator read a client Secret of another namespace.
pub async fn client_secrets_stay_in_their_namespace(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "tenant-a").await?;
    let other = "e2e-tenant-b";
    k8s::create_namespace(&c.client, other).await?;
    let client_id = unique("tenant");
    let client = c.kc().create_client(REALM, &client_id, None, true).await?;
    c.sensitive(&client.secret);
    k8s::put_client_secret(&c.client, other, "b-credentials", &[("client_secret", &client.secret)]).await?;
    let mut spec = c.spec(c.kc(), &client_id, "b-credentials");
    // The schema has no namespace field: the API server refuses it...
    spec["clientSecretRef"]["namespace"] = json!(other);
    let refused = c.ra("steal", spec).await.err().ok_or("the API server accepted clientSecretRef.namespace")?;
    assert!(refused.to_string().contains("clientSecretRef.namespace"), "{refused}");
    // ...and a plain name always means a Secret of the object's own namespace.
    c.ra("steal", c.spec(c.kc(), &client_id, "b-credentials")).await?;
    let s =
        wait_condition(&c.client, &c.ns, "steal", "Ready", "False", "ClientSecretNotFound", Duration::from_secs(30))
            .await?;
    let (_, _, message) = condition(&s, "Ready").ok_or("no Ready")?;
    assert!(message.contains(&format!("{}/b-credentials", c.ns)), "{message}");
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 0, "a token was issued with another namespace's secret");
    c.finish().await
}

/// A Secret that did not opt in is never sent, even holding the right client secret: its reason
/// says how to opt in, Keycloak counts no grant, and the value appears nowhere. Labelled, it is.
pub async fn a_client_secret_that_did_not_opt_in_is_never_sent(env: Arc<Env>) -> Result<()> {
    let (c, port) = Case::with_metrics(env, "opt-in", &[]).await?;
    let client_id = unique("opt-in");
    let kc_client = c.kc().create_client(REALM, &client_id, None, true).await?;
    c.sensitive(&kc_client.secret);
    k8s::put_secret(&c.client, &c.ns, "db-credentials", &[("client_secret", &kc_client.secret)]).await?;
    c.ra("sneaky", c.spec(c.kc(), &client_id, "db-credentials")).await?;
    let s =
        wait_condition(&c.client, &c.ns, "sneaky", "Ready", "False", "ClientSecretNotOptedIn", Duration::from_secs(30))
            .await?;
    let message = condition(&s, "Ready").ok_or("no Ready")?.2;
    assert!(message.contains("registry-access.io/client-secret=true"), "{message}");
    // The condition is the positive sign: the reconcile that wrote it looked at the Secret and
    // refused it. Nothing was asked of Keycloak, nor is anything waiting to be.
    let activity = wait_idle(port).await?;
    assert_eq!(activity.token_requests, 0.0, "the operator sent a token request: {activity:?}");
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 0, "a Secret that did not opt in reached Keycloak");
    assert!(c.token_secret("sneaky-token").await?.is_none());

    // Whoever may edit the Secret opts it in: the next reconcile sends it.
    let labelled = json!({"metadata": {"labels": {"registry-access.io/client-secret": "true"}}});
    Api::<Secret>::namespaced(c.client.clone(), &c.ns)
        .patch("db-credentials", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&labelled))
        .await?;
    c.ready("sneaky").await?;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 1);
    c.finish().await
}

/// Labels, annotations or a new resourceVersion of the client Secret issue no token; a new value
/// does, once.
pub async fn only_a_new_client_secret_value_issues_a_token(env: Arc<Env>) -> Result<()> {
    let (c, port) = Case::with_metrics(env, "touch", &[]).await?;
    let (client_id, client) = c.client_with_creds("touch", None).await?;
    c.ra("t", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("t").await?;
    let first = c.access_token("t-token").await?;
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.ns);
    let requests_before = wait_idle(port).await?.token_requests;
    let before = secrets.get("creds").await?.metadata.resource_version;
    let touch = json!({"metadata": {"labels": {"backup": "nightly"}, "annotations": {"restored-by": "velero"}}});
    secrets.patch("creds", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&touch)).await?;
    assert_ne!(secrets.get("creds").await?.metadata.resource_version, before);
    // The positive sign that the operator has looked at the object since the touch: an edit of
    // the token Secret's header key made after it (the Secret watch delivers both in order) is
    // undone, from the same token.
    k8s::put_secret(&c.client, &c.ns, "t-token", &[("authorization", "Bearer forged")]).await?;
    wait_until("the token Secret's header restored after the touch", Duration::from_secs(15), || async {
        let d = c.token_secret("t-token").await.ok().flatten().unwrap_or_default();
        d.get("authorization") == Some(&format!("Bearer {first}"))
    })
    .await?;
    let activity = wait_idle(port).await?;
    assert_eq!(activity.token_requests, requests_before, "touching the client Secret sent a token request");
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 1, "touching the client Secret issued a token");
    assert!(c.access_token("t-token").await? == first, "the token was replaced");

    let rotated = c.kc().regenerate_secret(REALM, &client.id).await?;
    c.sensitive(&rotated);
    let value = json!({"data": {"client_secret": base64_of(&rotated)}});
    secrets.patch("creds", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&value)).await?;
    wait_until("a token for the new client secret", Duration::from_secs(15), || async {
        c.access_token("t-token").await.is_ok_and(|t| t != first)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 2);
    c.finish().await
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
