//! Issuing and renewing tokens: the documented client, required roles, renewal before every expiry,
//! refresh on demand, a restarted operator, too little slack for the kubelet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::{Value, json};

use crate::support::case::*;
use crate::support::k8s::{condition, wait_condition};
use crate::support::keycloak::{self, REALM, ROLE};
use crate::support::metrics::wait_idle;
use crate::support::{Env, Result};

/// The documented case: test-ext in consent-01-external-system gets a verified token.
pub async fn issues_a_verified_token_for_the_documented_client(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "verified").await?;
    c.client_secret("test-ext-credentials", keycloak::TEST_EXT_SECRET).await?;
    let mut spec = c.spec(c.kc(), keycloak::TEST_EXT, "test-ext-credentials");
    spec["registryUrl"] = json!("https://external-service-api-consent-02-main.apps.example.com/api/gateway");
    c.ra("consent-02", spec).await?;
    let status = c.ready("consent-02").await?;

    let data = c.token_secret("consent-02-token").await?.ok_or("no token Secret")?;
    let token = &data["access_token"];
    let claims = verified_claims(c.kc(), token).await?;
    let roles: Vec<&str> = claims["realm_access"]["roles"]
        .as_array()
        .ok_or("no realm_access.roles")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(roles.contains(&ROLE), "roles {roles:?}");
    assert_eq!(claims["azp"], keycloak::TEST_EXT);
    assert_eq!(data["token_type"], "Bearer");
    assert!(data["authorization"] == format!("Bearer {token}"), "authorization is not 'Bearer <access_token>'");
    assert_eq!(data["registry_url"], "https://external-service-api-consent-02-main.apps.example.com/api/gateway");

    assert!(status.granted_roles.iter().any(|r| r == ROLE), "{:?}", status.granted_roles);
    let expires_at = status.expires_at.as_ref().ok_or("no expiresAt")?.0;
    let renew_at = status.renew_at.as_ref().ok_or("no renewAt")?.0;
    assert_eq!(ts(&data["expires_at"])?, expires_at);
    // expiresAt counts expires_in from when the request was sent: at most a moment before exp.
    let exp = claims["exp"].as_i64().ok_or("no exp")?;
    assert!((0..=2).contains(&(exp - expires_at.as_second())), "expiresAt {expires_at} vs exp {exp}");
    // Keycloak's default 300 s lifetime and the operator's defaults: renewal with 167 s left (the
    // kubelet's 90 s worst case, one failed 15 s request and its 2 s retry delay, a minute to
    // spare), minus <= 10 s jitter.
    let before = expires_at.duration_since(renew_at).as_secs();
    assert!((167..=178).contains(&before), "renewAt is {before}s before expiry");
    assert_eq!(status.secret_name.as_deref(), Some("consent-02-token"));

    let secret = Api::<Secret>::namespaced(c.client.clone(), &c.ns).get("consent-02-token").await?;
    assert_eq!(
        secret.metadata.labels.unwrap_or_default().get("app.kubernetes.io/managed-by").map(String::as_str),
        Some("registry-access-operator")
    );
    let owner = &secret.metadata.owner_references.unwrap_or_default()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("RegistryAccess", "consent-02", Some(true))
    );
    assert!(secret.metadata.annotations.unwrap_or_default().contains_key("registry-access.io/expires-at"));
    assert_eq!(c.kc().grants(REALM, keycloak::TEST_EXT).await?, 1, "one grant for one token");
    c.finish().await
}

/// Short tokens are replaced before each expiry, one grant per refresh.
pub async fn refreshes_before_every_expiry(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "refresh").await?;
    let (client_id, _) = c.client_with_creds("refresh", Some(20)).await?;
    c.ra("short", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("short").await?;

    let mut seen: Vec<String> = Vec::new();
    let sample = |seen: &mut Vec<String>, data: std::collections::BTreeMap<String, String>| -> Result<()> {
        let now = Timestamp::now();
        let token = data.get("access_token").ok_or("no token")?;
        let exp = jsonwebtoken::dangerous::insecure_decode::<Value>(token)?.claims["exp"].as_i64().ok_or("no exp")?;
        if now.as_second() >= exp || now >= ts(&data["expires_at"])? {
            return Err(format!("the Secret held an expired token at {now} (exp {exp})").into());
        }
        if seen.last() != Some(token) {
            seen.push(token.clone());
        }
        Ok(())
    };
    let start = Instant::now();
    // Three and a half lifetimes of 20 s.
    while start.elapsed() < Duration::from_secs(70) {
        let data = c.token_secret("short-token").await?.ok_or("token Secret vanished")?;
        sample(&mut seen, data)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Count grants when no refresh happens between the count and a last sample.
    let grants = loop {
        let before = seen.len();
        let grants = c.kc().grants(REALM, &client_id).await?;
        let data = c.token_secret("short-token").await?.ok_or("token Secret vanished")?;
        sample(&mut seen, data)?;
        if seen.len() == before {
            break grants;
        }
    };
    assert!(seen.len() >= 5, "only {} distinct tokens in 70 s of 20 s tokens", seen.len());
    assert_eq!(grants, seen.len(), "Keycloak grants vs distinct tokens seen in the Secret");
    c.finish().await
}

/// The refresh annotation issues one new token per new value.
pub async fn refresh_on_demand(env: Arc<Env>) -> Result<()> {
    let (c, port) = Case::with_metrics(env, "on-demand", &[]).await?;
    let (client_id, _) = c.client_with_creds("ondemand", None).await?;
    c.ra("od", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("od").await?;
    let first = c.access_token("od-token").await?;
    let annotate = |value: &str| {
        c.env.cluster.kubectl(&[
            "annotate",
            "-n",
            &c.ns,
            "registryaccess",
            "od",
            &format!("registry-access.io/refresh-requested-at={value}"),
            "--overwrite",
        ])
    };
    annotate("2026-11-29T12:00:00Z")?;
    wait_until("a token refreshed on demand", Duration::from_secs(15), || async {
        c.access_token("od-token").await.unwrap_or_default() != first
    })
    .await?;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 2);
    // Another annotation, same request value: nothing new.
    let before = wait_idle(port).await?;
    c.env.cluster.kubectl(&["annotate", "-n", &c.ns, "registryaccess", "od", "note=unrelated", "--overwrite"])?;
    // The positive sign that the operator has looked at the object since: a spec change made
    // after the annotation (the watch delivers them in order) that needs no token is applied to
    // the token Secret.
    let mut spec = c.spec(c.kc(), &client_id, "creds");
    spec["secret"] = json!({"labels": {"after-note": "yes"}});
    c.ra("od", spec).await?;
    wait_until("the spec change after the annotation applied", Duration::from_secs(15), || async {
        let s = Api::<Secret>::namespaced(c.client.clone(), &c.ns).get("od-token").await;
        s.is_ok_and(|s| s.metadata.labels.unwrap_or_default().get("after-note").map(String::as_str) == Some("yes"))
    })
    .await?;
    let after = wait_idle(port).await?;
    assert_eq!(after.token_requests, before.token_requests, "the same request value sent another token request");
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 2, "the same request value issued another token");
    let second = c.access_token("od-token").await?;
    annotate("again")?;
    wait_until("a second refresh on demand", Duration::from_secs(15), || async {
        c.access_token("od-token").await.unwrap_or_default() != second
    })
    .await?;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 3);
    c.finish().await
}

/// A restarted operator issues no token while the current ones are valid.
pub async fn restart_issues_no_new_tokens(env: Arc<Env>) -> Result<()> {
    let mut c = Case::new(env, "restart").await?;
    let (client_id, _) = c.client_with_creds("restart", None).await?;
    for name in ["a", "b", "c"] {
        c.ra(name, c.spec(c.kc(), &client_id, "creds")).await?;
    }
    let mut tokens = Vec::new();
    for name in ["a", "b", "c"] {
        c.ready(name).await?;
        tokens.push(c.access_token(&format!("{name}-token")).await?);
    }
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 3);

    c.operator.stop();
    c.operator.start_again()?;
    // A spec change that needs no new token proves the new process has reconciled each object.
    for name in ["a", "b", "c"] {
        let mut spec = c.spec(c.kc(), &client_id, "creds");
        spec["secret"] = json!({"labels": {"restarted": "yes"}});
        c.ra(name, spec).await?;
    }
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.ns);
    let t = Instant::now();
    for name in ["a", "b", "c"] {
        loop {
            let s = secrets.get(&format!("{name}-token")).await?;
            if s.metadata.labels.unwrap_or_default().get("restarted").map(String::as_str) == Some("yes") {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err("the restarted operator did not reconcile".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for (name, before) in ["a", "b", "c"].iter().zip(&tokens) {
        assert!(&c.access_token(&format!("{name}-token")).await? == before, "{name}: token replaced after restart");
    }
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 3, "grants after the restart");
    c.finish().await
}

/// 20 s tokens renewed 8 s before expiry leave pods less than the kubelet's sync period: warned
/// (Degraded, a Warning Event); a renewBefore longer than the lifetime allows is reduced and said.
pub async fn too_short_slack_is_warned(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "slack").await?;
    c.client_secret("creds", keycloak::SHORT_LIVED_SECRET).await?;
    let mut spec = c.spec(c.kc(), keycloak::SHORT_LIVED, "creds");
    spec["renewBefore"] = json!("8s");
    c.ra("short", spec.clone()).await?;
    let s =
        wait_condition(&c.client, &c.ns, "short", "Degraded", "True", "RenewBeforeTooShort", Duration::from_secs(30))
            .await?;
    assert_eq!(condition(&s, "Ready").map(|c| c.0), Some("True".into()));
    let message = condition(&s, "Degraded").ok_or("no Degraded")?.2;
    assert!(message.contains("renewed 8s before") && message.contains("90s"), "{message}");
    wait_until("a RenewBeforeTooShort Warning Event", Duration::from_secs(10), || async {
        events_of(&c).await.is_ok_and(|e| e.iter().any(|(t, r)| t == "Warning" && r == "RenewBeforeTooShort"))
    })
    .await?;

    spec["renewBefore"] = json!("19s");
    c.ra("short", spec).await?;
    let s =
        wait_condition(&c.client, &c.ns, "short", "Degraded", "True", "RenewBeforeAdjusted", Duration::from_secs(30))
            .await?;
    let message = condition(&s, "Degraded").ok_or("no Degraded")?.2;
    assert!(message.contains("spec.renewBefore 19s") && message.contains("renewed 15s before"), "{message}");
    c.finish().await
}

/// requiredRoles: the documented client has trembita-invoker; a role it lacks is named.
pub async fn required_roles_are_checked(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "roles").await?;
    c.client_secret("test-ext-credentials", keycloak::TEST_EXT_SECRET).await?;
    let mut spec = c.spec(c.kc(), keycloak::TEST_EXT, "test-ext-credentials");
    spec["requiredRoles"] = json!([ROLE]);
    c.ra("granted", spec.clone()).await?;
    c.ready("granted").await?;
    spec["requiredRoles"] = json!([ROLE, "registry-auditor"]);
    c.ra("lacking", spec).await?;
    let s =
        wait_condition(&c.client, &c.ns, "lacking", "Ready", "False", "RequiredRolesMissing", Duration::from_secs(30))
            .await?;
    let message = condition(&s, "Ready").ok_or("no Ready")?.2;
    assert!(message.contains("registry-auditor") && !message.contains(&format!("role(s) {ROLE}")), "{message}");
    assert!(s.granted_roles.iter().any(|r| r == ROLE));
    assert!(
        c.token_secret("lacking-token").await?.is_some_and(|d| d.contains_key("access_token")),
        "the token is still written"
    );
    c.finish().await
}
