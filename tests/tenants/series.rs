//! Objects deleted while their requests are in flight leave no metric series behind.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::case::*;
use crate::support::http::read_request;
use crate::support::{Env, Result};
use crate::text::unsigned_jwt;

/// A token server that answers each request with a valid-looking token after `delay`.
pub async fn slow_token_server(delay: Duration) -> Result<(String, JoinHandle<()>)> {
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
pub async fn deleted_objects_leave_no_series(env: Arc<Env>) -> Result<()> {
    const N: usize = 40;
    let (c, port) = Case::with_metrics(env, "ten-race", &["--kubelet-sync-period=0s"]).await?;
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
