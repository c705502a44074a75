//! Tenant isolation on the real environment: a Keycloak that hangs or drops connections, or a
//! namespace that creates hundreds of objects at once, must not delay the objects of anyone else.
//! The operator runs with its default flags: the defaults themselves must isolate tenants.
//!
//! Runs one test at a time: the tests measure how long objects wait.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use support::case::*;
use support::k8s::{self, condition, wait_condition};
use support::keycloak::REALM;
use support::{Env, Result};

/// Objects on the faulty server, and healthy objects beside them.
const FAULTY: usize = 20;
const HEALTHY: usize = 20;
/// The most the healthy objects may wait to be Ready beside the faulty ones.
const HEALTHY_BOUND: Duration = Duration::from_secs(20);
/// The most a deleted token Secret may stay missing.
const RESTORE_BOUND: Duration = Duration::from_secs(10);

/// A local TCP server that misbehaves; stops accepting when dropped.
struct FaultyServer {
    port: u16,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    /// Connections open now (the peer has not closed them).
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FaultyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultyServer {
    /// Accepts connections and hands each to `serve` (given the connection's number).
    async fn start<F, Fut>(serve: F) -> Result<Self>
    where
        F: Fn(tokio::net::TcpStream, usize) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (seen, held) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                held.fetch_add(1, Ordering::SeqCst);
                let (held, conn) = (held.clone(), serve(sock, n));
                tokio::spawn(async move {
                    conn.await;
                    held.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self { port, accepted, open, task })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/auth", self.port)
    }
}

/// A server that accepts connections and never answers: it reads whatever comes until the peer
/// gives up.
async fn hung_server() -> Result<FaultyServer> {
    FaultyServer::start(|mut sock, _| async move {
        let mut buf = [0u8; 4096];
        while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
}

/// A server that accepts connections and drops them at once: closed or reset, in turn.
async fn dropping_server() -> Result<FaultyServer> {
    FaultyServer::start(|sock, n| async move {
        if n % 2 == 1 {
            let _ = sock.set_zero_linger();
        }
        drop(sock);
    })
    .await
}

/// `FAULTY` objects on `server`, created first, then `HEALTHY` on the real Keycloak: the healthy
/// ones are Ready within [`HEALTHY_BOUND`], a deleted token Secret of theirs is back within
/// [`RESTORE_BOUND`], and the faulty ones end KeycloakUnavailable with a Degraded message that
/// contains one of `explained_by`.
async fn others_are_served_beside(
    env: Arc<Env>,
    name: &str,
    server: FaultyServer,
    holds_connections: bool,
    explained_by: &[&str],
) -> Result<()> {
    let c = Case::new(env, name).await?;
    let (client_id, _) = c.client_with_creds(name, None).await?;
    let mut faulty_spec = c.spec(c.kc(), &client_id, "creds");
    faulty_spec["server"] = json!(server.url());
    c.ra_many((0..FAULTY).map(|i| (format!("faulty-{i:02}"), faulty_spec.clone())).collect()).await?;
    let t = Instant::now();
    let healthy: Vec<String> = (0..HEALTHY).map(|i| format!("ok-{i:02}")).collect();
    c.ra_many(healthy.iter().map(|n| (n.clone(), c.spec(c.kc(), &client_id, "creds"))).collect()).await?;
    let created = t.elapsed();
    // Waits longer than the bound, so that a failure tells how long it really took.
    wait_all_ready(&c.client, &c.ns, &healthy, Duration::from_secs(150)).await?;
    let served = t.elapsed();
    let (open, accepted) = (server.open.load(Ordering::SeqCst), server.accepted.load(Ordering::SeqCst));
    eprintln!(
        "[isolation] {name}: {HEALTHY} healthy objects Ready {:.1}s after their creation began (created in \
         {:.1}s) beside {FAULTY} faulty ones; the faulty server had accepted {accepted} connections, {open} open",
        served.as_secs_f64(),
        created.as_secs_f64()
    );
    assert!(
        served <= HEALTHY_BOUND,
        "{HEALTHY} healthy objects took {served:?} to be Ready beside {FAULTY} on a faulty server (bound \
         {HEALTHY_BOUND:?})"
    );
    if holds_connections {
        assert!(open > 0, "the hung server held no connection when the healthy objects were Ready: nothing was tested");
    }

    // A healthy object's token Secret deleted while the faulty ones are still retried.
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.ns);
    let old_uid = secrets.get("ok-00-token").await?.metadata.uid;
    secrets.delete("ok-00-token", &DeleteParams::default()).await?;
    let t = Instant::now();
    let open = server.open.load(Ordering::SeqCst);
    wait_until("the deleted token Secret restored", Duration::from_secs(90), || async {
        secrets.get_opt("ok-00-token").await.ok().flatten().is_some_and(|s| {
            s.metadata.uid != old_uid && s.data.as_ref().is_some_and(|d| d.contains_key("access_token"))
        })
    })
    .await?;
    let restored = t.elapsed();
    let claims = verified_claims(c.kc(), &c.access_token("ok-00-token").await?).await?;
    assert_eq!(claims["azp"], json!(client_id), "the restored token is not the object's client's");
    eprintln!(
        "[isolation] {name}: deleted token Secret restored with a verified token after {:.1}s ({open} connections \
         open to the faulty server at the deletion)",
        restored.as_secs_f64()
    );
    assert!(
        restored <= RESTORE_BOUND,
        "a deleted token Secret took {restored:?} to be restored (bound {RESTORE_BOUND:?})"
    );

    // The faulty objects end explained.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(240);
    for i in 0..FAULTY {
        let object = format!("faulty-{i:02}");
        let left = deadline.saturating_duration_since(Instant::now());
        let s = wait_condition(&c.client, &c.ns, &object, "Ready", "False", "KeycloakUnavailable", left).await?;
        let message = condition(&s, "Degraded").ok_or_else(|| format!("{object}: no Degraded condition"))?.2;
        assert!(explained_by.iter().any(|e| message.contains(e)), "{object}: Degraded says {message:?}");
    }
    eprintln!(
        "[isolation] {name}: all {FAULTY} faulty objects KeycloakUnavailable {:.1}s later; the faulty server \
         accepted {} connections in all",
        t.elapsed().as_secs_f64(),
        server.accepted.load(Ordering::SeqCst)
    );
    assert!(server.accepted.load(Ordering::SeqCst) > 0, "the faulty server was never asked");
    assert_eq!(ready_count(&c.client, &c.ns).await?, HEALTHY, "healthy objects lost Ready meanwhile");
    c.finish().await
}

/// Objects on a server that never answers do not stall the objects on a healthy Keycloak.
async fn a_hung_server_does_not_stall_other_tenants(env: Arc<Env>) -> Result<()> {
    let server = hung_server().await?;
    others_are_served_beside(env, "iso-hung", server, true, &["no answer", "timed out", "timeout"]).await
}

/// Objects on a server that drops every connection do not stall the objects on a healthy
/// Keycloak.
async fn a_server_that_drops_connections_does_not_stall_other_tenants(env: Arc<Env>) -> Result<()> {
    let server = dropping_server().await?;
    let address = format!("127.0.0.1:{}", server.port);
    others_are_served_beside(env, "iso-drop", server, false, &[address.as_str()]).await
}

/// 200 objects created at once in one namespace do not delay a single object of another.
async fn a_busy_namespace_does_not_delay_another(env: Arc<Env>) -> Result<()> {
    const BUSY: usize = 200;
    const QUIET_BOUND: Duration = Duration::from_secs(5);
    const BUSY_BOUND: Duration = Duration::from_secs(90);
    let client = env.cluster.client().await?;
    let quiet = "e2e-iso-quiet";
    k8s::create_namespace(&client, quiet).await?;
    let watch_quiet = format!("--namespace={quiet}");
    let c = Case::with_operator_args(env, "iso-busy", &[watch_quiet.as_str()]).await?;
    let (busy_client, _) = c.client_with_creds("busy", None).await?;
    let quiet_client = unique("quiet");
    let info = c.kc().create_client(REALM, &quiet_client, None, true).await?;
    c.sensitive(&info.secret);
    k8s::put_client_secret(&c.client, quiet, "creds", &[("client_secret", &info.secret)]).await?;

    let t = Instant::now();
    let busy: Vec<String> = (0..BUSY).map(|i| format!("ra-{i:03}")).collect();
    c.ra_many(busy.iter().map(|n| (n.clone(), c.spec(c.kc(), &busy_client, "creds"))).collect()).await?;
    let busy_created = t.elapsed();
    k8s::apply_ra(&c.client, quiet, "alone", c.spec(c.kc(), &quiet_client, "creds")).await?;
    let q = Instant::now();
    // Waits longer than the bound, so that a failure tells how long it really took.
    wait_condition(&c.client, quiet, "alone", "Ready", "True", "TokenValid", Duration::from_secs(120)).await?;
    let quiet_ready = q.elapsed();
    let busy_ready_then = ready_count(&c.client, &c.ns).await?;
    eprintln!(
        "[isolation] the quiet namespace's object Ready {:.1}s after its creation, right after {BUSY} objects \
         created in {:.1}s in the busy one ({busy_ready_then} of them Ready by then)",
        quiet_ready.as_secs_f64(),
        busy_created.as_secs_f64()
    );
    assert!(
        quiet_ready <= QUIET_BOUND,
        "the quiet namespace's object took {quiet_ready:?} to be Ready behind {BUSY} objects of another namespace \
         (bound {QUIET_BOUND:?})"
    );
    let data =
        k8s::secret_data(&c.client, quiet, "alone-token").await?.ok_or("no token Secret in the quiet namespace")?;
    let token = data.get("access_token").ok_or("no access_token")?;
    c.sensitive(token);
    assert_eq!(verified_claims(c.kc(), token).await?["azp"], json!(quiet_client));

    wait_all_ready(&c.client, &c.ns, &busy, Duration::from_secs(180)).await?;
    let busy_ready = t.elapsed();
    eprintln!(
        "[isolation] all {BUSY} objects of the busy namespace Ready {:.1}s after their creation began",
        busy_ready.as_secs_f64()
    );
    assert!(busy_ready <= BUSY_BOUND, "{BUSY} objects took {busy_ready:?} to be Ready (bound {BUSY_BOUND:?})");
    let grants = c.kc().grants(REALM, &busy_client).await?;
    assert_eq!(grants, BUSY, "{grants} grants for {BUSY} objects: one token per object");
    assert_eq!(c.kc().grants(REALM, &quiet_client).await?, 1, "one grant for the quiet namespace's object");
    c.finish_with_namespaces(&[quiet]).await
}

fn main() {
    support::harness::run(
        "isolation",
        tests![
            a_hung_server_does_not_stall_other_tenants,
            a_server_that_drops_connections_does_not_stall_other_tenants,
            a_busy_namespace_does_not_delay_another,
        ],
        1,
    )
}
