//! End-to-end tests against real programs: etcd, kube-apiserver, kube-controller-manager and
//! Keycloak, with the operator's built binary run as a separate process per test.
//!
//! The environment is started once (see `support`), every test gets its own namespace and its
//! own operator watching it, and every test ends with a check that no token or client secret
//! reached the operator's logs, the statuses or the Events.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use registry_access_operator::api::RegistryAccess;
use serde_json::{Value, json};

use support::case::*;
use support::k8s::{self, condition, wait_condition};
use support::keycloak::{self, REALM, ROLE};
use support::operator::Operator;
use support::pki::ClientKeyType;
use support::{Env, Result};

// ---- the tests ----

/// The documented case: test-ext in consent-01-external-system gets a verified token.
async fn issues_a_verified_token_for_the_documented_client(env: Arc<Env>) -> Result<()> {
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
async fn refreshes_before_every_expiry(env: Arc<Env>) -> Result<()> {
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

/// A rotated client secret is used at once; a wrong one keeps the last good token.
async fn rotated_and_wrong_client_secrets(env: Arc<Env>) -> Result<()> {
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

/// Keycloak stopped: the token stays and Degraded is set; Keycloak back: recovered by itself.
async fn survives_a_keycloak_outage(env: Arc<Env>) -> Result<()> {
    let mut kc = env.extra_keycloak("keycloak-outage").await?;
    let c = Case::new(env, "outage").await?;
    c.client_secret("creds", keycloak::SHORT_LIVED_SECRET).await?;
    c.ra("short", c.spec(&kc, keycloak::SHORT_LIVED, "creds")).await?;
    let status = c.ready("short").await?;
    let token = c.access_token("short-token").await?;
    let expires_at = status.expires_at.ok_or("no expiresAt")?.0;

    kc.stop();
    let s =
        wait_condition(&c.client, &c.ns, "short", "Degraded", "True", "KeycloakUnavailable", Duration::from_secs(30))
            .await?;
    if Timestamp::now() < expires_at {
        assert_eq!(condition(&s, "Ready").map(|c| c.0), Some("True".into()));
    }
    assert!(c.access_token("short-token").await? == token, "the token was replaced while Keycloak was down");
    let s =
        wait_condition(&c.client, &c.ns, "short", "Ready", "False", "TokenExpired", Duration::from_secs(40)).await?;
    let turned = s.conditions.iter().find(|c| c.type_ == "Ready").ok_or("no Ready")?.last_transition_time.0;
    assert!(
        turned.as_second() >= expires_at.as_second(),
        "Ready turned False at {turned}, before the token expired at {expires_at}"
    );
    assert!(c.access_token("short-token").await? == token, "the expired token was removed");

    let t = Instant::now();
    kc.start_again().await?;
    eprintln!("[e2e] Keycloak restarted in {:.1}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    c.ready("short").await?;
    let recovered = t.elapsed();
    eprintln!("[e2e] recovered {:.1}s after Keycloak was ready", recovered.as_secs_f64());
    // Retries while Keycloak is down are at most 10 s apart.
    assert!(recovered < Duration::from_secs(13), "recovery took {recovered:?} after Keycloak was back");
    // The failure is gone; what stays is the warning that 20 s tokens leave pods too little time.
    wait_condition(&c.client, &c.ns, "short", "Degraded", "True", "RenewBeforeTooShort", Duration::from_secs(10))
        .await?;
    assert!(c.access_token("short-token").await? != token, "no new token after recovery");
    c.finish().await
}

/// A restarted operator issues no token while the current ones are valid.
async fn restart_issues_no_new_tokens(env: Arc<Env>) -> Result<()> {
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

/// A token Secret deleted or edited by someone else is restored: the same token where only a
/// derived key was changed, a new one where the token itself was.
async fn restores_an_edited_or_deleted_token_secret(env: Arc<Env>) -> Result<()> {
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

/// Only the allowed Keycloak servers are used; another gets ServerNotAllowed and no request.
async fn allow_list_refuses_other_servers(env: Arc<Env>) -> Result<()> {
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

/// Metrics and Events follow tokens and failures; routine refreshes write no Event.
async fn metrics_and_events_follow_tokens_and_failures(env: Arc<Env>) -> Result<()> {
    let port = support::process::free_port()?;
    let probe = format!("--probe-addr=127.0.0.1:{port}");
    // 20 s tokens, read through the API here: no warning about the kubelet's sync period.
    let c = Case::with_operator_args(env, "observe", &[probe.as_str(), "--kubelet-sync-period=0s"]).await?;
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

/// The refresh annotation issues one new token per new value.
async fn refresh_on_demand(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "on-demand").await?;
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
    c.env.cluster.kubectl(&["annotate", "-n", &c.ns, "registryaccess", "od", "note=unrelated", "--overwrite"])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
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

/// 200 objects due at once: requests spread and capped, every object Ready.
async fn startup_with_many_objects_is_spread_and_capped(env: Arc<Env>) -> Result<()> {
    const OBJECTS: usize = 200;
    const IN_FLIGHT: f64 = 4.0;
    const PER_SECOND: usize = 20;
    let client = env.cluster.client().await?;
    let ns = "e2e-herd";
    k8s::create_namespace(&client, ns).await?;
    let client_id = unique("herd");
    let kc_client = env.keycloak.create_client(REALM, &client_id, None, true).await?;
    k8s::put_client_secret(&client, ns, "creds", &[("client_secret", &kc_client.secret)]).await?;
    let spec = json!({"server": env.keycloak.base_url, "realm": REALM, "clientId": client_id, "clientSecretRef": {"name": "creds"}});
    futures::stream::iter(0..OBJECTS)
        .map(|i| {
            let (client, spec) = (client.clone(), spec.clone());
            async move { k8s::apply_ra(&client, ns, &format!("ra-{i:03}"), spec).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;

    let port = support::process::free_port()?;
    let args = [
        format!("--namespace={ns}"),
        format!("--probe-addr=127.0.0.1:{port}"),
        format!("--max-requests-in-flight={IN_FLIGHT}"),
        format!("--max-requests-per-second-per-server={PER_SECOND}"),
        "--log-level=info".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let mut operator = Operator::start(&env.cluster.kubeconfig, &env.path().join("operator-herd.log"), &args)?;
    let http = reqwest::Client::new();
    let mut peak: f64 = 0.0;
    let ras: Api<RegistryAccess> = Api::namespaced(client.clone(), ns);
    loop {
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await
            && let Ok(text) = r.text().await
            && let Some(v) = sample(&text, "registry_access_token_requests_in_flight")
        {
            peak = peak.max(v);
        }
        let ready = ras
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|r| r.status.as_ref().and_then(|s| condition(s, "Ready")).is_some_and(|c| c.0 == "True"))
            .count();
        if ready == OBJECTS {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {ready} of {OBJECTS} objects Ready after 120 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "[e2e] {OBJECTS} objects Ready {:.1}s after the operator started; in-flight peak {peak}",
        t.elapsed().as_secs_f64()
    );
    let times = env.keycloak.grant_times(REALM, &client_id).await?;
    assert_eq!(times.len(), OBJECTS, "one grant per object");
    assert!(peak <= IN_FLIGHT, "in-flight peak {peak} above the cap {IN_FLIGHT}");
    // Spread: at the paced rate 200 requests take ~9 s; never more than a burst plus a second's
    // worth in any one second.
    let span = (times[OBJECTS - 1] - times[0]) as f64 / 1000.0;
    assert!(span >= ((OBJECTS - PER_SECOND) / PER_SECOND) as f64 * 0.8, "200 grants within {span:.1}s: bunched");
    let busiest =
        times.iter().map(|t0| times.iter().filter(|t| **t >= *t0 && **t < t0 + 1000).count()).max().unwrap_or(0);
    // A burst of one second's worth plus the paced second, and a little for request latency.
    assert!(busiest <= 2 * PER_SECOND + 5, "{busiest} grants in one second");
    eprintln!("[e2e] grants spread over {span:.1}s, at most {busiest} in one second");
    operator.check_alive()?;
    operator.stop();
    assert_nothing_leaked(&client, ns, &operator.logs(), &[kc_client.secret.clone()].into()).await
}

/// Keycloak behind TLS signed by a private CA: trusted with the CA bundle (inline, from a
/// ConfigMap, or given to the operator), TLSError without it.
async fn private_ca_is_trusted_only_when_given(env: Arc<Env>) -> Result<()> {
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

/// Two replicas: SIGKILL of the leader hands over within the lease duration, SIGTERM at once;
/// no Secret ever holds an expired token and the handover issues at most one extra token.
async fn leader_failover_keeps_tokens_fresh(env: Arc<Env>) -> Result<()> {
    const LEASE: u64 = 10;
    let client = env.cluster.client().await?;
    let ns = "e2e-ha";
    k8s::create_namespace(&client, ns).await?;
    let client_id = unique("ha");
    let kc = env.keycloak.create_client(REALM, &client_id, Some(20), true).await?;
    k8s::put_client_secret(&client, ns, "creds", &[("client_secret", &kc.secret)]).await?;
    let names = ["a", "b", "c"];
    for n in names {
        let spec = json!({"server": env.keycloak.base_url, "realm": REALM, "clientId": client_id, "clientSecretRef": {"name": "creds"}});
        k8s::apply_ra(&client, ns, n, spec).await?;
    }
    let args = [
        format!("--namespace={ns}"),
        "--leader-election".to_owned(),
        format!("--leader-election-namespace={ns}"),
        format!("--leader-election-lease-duration={LEASE}s"),
        "--leader-election-renew-grace=3s".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = &env.cluster.kubeconfig;
    let mut first = Operator::start_with_env(
        kubeconfig,
        &env.path().join("operator-ha-1.log"),
        &args,
        &[("POD_NAME", "replica-1")],
    )?;
    wait_until("replica-1 holds the Lease", Duration::from_secs(30), || async {
        lease_holder(&client, ns).await.as_deref() == Some("replica-1")
    })
    .await?;
    let mut second = Operator::start_with_env(
        kubeconfig,
        &env.path().join("operator-ha-2.log"),
        &args,
        &[("POD_NAME", "replica-2")],
    )?;
    for n in names {
        wait_condition(&client, ns, n, "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    }

    // Sample every Secret until told to stop: never an expired token; count distinct tokens.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: BTreeSet<String> = BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for n in names {
                    let data =
                        k8s::secret_data(&client, ns, &format!("{n}-token")).await?.ok_or("token Secret vanished")?;
                    let exp = ts(&data["expires_at"])?;
                    if Timestamp::now() >= exp {
                        return Err::<BTreeSet<String>, Box<dyn std::error::Error + Send + Sync>>(
                            format!("{n}-token held an expired token").into(),
                        );
                    }
                    seen.insert(data["access_token"].clone());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(seen)
        })
    };

    let t = Instant::now();
    first.kill();
    wait_until("replica-2 takes the Lease after SIGKILL", Duration::from_secs(LEASE + 10), || async {
        lease_holder(&client, ns).await.as_deref() == Some("replica-2")
    })
    .await?;
    let takeover = t.elapsed();
    assert!(takeover <= Duration::from_secs(LEASE + 5), "takeover took {takeover:?} with a {LEASE}s lease");
    // Two full token lifetimes under the new leader.
    tokio::time::sleep(Duration::from_secs(40)).await;
    first.start_again()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    second.stop();
    wait_until("replica-1 takes the Lease after SIGTERM", Duration::from_secs(LEASE), || async {
        lease_holder(&client, ns).await.as_deref() == Some("replica-1")
    })
    .await?;
    let graceful = t.elapsed();
    assert!(graceful < Duration::from_secs(LEASE / 2 + 3), "graceful handover took {graceful:?}");
    assert!(second.logs().contains("released the Lease"), "SIGTERM did not release the Lease");
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = sampler.await??;
    for n in names {
        wait_condition(&client, ns, n, "Ready", "True", "TokenValid", Duration::from_secs(10)).await?;
    }
    let grants = env.keycloak.grants(REALM, &client_id).await?;
    // Every grant shows up in a Secret, except at most one per object per handover.
    assert!(grants <= seen.len() + 2 * names.len(), "{grants} grants for {} tokens seen", seen.len());
    eprintln!(
        "[e2e] SIGKILL takeover {:.1}s, SIGTERM handover {:.1}s, {grants} grants, {} tokens seen",
        takeover.as_secs_f64(),
        graceful.as_secs_f64(),
        seen.len()
    );
    first.check_alive()?;
    first.stop();
    let logs = format!("{}{}", first.logs(), second.logs());
    assert_nothing_leaked(&client, ns, &logs, &[kc.secret.clone()].into()).await
}

/// Deleting a RegistryAccess deletes its Secret; a foreign Secret of the target name is kept.
async fn garbage_collection_and_foreign_secrets(env: Arc<Env>) -> Result<()> {
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

/// A RegistryAccess cannot make the operator read a client Secret of another namespace.
async fn client_secrets_stay_in_their_namespace(env: Arc<Env>) -> Result<()> {
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

// ---- the harness ----

/// A Secret that did not opt in is never sent, even holding the right client secret: its reason
/// says how to opt in, Keycloak counts no grant, and the value appears nowhere. Labelled, it is.
async fn a_client_secret_that_did_not_opt_in_is_never_sent(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "opt-in").await?;
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
    tokio::time::sleep(Duration::from_secs(3)).await;
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

/// Without --allow-insecure-http, a plain http server gets InsecureServer and no request.
async fn plain_http_is_refused_without_the_flag(env: Arc<Env>) -> Result<()> {
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

/// Labels, annotations or a new resourceVersion of the client Secret issue no token; a new value
/// does, once.
async fn only_a_new_client_secret_value_issues_a_token(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "touch").await?;
    let (client_id, client) = c.client_with_creds("touch", None).await?;
    c.ra("t", c.spec(c.kc(), &client_id, "creds")).await?;
    c.ready("t").await?;
    let first = c.access_token("t-token").await?;
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.ns);
    let before = secrets.get("creds").await?.metadata.resource_version;
    let touch = json!({"metadata": {"labels": {"backup": "nightly"}, "annotations": {"restored-by": "velero"}}});
    secrets.patch("creds", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&touch)).await?;
    assert_ne!(secrets.get("creds").await?.metadata.resource_version, before);
    tokio::time::sleep(Duration::from_secs(4)).await;
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

/// Renaming spec.secret.name moves the token to the new Secret and retires the old one: its token
/// is removed once the new Secret holds one.
async fn renaming_the_token_secret_retires_the_old_one(env: Arc<Env>) -> Result<()> {
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

/// 20 s tokens renewed 8 s before expiry leave pods less than the kubelet's sync period: warned
/// (Degraded, a Warning Event); a renewBefore longer than the lifetime allows is reduced and said.
async fn too_short_slack_is_warned(env: Arc<Env>) -> Result<()> {
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

/// The environment itself, without the operator: Keycloak accepts as client credentials a
/// ServiceAccount token from the cluster's TokenRequest API (`federated-jwt`, the realm's
/// Kubernetes identity provider reading the API server's keys anonymously over TLS), and
/// assertions signed with an EC and an RSA private key (`client-jwt`) or with a client secret
/// (`client-secret-jwt`); no client_id is sent.
async fn environment_supports_secretless_client_authentication(env: Arc<Env>) -> Result<()> {
    use support::pki::{ClientKeyType, client_key};
    let kc = &env.keycloak;
    let audience = kc.issuer(REALM);
    let client = env.cluster.client().await?;
    let ns = "e2e-secretless-environment";
    k8s::create_namespace(&client, ns).await?;
    k8s::create_service_account(&client, ns, "registry-client").await?;

    // A grant with `assertion`, verified; checks the token's `azp` and Keycloak's recorded method.
    let grant = |client_id: String, assertion: String, method: &'static str| async move {
        let response = kc.grant_with_assertion(REALM, &assertion).await?;
        let claims = verified_claims(kc, response["access_token"].as_str().ok_or("no access_token")?).await?;
        assert_eq!(claims["azp"], client_id.as_str(), "{method}");
        let roles = claims["realm_access"]["roles"].as_array().cloned().unwrap_or_default();
        assert!(roles.iter().any(|r| r == ROLE), "{method}: roles {roles:?}");
        let events = kc.grant_events(REALM, &client_id).await?;
        assert_eq!(events.len(), 1, "{method}: {events:?}");
        assert_eq!(events[0]["details"]["client_auth_method"], method, "{events:?}");
        Result::Ok(())
    };

    let federated = unique("federated");
    kc.create_federated_client(REALM, &federated, ns, "registry-client", None).await?;
    let sa_token = k8s::service_account_token(&client, ns, "registry-client", &audience, 600).await?;
    grant(federated, sa_token, "federated-jwt").await?;

    for key_type in [ClientKeyType::EcP256, ClientKeyType::Rsa2048] {
        let key = client_key(key_type, "registry-client")?;
        let client_id = unique(&format!("{key_type:?}").to_lowercase());
        kc.create_private_key_jwt_client(REALM, &client_id, &key, None).await?;
        let assertion = keycloak::client_assertion(&client_id, &audience, key.algorithm(), &key.encoding_key()?)?;
        grant(client_id, assertion, "client-jwt").await?;
    }

    let client_id = unique("secret-jwt");
    let info = kc.create_client_secret_jwt_client(REALM, &client_id, None).await?;
    let secret = jsonwebtoken::EncodingKey::from_secret(info.secret.as_bytes());
    let assertion = keycloak::client_assertion(&client_id, &audience, jsonwebtoken::Algorithm::HS256, &secret)?;
    grant(client_id, assertion, "client-secret-jwt").await?;
    Ok(())
}

/// A ServiceAccount, opted in with its annotation, authenticates the client: no secret is stored
/// anywhere, Keycloak says federated-jwt, tokens are refreshed over several lifetimes; a recreated
/// ServiceAccount gets a new token; a deleted one keeps the last token and says why.
async fn service_account_authenticates_without_any_secret(env: Arc<Env>) -> Result<()> {
    let port = support::process::free_port()?;
    let probe = format!("--probe-addr=127.0.0.1:{port}");
    let c = Case::with_operator_args(env, "federated", &[probe.as_str(), "--kubelet-sync-period=0s"]).await?;
    let issuer = c.kc().issuer(REALM);
    k8s::put_service_account(&c.client, &c.ns, "registry-client", Some(&issuer)).await?;
    let client_id = unique("federated");
    c.kc().create_federated_client(REALM, &client_id, &c.ns, "registry-client", Some(20)).await?;
    let spec = |sa: &str, client_id: &str| {
        json!({
            "server": c.kc().base_url, "realm": REALM, "clientId": client_id,
            "clientAuthMethod": "service_account", "serviceAccountRef": {"name": sa},
            "requiredRoles": [ROLE],
        })
    };
    c.ra("fed", spec("registry-client", &client_id)).await?;
    let status = c.ready("fed").await?;
    assert!(status.granted_roles.iter().any(|r| r == ROLE), "{:?}", status.granted_roles);
    let first = c.access_token("fed-token").await?;
    let claims = verified_claims(c.kc(), &first).await?;
    assert_eq!(claims["azp"], client_id.as_str());
    let events = c.kc().grant_events(REALM, &client_id).await?;
    assert!(
        events.iter().all(|e| e["details"]["client_auth_method"] == "federated-jwt"),
        "Keycloak's events: {events:?}"
    );
    // Nothing secret is stored: the namespace's only Secret is the token Secret.
    let secrets: Vec<String> = Api::<Secret>::namespaced(c.client.clone(), &c.ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(secrets, ["fed-token"], "Secrets in the namespace");

    // Refreshed over two lifetimes of 20 s tokens.
    let mut seen = BTreeSet::from([first.clone()]);
    let t = Instant::now();
    while seen.len() < 3 {
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!("only {} tokens in 60 s of 20 s tokens", seen.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen.insert(c.access_token("fed-token").await?);
    }

    // Not opted in: its reason, no TokenRequest, no grant (a Keycloak client for it exists).
    k8s::put_service_account(&c.client, &c.ns, "plain", None).await?;
    let plain_client = unique("plain");
    c.kc().create_federated_client(REALM, &plain_client, &c.ns, "plain", None).await?;
    let minted = |text: &str| sample(text, "registry_access_service_account_token_requests_total").unwrap_or(0.0);
    let before = minted(&scrape_until(port, "metrics", |_| true).await?);
    c.ra("plain", spec("plain", &plain_client)).await?;
    let s = wait_condition(
        &c.client,
        &c.ns,
        "plain",
        "Ready",
        "False",
        "ServiceAccountNotOptedIn",
        Duration::from_secs(30),
    )
    .await?;
    let message = condition(&s, "Ready").ok_or("no Ready")?.2;
    assert!(message.contains("kubectl annotate serviceaccount plain"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        minted(&scrape_until(port, "metrics", |_| true).await?),
        before,
        "a TokenRequest for a ServiceAccount that did not opt in"
    );
    assert_eq!(c.kc().grants(REALM, &plain_client).await?, 0);

    // A Keycloak client bound to another ServiceAccount refuses this one's token.
    k8s::put_service_account(&c.client, &c.ns, "other", Some(&issuer)).await?;
    c.ra("other", spec("other", &client_id)).await?;
    wait_condition(&c.client, &c.ns, "other", "Ready", "False", "InvalidClientCredentials", Duration::from_secs(30))
        .await?;

    // Deleted: the last token stays, the reason says why; recreated: a new token at once.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(c.client.clone(), &c.ns);
    sas.delete("registry-client", &DeleteParams::default()).await?;
    let kept = c.access_token("fed-token").await?;
    wait_condition(&c.client, &c.ns, "fed", "Degraded", "True", "ServiceAccountNotFound", Duration::from_secs(30))
        .await?;
    assert!(
        c.access_token("fed-token").await? == kept || c.token_secret("fed-token").await?.is_some(),
        "the token Secret was removed"
    );
    let grants_before = c.kc().grants(REALM, &client_id).await?;
    k8s::put_service_account(&c.client, &c.ns, "registry-client", Some(&issuer)).await?;
    wait_until("a token for the recreated ServiceAccount", Duration::from_secs(15), || async {
        c.kc().grants(REALM, &client_id).await.is_ok_and(|g| g > grants_before)
    })
    .await?;
    c.ready("fed").await?;
    c.finish().await
}

/// private_key_jwt with an EC and an RSA key, client_secret_jwt; a wrong key and an unparsable
/// one get their reasons. Each assertion is single-use in Keycloak: refreshes prove they are fresh.
async fn signed_jwt_client_authentication(env: Arc<Env>) -> Result<()> {
    let c = Case::with_operator_args(env, "signed-jwt", &["--kubelet-sync-period=0s"]).await?;
    let mut clients = Vec::new();
    for (kind, name) in [(ClientKeyType::EcP256, "ec"), (ClientKeyType::Rsa2048, "rsa")] {
        let key = support::pki::client_key(kind, name)?;
        let client_id = unique(&format!("pkjwt-{name}"));
        c.kc().create_private_key_jwt_client(REALM, &client_id, &key, Some(20)).await?;
        for line in key.private_key_pem.lines().filter(|l| l.len() > 40) {
            c.sensitive(line);
        }
        let secret = format!("{name}-key");
        k8s::put_client_secret(&c.client, &c.ns, &secret, &[("tls.key", &key.private_key_pem)]).await?;
        c.ra(
            name,
            json!({
                "server": c.kc().base_url, "realm": REALM, "clientId": client_id,
                "clientAuthMethod": "private_key_jwt", "privateKeyRef": {"name": secret},
            }),
        )
        .await?;
        clients.push((name, client_id, key));
    }
    let jwt = c.kc().create_client_secret_jwt_client(REALM, &unique("csjwt"), None).await?;
    c.client_secret("csjwt-creds", &jwt.secret).await?;
    c.ra(
        "csjwt",
        json!({
            "server": c.kc().base_url, "realm": REALM, "clientId": jwt.client_id,
            "clientAuthMethod": "client_secret_jwt", "clientSecretRef": {"name": "csjwt-creds"},
        }),
    )
    .await?;
    for (name, client_id, _) in &clients {
        c.ready(name).await?;
        let claims = verified_claims(c.kc(), &c.access_token(&format!("{name}-token")).await?).await?;
        assert_eq!(claims["azp"], client_id.as_str());
    }
    c.ready("csjwt").await?;
    let events = c.kc().grant_events(REALM, &jwt.client_id).await?;
    assert!(events.iter().all(|e| e["details"]["client_auth_method"] == "client-secret-jwt"), "{events:?}");

    // Three tokens of 20 s each for the EC client: three fresh assertions accepted.
    let (_, ec_client, _) = &clients[0];
    wait_until("three grants with fresh assertions", Duration::from_secs(60), || async {
        c.kc().grants(REALM, ec_client).await.is_ok_and(|g| g >= 3)
    })
    .await?;
    c.ready("ec").await?;

    // The wrong key (the RSA client's key for the EC client) and an unparsable one.
    let (_, _, rsa_key) = &clients[1];
    k8s::put_client_secret(&c.client, &c.ns, "ec-key", &[("tls.key", &rsa_key.private_key_pem)]).await?;
    wait_condition(&c.client, &c.ns, "ec", "Degraded", "True", "InvalidClientCredentials", Duration::from_secs(30))
        .await?;
    k8s::put_client_secret(
        &c.client,
        &c.ns,
        "rsa-key",
        &[("tls.key", "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")],
    )
    .await?;
    let s = wait_condition(&c.client, &c.ns, "rsa", "Degraded", "True", "PrivateKeyInvalid", Duration::from_secs(30))
        .await?;
    assert!(condition(&s, "Degraded").ok_or("no Degraded")?.2.contains("rsa-key"));
    c.finish().await
}

/// requiredRoles: the documented client has trembita-invoker; a role it lacks is named.
async fn required_roles_are_checked(env: Arc<Env>) -> Result<()> {
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
async fn dashboard_and_alerts_use_only_exported_metrics(env: Arc<Env>) -> Result<()> {
    let port = support::process::free_port()?;
    let probe = format!("--probe-addr=127.0.0.1:{port}");
    let c = Case::with_operator_args(env, "dashboard", &[probe.as_str(), "--kubelet-sync-period=0s"]).await?;
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

/// `kubectl registry-access`: `status` shows the objects Ready with their roles, `renew --all
/// --wait` gives exactly one new token per object (Keycloak's grant count), `inspect` prints the
/// claims and neither the token nor the client secret, `check` names the Lease holder, and a
/// user without Secret access gets the missing right named.
async fn kubectl_plugin_status_renew_inspect_check(env: Arc<Env>) -> Result<()> {
    let lease = "plugin-registry-access-operator";
    let c = Case::with_operator_env(
        env.clone(),
        "plugin",
        &[
            "--leader-election",
            "--leader-election-namespace=e2e-plugin",
            &format!("--leader-election-lease-name={lease}"),
        ],
        &[("POD_NAME", "plugin-operator")],
    )
    .await?;
    let (client_id, client) = c.client_with_creds("plugin", None).await?;
    for name in ["alpha", "beta"] {
        c.ra(name, c.spec(c.kc(), &client_id, "creds")).await?;
        c.ready(name).await?;
    }
    let admin = &env.cluster.kubeconfig;
    let ns = c.ns.as_str();

    let (ok, out, err) = plugin(admin, &["-n", ns, "status"])?;
    assert!(ok, "status failed: {err}");
    let alpha = out.lines().find(|l| l.starts_with("alpha")).ok_or(format!("no alpha row:\n{out}"))?;
    assert!(alpha.contains("True") && alpha.contains("TokenValid") && alpha.contains(ROLE), "{out}");
    let (ok, out, _) = plugin(admin, &["-n", ns, "status", "-o", "json"])?;
    let rows: Value = serde_json::from_str(&out)?;
    assert!(ok && rows.as_array().map(Vec::len) == Some(2), "{out}");
    assert!(rows[0]["ready"] == "True" && rows[0]["roles"][0] == ROLE, "{out}");
    let (ok, out, err) = plugin(admin, &["-n", ns, "status", "alpha"])?;
    assert!(ok, "status alpha failed: {err}");
    assert!(out.contains("Token Secret: alpha-token") && out.contains("TokenIssued") && out.contains("Ready"), "{out}");

    let grants = c.kc().grants(REALM, &client_id).await?;
    assert_eq!(grants, 2);
    let (ok, out, err) = plugin(admin, &["-n", ns, "renew", "--all", "--wait", "--timeout=60"])?;
    assert!(ok, "renew failed: {err}");
    assert_eq!(out.matches("renewed, new token issued at").count(), 2, "{out}");
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 4, "renew --all gives exactly one grant per object");

    let token = c.access_token("alpha-token").await?;
    let (ok, out, err) = plugin(admin, &["-n", ns, "inspect", "alpha"])?;
    assert!(ok, "inspect failed: {err}");
    assert!(out.contains(&format!("Client:      {client_id}")) && out.contains(ROLE), "{out}");
    assert!(out.contains(&format!("Issuer:      {}", c.kc().issuer(REALM))), "{out}");
    let payload = token.split('.').nth(1).unwrap_or_default();
    for (what, secret) in
        [("token", token.as_str()), ("token payload", payload), ("client secret", client.secret.as_str())]
    {
        assert!(!out.contains(secret) && !err.contains(secret), "inspect printed the {what}");
    }

    let (ok, out, err) = plugin(admin, &["check"])?;
    assert!(ok, "check failed: {err}");
    assert!(out.contains(&format!("Lease e2e-plugin/{lease} held by plugin-operator")), "{out}");
    assert!(out.contains("registryaccesses.registry-access.io installed; served v1alpha1"), "{out}");

    // A user who may read RegistryAccess objects but not Secrets.
    let viewer = env.cluster.ca.client("plugin-viewer", &[])?;
    let kubeconfig = env.path().join("plugin-viewer.kubeconfig");
    std::fs::write(
        &kubeconfig,
        support::cluster::kubeconfig_with_cert(&env.cluster.server, &env.cluster.ca_pem, "plugin-viewer", &viewer),
    )?;
    env.cluster.kubectl(&[
        "create",
        "role",
        "ra-reader",
        "-n",
        ns,
        "--verb=get,list",
        "--resource=registryaccesses",
    ])?;
    env.cluster.kubectl(&[
        "create",
        "rolebinding",
        "ra-reader",
        "-n",
        ns,
        "--role=ra-reader",
        "--user=plugin-viewer",
    ])?;
    let (ok, _, err) = plugin(&kubeconfig, &["-n", ns, "inspect", "alpha"])?;
    assert!(!ok, "inspect succeeded without Secret access");
    assert!(
        err.contains(&format!("you may not read Secrets in namespace {ns}: inspect needs get on secrets")),
        "{err}"
    );
    env.cluster.kubectl(&["create", "role", "ra-events", "-n", ns, "--verb=list", "--resource=events"])?;
    env.cluster.kubectl(&[
        "create",
        "rolebinding",
        "ra-events",
        "-n",
        ns,
        "--role=ra-events",
        "--user=plugin-viewer",
    ])?;
    let (ok, out, err) = plugin(&kubeconfig, &["-n", ns, "status", "alpha"])?;
    assert!(ok && out.contains("Ready:       True (TokenValid)"), "status NAME without Secret access: {err}{out}");
    assert!(out.contains("alpha-token: not shown (you may not get secrets in namespace e2e-plugin)"), "{out}");
    let (ok, _, err) = plugin(&kubeconfig, &["-n", "default", "status"])?;
    assert!(
        !ok && err
            .contains("you may not list registryaccesses in namespace default: status needs list on registryaccesses"),
        "{err}"
    );
    c.finish().await
}

fn main() {
    // Most of a test is waiting for tokens to age: run several at once.
    support::harness::run(
        "e2e",
        tests![
            issues_a_verified_token_for_the_documented_client,
            refreshes_before_every_expiry,
            rotated_and_wrong_client_secrets,
            survives_a_keycloak_outage,
            restart_issues_no_new_tokens,
            restores_an_edited_or_deleted_token_secret,
            allow_list_refuses_other_servers,
            metrics_and_events_follow_tokens_and_failures,
            refresh_on_demand,
            startup_with_many_objects_is_spread_and_capped,
            leader_failover_keeps_tokens_fresh,
            kubectl_plugin_status_renew_inspect_check,
            dashboard_and_alerts_use_only_exported_metrics,
            private_ca_is_trusted_only_when_given,
            garbage_collection_and_foreign_secrets,
            client_secrets_stay_in_their_namespace,
            a_client_secret_that_did_not_opt_in_is_never_sent,
            plain_http_is_refused_without_the_flag,
            only_a_new_client_secret_value_issues_a_token,
            renaming_the_token_secret_retires_the_old_one,
            too_short_slack_is_warned,
            environment_supports_secretless_client_authentication,
            service_account_authenticates_without_any_secret,
            signed_jwt_client_authentication,
            required_roles_are_checked,
        ],
        4,
    )
}
