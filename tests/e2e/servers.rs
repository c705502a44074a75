//! Which Keycloak servers are used: the allow-list, plain http, and TLS with a private CA.

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use serde_json::json;

use crate::support::case::*;
use crate::support::k8s::{condition, wait_condition};
use crate::support::keycloak::{self, REALM};
use crate::support::{self, Env, Result};

/// Only the allowed Keycloak servers are used; another gets ServerNotAllowed and no request.
pub async fn allow_list_refuses_other_servers(env: Arc<Env>) -> Result<()> {
    let allowed = format!("--allowed-server={}", env.keycloak.base_url);
    let c = Case::with_operator_args(env, "allowlist", &[allowed.as_str()]).await?;
    let (client_id, _) = c.client_with_creds("allow", None).await?;
    c.ra("good", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("good").await?;
    // The same Keycloak under another name is another server as far as the list is concerned.
    let mut spec = c.spec(c.kc(), &client_id, "creds");
    spec["server"] = json!(c.kc().base_url.replace("127.0.0.1", "localhost"));
    c.ra("bad", spec).await?;
    let s =
        wait_condition(&c.client, &c.ns, "bad", "Ready", "False", "ServerNotAllowed", Duration::from_secs(20)).await?;
    assert!(condition(&s, "Ready").ok_or("no Ready")?.2.contains("localhost"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 1, "a request went to a server that is not allowed");
    assert!(c.token_secret("bad-token").await?.is_none());
    c.finish().await
}

/// Without --allow-insecure-http, a plain http server gets InsecureServer and no request.
pub async fn plain_http_is_refused_without_the_flag(env: Arc<Env>) -> Result<()> {
    let c = Case::with_operator_env(env, "https-only", &[], &[("ALLOW_INSECURE_HTTP", "false")]).await?;
    let (client_id, _) = c.client_with_creds("https-only", None).await?;
    assert!(c.kc().base_url.starts_with("http://"));
    c.ra("plain", c.spec(c.kc(), &client_id, "creds")).await?;
    let s =
        wait_condition(&c.client, &c.ns, "plain", "Ready", "False", "InsecureServer", Duration::from_secs(30)).await?;
    assert!(condition(&s, "Ready").ok_or("no Ready")?.2.contains("--allow-insecure-http"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 0, "a request went out over plain http");
    c.finish().await
}

/// Keycloak behind TLS signed by a private CA: trusted with the CA bundle (inline, from a
/// ConfigMap, or given to the operator), TLSError without it.
pub async fn private_ca_is_trusted_only_when_given(env: Arc<Env>) -> Result<()> {
    let ca = support::pki::Ca::new("registry-access-e2e-keycloak-ca")?;
    let serving = ca.server(&["127.0.0.1", "localhost"])?;
    let kc = env.extra_keycloak_tls("keycloak-tls", &serving.cert, &serving.key).await?;
    assert!(kc.base_url.starts_with("https://"));
    let ca_file = env.path().join("keycloak-ca.crt");
    std::fs::write(&ca_file, &ca.cert)?;

    let c = Case::new(env.clone(), "tls").await?;
    c.client_secret("creds", keycloak::SHORT_LIVED_SECRET).await?;
    let mut inline = c.spec(&kc, keycloak::SHORT_LIVED, "creds");
    inline["tls"] = json!({"caBundle": ca.cert});
    c.ra("inline", inline).await?;
    let cm: k8s_openapi::api::core::v1::ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "keycloak-ca"}, "data": {"ca.crt": ca.cert}}))?;
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(c.client.clone(), &c.ns)
        .create(&Default::default(), &cm)
        .await?;
    let mut from_cm = c.spec(&kc, keycloak::SHORT_LIVED, "creds");
    from_cm["tls"] = json!({"caBundleRef": {"kind": "ConfigMap", "name": "keycloak-ca"}});
    c.ra("configmap", from_cm).await?;
    c.ra("untrusted", c.spec(&kc, keycloak::SHORT_LIVED, "creds")).await?;
    let mut missing = c.spec(&kc, keycloak::SHORT_LIVED, "creds");
    missing["tls"] = json!({"caBundleRef": {"kind": "Secret", "name": "no-such-ca"}});
    c.ra("missing", missing).await?;

    c.ready("inline").await?;
    c.ready("configmap").await?;
    let s =
        wait_condition(&c.client, &c.ns, "untrusted", "Ready", "False", "TLSError", Duration::from_secs(30)).await?;
    let message = condition(&s, "Ready").ok_or("no Ready")?.2;
    assert!(message.to_lowercase().contains("certificate") || message.contains("UnknownIssuer"), "{message}");
    let s = wait_condition(&c.client, &c.ns, "missing", "Ready", "False", "InvalidCABundle", Duration::from_secs(30))
        .await?;
    assert!(condition(&s, "Ready").ok_or("no Ready")?.2.contains("no-such-ca"));
    c.finish().await?;

    // The operator-wide bundle: no per-object setting needed.
    let ca_arg = format!("--ca-bundle-file={}", ca_file.display());
    let g = Case::with_operator_args(env, "tls-global", &[ca_arg.as_str()]).await?;
    g.client_secret("creds", keycloak::SHORT_LIVED_SECRET).await?;
    g.ra("global", g.spec(&kc, keycloak::SHORT_LIVED, "creds")).await?;
    g.ready("global").await?;
    g.finish().await
}
