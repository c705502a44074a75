//! Keyed indexes kept by the watches: which objects name a Secret (as client Secret or token
//! Secret), the uid and resourceVersion of every Secret seen, which token Secrets each object
//! controls, and the fingerprints of client Secrets read. A Secret event finds its objects without
//! a scan, and a reconcile knows a Secret's version (and a client Secret's fingerprint) without
//! reading it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::KEYCLOAK_ISSUERS_ANNOTATION;
use crate::keycloak::credentials::Fingerprint;
use crate::watch::relist::{Relist, in_scope};

/// A namespaced name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self { namespace: namespace.to_owned(), name: name.to_owned() }
    }

    /// The namespaced name of any Kubernetes object (empty parts for a cluster-scoped or unnamed
    /// object).
    pub fn of<K: kube::Resource>(obj: &K) -> Self {
        let meta = obj.meta();
        Self::new(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
    }
}

/// How an object uses a Secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// It reads the client secret from it.
    Client,
    /// It writes its token to it.
    Token,
    /// It authenticates with tokens of this ServiceAccount (not a Secret).
    ServiceAccount,
}

/// An object that names a Secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Referrer {
    pub object: Key,
    pub uid: String,
    pub role: Role,
}

/// What the watch says of a ServiceAccount that some object names (others are not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountMeta {
    pub uid: String,
    pub resource_version: String,
    /// The Keycloak issuers its annotation lets the operator present its tokens to; `None`
    /// without the annotation. At most [`MAX_ISSUERS`] entries are kept.
    pub issuers: Option<Vec<String>>,
    /// The annotation is longer than [`MAX_ISSUERS_ANNOTATION`] and was not read.
    pub annotation_too_long: bool,
}

impl ServiceAccountMeta {
    /// What is kept of a ServiceAccount's metadata: its uid and version, and its issuers
    /// annotation when it is of a sane size (at most [`MAX_ISSUERS`] entries of it).
    pub fn of(meta: &ObjectMeta) -> Self {
        let annotation = meta.annotations.as_ref().and_then(|a| a.get(KEYCLOAK_ISSUERS_ANNOTATION));
        let too_long = annotation.is_some_and(|v| v.len() > MAX_ISSUERS_ANNOTATION);
        Self {
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            issuers: annotation.filter(|_| !too_long).map(|v| {
                v.split(',').map(str::trim).filter(|s| !s.is_empty()).take(MAX_ISSUERS).map(str::to_owned).collect()
            }),
            annotation_too_long: too_long,
        }
    }
}

/// Longest `registry-access.io/keycloak-issuers` annotation read, in bytes: a few dozen issuer
/// URLs. A longer one is not parsed (the ServiceAccount is treated as not opted in, and says why).
pub const MAX_ISSUERS_ANNOTATION: usize = 8 * 1024;
/// Most issuers kept from one annotation.
pub const MAX_ISSUERS: usize = 32;

/// Which watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Watched {
    Secrets,
    ServiceAccounts,
}

/// What the watch says of a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMeta {
    pub uid: String,
    pub resource_version: String,
    /// The uid of the RegistryAccess whose live token Secret this is (operator-managed, controlled
    /// by that object, not retired).
    pub token_of: Option<String>,
}

impl SecretMeta {
    /// What is kept of a Secret's metadata (the same for the watch's view and a read).
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            token_of: crate::secret::token_owner(meta),
        }
    }
}

#[derive(Default)]
struct Inner {
    by_secret: HashMap<Key, Vec<Referrer>>,
    of_object: HashMap<Key, Vec<(Key, Role)>>,
    secrets: HashMap<Key, SecretMeta>,
    /// The live token Secrets of each object, by its uid.
    token_secrets: HashMap<String, HashSet<Key>>,
    /// Fingerprints of client Secrets, each valid for the version it was taken from.
    fingerprints: HashMap<Key, Arc<Fingerprint>>,
    /// Secrets seen so far in a re-list, per watched scope (a namespace, or all).
    relisting: Relist<Option<String>>,
    service_accounts: HashMap<Key, ServiceAccountMeta>,
    /// ServiceAccounts seen so far in a re-list, per watched scope.
    relisting_service_accounts: Relist<Option<String>>,
    /// Watches (per scope) whose last listing completed with no error since: what they show
    /// can be trusted in place of a read.
    synced: HashSet<(Watched, Option<String>)>,
}

/// Both indexes.
#[derive(Default)]
pub struct Index {
    inner: RwLock<Inner>,
}

impl Index {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Records which Secrets an object names, replacing what it named before.
    pub fn set_object(&self, object: Key, uid: &str, secrets: &[(String, Role)]) {
        let mut inner = self.write();
        let before = Self::unlink(&mut inner, &object);
        let links: Vec<(Key, Role)> =
            secrets.iter().map(|(name, role)| (Key::new(&object.namespace, name), *role)).collect();
        for (secret, role) in &links {
            inner.by_secret.entry(secret.clone()).or_default().push(Referrer {
                object: object.clone(),
                uid: uid.to_owned(),
                role: *role,
            });
        }
        inner.of_object.insert(object, links);
        Self::drop_unnamed(&mut inner, before);
    }

    pub fn remove_object(&self, object: &Key) {
        let mut inner = self.write();
        let before = Self::unlink(&mut inner, object);
        Self::drop_unnamed(&mut inner, before);
    }

    /// Removes what `object` names; returns the Secrets and ServiceAccounts it named.
    fn unlink(inner: &mut Inner, object: &Key) -> Vec<Key> {
        let named = inner.of_object.remove(object).unwrap_or_default();
        for (secret, _) in &named {
            if let Some(refs) = inner.by_secret.get_mut(secret) {
                refs.retain(|r| &r.object != object);
                if refs.is_empty() {
                    inner.by_secret.remove(secret);
                }
            }
        }
        named.into_iter().map(|(k, _)| k).collect()
    }

    /// Forgets what is kept of Secrets and ServiceAccounts that no object names any more (live
    /// token Secrets excepted: they are followed for their object until they go).
    fn drop_unnamed(inner: &mut Inner, keys: Vec<Key>) {
        for key in keys {
            if inner.by_secret.contains_key(&key) {
                continue;
            }
            inner.service_accounts.remove(&key);
            if inner.secrets.get(&key).is_some_and(|m| m.token_of.is_none()) {
                Self::forget_secret(inner, &key);
            }
        }
    }

    /// The objects that name a Secret.
    pub fn referrers(&self, secret: &Key) -> Vec<Referrer> {
        self.read().by_secret.get(secret).cloned().unwrap_or_default()
    }

    /// What the watch last said of a Secret; `None` when it has not seen it (yet).
    pub fn secret(&self, secret: &Key) -> Option<SecretMeta> {
        self.read().secrets.get(secret).cloned()
    }

    /// Records a Secret the watch saw, if an object names it or it is a live token Secret (nothing
    /// is kept of the others, so memory follows the Secrets the operator serves); true when it is
    /// new or its version changed.
    pub fn secret_applied(&self, secret: Key, meta: SecretMeta) -> bool {
        let mut inner = self.write();
        if meta.token_of.is_none() && !inner.by_secret.contains_key(&secret) {
            return Self::forget_secret(&mut inner, &secret);
        }
        inner.relisting.seen_where(&secret, in_scope);
        if let Some(owner) = &meta.token_of {
            inner.token_secrets.entry(owner.clone()).or_default().insert(secret.clone());
        }
        let old = inner.secrets.insert(secret.clone(), meta.clone());
        if let Some(old) = &old {
            if old.resource_version != meta.resource_version {
                inner.fingerprints.remove(&secret);
            }
            if old.token_of != meta.token_of {
                Self::unlink_token(&mut inner, old.token_of.as_deref(), &secret);
            }
        }
        old != Some(meta)
    }

    /// Records a Secret read from the API that an object names, unless the watch already shows
    /// it (the watch's view is never replaced by a read that may be older).
    pub fn secret_read(&self, secret: Key, meta: SecretMeta) {
        let mut inner = self.write();
        if inner.secrets.contains_key(&secret) || (meta.token_of.is_none() && !inner.by_secret.contains_key(&secret)) {
            return;
        }
        if let Some(owner) = &meta.token_of {
            inner.token_secrets.entry(owner.clone()).or_default().insert(secret.clone());
        }
        inner.secrets.insert(secret, meta);
    }

    /// Forgets a deleted Secret; true when it was known.
    pub fn secret_deleted(&self, secret: &Key) -> bool {
        let mut inner = self.write();
        Self::forget_secret(&mut inner, secret)
    }

    fn forget_secret(inner: &mut Inner, secret: &Key) -> bool {
        inner.fingerprints.remove(secret);
        let Some(old) = inner.secrets.remove(secret) else { return false };
        Self::unlink_token(inner, old.token_of.as_deref(), secret);
        true
    }

    fn unlink_token(inner: &mut Inner, owner: Option<&str>, secret: &Key) {
        let Some(owner) = owner else { return };
        if let Some(keys) = inner.token_secrets.get_mut(owner) {
            keys.remove(secret);
            if keys.is_empty() {
                inner.token_secrets.remove(owner);
            }
        }
    }

    /// The live token Secrets the object with `uid` controls, by the watch.
    pub fn token_secrets_of(&self, uid: &str) -> Vec<Key> {
        self.read().token_secrets.get(uid).map(|k| k.iter().cloned().collect()).unwrap_or_default()
    }

    /// The fingerprint of a client Secret, when one was taken of the version the watch shows.
    pub fn fingerprint(&self, secret: &Key) -> Option<Arc<Fingerprint>> {
        let inner = self.read();
        let fp = inner.fingerprints.get(secret)?;
        (inner.secrets.get(secret)?.resource_version == fp.resource_version).then(|| fp.clone())
    }

    /// Keeps the fingerprint of a client Secret just read (while the watch knows the Secret).
    pub fn set_fingerprint(&self, secret: Key, fingerprint: Arc<Fingerprint>) {
        let mut inner = self.write();
        if inner.secrets.contains_key(&secret) {
            inner.fingerprints.insert(secret, fingerprint);
        }
    }

    /// A watch of `scope` starts listing again.
    pub fn relist_begin(&self, watched: Watched, scope: Option<String>) {
        let mut inner = self.write();
        match watched {
            Watched::Secrets => inner.relisting.begin(scope),
            Watched::ServiceAccounts => inner.relisting_service_accounts.begin(scope),
        }
    }

    /// A watch of `scope` finished listing: the Secrets (or ServiceAccounts) of the scope it did
    /// not list are gone, and forgotten. Returns them.
    pub fn relist_end(&self, watched: Watched, scope: &Option<String>) -> Vec<Key> {
        let inner = &mut *self.write();
        match watched {
            Watched::Secrets => {
                let gone = inner.relisting.end(scope, inner.secrets.keys().filter(|k| in_scope(scope, k)));
                for k in &gone {
                    Self::forget_secret(inner, k);
                }
                gone
            }
            Watched::ServiceAccounts => {
                let held = inner.service_accounts.keys().filter(|k| in_scope(scope, k));
                let gone = inner.relisting_service_accounts.end(scope, held);
                for k in &gone {
                    inner.service_accounts.remove(k);
                }
                gone
            }
        }
    }

    /// Secrets known.
    pub fn secrets(&self) -> usize {
        self.read().secrets.len()
    }

    /// What the watch last said of a ServiceAccount.
    pub fn service_account(&self, key: &Key) -> Option<ServiceAccountMeta> {
        self.read().service_accounts.get(key).cloned()
    }

    /// Records a ServiceAccount the watch saw, if some object names it (nothing is kept of the
    /// others); true when it is new or changed.
    pub fn service_account_applied(&self, key: Key, meta: ServiceAccountMeta) -> bool {
        let mut inner = self.write();
        inner.relisting_service_accounts.seen_where(&key, in_scope);
        if !Self::names_service_account(&inner, &key) {
            return inner.service_accounts.remove(&key).is_some();
        }
        inner.service_accounts.insert(key, meta.clone()) != Some(meta)
    }

    /// Records a ServiceAccount read from the API (the watch had not shown it while no object
    /// named it), if some object names it.
    pub fn service_account_read(&self, key: Key, meta: ServiceAccountMeta) {
        let mut inner = self.write();
        if Self::names_service_account(&inner, &key) {
            inner.service_accounts.insert(key, meta);
        }
    }

    fn names_service_account(inner: &Inner, key: &Key) -> bool {
        inner.by_secret.get(key).is_some_and(|refs| refs.iter().any(|r| r.role == Role::ServiceAccount))
    }

    /// ServiceAccounts kept.
    #[cfg(test)]
    pub fn service_accounts(&self) -> usize {
        self.read().service_accounts.len()
    }

    /// A watch of `scope` finished a listing (`true`) or failed (`false`); returns true when that
    /// changed whether it is in sync.
    pub fn set_synced(&self, watched: Watched, scope: Option<String>, synced: bool) -> bool {
        let mut inner = self.write();
        if synced { inner.synced.insert((watched, scope)) } else { inner.synced.remove(&(watched, scope)) }
    }

    /// The objects of `scope` the index knows.
    pub fn objects_in(&self, scope: &Option<String>) -> Vec<Key> {
        self.read().of_object.keys().filter(|k| in_scope(scope, k)).cloned().collect()
    }

    fn synced(&self, watched: Watched, namespace: &str) -> bool {
        let inner = self.read();
        inner.synced.contains(&(watched, None)) || inner.synced.contains(&(watched, Some(namespace.to_owned())))
    }

    /// True while the Secret watch of `namespace` is in sync: its index can stand for a read.
    pub fn secrets_synced(&self, namespace: &str) -> bool {
        self.synced(Watched::Secrets, namespace)
    }

    /// True while the ServiceAccount watch of `namespace` is in sync.
    pub fn service_accounts_synced(&self, namespace: &str) -> bool {
        self.synced(Watched::ServiceAccounts, namespace)
    }

    /// Forgets a deleted ServiceAccount; true when it was known.
    pub fn service_account_deleted(&self, key: &Key) -> bool {
        self.write().service_accounts.remove(key).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(rv: &str) -> SecretMeta {
        SecretMeta { uid: "u".into(), resource_version: rv.into(), token_of: None }
    }

    fn token_meta(rv: &str, owner: Option<&str>) -> SecretMeta {
        SecretMeta { token_of: owner.map(str::to_owned), ..meta(rv) }
    }

    #[test]
    fn follows_the_token_secrets_each_object_controls() {
        let ix = Index::default();
        let (a, b) = (Key::new("ns", "a-token"), Key::new("ns", "renamed"));
        ix.secret_applied(a.clone(), token_meta("1", Some("uid-a")));
        ix.secret_applied(b.clone(), token_meta("1", Some("uid-a")));
        let mut owned = ix.token_secrets_of("uid-a");
        owned.sort();
        assert_eq!(owned, vec![a.clone(), b.clone()]);
        // Retired: no longer a live token Secret of the object.
        ix.secret_applied(a.clone(), token_meta("2", None));
        assert_eq!(ix.token_secrets_of("uid-a"), vec![b.clone()]);
        ix.secret_deleted(&b);
        assert!(ix.token_secrets_of("uid-a").is_empty());
    }

    #[test]
    fn service_accounts_are_followed_and_pruned_on_relist() {
        let ix = Index::default();
        let k = Key::new("ns", "builder");
        let meta = |uid: &str| ServiceAccountMeta {
            uid: uid.into(),
            resource_version: "1".into(),
            issuers: None,
            annotation_too_long: false,
        };
        assert!(!ix.service_account_applied(k.clone(), meta("1")), "kept only while an object names it");
        assert_eq!(ix.service_accounts(), 0);
        ix.set_object(Key::new("ns", "ra"), "uid-ra", &[("builder".into(), Role::ServiceAccount)]);
        assert!(ix.service_account_applied(k.clone(), meta("1")));
        assert!(!ix.service_account_applied(k.clone(), meta("1")));
        assert!(ix.service_account_applied(k.clone(), meta("2")), "recreated");
        ix.relist_begin(Watched::ServiceAccounts, None);
        assert_eq!(ix.relist_end(Watched::ServiceAccounts, &None), vec![k.clone()]);
        assert!(ix.service_account(&k).is_none());
    }

    #[test]
    fn unnamed_service_accounts_cost_nothing() {
        let ix = Index::default();
        let huge = Some(vec!["x".repeat(100); MAX_ISSUERS]);
        for i in 0..1000 {
            let meta = ServiceAccountMeta {
                uid: format!("u{i}"),
                resource_version: "1".into(),
                issuers: huge.clone(),
                annotation_too_long: false,
            };
            ix.service_account_applied(Key::new("hostile", &format!("sa-{i}")), meta);
        }
        assert_eq!(ix.service_accounts(), 0);
        ix.service_account_read(
            Key::new("hostile", "sa-1"),
            ServiceAccountMeta {
                uid: "u".into(),
                resource_version: "1".into(),
                issuers: None,
                annotation_too_long: false,
            },
        );
        assert_eq!(ix.service_accounts(), 0, "a read is kept only for a named ServiceAccount");
    }

    #[test]
    fn a_watch_is_trusted_only_between_a_listing_and_its_next_error() {
        let ix = Index::default();
        assert!(!ix.secrets_synced("ns"));
        let _ = ix.set_synced(Watched::Secrets, Some("ns".into()), true);
        assert!(ix.secrets_synced("ns") && !ix.secrets_synced("other") && !ix.service_accounts_synced("ns"));
        assert!(ix.set_synced(Watched::Secrets, Some("ns".into()), false), "a change");
        assert!(!ix.set_synced(Watched::Secrets, Some("ns".into()), false), "no change");
        assert!(!ix.secrets_synced("ns"));
        let _ = ix.set_synced(Watched::ServiceAccounts, None, true);
        assert!(ix.service_accounts_synced("any"));
    }

    #[test]
    fn a_fingerprint_is_valid_for_its_version_only() {
        let ix = naming("ns", &["creds"]);
        let k = Key::new("ns", "creds");
        let fp = |rv: &str| Arc::new(Fingerprint { resource_version: rv.into(), ..Fingerprint::default() });
        ix.set_fingerprint(k.clone(), fp("1"));
        assert!(ix.fingerprint(&k).is_none(), "a Secret the watch has not seen keeps no fingerprint");
        ix.secret_applied(k.clone(), meta("1"));
        ix.set_fingerprint(k.clone(), fp("1"));
        assert_eq!(ix.fingerprint(&k).unwrap().resource_version, "1");
        ix.secret_applied(k.clone(), meta("2"));
        assert!(ix.fingerprint(&k).is_none(), "a new version needs a new fingerprint");
        ix.set_fingerprint(k.clone(), fp("2"));
        ix.secret_deleted(&k);
        ix.secret_applied(k.clone(), meta("2"));
        assert!(ix.fingerprint(&k).is_none(), "deletion drops the fingerprint");
    }

    #[test]
    fn finds_the_objects_that_name_a_secret_and_follows_spec_changes() {
        let ix = Index::default();
        let a = Key::new("ns", "a");
        ix.set_object(a.clone(), "uid-a", &[("creds".into(), Role::Client), ("a-token".into(), Role::Token)]);
        ix.set_object(Key::new("ns", "b"), "uid-b", &[("creds".into(), Role::Client), ("b-token".into(), Role::Token)]);
        ix.set_object(
            Key::new("other", "c"),
            "uid-c",
            &[("creds".into(), Role::Client), ("c-token".into(), Role::Token)],
        );
        let refs = ix.referrers(&Key::new("ns", "creds"));
        assert_eq!(refs.len(), 2, "{refs:?}");
        assert_eq!(ix.referrers(&Key::new("ns", "a-token"))[0].role, Role::Token);
        ix.set_object(a.clone(), "uid-a", &[("rotated".into(), Role::Client), ("a-token".into(), Role::Token)]);
        assert_eq!(ix.referrers(&Key::new("ns", "creds")).len(), 1);
        assert_eq!(ix.referrers(&Key::new("ns", "rotated"))[0].uid, "uid-a");
        ix.remove_object(&a);
        assert!(ix.referrers(&Key::new("ns", "a-token")).is_empty());
        assert!(ix.referrers(&Key::new("ns", "rotated")).is_empty());
    }

    /// An index in which object `ra` of namespace `ns` names each of `secrets` as client Secret.
    fn naming(ns: &str, secrets: &[&str]) -> Index {
        let ix = Index::default();
        for (i, s) in secrets.iter().enumerate() {
            ix.set_object(Key::new(ns, &format!("ra-{i}")), &format!("uid-{i}"), &[((*s).to_owned(), Role::Client)]);
        }
        ix
    }

    #[test]
    fn unnamed_secrets_cost_nothing() {
        let ix = naming("ns", &["creds"]);
        for i in 0..1000 {
            assert!(!ix.secret_applied(Key::new("ns", &format!("other-{i}")), meta("1")));
        }
        assert!(ix.secret_applied(Key::new("ns", "creds"), meta("1")));
        assert!(ix.secret_applied(Key::new("ns", "x-token"), token_meta("1", Some("uid-x"))), "a live token Secret");
        assert_eq!(ix.secrets(), 2);
        // A read is kept for a named Secret the watch has not shown, and never replaces the watch.
        let ix = naming("ns", &["creds", "late"]);
        ix.secret_read(Key::new("ns", "late"), meta("5"));
        ix.secret_read(Key::new("ns", "unnamed"), meta("5"));
        assert_eq!(ix.secret(&Key::new("ns", "late")).unwrap().resource_version, "5");
        assert!(ix.secret(&Key::new("ns", "unnamed")).is_none());
        ix.secret_applied(Key::new("ns", "late"), meta("7"));
        ix.secret_read(Key::new("ns", "late"), meta("6"));
        assert_eq!(ix.secret(&Key::new("ns", "late")).unwrap().resource_version, "7");
        // Named no more: forgotten; still named after an update of the object: kept.
        ix.set_object(Key::new("ns", "ra-1"), "uid-1", &[("late".into(), Role::Client)]);
        assert!(ix.secret(&Key::new("ns", "late")).is_some());
        ix.set_object(Key::new("ns", "ra-1"), "uid-1", &[("other".into(), Role::Client)]);
        assert!(ix.secret(&Key::new("ns", "late")).is_none());
        ix.remove_object(&Key::new("ns", "ra-0"));
        assert_eq!(ix.secrets(), 0);
    }

    #[test]
    fn secret_versions_change_once_and_deletions_are_noticed() {
        let ix = naming("ns", &["creds"]);
        let k = Key::new("ns", "creds");
        assert!(ix.secret_applied(k.clone(), meta("1")));
        assert!(!ix.secret_applied(k.clone(), meta("1")), "the same version again is no change");
        assert!(ix.secret_applied(k.clone(), meta("2")));
        assert_eq!(ix.secret(&k).unwrap().resource_version, "2");
        assert!(ix.secret_deleted(&k));
        assert!(ix.secret(&k).is_none());
    }

    #[test]
    fn a_relist_prunes_what_was_deleted_while_the_watch_was_away() {
        let ix = naming("a", &["kept", "gone"]);
        ix.set_object(Key::new("b", "ra"), "uid-b", &[("other".into(), Role::Client)]);
        for (ns, name) in [("a", "kept"), ("a", "gone"), ("b", "other")] {
            ix.secret_applied(Key::new(ns, name), meta("1"));
        }
        ix.relist_begin(Watched::Secrets, Some("a".into()));
        ix.secret_applied(Key::new("a", "kept"), meta("1"));
        let gone = ix.relist_end(Watched::Secrets, &Some("a".into()));
        assert_eq!(gone, vec![Key::new("a", "gone")]);
        assert!(ix.secret(&Key::new("b", "other")).is_some(), "another scope is untouched");
        assert_eq!(ix.secrets(), 2);
    }
}
