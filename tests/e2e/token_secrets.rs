//! Token Secrets: restored when edited or deleted, collected with their RegistryAccess, left alone
//! when someone else's, retired when renamed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use registry_access_operator::api::RegistryAccess;
use serde_json::json;

use crate::support::case::*;
use crate::support::k8s::{self, condition, wait_condition};
use crate::support::keycloak::REALM;
use crate::support::{Env, Result};

/// A token Secret deleted or edited by someone else is restored: the same token where only a
/// derived key was changed, a new one where the token itself was.
pub async fn restores_an_edited_or_deleted_token_secret(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "restore").await?;
    let (client_id, _) = c.client_with_creds("restore", None).await?;
    c.ra("r", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("r").await?;
    let first = c.access_token("r-token").await?;

    // Someone overwrites the header key: it is rewritten from the same token, no new grant.
    k8s::put_secret(&c.client, &c.ns, "r-token", &[("authorization", "Bearer forged")]).await?;
    wait_until("authorization restored", Duration::from_secs(15), || async {
        let d = c.token_secret("r-token").await.ok().flatten().unwrap_or_default();
        d.get("authorization") == Some(&format!("Bearer {first}"))
    })
    .await?;
    assert!(c.access_token("r-token").await? == first, "the token was replaced for an edit of a derived key");
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 1);

    // Someone replaces the token: a new, real one is issued.
    k8s::put_secret(&c.client, &c.ns, "r-token", &[("access_token", "forged-token-value")]).await?;
    wait_until("a real token again", Duration::from_secs(15), || async {
        let t = c.access_token("r-token").await.unwrap_or_default();
        t != first && t != "forged-token-value" && !t.is_empty()
    })
    .await?;
    verified_claims(c.kc(), &c.access_token("r-token").await?).await?;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 2);

    // Someone deletes the Secret: it is back within seconds.
    Api::<Secret>::namespaced(c.client.clone(), &c.ns).delete("r-token", &DeleteParams::default()).await?;
    wait_until("the token Secret recreated", Duration::from_secs(15), || async {
        c.token_secret("r-token").await.ok().flatten().is_some_and(|d| d.contains_key("access_token"))
    })
    .await?;
    verified_claims(c.kc(), &c.access_token("r-token").await?).await?;
    c.ready("r").await?;
    c.finish().await
}

/// Deleting a RegistryAccess deletes its Secret; a foreign Secret of the target name is kept.
pub async fn garbage_collection_and_foreign_secrets(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "ownership").await?;
    let (client_id, _) = c.client_with_creds("owner", None).await?;
    c.ra("gone", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("gone").await?;
    c.access_token("gone-token").await?;
    Api::<RegistryAccess>::namespaced(c.client.clone(), &c.ns).delete("gone", &DeleteParams::default()).await?;
    let t = Instant::now();
    while c.token_secret("gone-token").await?.is_some() {
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the token Secret outlived its RegistryAccess by 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("[e2e] token Secret garbage-collected {:.1}s after its RegistryAccess", t.elapsed().as_secs_f64());

    k8s::put_secret(&c.client, &c.ns, "taken", &[("note", "owned by someone else")]).await?;
    let grants_before = c.kc().grants(REALM, &client_id).await?;
    let mut spec = c.spec(c.kc(), &client_id, "creds");
    spec["secret"] = json!({"name": "taken"});
    c.ra("intruder", spec).await?;
    let s = wait_condition(&c.client, &c.ns, "intruder", "Ready", "False", "SecretConflict", Duration::from_secs(30))
        .await?;
    assert!(condition(&s, "Ready").ok_or("no Ready")?.2.contains("spec.secret.name"));
    let foreign = Api::<Secret>::namespaced(c.client.clone(), &c.ns).get("taken").await?;
    let data = foreign.data.unwrap_or_default();
    assert_eq!(data.len(), 1, "keys were added to the foreign Secret");
    assert_eq!(data["note"].0, b"owned by someone else");
    assert!(foreign.metadata.owner_references.unwrap_or_default().is_empty());
    assert_eq!(
        c.kc().grants(REALM, &client_id).await?,
        grants_before,
        "a token was requested for a conflicting Secret"
    );
    c.finish().await
}

/// Renaming spec.secret.name moves the token to the new Secret and retires the old one: its token
/// is removed once the new Secret holds one.
pub async fn renaming_the_token_secret_retires_the_old_one(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "rename").await?;
    let (client_id, _) = c.client_with_creds("rename", None).await?;
    c.ra("r", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("r").await?;
    c.access_token("r-token").await?;
    let mut spec = c.spec(c.kc(), &client_id, "creds");
    spec["secret"] = json!({"name": "registry-token"});
    c.ra("r", spec).await?;
    wait_until("the token in the renamed Secret and none in the old", Duration::from_secs(30), || async {
        let new = c.token_secret("registry-token").await.ok().flatten();
        let old = c.token_secret("r-token").await.ok().flatten();
        new.is_some_and(|d| d.contains_key("access_token")) && old.is_some_and(|d| !d.contains_key("access_token"))
    })
    .await?;
    let old = Api::<Secret>::namespaced(c.client.clone(), &c.ns).get("r-token").await?;
    let annotations = old.metadata.annotations.unwrap_or_default();
    assert!(annotations.contains_key("registry-access.io/retired"), "{annotations:?}");
    assert!(!annotations.contains_key("registry-access.io/expires-at"));
    let data = old.data.unwrap_or_default();
    assert!(data.keys().all(|k| k != "access_token" && k != "authorization"), "{:?}", data.keys());
    let s = c.ready("r").await?;
    assert_eq!(s.secret_name.as_deref(), Some("registry-token"));
    c.finish().await
}
