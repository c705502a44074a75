//! Availability: a Keycloak outage, a start with many objects due at once, and leader failover
//! between two replicas.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use kube::Api;
use kube::api::ListParams;
use registry_access_operator::api::RegistryAccess;
use serde_json::json;

use crate::support::case::*;
use crate::support::k8s::{self, condition, wait_condition};
use crate::support::keycloak::{self, REALM};
use crate::support::operator::Operator;
use crate::support::{self, Env, Result};

/// Keycloak stopped: the token stays and Degraded is set; Keycloak back: recovered by itself.
pub async fn survives_a_keycloak_outage(env: Arc<Env>) -> Result<()> {
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

/// 200 objects due at once: requests spread and capped, every object Ready.
pub async fn startup_with_many_objects_is_spread_and_capped(env: Arc<Env>) -> Result<()> {
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

/// Two replicas: SIGKILL of the leader hands over within the lease duration, SIGTERM releases
/// the Lease at once (the standby takes it when it next looks); no Secret ever holds an expired
/// token and the handover issues at most one extra token.
pub async fn leader_failover_keeps_tokens_fresh(env: Arc<Env>) -> Result<()> {
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
    // Under the new leader every token is renewed twice, and the tokens the old leader left run
    // out meanwhile (the sampler checks throughout that no Secret holds an expired token).
    let mut left_by_the_old = Timestamp::now();
    for n in names {
        let data = k8s::secret_data(&client, ns, &format!("{n}-token")).await?.ok_or("token Secret vanished")?;
        left_by_the_old = left_by_the_old.max(ts(&data["expires_at"])?);
    }
    wait_renewed(&client, ns, &names, 2, left_by_the_old, "two renewals by replica-2").await?;
    // replica-1 back, standing by: it says so when it starts waiting for the Lease.
    let waiting = |log: &str| log.matches("waiting for the Lease").count();
    let before = waiting(&first.logs());
    first.start_again()?;
    wait_until("replica-1 waiting for the Lease", Duration::from_secs(30), || async {
        waiting(&first.logs()) > before
    })
    .await?;
    let t = Instant::now();
    second.stop();
    // SIGTERM releases the Lease before the process ends: the moment replica-2 is gone, the
    // Lease is free (or already replica-1's), not left to expire.
    let right_after = lease_holder(&client, ns).await;
    assert!(right_after.as_deref() != Some("replica-2"), "replica-2 ended on SIGTERM still holding the Lease");
    assert!(second.logs().contains("released the Lease"), "SIGTERM did not release the Lease");
    // replica-1 takes it when it next looks, at the latest when the Lease it last saw would
    // have expired.
    wait_until("replica-1 takes the Lease after SIGTERM", Duration::from_secs(LEASE + 2), || async {
        lease_holder(&client, ns).await.as_deref() == Some("replica-1")
    })
    .await?;
    let graceful = t.elapsed();
    // replica-1 keeps the tokens fresh after the handover.
    wait_renewed(&client, ns, &names, 1, Timestamp::now(), "a renewal by replica-1").await?;
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

/// Polls the token Secrets of `names` in `ns` until each has held at least `renewals` tokens
/// other than the one it held at the call, and `not_before` has passed.
async fn wait_renewed(
    client: &kube::Client,
    ns: &str,
    names: &[&str],
    renewals: usize,
    not_before: Timestamp,
    what: &str,
) -> Result<()> {
    let timeout = Duration::from_secs(90);
    let token = |data: Option<std::collections::BTreeMap<String, String>>| -> Result<String> {
        Ok(data.and_then(|d| d.get("access_token").cloned()).ok_or("token Secret vanished")?)
    };
    let mut held = Vec::new();
    for n in names {
        held.push(token(k8s::secret_data(client, ns, &format!("{n}-token")).await?)?);
    }
    let mut new: Vec<BTreeSet<String>> = vec![BTreeSet::new(); names.len()];
    let t = Instant::now();
    loop {
        for (i, n) in names.iter().enumerate() {
            let now = token(k8s::secret_data(client, ns, &format!("{n}-token")).await?)?;
            if now != held[i] {
                new[i].insert(now);
            }
        }
        let counts: Vec<usize> = new.iter().map(BTreeSet::len).collect();
        if counts.iter().all(|c| *c >= renewals) && Timestamp::now() > not_before {
            eprintln!("[e2e] {what} after {:.1}s", t.elapsed().as_secs_f64());
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(format!("{what}: after {timeout:?}, new tokens per object {counts:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
