//! The operator's digest key: a random HMAC key kept in a Secret of the operator's namespace, so
//! that the fingerprints of client secrets recorded on token Secrets cannot be recomputed from a
//! guessed value by anyone who can read a token Secret, and stay the same across restarts.

use std::time::Duration;

use hmac::Mac as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::failure::{api_summary, within};

/// The key's entry in its Secret.
const KEY_ENTRY: &str = "key";
/// Length of a generated key.
const KEY_LEN: usize = 32;

/// An HMAC-SHA256 key.
#[derive(Clone)]
pub struct DigestKey([u8; KEY_LEN]);

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey(..)")
    }
}

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the digest key Secret {namespace}/{name}: {message}")]
    Read { namespace: String, name: String, message: String },
    #[error("creating the digest key Secret {namespace}/{name}: {message}")]
    Create { namespace: String, name: String, message: String },
    #[error("the digest key Secret {namespace}/{name} has no {KEY_ENTRY:?} entry of at least {KEY_LEN} bytes")]
    Invalid { namespace: String, name: String },
}

impl DigestKey {
    /// A fixed key, for tests.
    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A hex prefix of HMAC-SHA256(key, value): equal values give equal fingerprints, and
    /// without the key a fingerprint says nothing about the value.
    pub fn fingerprint(&self, value: &[u8]) -> String {
        let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC takes keys of any length")
        };
        mac.update(value);
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// Reads the key from `namespace/name`, creating the Secret with a new random key when it
    /// does not exist (another replica creating it at the same time is fine: its key is read).
    pub async fn load_or_create(
        client: &Client,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Self, KeyError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let read = |message: String| KeyError::Read { namespace: namespace.to_owned(), name: name.to_owned(), message };
        if let Some(s) = within(timeout, api.get_opt(name)).await.map_err(|e| read(api_summary(&e)))? {
            return Self::from_secret(&s, namespace, name);
        }
        let mut bytes = [0u8; KEY_LEN];
        rand::fill(&mut bytes);
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.to_owned());
        secret.metadata.labels =
            Some([(crate::secret::MANAGED_BY_LABEL.to_owned(), crate::secret::MANAGER.to_owned())].into());
        secret.data = Some([(KEY_ENTRY.to_owned(), ByteString(bytes.to_vec()))].into());
        match within(timeout, api.create(&PostParams::default(), &secret)).await {
            Ok(_) => {
                tracing::info!(namespace, name, "created the digest key Secret");
                Ok(Self(bytes))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let s = within(timeout, api.get(name)).await.map_err(|e| read(api_summary(&e)))?;
                Self::from_secret(&s, namespace, name)
            }
            Err(e) => Err(KeyError::Create {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                message: api_summary(&e),
            }),
        }
    }

    fn from_secret(s: &Secret, namespace: &str, name: &str) -> Result<Self, KeyError> {
        let invalid = || KeyError::Invalid { namespace: namespace.to_owned(), name: name.to_owned() };
        let raw = s.data.as_ref().and_then(|d| d.get(KEY_ENTRY)).ok_or_else(invalid)?;
        if raw.0.len() < KEY_LEN {
            return Err(invalid());
        }
        // A longer key is folded to its SHA-256, as HMAC itself does.
        let bytes: [u8; KEY_LEN] = if raw.0.len() == KEY_LEN {
            raw.0.as_slice().try_into().map_err(|_| invalid())?
        } else {
            use sha2::Digest as _;
            sha2::Sha256::digest(&raw.0).into()
        };
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_keyed_and_short() {
        let (a, b) = (DigestKey::from_bytes([1; 32]), DigestKey::from_bytes([2; 32]));
        assert_eq!(a.fingerprint(b"v"), a.fingerprint(b"v"));
        assert_ne!(a.fingerprint(b"v"), a.fingerprint(b"w"));
        assert_ne!(a.fingerprint(b"v"), b.fingerprint(b"v"));
        assert_eq!(a.fingerprint(b"v").len(), 32);
        assert_eq!(format!("{a:?}"), "DigestKey(..)");
    }

    #[test]
    fn a_stored_key_must_be_long_enough() {
        let mut s = Secret::default();
        assert!(DigestKey::from_secret(&s, "ns", "k").is_err());
        s.data = Some([(KEY_ENTRY.to_owned(), ByteString(vec![1; 16]))].into());
        assert!(DigestKey::from_secret(&s, "ns", "k").is_err());
        s.data = Some([(KEY_ENTRY.to_owned(), ByteString(vec![1; 32]))].into());
        let k = DigestKey::from_secret(&s, "ns", "k").unwrap();
        assert_eq!(k.fingerprint(b"v"), DigestKey::from_bytes([1; 32]).fingerprint(b"v"));
    }
}
