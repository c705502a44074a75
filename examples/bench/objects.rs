//! The bench's RegistryAccess objects: creating them in sets, and counting or waiting for the
//! Ready ones; also the count of the operator's token Secrets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Api, Client};
use registry_access_operator::api::RegistryAccess;
use serde_json::{Value, json};

use crate::support::Result;
use crate::support::keycloak::{Keycloak, REALM};
use crate::support::operator::Operator;
use crate::{LONG_LIFESPAN, log, managed_by};

/// Concurrency of the bench's own setup writes (creating objects).
const SETUP_CONCURRENCY: usize = 16;
/// Label of the bench's RegistryAccess objects: which set an object belongs to.
const SET_LABEL: &str = "bench.registry-access.io/set";
/// Giving up on "all Ready" when the Ready count stands still this long.
const STALL: Duration = Duration::from_secs(60);

/// The admin client and the RegistryAccess resource, which travel together.
pub struct Kube {
    pub client: Client,
    pub ra: ApiResource,
}

impl Kube {
    pub fn new(client: Client) -> Self {
        Self { client, ra: ApiResource::erase::<RegistryAccess>(&()) }
    }

    /// RegistryAccess objects of a namespace, untyped (the bench reads status fields by name).
    pub fn ras(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &self.ra)
    }
}

/// `count` objects named `<prefix>-00000`, ... spread over the namespaces in turn:
/// (namespace, name).
pub fn spread(namespaces: &[String], count: usize, prefix: &str) -> Vec<(String, String)> {
    (0..count).map(|i| (namespaces[i % namespaces.len()].clone(), format!("{prefix}-{i:05}"))).collect()
}

/// The spec of the bench's objects: a Keycloak client and the Secret of its client secret.
pub fn spec(kc: &Keycloak, client_id: &str, creds: &str) -> Value {
    json!({
        "server": kc.base_url, "realm": REALM, "clientId": client_id, "clientSecretRef": {"name": creds},
    })
}

/// Creates RegistryAccess objects with `spec` and the set label; returns (namespace, name, uid).
pub async fn create_ras(
    kube: &Kube,
    objects: &[(String, String)],
    spec: &Value,
    set: &str,
) -> Result<Vec<(String, String, String)>> {
    futures::stream::iter(objects.iter().map(|(ns, name)| async move {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": kube.ra.api_version,
            "kind": kube.ra.kind,
            "metadata": {"name": name, "namespace": ns, "labels": {SET_LABEL: set}},
            "spec": spec,
        }))?;
        let api = kube.ras(ns);
        let created = api.create(&PostParams::default(), &obj).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
            ns.clone(),
            name.clone(),
            created.metadata.uid.unwrap_or_default(),
        ))
    }))
    .buffer_unordered(SETUP_CONCURRENCY)
    .try_collect()
    .await
}

pub fn per_namespace(objects: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (ns, _) in objects {
        *m.entry(ns.clone()).or_insert(0) += 1;
    }
    m
}

/// True when the object's Ready condition is True and, with `since`, its token was issued then
/// or later (status.issuedAt, else expiresAt minus the long lifespan).
fn ready(obj: &DynamicObject, since: Option<Timestamp>) -> bool {
    let status = &obj.data["status"];
    let is_ready = status["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
    let fresh = match since {
        None => true,
        Some(since) => {
            let at = |k: &str| status[k].as_str().and_then(|s| s.parse::<Timestamp>().ok());
            let issued = at("issuedAt")
                .or_else(|| at("expiresAt").map(|e| e - jiff::SignedDuration::from_secs(i64::from(LONG_LIFESPAN))));
            issued.is_some_and(|i| i.as_second() >= since.as_second())
        }
    };
    is_ready && fresh
}

/// Ready objects of a set in one namespace, one LIST.
async fn ready_in(kube: &Kube, ns: &str, set: &str, since: Option<Timestamp>) -> Result<usize> {
    let api = kube.ras(ns);
    let list = api.list(&ListParams::default().labels(&format!("{SET_LABEL}={set}"))).await?;
    Ok(list.items.iter().filter(|o| ready(o, since)).count())
}

/// Ready objects of a set over the namespaces, one LIST per namespace.
pub async fn count_ready(kube: &Kube, set: &str, namespaces: &[String], since: Option<Timestamp>) -> Result<usize> {
    let mut n = 0;
    for ns in namespaces {
        n += ready_in(kube, ns, set, since).await?;
    }
    Ok(n)
}

/// The outcome of [`wait_ready`].
pub struct Waited {
    /// Seconds from the operator's start to all Ready (or to giving up).
    pub secs: f64,
    ready: usize,
    total: usize,
    /// Why not all objects became Ready (a timeout or a stall); `None` when they did.
    pub why: Option<String>,
}

impl Waited {
    /// Objects Ready per second.
    pub fn rate(&self) -> f64 {
        self.ready as f64 / self.secs
    }

    /// "12.3 s", or what stopped short of all Ready.
    pub fn describe(&self) -> String {
        match &self.why {
            None => format!("{:.1} s", self.secs),
            Some(why) => format!("NOT all Ready: {}/{} after {:.1} s ({why})", self.ready, self.total, self.secs),
        }
    }

    pub fn json(&self) -> Value {
        json!({"seconds": self.secs, "ready": self.ready, "total": self.total, "incomplete": self.why})
    }
}

/// Polls (a LIST per namespace not yet complete) until every object of the set is Ready, or
/// `timeout` passes, or the Ready count stands still for [`STALL`]. Fails when the operator exits.
pub async fn wait_ready(
    kube: &Kube,
    set: &str,
    expected: &BTreeMap<String, usize>,
    since: Option<Timestamp>,
    timeout: Duration,
    t0: Instant,
    op: &mut Operator,
) -> Result<Waited> {
    let total: usize = expected.values().sum();
    let mut pending: BTreeMap<String, usize> = expected.clone();
    let mut done = 0;
    let mut last_log = Instant::now();
    let (mut last_count, mut last_change) = (usize::MAX, Instant::now());
    let poll = Duration::from_millis(match total {
        0..=2000 => 250,
        2001..=5000 => 500,
        _ => 1000,
    });
    loop {
        let mut ready_now = done;
        for (ns, want) in pending.clone() {
            let n = ready_in(kube, &ns, set, since).await?;
            if n >= want {
                pending.remove(&ns);
                done += want;
                ready_now += want;
            } else {
                ready_now += n;
            }
        }
        if pending.is_empty() {
            return Ok(Waited { secs: t0.elapsed().as_secs_f64(), ready: total, total, why: None });
        }
        op.check_alive()?;
        if ready_now != last_count {
            (last_count, last_change) = (ready_now, Instant::now());
        }
        let why = if t0.elapsed() > timeout {
            Some(format!("timed out after {:.0} s", timeout.as_secs_f64()))
        } else if last_change.elapsed() > STALL {
            Some(format!("no progress for {} s", STALL.as_secs()))
        } else {
            None
        };
        if let Some(why) = why {
            log(format!("  NOT all Ready: {ready_now}/{total} Ready, {why}; going on"));
            return Ok(Waited { secs: t0.elapsed().as_secs_f64(), ready: ready_now, total, why: Some(why) });
        }
        if last_log.elapsed() > Duration::from_secs(10) {
            log(format!("  {ready_now}/{total} Ready after {:.0}s", t0.elapsed().as_secs_f64()));
            last_log = Instant::now();
        }
        tokio::time::sleep(poll).await;
    }
}

/// The operator's token Secrets over the namespaces.
pub async fn count_token_secrets(client: &Client, namespaces: &[String]) -> Result<usize> {
    let mut n = 0;
    for ns in namespaces {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        n += api.list_metadata(&ListParams::default().labels(&managed_by())).await?.items.len();
    }
    Ok(n)
}
