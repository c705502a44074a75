//! Hostile tenants on the real environment: what one namespace creates (hundreds of servers that
//! hang, reset or rate limit; the largest objects the API server takes; a token server that
//! answers with escape sequences) must not stop another namespace's renewals, grow the operator's
//! memory with what it does not serve, get a credential sent whose consent was withdrawn, or put
//! raw foreign text anywhere a person reads.
//!
//! The operator runs with its default flags: the defaults themselves must hold.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use support::case::*;
use support::http::read_request;
use support::k8s::{self, condition, wait_condition};
use support::keycloak::REALM;
use support::{Env, Result};

/// A local server on its own port (so its own origin); stops when dropped.
struct Origin {
    port: u16,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a hostile origin behaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Accepts TCP and never answers.
    Hang,
    /// Accepts TCP for https and never completes the TLS handshake.
    HangTls,
    /// Accepts and resets at once.
    Reset,
    /// Answers 429 with a ten-minute Retry-After.
    RateLimit,
}

impl Origin {
    async fn start(fault: Fault) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    match fault {
                        Fault::Hang | Fault::HangTls => {
                            let mut buf = [0u8; 4096];
                            while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                        }
                        Fault::Reset => {
                            let _ = sock.set_zero_linger();
                        }
                        Fault::RateLimit => {
                            if read_request(&mut sock).await.is_some() {
                                let _ = sock
                                    .write_all(
                                        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                                    )
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Ok(Self { port, accepted, task })
    }

    fn url(&self, fault: Fault) -> String {
        match fault {
            Fault::HangTls => format!("https://127.0.0.1:{}/auth", self.port),
            _ => format!("http://127.0.0.1:{}/auth", self.port),
        }
    }
}

/// Hostile objects, one origin each, and honest objects.
const HOSTILE: usize = 200;
const HONEST: usize = 20;
/// Honest token lifetime, and how many lifetimes are watched.
const LIFETIME_SECS: u32 = 20;
const LIFETIMES: u32 = 3;
/// The most an honest renewal may start after its renewAt.
const LAG_BOUND_SECS: i64 = 5;

/// A namespace with 200 objects on 200 origins that hang (TCP and TLS), reset or rate limit, beside
/// an honest namespace with 20 objects of 20 s tokens on the real Keycloak: over three lifetimes
/// every honest token is renewed within a few seconds of its renewAt and none ever expires.
async fn hostile_origins_do_not_stop_another_namespaces_renewals(env: Arc<Env>) -> Result<()> {
    let honest = "e2e-ten-honest";
    let client = env.cluster.client().await?;
    k8s::create_namespace(&client, honest).await?;
    let watch_honest = format!("--namespace={honest}");
    let c = Case::with_operator_args(env, "ten-hostile", &[watch_honest.as_str(), "--kubelet-sync-period=0s"]).await?;

    // The hostile namespace: one origin per object.
    c.client_secret("creds", "hostile-value").await?;
    let faults = [Fault::Hang, Fault::HangTls, Fault::Reset, Fault::RateLimit];
    let mut origins = Vec::new();
    let mut objects = Vec::new();
    for i in 0..HOSTILE {
        let fault = faults[i % faults.len()];
        let origin = Origin::start(fault).await?;
        let spec = json!({"server": origin.url(fault), "realm": REALM, "clientId": format!("hostile-{i}"),
                          "clientSecretRef": {"name": "creds"}});
        objects.push((format!("h-{i:03}"), spec));
        origins.push((fault, origin));
    }
    let t = Instant::now();
    c.ra_many(objects).await?;
    eprintln!("[tenants] {HOSTILE} hostile objects on {HOSTILE} origins created in {:.1}s", t.elapsed().as_secs_f64());

    // The honest namespace, created right after.
    let honest_client = unique("honest");
    let info = c.kc().create_client(REALM, &honest_client, Some(LIFETIME_SECS), true).await?;
    c.sensitive(&info.secret);
    k8s::put_client_secret(&c.client, honest, "creds", &[("client_secret", &info.secret)]).await?;
    let names: Vec<String> = (0..HONEST).map(|i| format!("ok-{i:02}")).collect();
    for n in &names {
        k8s::apply_ra(&c.client, honest, n, c.spec(c.kc(), &honest_client, "creds")).await?;
    }
    let t = Instant::now();
    wait_all_ready(&c.client, honest, &names, Duration::from_secs(120)).await?;
    let first = t.elapsed();
    eprintln!("[tenants] {HONEST} honest objects Ready {:.1}s after creation", first.as_secs_f64());
    assert!(first <= Duration::from_secs(20), "honest objects took {first:?} to be Ready beside the hostile ones");

    // Watch the honest objects for three lifetimes: each renewal's lag and each token's expiry.
    let ras: Api<registry_access_operator::api::RegistryAccess> = Api::namespaced(c.client.clone(), honest);
    let mut last: BTreeMap<String, (Timestamp, Timestamp)> = BTreeMap::new();
    let (mut renewals, mut worst_lag, mut least_left) = (0usize, i64::MIN, i64::MAX);
    let until = Instant::now() + Duration::from_secs(u64::from(LIFETIME_SECS * LIFETIMES) + 5);
    while Instant::now() < until {
        let now = Timestamp::now();
        for ra in ras.list(&Default::default()).await? {
            let name = ra.metadata.name.clone().unwrap_or_default();
            let s = ra.status.ok_or_else(|| format!("{name}: no status"))?;
            let (Some(issued), Some(expires), Some(renew)) = (s.issued_at, s.expires_at, s.renew_at) else {
                return Err(format!("{name}: status without issuedAt, expiresAt or renewAt").into());
            };
            let left = expires.0.as_second() - now.as_second();
            least_left = least_left.min(left);
            assert!(left > 0, "{name}: its token expired {}s ago beside the hostile namespace", -left);
            if let Some((old_issued, old_renew)) = last.get(&name)
                && *old_issued != issued.0
            {
                let lag = issued.0.as_second() - old_renew.as_second();
                worst_lag = worst_lag.max(lag);
                renewals += 1;
            }
            last.insert(name, (issued.0, renew.0));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let accepted: usize = origins.iter().map(|(_, o)| o.accepted.load(Ordering::SeqCst)).sum();
    let hung: usize = origins
        .iter()
        .filter(|(f, _)| matches!(f, Fault::Hang | Fault::HangTls))
        .map(|(_, o)| o.accepted.load(Ordering::SeqCst))
        .sum();
    eprintln!(
        "[tenants] over {LIFETIMES} lifetimes of {LIFETIME_SECS}s: {renewals} honest renewals, worst lag {worst_lag}s \
         after renewAt, least validity seen {least_left}s; the hostile origins accepted {accepted} connections \
         ({hung} to hanging ones)"
    );
    assert!(hung >= 16, "the hanging origins were hardly asked ({hung} connections): nothing was tested");
    let expected = HONEST * (LIFETIMES as usize - 1);
    assert!(renewals >= expected, "{renewals} honest renewals, expected at least {expected}");
    assert!(worst_lag <= LAG_BOUND_SECS, "an honest renewal started {worst_lag}s after its renewAt");
    let token = k8s::secret_data(&c.client, honest, "ok-00-token").await?.ok_or("no token Secret")?;
    let token = token.get("access_token").ok_or("no access_token")?;
    c.sensitive(token);
    assert_eq!(verified_claims(c.kc(), token).await?["azp"], json!(honest_client));
    c.finish_with_namespaces(&[honest]).await
}

/// The operator's resident memory, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// Largest annotation value the API server takes in one object (its limit is 256 KiB for all).
const HUGE: usize = 250 * 1024;
/// How much the operator's RSS may grow for the whole hostile set below.
const RSS_BOUND_KIB: u64 = 16 * 1024;

/// ServiceAccounts and RegistryAccess objects with the largest annotations, labels and lists the
/// API server and the CRD take, in a namespace nobody else uses: the operator's RSS grows by less
/// than a fixed bound, it never restarts, another namespace's tokens keep renewing, and objects
/// over the CRD's bounds are refused at `kubectl apply`.
async fn the_largest_objects_cost_a_bounded_amount_of_memory(env: Arc<Env>) -> Result<()> {
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

/// A token server that answers every request with 429 and `Retry-After`, recording each body.
async fn rate_limiting_server(retry_after_secs: u32) -> Result<(String, Arc<Mutex<Vec<String>>>, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(req) = read_request(&mut sock).await {
                    seen.lock().unwrap().push(req.body_text());
                    let answer = format!(
                        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {retry_after_secs}\r\nContent-Length: 0\r\n\r\n"
                    );
                    if sock.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((format!("http://127.0.0.1:{port}/auth"), bodies, task))
}

/// Requests waiting behind a client's Retry-After pause whose Secret loses its opt-in label, or
/// whose allowed-servers annotation changes, are dropped unsent: the token server never receives
/// their secret.
async fn consent_withdrawn_while_waiting_stops_the_request(env: Arc<Env>) -> Result<()> {
    let port = support::process::free_port()?;
    let probe = format!("--probe-addr=127.0.0.1:{port}");
    let c = Case::with_operator_args(env, "ten-consent", &[probe.as_str()]).await?;
    let (server, bodies, _task) = rate_limiting_server(15).await?;
    let spec = |creds: &str| json!({"server": server, "realm": REALM, "clientId": "limited", "clientSecretRef": {"name": creds}});
    for (name, value) in [("a-creds", "value-of-a"), ("b-creds", "value-of-b"), ("c-creds", "value-of-c")] {
        c.client_secret(name, value).await?;
    }
    c.ra("first", spec("a-creds")).await?;
    wait_condition(&c.client, &c.ns, "first", "Ready", "False", "RateLimited", Duration::from_secs(30)).await?;
    // The client is paused for 15 s: two more objects of the same client wait behind it.
    c.ra("unlabelled", spec("b-creds")).await?;
    c.ra("narrowed", spec("c-creds")).await?;
    scrape_until(port, "two requests queued", |t| {
        sample(t, "registry_access_token_requests_queued").is_some_and(|v| v >= 2.0)
    })
    .await?;
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.ns);
    let patch = |v: Value| Patch::Merge(v);
    secrets
        .patch(
            "b-creds",
            &PatchParams::default(),
            &patch(json!({"metadata": {"labels": {"registry-access.io/client-secret": null}}})),
        )
        .await?;
    secrets
        .patch(
            "c-creds",
            &PatchParams::default(),
            &patch(json!({"metadata": {"annotations": {"registry-access.io/allowed-servers": "https://elsewhere.example"}}})),
        )
        .await?;
    // The positive sign: both requests reached their turn and were dropped.
    let text = scrape_until(port, "two requests withdrawn", |t| {
        sample(t, "registry_access_token_requests_withdrawn_total{why=\"credential_changed\"}")
            .is_some_and(|v| v >= 2.0)
    })
    .await?;
    eprintln!(
        "[tenants] withdrawn: {:?}",
        sample(&text, "registry_access_token_requests_withdrawn_total{why=\"credential_changed\"}")
    );
    wait_condition(&c.client, &c.ns, "unlabelled", "Ready", "False", "ClientSecretNotOptedIn", Duration::from_secs(30))
        .await?;
    wait_condition(&c.client, &c.ns, "narrowed", "Ready", "False", "ServerNotAllowed", Duration::from_secs(30)).await?;
    let bodies = bodies.lock().unwrap().clone();
    assert!(
        bodies.iter().any(|b| b.contains("value-of-a")),
        "the first object's request never arrived: nothing was tested"
    );
    for (what, value) in [("unlabelled", "value-of-b"), ("narrowed", "value-of-c")] {
        assert!(
            !bodies.iter().any(|b| b.contains(value)),
            "the {what} object's secret was sent after its consent was withdrawn"
        );
    }
    c.finish().await
}

/// An unsigned JWT with these claims (the operator reads, never verifies, an access token).
fn unsigned_jwt(claims: &Value) -> String {
    let e = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!("{}.{}.{}", e(br#"{"alg":"none"}"#), e(claims.to_string().as_bytes()), e(b"sig"))
}

const ESC: char = '\u{1b}';

/// A token server whose answers carry escape sequences: roles and a scope with terminal escapes
/// (realm `escape`), a 100 KiB `Location` (realm `redirect`) and one with an escape (realm
/// `redirect-escape`).
async fn hostile_token_server() -> Result<(String, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(req) = read_request(&mut sock).await else { return };
                let answer = if req.path().contains("/realms/redirect") {
                    // 100 KiB; or with an escape, which no HTTP header may hold.
                    let location = if req.path().contains("/realms/redirect-escape/") {
                        format!("https://x.example/{ESC}[2J")
                    } else {
                        format!("https://x.example/{}", "a".repeat(100 * 1024))
                    };
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                } else {
                    let now = Timestamp::now().as_second();
                    let roles = json!(["ok-role", format!("{ESC}[31mred{ESC}[0m"), "r".repeat(5000)]);
                    let token = unsigned_jwt(&json!({"iat": now, "exp": now + 300, "realm_access": {"roles": roles}}));
                    let scope = format!("profile {ESC}]0;owned\u{7} {}", "s".repeat(20_000));
                    let body =
                        json!({"access_token": token, "token_type": "Bearer", "expires_in": 300, "scope": scope})
                            .to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = sock.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok((format!("http://127.0.0.1:{port}/auth"), task))
}

/// True when `s` holds an unprintable character (an escape, a bidirectional override).
fn unprintable(s: &str) -> bool {
    s.chars().any(|c| c != '\n' && c != '\t' && registry_access_operator::text::unprintable(c))
}

/// Escape sequences in a role and the scope, a 100 KiB `Location`, a certificate with long names:
/// the status, Events, token Secret annotations, logs and the kubectl plugin's output hold none of
/// the raw text and nothing over the caps.
async fn foreign_text_is_bounded_and_cleaned_everywhere(env: Arc<Env>) -> Result<()> {
    let c = Case::with_operator_args(env, "ten-text", &["--kubelet-sync-period=0s"]).await?;
    let (server, _task) = hostile_token_server().await?;
    c.client_secret("creds", "text-secret-value").await?;
    c.ra("escape", json!({"server": server, "realm": "escape", "clientId": "x", "clientSecretRef": {"name": "creds"}}))
        .await?;
    for realm in ["redirect", "redirect-escape"] {
        c.ra(realm, json!({"server": server, "realm": realm, "clientId": "x", "clientSecretRef": {"name": "creds"}}))
            .await?;
    }
    // A TLS server whose certificate names a long internal host: never echoed.
    let ca = support::pki::Ca::new("internal-ca")?;
    let hidden = format!("{}.internal-billing.corp.example", "n".repeat(60));
    let tls = tls_origin(&ca, &hidden).await?;
    c.ra("tls", json!({"server": tls.0, "realm": REALM, "clientId": "x", "clientSecretRef": {"name": "creds"}}))
        .await?;

    let s = wait_condition(&c.client, &c.ns, "escape", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    assert!(s.granted_roles.iter().all(|r| r.chars().count() <= 128 && !unprintable(r)), "{:?}", s.granted_roles);
    assert!(s.granted_roles.iter().any(|r| r.contains("[31mred")), "the role is kept, cleaned: {:?}", s.granted_roles);
    let scope = s.scope.clone().unwrap_or_default();
    assert!(scope.chars().count() <= 512 && !unprintable(&scope), "scope of {} chars", scope.chars().count());
    let token_secret: Secret = Api::namespaced(c.client.clone(), &c.ns).get("escape-token").await?;
    for (k, v) in token_secret.metadata.annotations.unwrap_or_default() {
        assert!(v.chars().count() <= 1024 && !unprintable(&v), "annotation {k} of {} chars", v.chars().count());
    }
    let s =
        wait_condition(&c.client, &c.ns, "redirect", "Ready", "False", "UnexpectedRedirect", Duration::from_secs(30))
            .await?;
    let (_, _, message) = condition(&s, "Degraded").ok_or("no Degraded")?;
    assert!(
        message.chars().count() < 1000 && !unprintable(&message),
        "Degraded message of {} chars",
        message.chars().count()
    );
    assert!(
        message.contains("https://x.example/aaa") && message.contains('…'),
        "the Location is quoted, cut: {message}"
    );
    // An escape in a header: the HTTP client refuses the answer whole, told in our words.
    let s = wait_condition(
        &c.client,
        &c.ns,
        "redirect-escape",
        "Ready",
        "False",
        "KeycloakUnavailable",
        Duration::from_secs(30),
    )
    .await?;
    let (_, _, message) = condition(&s, "Degraded").ok_or("no Degraded")?;
    assert!(message.contains("failed before Keycloak answered") && !unprintable(&message), "{message}");
    let s = wait_condition(&c.client, &c.ns, "tls", "Ready", "False", "TLSError", Duration::from_secs(30)).await?;
    let (_, _, message) = condition(&s, "Degraded").ok_or("no Degraded")?;
    assert!(message.contains("not signed by a trusted CA") && !message.contains("internal-billing"), "{message}");

    // Events and logs.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.client.clone(), &c.ns);
    for e in events.list(&Default::default()).await? {
        let note = e.note.unwrap_or_default();
        assert!(note.chars().count() < 1100 && !unprintable(&note), "Event note of {} chars", note.chars().count());
        assert!(!note.contains("internal-billing"), "{note}");
    }
    let logs = c.operator.logs();
    assert!(!logs.contains(ESC) && !logs.contains('\u{7}'), "an escape reached the logs");
    assert!(!logs.contains("internal-billing"), "the certificate's names reached the logs");
    assert!(!logs.contains(&"a".repeat(1000)), "the Location reached the logs whole");

    // The kubectl plugin prints what the cluster holds, escaped.
    for args in [
        vec!["-n", c.ns.as_str(), "status"],
        vec!["-n", c.ns.as_str(), "status", "escape"],
        vec!["-n", c.ns.as_str(), "inspect", "escape"],
    ] {
        let (ok, stdout, stderr) = plugin(&c.env.cluster.kubeconfig, &args)?;
        assert!(ok, "kubectl registry-access {args:?} failed: {stderr}");
        assert!(
            !unprintable(&stdout) && !unprintable(&stderr),
            "kubectl registry-access {args:?} printed a raw escape"
        );
    }
    c.finish().await
}

/// A TLS origin whose certificate (signed by `ca`, which the operator does not trust) names only
/// `name`.
async fn tls_origin(ca: &support::pki::Ca, name: &str) -> Result<(String, JoinHandle<()>)> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pair = ca.server(&[name])?;
    let certs = CertificateDer::pem_slice_iter(pair.cert.as_bytes()).collect::<std::result::Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes())?;
    let config = tokio_rustls::rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(sock).await;
            });
        }
    });
    Ok((format!("https://127.0.0.1:{port}/auth"), task))
}

/// A token server that answers each request with a valid-looking token after `delay`.
async fn slow_token_server(delay: Duration) -> Result<(String, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                while read_request(&mut sock).await.is_some() {
                    tokio::time::sleep(delay).await;
                    let now = Timestamp::now().as_second();
                    let token = unsigned_jwt(&json!({"iat": now, "exp": now + 300}));
                    let body = json!({"access_token": token, "token_type": "Bearer", "expires_in": 300}).to_string();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((format!("http://127.0.0.1:{port}/auth"), task))
}

/// Many objects deleted while their requests are in flight (and while their outcomes are being
/// written): once every request has ended, no metric series of a deleted object remains.
async fn deleted_objects_leave_no_series(env: Arc<Env>) -> Result<()> {
    const N: usize = 40;
    let port = support::process::free_port()?;
    let probe = format!("--probe-addr=127.0.0.1:{port}");
    let c = Case::with_operator_args(env, "ten-race", &[probe.as_str(), "--kubelet-sync-period=0s"]).await?;
    let (server, _task) = slow_token_server(Duration::from_millis(1500)).await?;
    c.client_secret("creds", "race-secret-value").await?;
    let spec = json!({"server": server, "realm": "r", "clientId": "x", "clientSecretRef": {"name": "creds"}});
    // Half get a token first (their series exist), then everything is deleted while the other
    // half's requests are in flight and the first half renews on demand.
    let names: Vec<String> = (0..N).map(|i| format!("race-{i:02}")).collect();
    c.ra_many(names[..N / 2].iter().map(|n| (n.clone(), spec.clone())).collect()).await?;
    wait_all_ready(&c.client, &c.ns, &names[..N / 2], Duration::from_secs(90)).await?;
    c.ra_many(names[N / 2..].iter().map(|n| (n.clone(), spec.clone())).collect()).await?;
    scrape_until(port, "requests in flight", |t| {
        sample(t, "registry_access_token_requests_in_flight").is_some_and(|v| v >= 1.0)
    })
    .await?;
    let ras: Api<registry_access_operator::api::RegistryAccess> = Api::namespaced(c.client.clone(), &c.ns);
    for n in &names {
        ras.delete(n, &DeleteParams::default()).await?;
    }
    // The positive sign: every request has ended and the queue is empty.
    scrape_until(port, "no request in flight or queued", |t| {
        sample(t, "registry_access_token_requests_in_flight") == Some(0.0)
            && sample(t, "registry_access_token_requests_queued") == Some(0.0)
    })
    .await?;
    wait_until("the objects gone", Duration::from_secs(30), || async {
        ras.list(&Default::default()).await.is_ok_and(|l| l.items.is_empty())
    })
    .await?;
    let text = scrape_until(port, "the metrics", |_| true).await?;
    let left: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && l.contains("name=\"race-")).collect();
    assert!(left.is_empty(), "series of deleted objects remain: {left:?}");
    c.finish().await
}

fn main() {
    support::harness::run(
        "tenants",
        tests![
            hostile_origins_do_not_stop_another_namespaces_renewals,
            the_largest_objects_cost_a_bounded_amount_of_memory,
            consent_withdrawn_while_waiting_stops_the_request,
            foreign_text_is_bounded_and_cleaned_everywhere,
            deleted_objects_leave_no_series,
        ],
        2,
    )
}
