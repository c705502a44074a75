//! The CA bundle a RegistryAccess names in spec.tls: read inline or from its ConfigMap or Secret,
//! and checked to hold at least one certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use crate::api::{CaBundleKind, RegistryAccess};
use crate::failure::{Error, Problem, reason, within};
use crate::keycloak::token;

/// Largest CA bundle read from a ConfigMap or Secret (a few hundred certificates).
pub const MAX_CA_BUNDLE: usize = 256 * 1024;

/// The extra CA bundle of `ra`: inline, or read from its ConfigMap or Secret. A missing object or
/// key, or a bundle without a certificate, is a problem for the status; an API error is an error.
pub async fn read_ca_bundle(
    ra: &RegistryAccess,
    client: &Client,
    namespace: &str,
    limit: std::time::Duration,
) -> Result<Result<Option<String>, Problem>, Error> {
    let Some(tls) = &ra.spec.tls else { return Ok(Ok(None)) };
    let problem = |message: String| Problem::fix(reason::INVALID_CA_BUNDLE, message);
    let pem = match (&tls.ca_bundle, &tls.ca_bundle_ref) {
        (Some(pem), _) => pem.clone(),
        (None, None) => return Ok(Ok(None)),
        (None, Some(r)) => {
            let kind = match r.kind {
                CaBundleKind::ConfigMap => "ConfigMap",
                CaBundleKind::Secret => "Secret",
            };
            let read_error =
                |source| Error::ReadCaBundle { kind, namespace: namespace.to_owned(), name: r.name.clone(), source };
            let value = match r.kind {
                CaBundleKind::ConfigMap => {
                    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
                    within(limit, api.get_opt(&r.name))
                        .await
                        .map_err(read_error)?
                        .map(|cm| cm.data.unwrap_or_default().get(&r.key).cloned())
                }
                CaBundleKind::Secret => {
                    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
                    within(limit, api.get_opt(&r.name)).await.map_err(read_error)?.map(|s| {
                        s.data.unwrap_or_default().get(&r.key).map(|v| String::from_utf8_lossy(&v.0).into_owned())
                    })
                }
            };
            match value {
                None => {
                    return Ok(Err(problem(format!(
                        "{kind} {namespace}/{} named in spec.tls.caBundleRef does not exist",
                        r.name
                    ))));
                }
                Some(None) => {
                    return Ok(Err(problem(format!(
                        "{kind} {namespace}/{} has no key {:?} (spec.tls.caBundleRef.key)",
                        r.name, r.key
                    ))));
                }
                Some(Some(pem)) => pem,
            }
        }
    };
    if pem.len() > MAX_CA_BUNDLE {
        return Ok(Err(problem(format!(
            "spec.tls: the CA bundle is {} bytes, more than the {MAX_CA_BUNDLE} the operator reads",
            pem.len()
        ))));
    }
    Ok(match token::parse_ca_bundle(&pem) {
        Ok(_) => Ok(Some(pem)),
        Err(e) => Err(problem(format!("spec.tls: {e}"))),
    })
}

/// CA bundles shared by the requests that carry them: a thousand queued requests of objects
/// that name the same bundle hold one copy of it.
#[derive(Default)]
pub struct Bundles {
    live: Mutex<HashMap<[u8; 32], Weak<str>>>,
}

impl Bundles {
    /// The shared copy of `pem`.
    pub fn share(&self, pem: String) -> Arc<str> {
        use sha2::Digest as _;
        let key: [u8; 32] = sha2::Sha256::digest(pem.as_bytes()).into();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = live.get(&key).and_then(Weak::upgrade) {
            return shared;
        }
        live.retain(|_, w| w.strong_count() > 0);
        let shared: Arc<str> = Arc::from(pem);
        live.insert(key, Arc::downgrade(&shared));
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_bundle_while_any_request_holds_it() {
        let bundles = Bundles::default();
        let a = bundles.share("PEM".repeat(1000));
        let b = bundles.share("PEM".repeat(1000));
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        let c = bundles.share("OTHER".into());
        assert_eq!(bundles.live.lock().unwrap().len(), 1, "the dropped bundle is forgotten");
        drop(c);
    }
}
