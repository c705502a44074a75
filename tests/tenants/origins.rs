//! Hundreds of hostile origins (servers that hang, reset or rate limit) in one namespace do not
//! stop another namespace's renewals.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::case::*;
use crate::support::http::read_request;
use crate::support::k8s::{self};
use crate::support::keycloak::REALM;
use crate::support::{Env, Result};

/// A local server on its own port (so its own origin); stops when dropped.
pub struct Origin {
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
pub enum Fault {
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
pub const HOSTILE: usize = 200;
pub const HONEST: usize = 20;
/// Honest token lifetime, and how many lifetimes are watched.
pub const LIFETIME_SECS: u32 = 20;
pub const LIFETIMES: u32 = 3;
/// The most an honest renewal may start after its renewAt.
pub const LAG_BOUND_SECS: i64 = 5;

/// A namespace with 200 objects on 200 origins that hang (TCP and TLS), reset or rate limit, beside
/// an honest namespace with 20 objects of 20 s tokens on the real Keycloak: over three lifetimes
/// every honest token is renewed within a few seconds of its renewAt and none ever expires.
pub async fn hostile_origins_do_not_stop_another_namespaces_renewals(env: Arc<Env>) -> Result<()> {
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
