//! The bare baselines the operator is compared against: Keycloak's client_credentials grant rate
//! alone, and a bare loop doing per object what the operator does for a first token (one grant,
//! one Secret apply, one status apply).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{StreamExt as _, TryStreamExt as _};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use registry_access_operator::api::DEFAULT_SECRET_SUFFIX;
use registry_access_operator::secret::{
    EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION, KEY_ACCESS_TOKEN, KEY_AUTHORIZATION, KEY_EXPIRES_AT, KEY_TOKEN_TYPE,
    MANAGED_BY_LABEL, SCOPE_ANNOTATION, TOKEN_DIGEST_ANNOTATION, rfc3339, token_digest,
};
use serde_json::{Value, json};

use crate::measure::{KeycloakCpu, KeycloakGrants};
use crate::objects::{self, Kube, create_ras};
use crate::support::keycloak::{Keycloak, REALM};
use crate::support::{Result, k8s};
use crate::{Config, LONG_LIFESPAN, log};

/// Concurrency of the bare loops (Keycloak alone, and grant + writes).
pub const BARE_CONCURRENCY: usize = 8;
/// Length of the Keycloak bare-rate measurement, after a warm-up.
const GRANT_WINDOW: Duration = Duration::from_secs(5);
/// Keycloak's JVM needs a warm-up after its start: grants at full speed in rounds of
/// [`GRANT_WARMUP`] until the rate stops rising by more than a tenth and its JIT compiler threads
/// take less than [`JIT_QUIET_SHARE`] of its CPU (for at most [`GRANT_WARMUP_MAX`]), then grants
/// at [`WARMUP_PACE`] per second in rounds of [`PACED_WARMUP`] until compiling is as quiet again
/// (for at most [`PACED_WARMUP_MAX`]). The rate levels off in about 10 s on two cores, while the
/// compiler goes on for a minute or two, and grants that come one by one make it compile other
/// code than grants at full speed: compiling is CPU that would otherwise land in the runs
/// measured after the warm-up, in proportion to their length.
const GRANT_WARMUP: Duration = Duration::from_secs(2);
const GRANT_WARMUP_MAX: Duration = Duration::from_secs(80);
const WARMUP_PACE: f64 = 50.0;
const PACED_WARMUP: Duration = Duration::from_secs(4);
const PACED_WARMUP_MAX: Duration = Duration::from_secs(60);
const JIT_QUIET_SHARE: f64 = 0.1;
/// Field manager of the bench's own writes.
const BENCH_MANAGER: &str = "registry-access-bench";

pub struct Creds {
    pub url: String,
    pub id: String,
    pub secret: String,
}

/// What a token response says (the token itself stays in memory only).
struct Grant {
    access_token: String,
    expires_in: i64,
    scope: Option<String>,
}

async fn grant(http: &reqwest::Client, c: &Creds) -> Result<Grant> {
    let resp = http
        .post(&c.url)
        .form(&[("grant_type", "client_credentials"), ("client_id", &c.id), ("client_secret", &c.secret)])
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("token request for {} failed: HTTP {status}", c.id).into());
    }
    let body: Value = resp.json().await?;
    Ok(Grant {
        access_token: body["access_token"].as_str().ok_or("no access_token in the token response")?.to_owned(),
        expires_in: body["expires_in"].as_i64().unwrap_or(300),
        scope: body["scope"].as_str().map(str::to_owned),
    })
}

/// Grants until Keycloak's rate levels off and its JIT compiler has little left to do, at full
/// speed and then at an even pace (a fresh JVM is several times slower at first); `pid` is
/// Keycloak's JVM.
pub async fn warm_up(http: &reqwest::Client, creds: &Creds, pid: u32) -> Result<()> {
    // One round: grants per second, and the share of Keycloak's CPU that went to compiling.
    let round = |length: Duration, pace: Option<f64>| async move {
        let before = KeycloakCpu::read(pid)?;
        let (ok, _) = grant_loop(http, creds, length, pace).await;
        let cpu = before.since()?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
            ok as f64 / length.as_secs_f64(),
            cpu.jit_secs() / cpu.cpu_secs.max(1e-9),
        ))
    };
    let t = Instant::now();
    let mut previous = 0.0;
    let (rate, jit) = loop {
        let (rate, jit) = round(GRANT_WARMUP, None).await?;
        let levelled = t.elapsed() >= GRANT_WARMUP * 3 && rate < previous * 1.1;
        if (levelled && jit < JIT_QUIET_SHARE) || t.elapsed() > GRANT_WARMUP_MAX {
            break (rate, jit);
        }
        previous = rate;
    };
    let paced = Instant::now();
    let paced_jit = loop {
        let (_, jit) = round(PACED_WARMUP, Some(WARMUP_PACE)).await?;
        if jit < JIT_QUIET_SHARE || paced.elapsed() > PACED_WARMUP_MAX {
            break jit;
        }
    };
    log(format!(
        "  Keycloak warmed up in {:.0}s: {rate:.0} grants/s at full speed ({:.0}% of its CPU compiling), \
         then {:.0}s at {WARMUP_PACE:.0}/s ({:.0}% compiling)",
        paced.duration_since(t).as_secs_f64(),
        jit * 100.0,
        paced.elapsed().as_secs_f64(),
        paced_jit * 100.0
    ));
    Ok(())
}

/// Keycloak's grant rate over [`GRANT_WINDOW`]: grants per second, and the run as JSON.
pub async fn keycloak_rate(http: &reqwest::Client, creds: &Creds) -> Result<(f64, Value)> {
    let t = Instant::now();
    let (ok, failed) = grant_loop(http, creds, GRANT_WINDOW, None).await;
    let secs = t.elapsed().as_secs_f64();
    if ok == 0 {
        return Err(format!("Keycloak granted no token in {secs:.1}s ({failed} requests failed)").into());
    }
    let rate = ok as f64 / secs;
    log(format!("  {ok} grants in {secs:.1}s ({failed} failed): {rate:.0} grants/s"));
    let run = json!({
        "concurrency": BARE_CONCURRENCY, "seconds": secs, "grants": ok, "failed": failed, "grants_per_second": rate,
    });
    Ok((rate, run))
}

/// Grants in a loop on [`BARE_CONCURRENCY`] keep-alive connections for `length`, as fast as
/// Keycloak answers or spread evenly at `pace` per second: (ok, failed).
async fn grant_loop(http: &reqwest::Client, c: &Creds, length: Duration, pace: Option<f64>) -> (u64, u64) {
    let start = Instant::now();
    let deadline = start + length;
    let (next, ok, failed) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let worker = || async {
        loop {
            if let Some(pace) = pace {
                let at = start + Duration::from_secs_f64(next.fetch_add(1, Ordering::Relaxed) as f64 / pace);
                if at >= deadline {
                    break;
                }
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            } else if Instant::now() >= deadline {
                break;
            }
            match grant(http, c).await {
                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
        }
    };
    futures::future::join_all((0..BARE_CONCURRENCY).map(|_| worker())).await;
    (ok.into_inner(), failed.into_inner())
}

/// `count` grants of a client of their own at `rate` per second, spread evenly, on up to
/// [`BARE_CONCURRENCY`] keep-alive connections: Keycloak's CPU at another client's pace.
pub async fn paced_grants(
    kc: &Keycloak,
    http: &reqwest::Client,
    rate: f64,
    count: usize,
    name: &str,
) -> Result<KeycloakGrants> {
    let client = kc.create_client(REALM, name, Some(LONG_LIFESPAN), true).await?;
    let creds = Creds { url: kc.token_url(REALM), id: client.client_id.clone(), secret: client.secret.clone() };
    let next = AtomicU64::new(0);
    let (t, before) = (Instant::now(), KeycloakCpu::read(kc.jvm_pid().ok_or("Keycloak is not running")?)?);
    let worker = || async {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count as u64 {
                return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
            }
            let at = t + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            grant(http, &creds).await?;
        }
    };
    futures::future::try_join_all((0..BARE_CONCURRENCY).map(|_| worker())).await?;
    // Keycloak's CPU is read before its admin API is asked for the grants.
    let cpu = before.since()?;
    let keycloak = KeycloakGrants { cpu, grants: kc.grants(REALM, &client.client_id).await? };
    log(format!(
        "  {} grants at {rate:.0}/s in {:.1}s; Keycloak {:.2} s CPU",
        keycloak.grants, keycloak.cpu.secs, keycloak.cpu.cpu_secs
    ));
    Ok(keycloak)
}

/// For each of N objects (created first, no operator running): one grant, one Secret apply and
/// one status apply, [`BARE_CONCURRENCY`] at a time. Returns objects per second, the run as JSON,
/// and Keycloak's CPU over the loop with the grants it recorded.
pub async fn bare_loop(
    cfg: &Config,
    kube: &Kube,
    kc: &Keycloak,
    http: &reqwest::Client,
    round: usize,
) -> Result<(f64, Value, KeycloakGrants)> {
    let bare = kc.create_client(REALM, &format!("bench-bare-{round}"), Some(LONG_LIFESPAN), true).await?;
    let namespaces = cfg.namespaces(&format!("bench-bare{round}"));
    for ns in &namespaces {
        k8s::create_namespace(&kube.client, ns).await?;
    }
    let objects = objects::spread(&namespaces, cfg.n, "ra");
    let spec = objects::spec(kc, &bare.client_id, "creds");
    let t = Instant::now();
    let created = create_ras(kube, &objects, &spec, "bare").await?;
    log(format!("  created {} RegistryAccess objects in {:.1}s", cfg.n, t.elapsed().as_secs_f64()));
    let creds = Creds { url: kc.token_url(REALM), id: bare.client_id.clone(), secret: bare.secret.clone() };
    let (t, kc_before) = (Instant::now(), KeycloakCpu::read(kc.jvm_pid().ok_or("Keycloak is not running")?)?);
    futures::stream::iter(created.iter().map(|(ns, name, uid)| bare_one(kube, http, &creds, ns, name, uid)))
        .buffer_unordered(BARE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    // Keycloak's CPU is read before its admin API is asked for the grants.
    let cpu = kc_before.since()?;
    let keycloak = KeycloakGrants { cpu, grants: kc.grants(REALM, &bare.client_id).await? };
    let rate = cfg.n as f64 / secs;
    log(format!(
        "  {} objects in {secs:.1}s: {rate:.0} objects/s; Keycloak {:.2} s CPU for {} grants",
        cfg.n, keycloak.cpu.cpu_secs, keycloak.grants
    ));
    let run = json!({
        "concurrency": BARE_CONCURRENCY, "objects": cfg.n, "seconds": secs, "objects_per_second": rate,
    });
    // Gone before the operator (watching all namespaces) starts; Secrets first, so that the
    // garbage collector has nothing left to do.
    let t = Instant::now();
    for ns in &namespaces {
        let secrets: Api<Secret> = Api::namespaced(kube.client.clone(), ns);
        secrets.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
        let ras = kube.ras(ns);
        ras.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    }
    for ns in &namespaces {
        let api: Api<Namespace> = Api::all(kube.client.clone());
        api.delete(ns, &DeleteParams::default()).await?;
    }
    log(format!("  bare-loop objects deleted in {:.1}s", t.elapsed().as_secs_f64()));
    Ok((rate, run, keycloak))
}

/// One object of the bare loop: what the operator does for a first token, minus its reads.
async fn bare_one(kube: &Kube, http: &reqwest::Client, creds: &Creds, ns: &str, name: &str, uid: &str) -> Result<()> {
    let issued = Timestamp::now();
    let g = grant(http, creds).await?;
    let expires = issued + jiff::SignedDuration::from_secs(g.expires_in);
    let renew = expires - jiff::SignedDuration::from_secs(g.expires_in / 3);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secret_name = format!("{name}{DEFAULT_SECRET_SUFFIX}");
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name,
            "namespace": ns,
            "labels": {MANAGED_BY_LABEL: BENCH_MANAGER},
            "annotations": {
                EXPIRES_AT_ANNOTATION: rfc3339(expires),
                ISSUED_AT_ANNOTATION: rfc3339(issued),
                TOKEN_DIGEST_ANNOTATION: token_digest(&g.access_token),
                SCOPE_ANNOTATION: g.scope.clone().unwrap_or_default(),
            },
            "ownerReferences": [{
                "apiVersion": kube.ra.api_version, "kind": kube.ra.kind, "name": name, "uid": uid,
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "type": "Opaque",
        "data": {
            KEY_ACCESS_TOKEN: b64(&g.access_token),
            KEY_TOKEN_TYPE: b64("Bearer"),
            KEY_EXPIRES_AT: b64(&rfc3339(expires)),
            KEY_AUTHORIZATION: b64(&format!("Bearer {}", g.access_token)),
        },
    });
    let apply = PatchParams::apply(BENCH_MANAGER).force();
    Api::<Secret>::namespaced(kube.client.clone(), ns).patch(&secret_name, &apply, &Patch::Apply(&secret)).await?;
    let status = json!({
        "apiVersion": kube.ra.api_version,
        "kind": kube.ra.kind,
        "status": {
            "observedGeneration": 1,
            "secretName": secret_name,
            "issuedAt": rfc3339(issued),
            "expiresAt": rfc3339(expires),
            "renewAt": rfc3339(renew),
            "scope": g.scope,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "TokenValid", "observedGeneration": 1,
                "message": format!("Secret {secret_name} holds a token valid until {}", rfc3339(expires)),
                "lastTransitionTime": rfc3339(issued),
            }],
        },
    });
    kube.ras(ns).patch_status(name, &apply, &Patch::Apply(&status)).await?;
    Ok(())
}
