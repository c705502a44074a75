//! The token Secret: building it from a token (pure), and reading back what an existing one holds.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};

use crate::api::RegistryAccess;
use crate::keycloak::jwt;
use crate::keycloak::token::{IssuedToken, TokenFacts};

/// The operator's name: field manager of its writes and value of the managed-by label.
pub const MANAGER: &str = "registry-access-operator";
/// Label set on every token Secret.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Annotation with the token's expiry (RFC 3339), the operator's record of what the Secret holds.
pub const EXPIRES_AT_ANNOTATION: &str = "registry-access.io/expires-at";
/// Annotation with the time the token was issued (RFC 3339).
pub const ISSUED_AT_ANNOTATION: &str = "registry-access.io/issued-at";
/// Annotation with the scope Keycloak granted.
pub const SCOPE_ANNOTATION: &str = "registry-access.io/scope";
/// Annotation with a digest of the request inputs (server, realm, client, client Secret version):
/// when it changes, the token was issued for something else and is replaced.
pub const INPUTS_ANNOTATION: &str = "registry-access.io/inputs";
/// Annotation with a SHA-256 prefix of the token, to notice a token edited by someone else.
pub const TOKEN_DIGEST_ANNOTATION: &str = "registry-access.io/token-sha256";
/// Annotation on a former token Secret whose token the operator removed after the object's
/// spec.secret.name changed.
pub const RETIRED_ANNOTATION: &str = "registry-access.io/retired";
/// Prefix of the annotations the operator reserves for itself.
pub const RESERVED_PREFIX: &str = "registry-access.io/";

pub const KEY_ACCESS_TOKEN: &str = "access_token";
pub const KEY_TOKEN_TYPE: &str = "token_type";
pub const KEY_EXPIRES_AT: &str = "expires_at";
pub const KEY_AUTHORIZATION: &str = "authorization";
pub const KEY_REGISTRY_URL: &str = "registry_url";

/// The token type written to the Secret; Keycloak issues Bearer tokens.
const TOKEN_TYPE: &str = "Bearer";

/// What the Secret with the target name holds, as far as this RegistryAccess is concerned.
#[derive(Debug)]
pub enum Observed {
    /// No Secret of that name exists.
    Missing,
    /// A Secret of that name exists but is not controlled by this RegistryAccess.
    Foreign,
    /// Our Secret, but its token cannot be trusted (edited, cut, or our annotations are gone).
    Damaged,
    /// Our Secret with an intact token.
    Held(HeldToken),
}

/// What our Secret holds: the facts of its token (not the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldToken {
    pub token: TokenFacts,
    /// The inputs the token was issued for, as recorded when it was written.
    pub inputs: Option<String>,
}

/// Builds the token Secret for `ra` holding `token`, as sent with server-side apply.
pub fn build(ra: &RegistryAccess, token: &IssuedToken, inputs: &str) -> Secret {
    let template = ra.spec.secret.clone().unwrap_or_default();
    let mut labels = template.labels;
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned());
    let mut annotations: BTreeMap<String, String> =
        template.annotations.into_iter().filter(|(k, _)| !k.starts_with(RESERVED_PREFIX)).collect();
    let access_token = token.access_token.expose_secret();
    annotations.insert(EXPIRES_AT_ANNOTATION.to_owned(), rfc3339(token.expires_at));
    annotations.insert(ISSUED_AT_ANNOTATION.to_owned(), rfc3339(token.issued_at));
    annotations.insert(INPUTS_ANNOTATION.to_owned(), inputs.to_owned());
    annotations.insert(TOKEN_DIGEST_ANNOTATION.to_owned(), token_digest(access_token));
    if let Some(scope) = &token.scope {
        annotations.insert(SCOPE_ANNOTATION.to_owned(), scope.clone());
    }

    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
    put(KEY_ACCESS_TOKEN, access_token);
    put(KEY_TOKEN_TYPE, TOKEN_TYPE);
    put(KEY_EXPIRES_AT, &rfc3339(token.expires_at));
    put(KEY_AUTHORIZATION, &format!("{TOKEN_TYPE} {access_token}"));
    if let Some(url) = &ra.spec.registry_url {
        put(KEY_REGISTRY_URL, url);
    }

    Secret {
        metadata: ObjectMeta {
            name: Some(ra.token_secret_name()),
            namespace: ra.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: ra.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The uid of the RegistryAccess whose live token Secret `meta` describes: managed by the
/// operator, controlled by a RegistryAccess, not retired.
pub fn token_owner(meta: &ObjectMeta) -> Option<String> {
    let ours = meta.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL)).is_some_and(|v| v == MANAGER);
    let retired = meta.annotations.as_ref().is_some_and(|a| a.contains_key(RETIRED_ANNOTATION));
    if !ours || retired {
        return None;
    }
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| {
            o.controller == Some(true) && o.kind == "RegistryAccess" && o.api_version.starts_with(crate::api::GROUP)
        })
        .map(|o| o.uid.clone())
}

/// Reads what `live` (the Secret with the target name, if any) holds for `ra`.
pub fn observe(ra: &RegistryAccess, live: Option<&Secret>) -> Observed {
    let Some(live) = live else {
        return Observed::Missing;
    };
    let controlled =
        live.owner_references().iter().any(|o| o.controller == Some(true) && Some(&o.uid) == ra.metadata.uid.as_ref());
    if !controlled {
        return Observed::Foreign;
    }
    match read_token(live) {
        Some((token, inputs)) => Observed::Held(HeldToken { token: token.facts(), inputs }),
        None => Observed::Damaged,
    }
}

/// The token our Secret holds and the inputs it was issued for, if it is intact.
pub fn read_token(live: &Secret) -> Option<(IssuedToken, Option<String>)> {
    let annotations = live.metadata.annotations.as_ref()?;
    let data = live.data.as_ref()?;
    let access_token = std::str::from_utf8(&data.get(KEY_ACCESS_TOKEN)?.0).ok()?;
    if access_token.is_empty() || annotations.get(TOKEN_DIGEST_ANNOTATION)? != &token_digest(access_token) {
        return None;
    }
    let expires_at: Timestamp = annotations.get(EXPIRES_AT_ANNOTATION)?.parse().ok()?;
    let issued_at: Timestamp = annotations.get(ISSUED_AT_ANNOTATION)?.parse().ok()?;
    let claims = jwt::decode_claims(access_token).unwrap_or_default();
    Some((
        IssuedToken {
            access_token: SecretString::from(access_token.to_owned()),
            issued_at,
            expires_at,
            scope: annotations.get(SCOPE_ANNOTATION).map(|s| crate::text::foreign(s, crate::text::MAX_SCOPE_CHARS)),
            roles_claim: claims.roles_claim,
            realm_roles: claims.realm_roles,
        },
        annotations.get(INPUTS_ANNOTATION).cloned(),
    ))
}

/// True when `live` differs from `desired` in anything the operator sets, so it must be applied
/// again (for example after someone edited a key or a label, or the spec's registryUrl changed).
pub fn needs_apply(desired: &Secret, live: &Secret) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>, have: &Option<BTreeMap<String, String>>| {
        let empty = BTreeMap::new();
        let have = have.as_ref().unwrap_or(&empty);
        want.iter().flatten().all(|(k, v)| have.get(k) == Some(v))
    };
    desired.data != live.data
        || desired.type_ != live.type_
        || !subset(&desired.metadata.labels, &live.metadata.labels)
        || !subset(&desired.metadata.annotations, &live.metadata.annotations)
        || desired.metadata.owner_references.iter().flatten().any(|o| !live.owner_references().contains(o))
}

/// A hex SHA-256 prefix of the token: enough to notice an edit, useless to recover the token.
pub fn token_digest(token: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(token.as_bytes());
    hex::encode(&digest[..16])
}

/// RFC 3339 in UTC with second precision, as Kubernetes writes times.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{RegistryAccessSpec, SecretTemplate};
    use crate::keycloak::jwt::tests::jwt;

    pub(crate) fn ra() -> RegistryAccess {
        let spec: RegistryAccessSpec = serde_json::from_value(serde_json::json!({
            "server": "https://kc.example.com/auth", "realm": "r", "clientId": "c",
            "clientSecretRef": {"name": "creds"},
            "registryUrl": "https://registry.example.com/api/gateway",
        }))
        .unwrap();
        let mut ra = RegistryAccess::new("consent-02", spec);
        ra.metadata.namespace = Some("billing".into());
        ra.metadata.uid = Some("uid-1".into());
        ra
    }

    pub(crate) fn token(issued: i64, expires: i64) -> IssuedToken {
        let raw = jwt(&serde_json::json!({"exp": expires, "realm_access": {"roles": ["trembita-invoker"]}}));
        IssuedToken {
            access_token: SecretString::from(raw),
            issued_at: Timestamp::from_second(issued).unwrap(),
            expires_at: Timestamp::from_second(expires).unwrap(),
            scope: Some("profile email".into()),
            realm_roles: vec!["trembita-invoker".into()],
            roles_claim: true,
        }
    }

    pub(crate) fn facts(issued: i64, expires: i64) -> TokenFacts {
        token(issued, expires).facts()
    }

    fn value(s: &Secret, k: &str) -> String {
        String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap()
    }

    #[test]
    fn builds_the_documented_keys_and_metadata() {
        let t = token(1_700_000_000, 1_700_000_300);
        let s = build(&ra(), &t, "inputs-1");
        assert_eq!(s.metadata.name.as_deref(), Some("consent-02-token"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("billing"));
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
        assert!(s.string_data.is_none());
        let tok = t.access_token.expose_secret();
        assert_eq!(value(&s, "access_token"), tok);
        assert_eq!(value(&s, "token_type"), "Bearer");
        assert_eq!(value(&s, "authorization"), format!("Bearer {tok}"));
        assert_eq!(value(&s, "expires_at"), "2023-11-14T22:18:20Z");
        assert_eq!(value(&s, "registry_url"), "https://registry.example.com/api/gateway");
        assert_eq!(s.metadata.labels.as_ref().unwrap()[MANAGED_BY_LABEL], MANAGER);
        let ann = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[EXPIRES_AT_ANNOTATION], "2023-11-14T22:18:20Z");
        assert_eq!(ann[INPUTS_ANNOTATION], "inputs-1");
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("RegistryAccess", "uid-1", Some(true))
        );
    }

    #[test]
    fn no_registry_url_key_when_unset_and_user_metadata_is_merged() {
        let mut ra = ra();
        ra.spec.registry_url = None;
        ra.spec.secret = Some(SecretTemplate {
            name: None,
            labels: [("team".to_owned(), "billing".to_owned()), (MANAGED_BY_LABEL.to_owned(), "me".to_owned())].into(),
            annotations: [("note".to_owned(), "x".to_owned()), (EXPIRES_AT_ANNOTATION.to_owned(), "never".to_owned())]
                .into(),
        });
        let s = build(&ra, &token(0, 300), "i");
        assert!(!s.data.as_ref().unwrap().contains_key("registry_url"));
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!((labels["team"].as_str(), labels[MANAGED_BY_LABEL].as_str()), ("billing", MANAGER));
        let ann = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann["note"], "x");
        assert_eq!(ann[EXPIRES_AT_ANNOTATION], "1970-01-01T00:05:00Z");
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let ra = ra();
        let s = build(&ra, &token(1_700_000_000, 1_700_000_300), "inputs-1");
        let Observed::Held(held) = observe(&ra, Some(&s)) else { panic!("not held") };
        assert_eq!(held.token.expires_at.as_second(), 1_700_000_300);
        assert_eq!(held.token.issued_at.as_second(), 1_700_000_000);
        assert_eq!(held.token.realm_roles, vec!["trembita-invoker"]);
        assert_eq!(held.token.scope.as_deref(), Some("profile email"));
        assert_eq!(held.inputs.as_deref(), Some("inputs-1"));
        assert!(!needs_apply(&s, &s));
    }

    #[test]
    fn a_secret_owned_by_someone_else_is_foreign() {
        let ra = ra();
        let mut s = build(&ra, &token(0, 300), "i");
        assert!(matches!(observe(&ra, None), Observed::Missing));
        s.metadata.owner_references = None;
        assert!(matches!(observe(&ra, Some(&s)), Observed::Foreign));
        let mut other = ra.clone();
        other.metadata.uid = Some("uid-2".into());
        let s = build(&other, &token(0, 300), "i");
        assert!(matches!(observe(&ra, Some(&s)), Observed::Foreign));
    }

    #[test]
    fn an_edited_token_is_damaged_and_edited_keys_need_reapply() {
        let ra = ra();
        let desired = build(&ra, &token(0, 300), "i");
        let mut edited = desired.clone();
        edited.data.as_mut().unwrap().insert(KEY_ACCESS_TOKEN.into(), ByteString(b"forged".to_vec()));
        assert!(matches!(observe(&ra, Some(&edited)), Observed::Damaged));

        let mut edited = desired.clone();
        edited.data.as_mut().unwrap().insert(KEY_AUTHORIZATION.into(), ByteString(b"Bearer x".to_vec()));
        assert!(matches!(observe(&ra, Some(&edited)), Observed::Held(_)));
        assert!(needs_apply(&desired, &edited));

        let mut relabeled = desired.clone();
        relabeled.metadata.labels = None;
        assert!(needs_apply(&desired, &relabeled));

        let mut extra = desired.clone();
        extra.metadata.labels.as_mut().unwrap().insert("added-by-user".into(), "y".into());
        assert!(!needs_apply(&desired, &extra));

        let mut stripped = desired.clone();
        stripped.metadata.annotations.as_mut().unwrap().remove(EXPIRES_AT_ANNOTATION);
        assert!(matches!(observe(&ra, Some(&stripped)), Observed::Damaged));
    }

    #[test]
    fn digest_is_short_hex() {
        let d = token_digest("abc");
        assert_eq!(d.len(), 32);
        assert!(d.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
