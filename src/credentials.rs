//! Reading the client secret from its Secret, and the digest of everything a token request depends on.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use secrecy::SecretString;

use crate::api::{REFRESH_ANNOTATION, RegistryAccess};
use crate::failure::{Problem, reason};

/// The client secret and the digest of the request inputs it belongs to.
pub struct Credentials {
    pub client_secret: SecretString,
    /// Digest of server, realm, client, auth method, scopes and the client Secret's identity and
    /// version. It holds nothing secret: the client secret enters only through its Secret's
    /// resourceVersion.
    pub inputs: String,
}

/// Extracts the client secret of `ra` from `secret` (the referenced Secret, if it exists).
pub fn extract(ra: &RegistryAccess, secret: Option<&Secret>) -> Result<Credentials, Problem> {
    let r = &ra.spec.client_secret_ref;
    let ns = ra.namespace().unwrap_or_default();
    let Some(secret) = secret else {
        return Err(not_found(ra));
    };
    let missing = |what: &str| {
        Problem::fix(
            reason::CLIENT_SECRET_KEY_MISSING,
            format!("Secret {ns}/{} {what}; set spec.clientSecretRef.key or add the key", r.name),
        )
    };
    let raw =
        secret.data.as_ref().and_then(|d| d.get(&r.key)).ok_or_else(|| missing(&format!("has no key {:?}", r.key)))?;
    let value = std::str::from_utf8(&raw.0).map_err(|_| missing(&format!("key {:?} is not UTF-8 text", r.key)))?;
    // A secret written from a file often ends in a newline that is not part of the password.
    let value = value.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(missing(&format!("key {:?} is empty", r.key)));
    }
    let inputs = inputs_digest(
        ra,
        secret.metadata.uid.as_deref().unwrap_or_default(),
        secret.metadata.resource_version.as_deref().unwrap_or_default(),
    );
    Ok(Credentials { client_secret: SecretString::from(value.to_owned()), inputs })
}

/// The problem of a client Secret that does not exist.
pub fn not_found(ra: &RegistryAccess) -> Problem {
    Problem::fix(
        reason::CLIENT_SECRET_NOT_FOUND,
        format!(
            "Secret {}/{} named in spec.clientSecretRef does not exist",
            ra.namespace().unwrap_or_default(),
            ra.spec.client_secret_ref.name
        ),
    )
}

/// Digest of what the token was requested with (no secret material): the spec's request fields
/// and the client Secret's `uid` and `resourceVersion`, which the metadata watch gives without
/// reading the Secret.
pub fn inputs_digest(ra: &RegistryAccess, secret_uid: &str, secret_version: &str) -> String {
    use sha2::Digest as _;
    let s = &ra.spec;
    let mut h = sha2::Sha256::new();
    for part in [
        s.server.as_str(),
        s.realm.as_str(),
        s.client_id.as_str(),
        s.client_auth_method.as_str(),
        &s.scopes.join(" "),
        &s.client_secret_ref.name,
        &s.client_secret_ref.key,
        secret_uid,
        secret_version,
        // A new value of the refresh annotation is a request for a new token.
        ra.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REFRESH_ANNOTATION))
            .map(String::as_str)
            .unwrap_or_default(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::tests::ra;
    use k8s_openapi::ByteString;
    use secrecy::ExposeSecret;

    fn client_secret(key: &str, value: &[u8], rv: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some("creds".into());
        s.metadata.uid = Some("cs-uid".into());
        s.metadata.resource_version = Some(rv.into());
        s.data = Some([(key.to_owned(), ByteString(value.to_vec()))].into());
        s
    }

    #[test]
    fn reads_the_default_key_and_trims_a_trailing_newline() {
        let c = extract(&ra(), Some(&client_secret("client_secret", b"s3cret\n", "1"))).unwrap();
        assert_eq!(c.client_secret.expose_secret(), "s3cret");
    }

    #[test]
    fn missing_secret_and_key_have_their_reasons() {
        let e = extract(&ra(), None).err().unwrap();
        assert_eq!(e.reason, reason::CLIENT_SECRET_NOT_FOUND);
        assert!(e.message.contains("billing/creds"), "{}", e.message);
        let e = extract(&ra(), Some(&client_secret("password", b"x", "1"))).err().unwrap();
        assert_eq!(e.reason, reason::CLIENT_SECRET_KEY_MISSING);
        assert!(e.message.contains("\"client_secret\""));
        let e = extract(&ra(), Some(&client_secret("client_secret", b"\n", "1"))).err().unwrap();
        assert!(e.message.contains("empty"));
        let e = extract(&ra(), Some(&client_secret("client_secret", &[0xff], "1"))).err().unwrap();
        assert!(e.message.contains("UTF-8"));
    }

    #[test]
    fn inputs_change_with_the_secret_version_and_the_spec() {
        let a = extract(&ra(), Some(&client_secret("client_secret", b"x", "1"))).unwrap().inputs;
        let b = extract(&ra(), Some(&client_secret("client_secret", b"x", "2"))).unwrap().inputs;
        assert_ne!(a, b);
        let mut other = ra();
        other.spec.scopes = vec!["email".into()];
        let c = extract(&other, Some(&client_secret("client_secret", b"x", "1"))).unwrap().inputs;
        assert_ne!(a, c);
        let mut same = ra();
        same.spec.registry_url = None;
        let d = extract(&same, Some(&client_secret("client_secret", b"x", "1"))).unwrap().inputs;
        assert_eq!(a, d, "registryUrl does not need a new token");
    }

    #[test]
    fn a_new_refresh_request_changes_the_inputs_once() {
        let secret = client_secret("client_secret", b"x", "1");
        let plain = extract(&ra(), Some(&secret)).unwrap().inputs;
        let mut asked = ra();
        asked.metadata.annotations = Some([(REFRESH_ANNOTATION.to_owned(), "2026-01-01T00:00:00Z".to_owned())].into());
        let first = extract(&asked, Some(&secret)).unwrap().inputs;
        assert_ne!(plain, first);
        assert_eq!(first, extract(&asked, Some(&secret)).unwrap().inputs, "the same value asks only once");
        asked.metadata.annotations = Some([(REFRESH_ANNOTATION.to_owned(), "again".to_owned())].into());
        assert_ne!(first, extract(&asked, Some(&secret)).unwrap().inputs);
    }

    #[test]
    fn inputs_do_not_depend_on_the_secret_value() {
        let a = extract(&ra(), Some(&client_secret("client_secret", b"one", "1"))).unwrap();
        let b = extract(&ra(), Some(&client_secret("client_secret", b"two", "1"))).unwrap();
        assert_eq!(a.inputs, b.inputs);
    }
}
