//! Consent withdrawn while a request waits for its turn stops the request: the secret is never
//! sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::case::*;
use crate::support::http::read_request;
use crate::support::k8s::wait_condition;
use crate::support::keycloak::REALM;
use crate::support::{Env, Result};

/// A token server that answers every request with 429 and `Retry-After`, recording each body.
pub async fn rate_limiting_server(retry_after_secs: u32) -> Result<(String, Arc<Mutex<Vec<String>>>, JoinHandle<()>)> {
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
pub async fn consent_withdrawn_while_waiting_stops_the_request(env: Arc<Env>) -> Result<()> {
    let (c, port) = Case::with_metrics(env, "ten-consent", &[]).await?;
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
