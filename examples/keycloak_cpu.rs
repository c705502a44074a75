//! Keycloak's CPU per client_credentials grant by the way grants are asked for: the experiments
//! behind the "Keycloak's CPU per grant" figures of `make bench` (docs/performance.md).
//!
//! Starts Keycloak alone (the test realm, dev-mem database, events on, as in the end-to-end
//! environment), warms it up, measures its idle CPU rate, then runs each variant in turn, in
//! rounds, and prints Keycloak's CPU per grant (its JVM's utime + stime from /proc, the idle rate
//! subtracted), in all and outside its JIT compiler threads.
//!
//! `cargo run --example keycloak_cpu` (after `make tools`). Environment, all optional:
//!
//! - `KC_CPU_VARIANTS`: comma-separated `who:concurrency:rate:connections:clients[:grants]`, where
//!   `who` is `bare` (a plain reqwest form post, as the bench's bare loop sends) or the operator's
//!   own token client with `post` (client_secret_post), `basic`, `secret-jwt` or `private-key-jwt`
//!   (slow to sign in a debug build: run that one with `--release`); `rate` is grants per second
//!   spread evenly, or `max`; `connections` is `keep` (keep-alive) or `new` (a new connection per
//!   grant, `bare` only); `clients` is how many Keycloak clients the grants are spread over;
//! - `KC_CPU_GRANTS` (1500 per variant), `KC_CPU_ROUNDS` (2), `KC_CPU_WARMUP` (60 s);
//! - `KC_CPU_TLS=1`: Keycloak serves HTTPS only (a throw-away CA, which the token client trusts).
#![forbid(unsafe_code)]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "bench/measure.rs"]
#[allow(dead_code)]
mod measure;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use registry_access_operator::keycloak::assertion::{Credential, SigningKey};
use registry_access_operator::keycloak::token::{ClientConfig, TokenClient, TokenRequest};
use secrecy::SecretString;

use measure::{KeycloakCpu, keycloak_idle_rate};
use support::keycloak::{Keycloak, REALM};
use support::pki::{Ca, ClientKeyType, client_key};
use support::{Result, Tools, repo};

const DEFAULT_VARIANTS: &str = "bare:8:max:keep:1,post:8:max:keep:1,bare:8:50:keep:1,post:8:50:keep:1,\
bare:8:25:keep:1,post:8:25:keep:1,bare:8:max:new:1,post:8:max:keep:8,basic:8:max:keep:1,secret-jwt:8:max:keep:1";

#[derive(Clone, Copy, PartialEq)]
enum Who {
    Bare,
    Post,
    Basic,
    SecretJwt,
    PrivateKeyJwt,
}

struct Variant {
    spec: String,
    who: Who,
    concurrency: usize,
    rate: Option<f64>,
    keep_alive: bool,
    clients: usize,
    grants: u64,
}

impl Variant {
    fn parse(spec: &str, grants: u64) -> Result<Self> {
        let p: Vec<&str> = spec.trim().split(':').collect();
        if p.len() < 5 {
            return Err(format!("variant {spec}: want who:concurrency:rate:connections:clients[:grants]").into());
        }
        let who = match p[0] {
            "bare" => Who::Bare,
            "post" => Who::Post,
            "basic" => Who::Basic,
            "secret-jwt" => Who::SecretJwt,
            "private-key-jwt" => Who::PrivateKeyJwt,
            other => return Err(format!("variant {spec}: unknown client {other}").into()),
        };
        let keep_alive = match p[3] {
            "keep" => true,
            "new" if who == Who::Bare => false,
            _ => return Err(format!("variant {spec}: connections are keep, or new for bare").into()),
        };
        Ok(Self {
            spec: spec.trim().to_owned(),
            who,
            concurrency: p[1].parse::<usize>()?.max(1),
            rate: if p[2] == "max" { None } else { Some(p[2].parse::<f64>()?) },
            keep_alive,
            clients: p[4].parse::<usize>()?.max(1),
            grants: p.get(5).map(|g| g.parse()).transpose()?.unwrap_or(grants),
        })
    }
}

/// The Keycloak clients the variants ask for tokens as.
struct Clients {
    token_url: String,
    /// client-secret clients: (client id, secret).
    secret: Vec<(String, String)>,
    secret_jwt: (String, String),
    private_key: (String, Arc<SigningKey>),
    ca: Option<String>,
}

fn tcp_active_opens() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(head), Some(values)) = (tcp.next(), tcp.next()) else { return 0 };
    let i = head.split_whitespace().position(|h| h == "ActiveOpens");
    i.and_then(|i| values.split_whitespace().nth(i)?.parse().ok()).unwrap_or(0)
}

async fn run(pid: u32, c: &Clients, v: &Variant, idle: measure::IdleRate) -> Result<()> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30)).danger_accept_invalid_certs(true);
    if !v.keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    let http = builder.build()?;
    let tokens = TokenClient::new(ClientConfig::default())?;
    let token_url = reqwest::Url::parse(&c.token_url)?;
    let credentials: Vec<(String, Credential)> = match v.who {
        Who::SecretJwt => {
            vec![(c.secret_jwt.0.clone(), Credential::SecretJwt(SecretString::from(c.secret_jwt.1.clone())))]
        }
        Who::PrivateKeyJwt => vec![(c.private_key.0.clone(), Credential::PrivateKey(c.private_key.1.clone()))],
        _ => c
            .secret
            .iter()
            .take(v.clients)
            .map(|(id, s)| {
                let s = SecretString::from(s.clone());
                (id.clone(), if v.who == Who::Basic { Credential::SecretBasic(s) } else { Credential::SecretPost(s) })
            })
            .collect(),
    };
    let secrets = &c.secret[..v.clients.min(c.secret.len())];
    let next = AtomicU64::new(0);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let (start, before, opens) = (Instant::now(), KeycloakCpu::read(pid)?, tcp_active_opens());
    let worker = || async {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= v.grants {
                return;
            }
            if let Some(rate) = v.rate {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            }
            let granted = if v.who == Who::Bare {
                let (id, secret) = &secrets[i as usize % secrets.len()];
                let form = [("grant_type", "client_credentials"), ("client_id", id), ("client_secret", secret)];
                http.post(&c.token_url).form(&form).send().await.is_ok_and(|r| r.status().is_success())
            } else {
                let (id, credential) = &credentials[i as usize % credentials.len()];
                let request = TokenRequest {
                    token_url: &token_url,
                    client_id: id,
                    credential,
                    scopes: &[],
                    ca_bundle: c.ca.as_deref(),
                };
                tokens.request(&request, jiff::Timestamp::now()).await.is_ok()
            };
            if granted { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
        }
    };
    futures::future::join_all((0..v.concurrency).map(|_| worker())).await;
    let used = before.since()?;
    let (ok, failed) = (ok.into_inner() as usize, failed.into_inner());
    let per = used.per_grant(ok, idle);
    let ms = |f: fn(&measure::PerGrant) -> f64| per.as_ref().map(f).map_or("n/a".into(), |v| format!("{v:.2}"));
    println!(
        "{:<28} {ok:>6} {failed:>4} {:>7.0} {:>7} {:>7} {:>6} {:>7.2}",
        v.spec,
        ok as f64 / used.secs,
        ms(|p| p.all),
        ms(|p| p.without_jit),
        tcp_active_opens() - opens,
        used.jit_secs(),
    );
    Ok(())
}

fn num(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().parse()?),
        _ => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let grants = num("KC_CPU_GRANTS", 1500)?;
    let variants: Vec<Variant> = std::env::var("KC_CPU_VARIANTS")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_VARIANTS.to_owned())
        .split(',')
        .map(|s| Variant::parse(s, grants))
        .collect::<Result<_>>()?;
    let tls = std::env::var("KC_CPU_TLS").is_ok_and(|v| v == "1");
    let tools = Tools::provision()?;
    let dir = tempfile::Builder::new().prefix("keycloak-cpu-").tempdir()?;
    let realm = repo().join("tests/fixtures/consent-01-external-system-realm.json");
    let ca = Ca::new("keycloak-cpu")?;
    let serving = ca.server(&["127.0.0.1", "localhost"])?;
    let tls_pair = tls.then_some((serving.cert.as_str(), serving.key.as_str()));
    eprintln!("starting Keycloak ({})...", if tls { "https" } else { "http" });
    let kc = Keycloak::start_with(&tools.keycloak_home, dir.path(), &realm, tls_pair, None).await?;
    let pid = kc.jvm_pid().ok_or("Keycloak's JVM is not running")?;
    let most = variants.iter().map(|v| v.clients).max().unwrap_or(1);
    let mut secret = Vec::new();
    for i in 0..most {
        let c = kc.create_client(REALM, &format!("cpu-{i}"), Some(300), true).await?;
        secret.push((c.client_id, c.secret));
    }
    let sj = kc.create_client_secret_jwt_client(REALM, "cpu-secret-jwt", Some(300)).await?;
    let key = client_key(ClientKeyType::Rsa2048, "cpu-private-key-jwt")?;
    kc.create_private_key_jwt_client(REALM, "cpu-private-key-jwt", &key, Some(300)).await?;
    let clients = Clients {
        token_url: kc.token_url(REALM),
        secret,
        secret_jwt: (sj.client_id, sj.secret),
        private_key: ("cpu-private-key-jwt".to_owned(), Arc::new(SigningKey::from_pem(&key.private_key_pem, None)?)),
        ca: tls.then(|| ca.cert.clone()),
    };

    let warm_up = Duration::from_secs(num("KC_CPU_WARMUP", 60)?);
    eprintln!("warming Keycloak up for {} s...", warm_up.as_secs());
    println!("warm-up (no idle rate subtracted):");
    let t = Instant::now();
    while t.elapsed() < warm_up {
        let v = Variant::parse("bare:8:max:keep:1:2000", 0)?;
        run(pid, &clients, &v, measure::IdleRate::default()).await?;
    }
    run(pid, &clients, &Variant::parse("post:8:max:keep:1:2000", 0)?, measure::IdleRate::default()).await?;
    for round in 1..=num("KC_CPU_ROUNDS", 2)? {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (idle, _) = keycloak_idle_rate(pid, Duration::from_secs(15)).await?;
        println!("\nround {round}: Keycloak idle {:.1} ms CPU/s outside JIT compiling", idle.0 * 1000.0);
        println!(
            "{:<28} {:>6} {:>4} {:>7} {:>7} {:>7} {:>6} {:>7}",
            "variant", "grants", "fail", "per s", "ms/gr", "no-JIT", "opens", "JIT s"
        );
        for v in &variants {
            run(pid, &clients, v, idle).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    println!(
        "\nms/gr: Keycloak CPU per grant, idle rate subtracted; no-JIT: the same outside its JIT compiler threads; \
         opens: TCP connections opened on this machine meanwhile (all processes: noisy on a shared machine)."
    );
    Ok(())
}
