//! The pods of the namespaces that have RegistryAccess objects, as far as token delivery needs
//! them: which Secrets each running pod mounts as a volume (so that a new token can be nudged to
//! it), and which it reads in a way that never sees a new token (an environment variable, or a
//! volume mount with `subPath`). A pod costs its name, uid, phase and those Secret names, each list
//! bounded; pods that name no Secret cost nothing.
//!
//! Pure bookkeeping: the watches that feed it are started by the controller, one per namespace
//! with objects; nothing here talks to the API.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::RwLock;

use k8s_openapi::api::core::v1::Pod;

use crate::watch::index::Key;
use crate::watch::relist::Relist;

/// At most this many Secret names are kept per pod for each of its mounts and its fixed reads:
/// a pod naming more is served for the first ones.
pub const MAX_SECRETS_PER_POD: usize = 32;
/// Container names longer than this are cut (they are DNS labels, 63 characters at most).
const MAX_CONTAINER_CHARS: usize = 63;
/// A `subPath` longer than this is kept cut (the API server sets no length limit on it; Secret
/// keys, which it names, have at most 253 characters): a pod costs a bounded amount however long
/// its paths are.
const MAX_KEY_CHARS: usize = 253;

/// How a container reads a Secret so that it never sees a renewed token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fixed {
    /// `env[].valueFrom.secretKeyRef` (the value is copied into the process at start).
    Env,
    /// `envFrom[].secretRef` (every key copied at start).
    EnvFrom,
    /// A volume mount with `subPath` (the kubelet never updates such a file).
    SubPath,
}

impl Fixed {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Env => "an environment variable (env[].valueFrom.secretKeyRef)",
            Self::EnvFrom => "environment variables (envFrom[].secretRef)",
            Self::SubPath => "a volume mount with subPath",
        }
    }
}

/// One container's fixed read of a Secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FixedRead {
    pub secret: String,
    /// The key read, where the pod names one (`env` with `secretKeyRef`, a `subPath` into an
    /// item of the volume).
    pub key: Option<String>,
    pub container: String,
    pub how: Fixed,
}

/// What is kept of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodView {
    pub uid: String,
    /// The pod's phase is Running (a pod that is not gets no nudge).
    pub running: bool,
    /// The Secrets it mounts as volumes (a `secret` volume or a `projected` source), sorted.
    pub mounts: Vec<String>,
    /// The Secrets its containers read once and never again.
    pub fixed: Vec<FixedRead>,
}

/// What is kept of `pod`; `None` when it names no Secret at all (nothing is kept of it).
pub fn view(pod: &Pod) -> Option<PodView> {
    let spec = pod.spec.as_ref()?;
    // Volume name -> Secret name, for secret volumes and projected sources.
    let mut volumes: HashMap<&str, Vec<&str>> = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        let mut names: Vec<&str> = Vec::new();
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
            names.push(s);
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(s) = source.secret.as_ref().map(|s| s.name.as_str()) {
                names.push(s);
            }
        }
        if !names.is_empty() {
            volumes.insert(v.name.as_str(), names);
        }
    }
    let mut mounts: BTreeSet<String> = BTreeSet::new();
    let mut fixed: BTreeSet<FixedRead> = BTreeSet::new();
    let containers = spec.init_containers.iter().flatten().chain(spec.containers.iter());
    for c in containers {
        let container: String = c.name.chars().take(MAX_CONTAINER_CHARS).collect();
        for m in c.volume_mounts.iter().flatten() {
            let Some(secrets) = volumes.get(m.name.as_str()) else { continue };
            match m.sub_path.as_deref().filter(|p| !p.is_empty()) {
                Some(path) => {
                    for s in secrets {
                        fixed.insert(FixedRead {
                            secret: (*s).to_owned(),
                            key: Some(path.chars().take(MAX_KEY_CHARS).collect()),
                            container: container.clone(),
                            how: Fixed::SubPath,
                        });
                    }
                }
                None => mounts.extend(secrets.iter().map(|s| (*s).to_owned())),
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(r) = e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) {
                fixed.insert(FixedRead {
                    secret: r.name.clone(),
                    key: Some(r.key.clone()),
                    container: container.clone(),
                    how: Fixed::Env,
                });
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = e.secret_ref.as_ref() {
                fixed.insert(FixedRead {
                    secret: r.name.clone(),
                    key: None,
                    container: container.clone(),
                    how: Fixed::EnvFrom,
                });
            }
        }
    }
    if mounts.is_empty() && fixed.is_empty() {
        return None;
    }
    Some(PodView {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        running: pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
        mounts: mounts.into_iter().take(MAX_SECRETS_PER_POD).collect(),
        fixed: fixed.into_iter().take(MAX_SECRETS_PER_POD).collect(),
    })
}

#[derive(Default)]
struct Inner {
    pods: HashMap<Key, PodView>,
    /// Secret -> the pods (names) that mount it or read it once.
    by_secret: HashMap<Key, HashSet<String>>,
    relisting: Relist<String>,
}

impl Inner {
    fn unlink(&mut self, pod: &Key) -> Option<PodView> {
        let old = self.pods.remove(pod)?;
        for secret in secrets_of(&old) {
            let key = Key::new(&pod.namespace, secret);
            if let Some(pods) = self.by_secret.get_mut(&key) {
                pods.remove(&pod.name);
                if pods.is_empty() {
                    self.by_secret.remove(&key);
                }
            }
        }
        Some(old)
    }
}

fn secrets_of(v: &PodView) -> impl Iterator<Item = &str> {
    v.mounts.iter().map(String::as_str).chain(v.fixed.iter().map(|f| f.secret.as_str()))
}

/// The pods kept, by namespaced name, with the Secrets they name.
#[derive(Default)]
pub struct Pods {
    inner: RwLock<Inner>,
}

/// A pod that mounts a Secret, as a nudge needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounting {
    pub name: String,
    pub uid: String,
}

impl Pods {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what the watch shows of a pod; returns the Secrets whose fixed readers changed
    /// (their objects report them).
    pub fn applied(&self, pod: Key, view: Option<PodView>) -> Vec<Key> {
        let mut inner = self.write();
        inner.relisting.seen(&pod.namespace, &pod);
        let old = inner.unlink(&pod);
        if let Some(v) = &view {
            for secret in secrets_of(v) {
                inner.by_secret.entry(Key::new(&pod.namespace, secret)).or_default().insert(pod.name.clone());
            }
        }
        let changed = fixed_changes(&pod.namespace, old.as_ref(), view.as_ref());
        if let Some(v) = view {
            inner.pods.insert(pod, v);
        }
        changed
    }

    /// Forgets a deleted pod; returns the Secrets whose fixed readers changed.
    pub fn deleted(&self, pod: &Key) -> Vec<Key> {
        let old = self.write().unlink(pod);
        fixed_changes(&pod.namespace, old.as_ref(), None)
    }

    /// The pod watch of `namespace` starts listing (again).
    pub fn relist_begin(&self, namespace: &str) {
        self.write().relisting.begin(namespace.to_owned());
    }

    /// The pod watch of `namespace` finished listing: pods it did not list are gone. Returns the
    /// Secrets whose fixed readers changed.
    pub fn relist_end(&self, namespace: &str) -> Vec<Key> {
        let inner = &mut *self.write();
        let held = inner.pods.keys().filter(|k| k.namespace == namespace);
        let gone = inner.relisting.end(&namespace.to_owned(), held);
        let mut changed = Vec::new();
        for k in gone {
            let old = inner.unlink(&k);
            changed.extend(fixed_changes(namespace, old.as_ref(), None));
        }
        changed
    }

    /// Forgets every pod of a namespace (its watch stopped: no object there any more).
    pub fn forget_namespace(&self, namespace: &str) {
        let inner = &mut *self.write();
        let pods: Vec<Key> = inner.pods.keys().filter(|k| k.namespace == namespace).cloned().collect();
        for k in pods {
            inner.unlink(&k);
        }
    }

    /// The running pods that mount `secret` as a volume.
    pub fn mounting(&self, secret: &Key) -> Vec<Mounting> {
        let inner = self.read();
        let Some(names) = inner.by_secret.get(secret) else { return Vec::new() };
        let mut out: Vec<Mounting> = names
            .iter()
            .filter_map(|name| {
                let view = inner.pods.get(&Key::new(&secret.namespace, name))?;
                (view.running && view.mounts.contains(&secret.name))
                    .then(|| Mounting { name: name.clone(), uid: view.uid.clone() })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The running pods whose containers read `secret` once (env or subPath), with how, sorted.
    pub fn fixed_readers(&self, secret: &Key) -> Vec<(String, FixedRead)> {
        let inner = self.read();
        let Some(names) = inner.by_secret.get(secret) else { return Vec::new() };
        let mut out: Vec<(String, FixedRead)> = names
            .iter()
            .filter_map(|name| inner.pods.get(&Key::new(&secret.namespace, name)).map(|v| (name, v)))
            .filter(|(_, v)| v.running)
            .flat_map(|(name, v)| v.fixed.iter().filter(|f| f.secret == secret.name).map(|f| (name.clone(), f.clone())))
            .collect();
        out.sort();
        out
    }

    /// Pods kept.
    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Secrets whose running fixed readers differ between two views of a pod.
fn fixed_changes(namespace: &str, old: Option<&PodView>, new: Option<&PodView>) -> Vec<Key> {
    let fixed = |v: Option<&PodView>| -> BTreeSet<FixedRead> {
        v.filter(|v| v.running).map(|v| v.fixed.iter().cloned().collect()).unwrap_or_default()
    };
    let (a, b) = (fixed(old), fixed(new));
    let secrets: BTreeSet<&str> = a.symmetric_difference(&b).map(|f| f.secret.as_str()).collect();
    secrets.into_iter().map(|s| Key::new(namespace, s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "pod-uid"},
            "spec": spec,
            "status": {"phase": phase},
        }))
        .expect("pod")
    }

    fn workload() -> Pod {
        pod(
            serde_json::json!({
                "volumes": [
                    {"name": "token", "secret": {"secretName": "a-token"}},
                    {"name": "both", "projected": {"sources": [{"secret": {"name": "b-token"}}, {"configMap": {"name": "cm"}}]}},
                    {"name": "once", "secret": {"secretName": "c-token"}},
                    {"name": "cache", "emptyDir": {}},
                ],
                "containers": [{
                    "name": "app", "image": "x",
                    "volumeMounts": [
                        {"name": "token", "mountPath": "/t"},
                        {"name": "both", "mountPath": "/b"},
                        {"name": "once", "mountPath": "/c/access_token", "subPath": "access_token"},
                        {"name": "cache", "mountPath": "/cache"},
                    ],
                    "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "d-token", "key": "access_token"}}},
                            {"name": "PLAIN", "value": "x"}],
                    "envFrom": [{"secretRef": {"name": "e-token"}}],
                }],
            }),
            "Running",
        )
    }

    #[test]
    fn a_pod_is_kept_as_the_secrets_it_mounts_and_reads_once() {
        let v = view(&workload()).expect("kept");
        assert_eq!(v.mounts, vec!["a-token", "b-token"]);
        let how: Vec<(&str, Fixed)> = v.fixed.iter().map(|f| (f.secret.as_str(), f.how)).collect();
        assert_eq!(how, vec![("c-token", Fixed::SubPath), ("d-token", Fixed::Env), ("e-token", Fixed::EnvFrom)]);
        assert!(v.running);
        let plain = pod(serde_json::json!({"containers": [{"name": "app", "image": "x"}]}), "Running");
        assert_eq!(view(&plain), None, "a pod that names no Secret is not kept");
    }

    #[test]
    fn only_running_pods_that_mount_a_secret_are_nudged() {
        let pods = Pods::default();
        pods.applied(Key::new("ns", "p"), view(&workload()));
        let mut pending = workload();
        pending.metadata.name = Some("q".into());
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        pods.applied(Key::new("ns", "q"), view(&pending));
        let names = |s: &str| pods.mounting(&Key::new("ns", s)).into_iter().map(|m| m.name).collect::<Vec<_>>();
        assert_eq!(names("a-token"), vec!["p"]);
        assert!(names("c-token").is_empty(), "a subPath mount gets no nudge: it never updates");
        assert!(pods.mounting(&Key::new("other", "a-token")).is_empty());
        pods.deleted(&Key::new("ns", "p"));
        assert!(names("a-token").is_empty());
    }

    #[test]
    fn fixed_readers_are_reported_when_they_change() {
        let pods = Pods::default();
        let changed = pods.applied(Key::new("ns", "p"), view(&workload()));
        assert_eq!(changed, vec![Key::new("ns", "c-token"), Key::new("ns", "d-token"), Key::new("ns", "e-token")]);
        assert!(pods.applied(Key::new("ns", "p"), view(&workload())).is_empty(), "nothing changed");
        let readers = pods.fixed_readers(&Key::new("ns", "d-token"));
        assert_eq!(readers.len(), 1);
        assert_eq!((readers[0].0.as_str(), readers[0].1.container.as_str()), ("p", "app"));
        assert_eq!(pods.deleted(&Key::new("ns", "p")).len(), 3);
        assert!(pods.fixed_readers(&Key::new("ns", "d-token")).is_empty());
    }

    #[test]
    fn a_relist_forgets_pods_it_did_not_show_again_and_a_stopped_namespace_forgets_all() {
        let pods = Pods::default();
        pods.applied(Key::new("ns", "p"), view(&workload()));
        let mut other = workload();
        other.metadata.namespace = Some("other".into());
        pods.applied(Key::new("other", "p"), view(&other));
        pods.relist_begin("ns");
        assert_eq!(pods.relist_end("ns").len(), 3, "p's fixed readers went with it");
        assert_eq!(pods.len(), 1, "the other namespace's pod stays");
        pods.forget_namespace("other");
        assert!(pods.is_empty());
        assert!(pods.inner.read().unwrap().by_secret.is_empty(), "nothing left behind");
    }

    #[test]
    fn a_pod_naming_many_secrets_keeps_a_bounded_number() {
        let volumes: Vec<serde_json::Value> = (0..200)
            .map(|i| serde_json::json!({"name": format!("v{i}"), "secret": {"secretName": format!("s{i}")}}))
            .collect();
        let mounts: Vec<serde_json::Value> =
            (0..200).map(|i| serde_json::json!({"name": format!("v{i}"), "mountPath": format!("/m{i}")})).collect();
        let p = pod(
            serde_json::json!({"volumes": volumes, "containers": [{"name": "app", "image": "x", "volumeMounts": mounts}]}),
            "Running",
        );
        assert_eq!(view(&p).expect("kept").mounts.len(), MAX_SECRETS_PER_POD);
    }

    #[test]
    fn a_long_sub_path_is_kept_cut() {
        let mut p = workload();
        let long = "k".repeat(100_000);
        p.spec.as_mut().unwrap().containers[0].volume_mounts.as_mut().unwrap()[2].sub_path = Some(long);
        let v = view(&p).expect("kept");
        let sub_path = v.fixed.iter().find(|f| f.how == Fixed::SubPath).expect("the subPath read");
        assert_eq!(sub_path.key.as_deref().map(str::len), Some(MAX_KEY_CHARS));
    }
}
