//! The client Secret: whether it may be sent (opt-in label, allowed servers), its keyed
//! fingerprint, the client secret itself, and the digest of everything a token request depends on.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use secrecy::SecretString;

use crate::api::{
    ALLOWED_SERVERS_ANNOTATION, CLIENT_SECRET_LABEL, ClientAuthMethod, CredentialSource, REFRESH_ANNOTATION,
    RegistryAccess,
};
use crate::failure::{Problem, reason};
use crate::keycloak::digest_key::DigestKey;
use crate::policy;

/// The client secret and the digest of the request inputs it belongs to.
pub struct Credentials {
    pub client_secret: SecretString,
    /// Digest of server, realm, client, auth method, scopes and the keyed fingerprint of the
    /// client secret's value: it changes when the value does, and reveals nothing of it.
    pub inputs: String,
}

/// Longest `registry-access.io/allowed-servers` annotation read, in bytes; a longer one allows
/// nothing (the Secret is not sent, and the status says why).
pub const MAX_ALLOWED_SERVERS_ANNOTATION: usize = 8 * 1024;
/// Most servers kept from that annotation.
pub const MAX_ALLOWED_SERVERS: usize = 32;

/// What the operator keeps of a client Secret it read: whether it may be sent, and a keyed
/// fingerprint of the one value an object uses (never a value). Nothing of a Secret that did not
/// opt in is looked at beyond its label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// The version this was taken from.
    pub resource_version: String,
    /// The Secret carries the opt-in label.
    pub opted_in: bool,
    /// The servers its annotation allows, if it names any (an annotation over the size bound
    /// allows none).
    pub allowed_servers: Option<Vec<String>>,
    /// The data key this was taken for.
    pub key: String,
    /// The keyed fingerprint of that key's value, or why the value is unusable; `None` when the
    /// key is absent or the Secret did not opt in.
    pub value: Option<Result<String, &'static str>>,
}

impl Fingerprint {
    /// Takes the fingerprint of `secret`'s value under `data_key` with `digest`, only when the
    /// Secret opted in.
    pub fn of(secret: &Secret, digest: &DigestKey, data_key: &str) -> Self {
        let labels = secret.metadata.labels.as_ref();
        let annotations = secret.metadata.annotations.as_ref();
        let opted_in = labels.and_then(|l| l.get(CLIENT_SECRET_LABEL)).is_some_and(|v| v == "true");
        let allowed_servers =
            annotations.and_then(|a| a.get(ALLOWED_SERVERS_ANNOTATION)).filter(|_| opted_in).map(|v| {
                if v.len() > MAX_ALLOWED_SERVERS_ANNOTATION {
                    return Vec::new();
                }
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .take(MAX_ALLOWED_SERVERS)
                    .map(str::to_owned)
                    .collect()
            });
        let value = secret
            .data
            .as_ref()
            .filter(|_| opted_in)
            .and_then(|d| d.get(data_key))
            .map(|v| value_of(&v.0).map(|value| digest.fingerprint(value.as_bytes())));
        Self {
            resource_version: secret.metadata.resource_version.clone().unwrap_or_default(),
            opted_in,
            allowed_servers,
            key: data_key.to_owned(),
            value,
        }
    }

    /// The fingerprint of the value `ra` would send, or why this Secret may not or cannot be
    /// used for it. Opt-in and allowed servers are checked before anything about the keys is
    /// said, so a Secret that did not opt in reveals nothing.
    pub fn check(&self, ra: &RegistryAccess) -> Result<&str, Problem> {
        let ns = ra.namespace().unwrap_or_default();
        let (name, key) = match ra.spec.credential_source() {
            CredentialSource::Secret { name, key } => (name, key),
            _ => return Err(no_source(ra)),
        };
        let field = ref_field(ra);
        if !self.opted_in {
            return Err(Problem::fix(
                reason::CLIENT_SECRET_NOT_OPTED_IN,
                format!(
                    "Secret {ns}/{name} is not marked for use as a client secret, so it is not sent to Keycloak: \
                     someone who may edit Secrets in namespace {ns} can allow it with \
                     `kubectl label secret {name} {CLIENT_SECRET_LABEL}=true -n {ns}`; no request was sent"
                ),
            ));
        }
        if let Some(allowed) = &self.allowed_servers
            && !policy::server_allowed_nonempty(&ra.spec.server, allowed)
        {
            return Err(Problem::fix(
                reason::SERVER_NOT_ALLOWED,
                format!(
                    "Secret {ns}/{name} may only be used for {} (its annotation {ALLOWED_SERVERS_ANNOTATION}, \
                     read up to {MAX_ALLOWED_SERVERS_ANNOTATION} bytes), not for spec.server {}; no request was sent",
                    crate::text::foreign(&allowed.join(", "), crate::text::MAX_QUOTED_CHARS),
                    ra.spec.server
                ),
            ));
        }
        let why = if ra.spec.client_auth_method == ClientAuthMethod::PrivateKeyJwt {
            reason::PRIVATE_KEY_INVALID
        } else {
            reason::CLIENT_SECRET_KEY_MISSING
        };
        let missing =
            |what: String| Problem::fix(why, format!("Secret {ns}/{name} {what}; set {field}.key or add the key"));
        match self.value.as_ref().filter(|_| self.key == key) {
            None => Err(missing(format!("has no key {key:?}"))),
            Some(Err(why)) => Err(missing(format!("key {key:?} {why}"))),
            Some(Ok(fp)) => Ok(fp),
        }
    }

    /// The digest of the inputs of a request for `ra` with this Secret, when it may be sent.
    pub fn inputs(&self, ra: &RegistryAccess) -> Option<String> {
        self.check(ra).ok().map(|fp| inputs_digest(ra, fp))
    }
}

/// The client secret in a Secret's value: UTF-8 text without the trailing newline a file often
/// ends in, not empty.
fn value_of(raw: &[u8]) -> Result<&str, &'static str> {
    let value = std::str::from_utf8(raw).map_err(|_| "is not UTF-8 text")?;
    let value = value.trim_end_matches(['\n', '\r']);
    if value.is_empty() { Err("is empty") } else { Ok(value) }
}

/// The spec field that names the credential Secret of `ra`'s method.
pub fn ref_field(ra: &RegistryAccess) -> &'static str {
    match ra.spec.client_auth_method {
        ClientAuthMethod::PrivateKeyJwt => "spec.privateKeyRef",
        ClientAuthMethod::ServiceAccount => "spec.serviceAccountRef",
        _ => "spec.clientSecretRef",
    }
}

/// The problem of a spec that names no credential for its method (the API server's validation
/// normally refuses it first).
pub fn no_source(ra: &RegistryAccess) -> Problem {
    Problem::fix(
        reason::INVALID_SPEC,
        format!("clientAuthMethod {} needs {}", ra.spec.client_auth_method.as_str(), ref_field(ra)),
    )
}

/// Extracts the credential of `ra` (client secret or private key PEM) from `secret` (the
/// referenced Secret, if it exists), if it may be used; with the fingerprint taken of it.
pub fn extract(
    ra: &RegistryAccess,
    secret: Option<&Secret>,
    key: &DigestKey,
) -> Result<(Credentials, Fingerprint), Problem> {
    let Some(secret) = secret else {
        return Err(not_found(ra));
    };
    let CredentialSource::Secret { key: data_key, .. } = ra.spec.credential_source() else {
        return Err(no_source(ra));
    };
    let fingerprint = Fingerprint::of(secret, key, data_key);
    let inputs = inputs_digest(ra, fingerprint.check(ra)?);
    let raw = secret.data.as_ref().and_then(|d| d.get(data_key)).map(|v| v.0.as_slice());
    let value = raw.and_then(|raw| value_of(raw).ok()).unwrap_or_default();
    Ok((Credentials { client_secret: SecretString::from(value.to_owned()), inputs }, fingerprint))
}

/// The problem of a credential Secret that does not exist.
pub fn not_found(ra: &RegistryAccess) -> Problem {
    let CredentialSource::Secret { name, .. } = ra.spec.credential_source() else { return no_source(ra) };
    let why = if ra.spec.client_auth_method == ClientAuthMethod::PrivateKeyJwt {
        reason::PRIVATE_KEY_INVALID
    } else {
        reason::CLIENT_SECRET_NOT_FOUND
    };
    Problem::fix(
        why,
        format!("Secret {}/{name} named in {} does not exist", ra.namespace().unwrap_or_default(), ref_field(ra)),
    )
}

/// Digest of what the token is requested with: the spec's request fields, where the credential
/// comes from, `credential` (the keyed fingerprint of a secret's value, or a ServiceAccount's
/// identity), and the refresh annotation. A new label, annotation or version of the credential
/// Secret with the same value is the same input.
pub fn inputs_digest(ra: &RegistryAccess, credential: &str) -> String {
    use sha2::Digest as _;
    let s = &ra.spec;
    let source = match s.credential_source() {
        CredentialSource::Secret { name, key } => format!("secret/{name}/{key}"),
        CredentialSource::ServiceAccount { name } => {
            format!(
                "serviceaccount/{name}/{}",
                s.service_account_ref.as_ref().and_then(|r| r.audience.as_deref()).unwrap_or_default()
            )
        }
        CredentialSource::Missing => String::new(),
    };
    let kid = s.private_key_ref.as_ref().and_then(|r| r.key_id.as_deref()).unwrap_or_default();
    let mut h = sha2::Sha256::new();
    for part in [
        s.server.as_str(),
        s.realm.as_str(),
        s.client_id.as_str(),
        s.client_auth_method.as_str(),
        &s.scopes.join(" "),
        &source,
        kid,
        credential,
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
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::tests::ra;
    use k8s_openapi::ByteString;
    use secrecy::ExposeSecret;

    fn key() -> DigestKey {
        DigestKey::from_bytes([7; 32])
    }

    fn client_secret(key: &str, value: &[u8], rv: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some("creds".into());
        s.metadata.uid = Some("cs-uid".into());
        s.metadata.resource_version = Some(rv.into());
        s.metadata.labels = Some([(CLIENT_SECRET_LABEL.to_owned(), "true".to_owned())].into());
        s.data = Some([(key.to_owned(), ByteString(value.to_vec()))].into());
        s
    }

    fn inputs(ra: &RegistryAccess, s: &Secret) -> String {
        extract(ra, Some(s), &key()).map_err(|p| p.message).unwrap().0.inputs
    }

    #[test]
    fn reads_the_default_key_and_trims_a_trailing_newline() {
        let (c, fp) = extract(&ra(), Some(&client_secret("client_secret", b"s3cret\n", "1")), &key()).unwrap();
        assert_eq!(c.client_secret.expose_secret(), "s3cret");
        assert_eq!(fp.inputs(&ra()), Some(c.inputs));
    }

    #[test]
    fn missing_secret_and_key_have_their_reasons() {
        let problem = |s: Option<&Secret>| extract(&ra(), s, &key()).err().unwrap();
        let e = problem(None);
        assert_eq!(e.reason, reason::CLIENT_SECRET_NOT_FOUND);
        assert!(e.message.contains("billing/creds"), "{}", e.message);
        let e = problem(Some(&client_secret("password", b"x", "1")));
        assert_eq!(e.reason, reason::CLIENT_SECRET_KEY_MISSING);
        assert!(e.message.contains("\"client_secret\""));
        assert!(problem(Some(&client_secret("client_secret", b"\n", "1"))).message.contains("empty"));
        assert!(problem(Some(&client_secret("client_secret", &[0xff], "1"))).message.contains("UTF-8"));
    }

    #[test]
    fn a_secret_without_the_opt_in_label_is_never_sent_and_reveals_nothing() {
        let mut s = client_secret("password", b"db-password", "1");
        s.metadata.labels = None;
        let e = extract(&ra(), Some(&s), &key()).err().unwrap();
        assert_eq!(e.reason, reason::CLIENT_SECRET_NOT_OPTED_IN);
        assert!(e.message.contains("kubectl label secret creds registry-access.io/client-secret=true -n billing"));
        assert!(!e.message.contains("password"), "nothing about its keys: {}", e.message);
        s.metadata.labels = Some([(CLIENT_SECRET_LABEL.to_owned(), "false".to_owned())].into());
        let fp = Fingerprint::of(&s, &key(), "client_secret");
        assert_eq!(fp.check(&ra()).unwrap_err().reason, reason::CLIENT_SECRET_NOT_OPTED_IN);
        assert_eq!(fp.inputs(&ra()), None);
        assert_eq!(fp.value, None, "nothing of a Secret that did not opt in is fingerprinted");
    }

    #[test]
    fn a_secret_may_restrict_the_servers_it_is_sent_to() {
        let mut s = client_secret("client_secret", b"x", "1");
        s.metadata.annotations = Some(
            [(
                ALLOWED_SERVERS_ANNOTATION.to_owned(),
                "https://other.example.com, https://kc.example.com/auth".to_owned(),
            )]
            .into(),
        );
        assert!(extract(&ra(), Some(&s), &key()).is_ok());
        s.metadata.annotations =
            Some([(ALLOWED_SERVERS_ANNOTATION.to_owned(), "https://other.example.com".to_owned())].into());
        let e = extract(&ra(), Some(&s), &key()).err().unwrap();
        assert_eq!(e.reason, reason::SERVER_NOT_ALLOWED);
        assert!(e.message.contains("https://other.example.com"), "{}", e.message);
    }

    #[test]
    fn inputs_follow_the_value_and_the_spec_not_the_secret_version() {
        let a = inputs(&ra(), &client_secret("client_secret", b"x", "1"));
        let mut relabelled = client_secret("client_secret", b"x\n", "2");
        relabelled.metadata.labels.as_mut().unwrap().insert("team".into(), "billing".into());
        relabelled.metadata.uid = Some("recreated".into());
        assert_eq!(a, inputs(&ra(), &relabelled), "a label, a new version or a recreated Secret is no new input");
        assert_ne!(a, inputs(&ra(), &client_secret("client_secret", b"rotated", "3")));
        let mut other = ra();
        other.spec.scopes = vec!["email".into()];
        assert_ne!(a, inputs(&other, &client_secret("client_secret", b"x", "1")));
        let mut same = ra();
        same.spec.registry_url = None;
        assert_eq!(
            a,
            inputs(&same, &client_secret("client_secret", b"x", "1")),
            "registryUrl does not need a new token"
        );
    }

    #[test]
    fn the_digest_is_keyed() {
        let s = client_secret("client_secret", b"x", "1");
        let other_key = DigestKey::from_bytes([8; 32]);
        let a = extract(&ra(), Some(&s), &key()).unwrap().0.inputs;
        let b = extract(&ra(), Some(&s), &other_key).unwrap().0.inputs;
        assert_ne!(a, b, "without the key, the digest cannot be recomputed from a guessed value");
    }

    #[test]
    fn a_new_refresh_request_changes_the_inputs_once() {
        let secret = client_secret("client_secret", b"x", "1");
        let plain = inputs(&ra(), &secret);
        let mut asked = ra();
        asked.metadata.annotations = Some([(REFRESH_ANNOTATION.to_owned(), "2026-01-01T00:00:00Z".to_owned())].into());
        let first = inputs(&asked, &secret);
        assert_ne!(plain, first);
        assert_eq!(first, inputs(&asked, &secret), "the same value asks only once");
        asked.metadata.annotations = Some([(REFRESH_ANNOTATION.to_owned(), "again".to_owned())].into());
        assert_ne!(first, inputs(&asked, &secret));
    }
}
