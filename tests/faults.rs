//! Faults and hostile input on the real environment: broken objects, Keycloak-level mistakes, a
//! hung Keycloak, a flaky one, a control-plane restart, and the operator killed mid-batch. Each
//! test fails if a token is lost, a Secret is half-written, or a failure goes unexplained.
//!
//! Runs one test at a time: the control-plane restart would disturb any test beside it.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use registry_access_operator::api::RegistryAccess;
use registry_access_operator::secret::{EXPIRES_AT_ANNOTATION, TOKEN_DIGEST_ANNOTATION, token_digest};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use support::case::*;
use support::http::read_request;
use support::k8s::{self, condition, wait_condition};
use support::keycloak::{self, REALM};
use support::operator::Operator;
use support::{Env, Result};

/// Broken objects are refused by the API server itself, with a message naming the field.
async fn broken_objects_are_refused_with_the_field_named(env: Arc<Env>) -> Result<()> {
    let client = env.cluster.client().await?;
    let ns = "faults-input";
    k8s::create_namespace(&client, ns).await?;
    let api: Api<RegistryAccess> = Api::namespaced(client.clone(), ns);
    let good = json!({"server": "https://kc.example.com/auth", "realm": "r", "clientId": "c", "clientSecretRef": {"name": "creds"}});
    let with = |path: &[&str], value: Value| {
        let mut spec = good.clone();
        let mut at = &mut spec;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = value;
        spec
    };
    let without = |field: &str| {
        let mut spec = good.clone();
        spec.as_object_mut().unwrap().remove(field);
        spec
    };
    let long_name = "x".repeat(250);
    let corpus: Vec<(&str, String, Value, &str)> = vec![
        ("empty server", "empty-server".into(), with(&["server"], json!("")), "spec.server"),
        ("server not a URL", "bad-server".into(), with(&["server"], json!("keycloak")), "spec.server"),
        (
            "server with user information",
            "userinfo".into(),
            with(&["server"], json!("https://admin:pw@kc.example.com/auth")),
            "spec.server",
        ),
        ("server with another scheme", "ftp".into(), with(&["server"], json!("ftp://kc.example.com")), "spec.server"),
        (
            "unknown clientAuthMethod",
            "auth-method".into(),
            with(&["clientAuthMethod"], json!("tls_client_auth")),
            "spec.clientAuthMethod",
        ),
        (
            "service_account without serviceAccountRef",
            "sa-without-ref".into(),
            with(&["clientAuthMethod"], json!("service_account")),
            "serviceAccountRef is required",
        ),
        (
            "private_key_jwt without privateKeyRef",
            "key-without-ref".into(),
            with(&["clientAuthMethod"], json!("private_key_jwt")),
            "privateKeyRef is required",
        ),
        (
            "serviceAccountRef with a client secret method",
            "secret-and-sa".into(),
            with(&["serviceAccountRef"], json!({"name": "builder"})),
            "serviceAccountRef is required with clientAuthMethod service_account, and not allowed",
        ),
        ("negative renewBefore", "negative".into(), with(&["renewBefore"], json!("-5s")), "spec.renewBefore"),
        ("unparsable renewBefore", "unparsable".into(), with(&["renewBefore"], json!("soon")), "spec.renewBefore"),
        ("zero renewBefore", "zero".into(), with(&["renewBefore"], json!("0s")), "spec.renewBefore"),
        ("missing clientSecretRef", "no-ref".into(), without("clientSecretRef"), "clientSecretRef"),
        ("empty realm", "empty-realm".into(), with(&["realm"], json!("")), "spec.realm"),
        ("empty clientId", "empty-client".into(), with(&["clientId"], json!("")), "spec.clientId"),
        (
            "bad Secret name",
            "bad-secret-name".into(),
            with(&["clientSecretRef", "name"], json!("Not_A_Name")),
            "spec.clientSecretRef.name",
        ),
        ("scope with a space", "bad-scope".into(), with(&["scopes"], json!(["two words"])), "spec.scopes"),
        (
            "both CA bundle forms",
            "two-cas".into(),
            with(&["tls"], json!({"caBundle": "x", "caBundleRef": {"kind": "ConfigMap", "name": "ca"}})),
            "spec.tls",
        ),
        ("name too long for the default Secret name", long_name, good.clone(), "spec.secret.name"),
    ];
    for (what, name, spec, field) in corpus {
        let raw = json!({"apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
            "metadata": {"name": name, "namespace": ns}, "spec": spec});
        let refused = env.cluster.kubectl_stdin(&["create", "-f", "-"], &raw.to_string()).err();
        let message = refused.ok_or_else(|| format!("the API server accepted: {what}"))?.to_string();
        assert!(message.contains(field), "{what}: the refusal does not name {field}: {message}");
    }
    assert!(api.list(&ListParams::default()).await?.items.is_empty(), "a broken object was stored");
    Ok(())
}

/// Mistakes only Keycloak can tell get their own reasons; the operator keeps serving the rest.
async fn keycloak_level_mistakes_get_their_reasons(env: Arc<Env>) -> Result<()> {
    let c = Case::new(env, "kc-mistakes").await?;
    c.client_secret("creds", keycloak::TEST_EXT_SECRET).await?;
    c.client_secret("nsa-creds", "no-service-account-secret-000000000").await?;
    let kc = c.kc();
    c.ra("good", c.spec(kc, keycloak::TEST_EXT, "creds")).await?;
    let mut realm = c.spec(kc, keycloak::TEST_EXT, "creds");
    realm["realm"] = json!("no-such-realm");
    c.ra("realm", realm).await?;
    c.ra("client", c.spec(kc, "no-such-client", "creds")).await?;
    c.ra("service-accounts", c.spec(kc, "no-service-account", "nsa-creds")).await?;
    let mut scope = c.spec(kc, keycloak::TEST_EXT, "creds");
    scope["scopes"] = json!(["no-such-scope"]);
    c.ra("scope", scope).await?;
    let expected = [
        ("realm", "RealmNotFound", "spec.realm"),
        ("client", "InvalidClientCredentials", "clientId"),
        ("service-accounts", "ServiceAccountsDisabled", "service accounts"),
        ("scope", "InvalidScope", "spec.scopes"),
    ];
    for (name, reason, hint) in expected {
        let s = wait_condition(&c.client, &c.ns, name, "Ready", "False", reason, Duration::from_secs(30)).await?;
        let message = condition(&s, "Degraded").ok_or("no Degraded")?.2;
        assert!(message.contains(hint), "{name}: {message}");
    }
    c.ready("good").await?;
    c.finish().await
}

/// A TCP server that accepts connections and never answers; returns its port.
async fn hung_server() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    Ok(port)
}

/// A hung Keycloak: requests time out with the right reason and other objects are served.
async fn a_hung_keycloak_times_out_without_blocking_others(env: Arc<Env>) -> Result<()> {
    let port = hung_server().await?;
    let c = Case::with_operator_args(env, "hung", &["--request-timeout=2s"]).await?;
    c.client_secret("creds", keycloak::TEST_EXT_SECRET).await?;
    for i in 0..10 {
        let mut spec = c.spec(c.kc(), keycloak::TEST_EXT, "creds");
        spec["server"] = json!(format!("http://127.0.0.1:{port}/auth"));
        c.ra(&format!("hung-{i}"), spec).await?;
    }
    let t = Instant::now();
    c.ra("good", c.spec(c.kc(), keycloak::TEST_EXT, "creds")).await?;
    c.ready("good").await?;
    let served = t.elapsed();
    assert!(served < Duration::from_secs(10), "a healthy object waited {served:?} behind hung requests");
    for i in 0..10 {
        let s = wait_condition(
            &c.client,
            &c.ns,
            &format!("hung-{i}"),
            "Ready",
            "False",
            "KeycloakUnavailable",
            Duration::from_secs(30),
        )
        .await?;
        let message = condition(&s, "Degraded").ok_or("no Degraded")?.2;
        assert!(message.contains("no answer"), "{message}");
    }
    eprintln!("[faults] healthy object Ready {:.1}s after creation beside 10 hung ones", served.as_secs_f64());
    c.finish().await
}

/// A proxy in front of Keycloak that answers 503 to every other request.
async fn flaky_proxy(upstream: String) -> Result<(u16, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let upstream = Arc::new(upstream);
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            let (http, upstream, seen) = (http.clone(), upstream.clone(), seen.clone());
            tokio::spawn(async move {
                let Some(request) = read_request(&mut sock).await else { return };
                let (path, headers, body) = (request.path().to_owned(), request.headers, request.body);
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let (status, content_type, reply) = if n % 2 == 0 {
                    (503, "text/plain".to_owned(), b"flaky".to_vec())
                } else {
                    let mut req = http.post(format!("{upstream}{path}")).body(body);
                    for (k, v) in headers {
                        if k.eq_ignore_ascii_case("content-type") || k.eq_ignore_ascii_case("authorization") {
                            req = req.header(k, v);
                        }
                    }
                    match req.send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let ct = r
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("application/json")
                                .to_owned();
                            (status, ct, r.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
                        }
                        Err(_) => (502, "text/plain".to_owned(), b"upstream".to_vec()),
                    }
                };
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    reply.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&reply).await;
            });
        }
    });
    Ok((port, count))
}

/// Checks that a token Secret is whole: every key agrees with the others.
fn assert_whole(name: &str, s: &Secret) -> Result<String> {
    let data: BTreeMap<String, String> = s
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    let ann = s.metadata.annotations.clone().unwrap_or_default();
    let token = data.get("access_token").ok_or_else(|| format!("{name}: no access_token"))?;
    if data.get("authorization") != Some(&format!("Bearer {token}"))
        || data.get("expires_at") != ann.get(EXPIRES_AT_ANNOTATION)
        || ann.get(TOKEN_DIGEST_ANNOTATION) != Some(&token_digest(token))
        || data.get("token_type").map(String::as_str) != Some("Bearer")
    {
        return Err(format!("{name}: the Secret is half-written (its keys disagree)").into());
    }
    Ok(token.clone())
}

/// A Keycloak answering 503 to every other request: refreshes still land before expiry.
async fn flaky_keycloak_still_refreshes_before_expiry(env: Arc<Env>) -> Result<()> {
    let (port, requests) = flaky_proxy(env.keycloak.base_url.trim_end_matches("/auth").to_owned()).await?;
    let c = Case::new(env, "flaky").await?;
    c.client_secret("creds", keycloak::SHORT_LIVED_SECRET).await?;
    let mut spec = c.spec(c.kc(), keycloak::SHORT_LIVED, "creds");
    spec["server"] = json!(format!("http://127.0.0.1:{port}/auth"));
    c.ra("flaky", spec).await?;
    c.ready("flaky").await?;
    let mut tokens = std::collections::BTreeSet::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(40) {
        let data = c.token_secret("flaky-token").await?.ok_or("token Secret vanished")?;
        if Timestamp::now() >= ts(&data["expires_at"])? {
            return Err("the Secret held an expired token while Keycloak was flaky".into());
        }
        tokens.insert(data["access_token"].clone());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = requests.load(Ordering::SeqCst);
    assert!(tokens.len() >= 3, "only {} tokens in 40 s of 20 s tokens", tokens.len());
    assert!(
        sent >= 2 * tokens.len() - 1,
        "the proxy saw {sent} requests for {} tokens: no failures were survived",
        tokens.len()
    );
    eprintln!("[faults] {} tokens through {sent} requests, half of them answered 503", tokens.len());
    c.finish().await
}

/// kube-apiserver and etcd restarted: watches recover and refreshes continue.
async fn control_plane_restart_is_survived(env: Arc<Env>) -> Result<()> {
    let mut c = Case::new(env.clone(), "restart-api").await?;
    let (client_id, _) = c.client_with_creds("cp", Some(20)).await?;
    for n in ["a", "b"] {
        c.ra(n, c.spec(c.kc(), &client_id, "creds")).await?;
        c.ready(n).await?;
    }
    let before: Vec<String> = vec![c.access_token("a-token").await?, c.access_token("b-token").await?];
    // Every token the Secrets hold, sampled whenever the API answers.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (kubeconfig, ns, stop) = (env.cluster.kubeconfig.clone(), c.ns.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(client) = support::cluster::client_for(&kubeconfig).await {
                    for n in ["a", "b"] {
                        if let Ok(Some(d)) = k8s::secret_data(&client, &ns, &format!("{n}-token")).await
                            && let Some(t) = d.get("access_token")
                        {
                            seen.insert(t.clone());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            seen
        })
    };
    let t = Instant::now();
    env.cluster.restart_control_plane().await?;
    eprintln!("[faults] control plane restarted in {:.1}s", t.elapsed().as_secs_f64());
    // Refreshes continue: each object gets two tokens issued after the restart (the watches
    // are back and renewals go on), and is Ready.
    let restarted = Timestamp::now().as_second();
    let client = env.cluster.client().await?;
    c.client = client;
    let issued_after = std::sync::Mutex::new(vec![std::collections::BTreeSet::<String>::new(); 2]);
    wait_until("two tokens per object issued after the restart", Duration::from_secs(90), || async {
        for (i, n) in ["a", "b"].iter().enumerate() {
            let Ok(Some(d)) = k8s::secret_data(&c.client, &c.ns, &format!("{n}-token")).await else { continue };
            let Some(t) = d.get("access_token") else { continue };
            let iat = jsonwebtoken::dangerous::insecure_decode::<Value>(t).ok().and_then(|d| d.claims["iat"].as_i64());
            if iat.is_some_and(|iat| iat > restarted) {
                issued_after.lock().unwrap()[i].insert(t.clone());
            }
        }
        issued_after.lock().unwrap().iter().all(|s| s.len() >= 2)
    })
    .await?;
    for (n, old) in ["a", "b"].iter().zip(&before) {
        let s = wait_condition(&c.client, &c.ns, n, "Ready", "True", "TokenValid", Duration::from_secs(30)).await?;
        let now = c.access_token(&format!("{n}-token")).await?;
        assert!(&now != old, "{n}: no refresh after the control plane restart");
        assert!(s.expires_at.ok_or("no expiresAt")?.0 > Timestamp::now());
    }
    stop.store(true, Ordering::SeqCst);
    let seen = sampler.await?;
    let grants = c.kc().grants(REALM, &client_id).await?;
    // Each grant reached a Secret, but for at most one retried per object.
    assert!(grants <= seen.len() + 2, "{grants} grants for {} tokens seen", seen.len());
    eprintln!("[faults] {grants} grants, {} tokens seen across the restart", seen.len());
    c.operator.check_alive()?;
    let logs = c.operator.logs();
    assert!(logs.contains("token refreshed"), "no refresh logged");
    c.finish().await
}

/// The operator SIGKILLed in the middle of a batch: nothing lost, nothing half-written, no
/// valid token replaced.
async fn sigkill_mid_batch_loses_nothing(env: Arc<Env>) -> Result<()> {
    const OBJECTS: usize = 40;
    let client = env.cluster.client().await?;
    let ns = "faults-sigkill";
    k8s::create_namespace(&client, ns).await?;
    let client_id = unique("kill");
    let kc = env.keycloak.create_client(REALM, &client_id, None, true).await?;
    k8s::put_client_secret(&client, ns, "creds", &[("client_secret", &kc.secret)]).await?;
    let spec = json!({"server": env.keycloak.base_url, "realm": REALM, "clientId": client_id, "clientSecretRef": {"name": "creds"}});
    for i in 0..OBJECTS {
        k8s::apply_ra(&client, ns, &format!("ra-{i:02}"), spec.clone()).await?;
    }
    // A slow pace, so that the kill lands in the middle of the batch.
    let args = [format!("--namespace={ns}"), "--max-requests-per-second-per-server=4".to_owned()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = env.path().join("operator-sigkill.log");
    let mut operator = Operator::start(&env.cluster.kubeconfig, &log, &args)?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=registry-access-operator");
    wait_until("a part of the batch done", Duration::from_secs(30), || async {
        secrets.list(&managed).await.map(|l| l.items.len() >= OBJECTS / 4).unwrap_or(false)
    })
    .await?;
    operator.kill();
    let mut at_kill = BTreeMap::new();
    for s in secrets.list(&managed).await? {
        let name = s.metadata.name.clone().unwrap_or_default();
        at_kill.insert(name.clone(), assert_whole(&name, &s)?);
    }
    assert!(at_kill.len() < OBJECTS, "the whole batch was done before the kill");
    let grants_at_kill = env.keycloak.grants(REALM, &client_id).await?;
    operator.start_again()?;
    let ras: Api<RegistryAccess> = Api::namespaced(client.clone(), ns);
    wait_until("every object Ready after the restart", Duration::from_secs(60), || async {
        ras.list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|r| r.status.as_ref().and_then(|s| condition(s, "Ready")).is_some_and(|c| c.0 == "True"))
                    .count()
                    == OBJECTS
            })
            .unwrap_or(false)
    })
    .await?;
    let mut after = BTreeMap::new();
    for s in secrets.list(&managed).await? {
        let name = s.metadata.name.clone().unwrap_or_default();
        after.insert(name.clone(), assert_whole(&name, &s)?);
    }
    assert_eq!(after.len(), OBJECTS);
    for (name, token) in &at_kill {
        assert!(after.get(name) == Some(token), "{name}: a valid token was replaced after the restart");
    }
    let grants = env.keycloak.grants(REALM, &client_id).await?;
    // Every object has one token; at most the requests in flight at the kill were wasted.
    assert!(grants <= OBJECTS + (grants_at_kill - at_kill.len()), "{grants} grants for {OBJECTS} objects");
    assert!(grants - OBJECTS <= 4, "{} grants wasted by the kill", grants - OBJECTS);
    eprintln!("[faults] killed with {} of {OBJECTS} done; {grants} grants in all", at_kill.len());
    operator.stop();
    assert_nothing_leaked(&client, ns, &operator.logs(), &[kc.secret.clone()].into()).await
}

/// A token that cannot be stored (the API server refuses the write) is reported, not lost.
async fn an_unwritable_secret_is_reported(env: Arc<Env>) -> Result<()> {
    let mut c = Case::new(env, "unwritable").await?;
    let client_id = unique("unwritable");
    let kc = c.kc().create_client(REALM, &client_id, None, true).await?;
    let mut spec = c.spec(c.kc(), &client_id, "creds-later");
    spec["secret"] = json!({"name": "custom-token"});
    c.ra("stuck", spec.clone()).await?;
    let ras: Api<RegistryAccess> = Api::namespaced(c.client.clone(), &c.ns);
    let ra = ras.get("stuck").await?;
    // A Secret this object controls, but of a type the token Secret cannot be changed into
    // (a Secret's type is immutable): every write of the token is refused.
    let owner = json!({"apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess", "name": "stuck",
        "uid": ra.metadata.uid, "controller": true});
    let odd: Secret = serde_json::from_value(json!({
        "metadata": {"name": "custom-token", "ownerReferences": [owner]},
        "type": "example.com/custom", "data": {},
    }))?;
    Api::<Secret>::namespaced(c.client.clone(), &c.ns).create(&Default::default(), &odd).await?;
    spec["clientSecretRef"]["name"] = json!("creds");
    c.client_secret("creds", &kc.secret).await?;
    c.ra("stuck", spec).await?;
    let s = wait_condition(&c.client, &c.ns, "stuck", "Degraded", "True", "SecretWriteFailed", Duration::from_secs(30))
        .await?;
    let message = condition(&s, "Degraded").ok_or("no Degraded")?.2;
    // Our words and the API's status only: never the API server's own message text.
    assert!(
        message.contains("custom-token") && message.contains("HTTP 422") && message.contains("immutable"),
        "{message}"
    );
    assert!(!message.contains("field is immutable"), "the API server's message was copied: {message}");
    // Retries write the token already issued instead of asking Keycloak again.
    wait_until("three write attempts", Duration::from_secs(30), || async {
        k8s::ra_status(&c.client, &c.ns, "stuck").await.ok().flatten().and_then(|s| s.failed_attempts).unwrap_or(0) >= 3
    })
    .await?;
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 1, "a retry of a failed write asked Keycloak again");
    c.operator.check_alive()?;
    c.finish().await
}

/// The operator loses list and watch on Secrets (its ClusterRole narrowed, its watches
/// restarted): the watch errors show in a metric and a log line, and a deleted token Secret is
/// still restored, read from the API instead of trusted from what the broken watch last showed.
async fn a_lost_secret_watch_is_noticed_and_tokens_are_still_restored(env: Arc<Env>) -> Result<()> {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let admin = env.cluster.client().await?;
    let user = "e2e-rao-revocable";
    let rules = |secret_verbs: &[&str]| {
        json!([
            {"apiGroups": ["registry-access.io"], "resources": ["registryaccesses"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["registry-access.io"], "resources": ["registryaccesses/status"], "verbs": ["get", "patch", "update"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": secret_verbs},
            {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        ])
    };
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let apply = PatchParams::apply("e2e").force();
    let role = |verbs: &[&str]| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": user}, "rules": rules(verbs)})
    };
    roles.patch(user, &apply, &Patch::Apply(role(&["get", "list", "watch", "create", "patch", "update"]))).await?;
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]});
    Api::<ClusterRoleBinding>::all(admin.clone()).patch(user, &apply, &Patch::Apply(binding)).await?;
    let pair = env.cluster.ca.client(user, &[])?;
    let kubeconfig = env.path().join(format!("{user}.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        support::cluster::kubeconfig_with_cert(&env.cluster.server, &env.cluster.ca_pem, user, &pair),
    )?;

    let port = support::process::free_port()?;
    let probe = format!("--probe-addr=127.0.0.1:{port}");
    let c = Case::with_kubeconfig(env.clone(), "revoked", &kubeconfig, &[probe.as_str()], &[]).await?;
    let (client_id, _) = c.client_with_creds("revoked", None).await?;
    c.ra("kept", c.spec(c.kc(), &client_id, "creds")).await?;
    let first = c.ready("kept").await?;
    let errors = "registry_access_watch_errors_total{resource=\"secrets\"}";
    assert_eq!(
        sample(&scrape_until(port, "the watch error series", |t| sample(t, errors).is_some()).await?, errors),
        Some(0.0)
    );

    // Narrowed: get, create and patch only; the watches reconnect after a control-plane restart.
    roles.patch(user, &apply, &Patch::Apply(role(&["get", "create", "patch", "update"]))).await?;
    env.cluster.restart_control_plane().await?;
    scrape_until(port, "a Secret watch error", |t| sample(t, errors).is_some_and(|v| v >= 1.0)).await?;
    wait_until("the watch error logged", Duration::from_secs(30), || async {
        c.operator.logs().contains("watch failed")
    })
    .await?;

    // A token Secret deleted now is not seen by any watch: it is restored all the same.
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.ns);
    let t = Instant::now();
    secrets.delete("kept-token", &Default::default()).await?;
    // Within the minute an object looks again while its Secret watch is away (without that, the
    // next look is the renewal, two minutes away).
    wait_until("the deleted token Secret restored", Duration::from_secs(75), || async {
        secrets
            .get_opt("kept-token")
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.data.is_some_and(|d| d.contains_key("access_token")))
    })
    .await?;
    eprintln!(
        "[faults] with the Secret watch lost, a deleted token Secret restored after {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let s = c.ready("kept").await?;
    assert!(s.issued_at > first.issued_at, "the restored Secret holds the old token");
    roles.delete(user, &Default::default()).await?;
    Api::<ClusterRoleBinding>::all(admin).delete(user, &Default::default()).await?;
    c.finish().await
}

fn main() {
    support::harness::run(
        "faults",
        tests![
            broken_objects_are_refused_with_the_field_named,
            keycloak_level_mistakes_get_their_reasons,
            a_hung_keycloak_times_out_without_blocking_others,
            flaky_keycloak_still_refreshes_before_expiry,
            sigkill_mid_batch_loses_nothing,
            an_unwritable_secret_is_reported,
            control_plane_restart_is_survived,
            a_lost_secret_watch_is_noticed_and_tokens_are_still_restored,
        ],
        1,
    )
}
