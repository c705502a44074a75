//! Stage 1 of a reconcile, reads only: the token Secret (from memory while the watch shows it
//! unchanged since the operator wrote or checked it), the client Secret's fingerprint (from memory
//! while the watch shows it unchanged), and, only for a request about to be queued, the client
//! secret itself and the CA bundle.
//!
//! Nothing here writes, to the API or to memory: what a read learned that the watch had not shown
//! comes back as [`Learned`] for the apply stage to keep, and a ServiceAccount token to present is
//! only named ([`Presented::Mint`]); the apply stage mints it.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{Api, ResourceExt};
use reqwest::Url;
use secrecy::ExposeSecret;

use super::Context;
use crate::api::RegistryAccess;
use crate::api::{ClientAuthMethod, CredentialSource, KEYCLOAK_ISSUERS_ANNOTATION};
use crate::failure::{Error, Problem, reason, within};
use crate::keycloak::assertion::{Credential, SigningKey};
use crate::keycloak::credentials::{self, Fingerprint};
use crate::keycloak::token;
use crate::keycloak::trust;
use crate::policy::{self, Policy};
use crate::requests::issuer::Consent;
use crate::secret::{self, Observed};
use crate::watch::index::Key;
use crate::watch::index::{MAX_ISSUERS_ANNOTATION, SecretMeta, ServiceAccountMeta};

/// What a read learned from the API that the watch had not shown (yet): the apply stage keeps it
/// in the index, so that later reconciles and the check at sending know it.
#[derive(Debug, Default)]
pub struct Learned {
    /// A credential Secret read, and what the watch would say of it.
    pub secret: Option<(Key, SecretMeta)>,
    /// The fingerprint taken of a client Secret just read.
    pub fingerprint: Option<(Key, Arc<Fingerprint>)>,
    /// A ServiceAccount read because the watch had not shown it.
    pub service_account: Option<(Key, ServiceAccountMeta)>,
}

/// What the token Secret holds.
pub struct TokenSecret {
    pub observed: Observed,
    /// The Secret as read, when it had to be read (changed since the operator last saw it).
    pub live: Option<Secret>,
}

/// Reads the token Secret, or says what it holds from memory when the watch shows the version
/// the operator last wrote or checked and the spec did not change since.
pub async fn token_secret(ra: &RegistryAccess, ctx: &Context) -> Result<TokenSecret, Error> {
    let (namespace, name) = (ra.namespace().unwrap_or_default(), ra.token_secret_name());
    let uid = ra.uid().unwrap_or_default();
    if let Some(known) = ctx.states.known(&uid)
        && known.generation == ra.metadata.generation
        && ctx.index.secrets_synced(&namespace)
        && ctx
            .index
            .secret(&Key::new(&namespace, &name))
            .is_some_and(|meta| meta.resource_version == known.resource_version)
    {
        return Ok(TokenSecret { observed: Observed::Held(known.held), live: None });
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = within(ctx.api_timeout, api.get_opt(&name)).await.map_err(|source| Error::ReadTokenSecret {
        namespace,
        name,
        source,
    })?;
    let observed = secret::observe(ra, live.as_ref());
    Ok(TokenSecret { observed, live })
}

/// The object's credential as far as the decision needs it.
pub enum ClientSecret {
    /// The credential Secret exists: its fingerprint, and the Secret itself when it had to be read.
    Found {
        fingerprint: Arc<Fingerprint>,
        read: Option<Box<Secret>>,
    },
    /// The ServiceAccount exists, as the watch (or a read) shows it.
    ServiceAccount(ServiceAccountMeta),
    Missing,
}

impl ClientSecret {
    /// The digest of the request inputs, when the credential exists and may be used.
    pub fn inputs(&self, ra: &RegistryAccess) -> Option<String> {
        match self {
            Self::Found { fingerprint, .. } => fingerprint.inputs(ra),
            Self::ServiceAccount(meta) => service_account_check(ra, meta).ok().map(|()| sa_inputs(ra, meta)),
            Self::Missing => None,
        }
    }

    /// Why the next request would fail because of the credential, if it would.
    pub fn problem(&self, ra: &RegistryAccess) -> Option<Problem> {
        match self {
            Self::Found { fingerprint, .. } => fingerprint.check(ra).err(),
            Self::ServiceAccount(meta) => service_account_check(ra, meta).err(),
            Self::Missing => Some(match ra.spec.credential_source() {
                CredentialSource::ServiceAccount { name } => Problem::fix(
                    reason::SERVICE_ACCOUNT_NOT_FOUND,
                    format!(
                        "ServiceAccount {}/{name} named in spec.serviceAccountRef does not exist",
                        ra.namespace().unwrap_or_default()
                    ),
                ),
                _ => credentials::not_found(ra),
            }),
        }
    }
}

fn sa_inputs(ra: &RegistryAccess, meta: &ServiceAccountMeta) -> String {
    credentials::inputs_digest(ra, &format!("uid:{}", meta.uid))
}

/// The audience of the ServiceAccount tokens presented for `ra`: `spec.serviceAccountRef.audience`,
/// else the realm's issuer.
pub fn audience(ra: &RegistryAccess) -> Result<String, Problem> {
    if let Some(aud) = ra.spec.service_account_ref.as_ref().and_then(|r| r.audience.clone()) {
        return Ok(aud);
    }
    token::token_url(&ra.spec.server, &ra.spec.realm)
        .map(|url| token::realm_issuer(&url))
        .map_err(|message| Problem::fix(reason::INVALID_SPEC, message))
}

/// Whether the ServiceAccount opted in to have its tokens presented to `ra`'s Keycloak: both the
/// audience and the issuer of the server the token is sent to must be among its annotation's
/// issuers (an audience override cannot send a token for one Keycloak to another server).
fn service_account_check(ra: &RegistryAccess, meta: &ServiceAccountMeta) -> Result<(), Problem> {
    let audience = audience(ra)?;
    let destination = token::token_url(&ra.spec.server, &ra.spec.realm)
        .map(|url| token::realm_issuer(&url))
        .map_err(|message| Problem::fix(reason::INVALID_SPEC, message))?;
    let ns = ra.namespace().unwrap_or_default();
    let name = ra.spec.service_account_ref.as_ref().map(|r| r.name.as_str()).unwrap_or_default();
    let allowed = meta.issuers.as_deref().unwrap_or_default();
    let uncovered = [&audience, &destination].into_iter().find(|u| !policy::server_allowed_nonempty(u, allowed));
    let Some(audience) = uncovered else { return Ok(()) };
    let what = match &meta.issuers {
        None if meta.annotation_too_long => {
            format!("has an annotation longer than {MAX_ISSUERS_ANNOTATION} bytes (not read)")
        }
        None => "has no annotation".to_owned(),
        Some(list) => format!(
            "lists only {} in its annotation",
            crate::text::foreign(&list.join(", "), crate::text::MAX_QUOTED_CHARS)
        ),
    };
    Err(Problem::fix(
        reason::SERVICE_ACCOUNT_NOT_OPTED_IN,
        format!(
            "ServiceAccount {ns}/{name} {what} {KEYCLOAK_ISSUERS_ANNOTATION}, so no token of it is made for {audience}: \
             someone who may edit ServiceAccounts in namespace {ns} can allow it with \
             `kubectl annotate serviceaccount {name} -n {ns} {KEYCLOAK_ISSUERS_ANNOTATION}={audience}`"
        ),
    ))
}

/// The credential's state: a Secret's fingerprint from memory while the watch shows the version
/// it was taken of (otherwise the Secret is read and a new fingerprint taken), or the
/// ServiceAccount as the watch shows it (read when the watch has not seen it).
pub async fn client_secret(ra: &RegistryAccess, ctx: &Context) -> Result<(ClientSecret, Learned), Error> {
    let namespace = ra.namespace().unwrap_or_default();
    match ra.spec.credential_source() {
        CredentialSource::Missing => Ok((ClientSecret::Missing, Learned::default())),
        CredentialSource::ServiceAccount { name } => {
            let key = Key::new(&namespace, name);
            if ctx.index.service_accounts_synced(&namespace)
                && let Some(meta) = ctx.index.service_account(&key)
            {
                return Ok((ClientSecret::ServiceAccount(meta), Learned::default()));
            }
            let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
            let read = within(ctx.api_timeout, api.get_metadata_opt(name)).await.map_err(|source| {
                Error::ReadServiceAccount { namespace: namespace.clone(), name: name.to_owned(), source }
            })?;
            Ok(match read {
                Some(sa) => {
                    let meta = ServiceAccountMeta::of(&sa.metadata);
                    let learned = Learned { service_account: Some((key, meta.clone())), ..Learned::default() };
                    (ClientSecret::ServiceAccount(meta), learned)
                }
                None => (ClientSecret::Missing, Learned::default()),
            })
        }
        CredentialSource::Secret { name, key: data_key } => {
            let key = Key::new(&namespace, name);
            if ctx.index.secrets_synced(&namespace)
                && let Some(fingerprint) = ctx.index.fingerprint(&key).filter(|f| f.key == data_key)
            {
                return Ok((ClientSecret::Found { fingerprint, read: None }, Learned::default()));
            }
            Ok(match read_secret(ctx, &namespace, name).await? {
                Some(s) => {
                    let fingerprint = Arc::new(Fingerprint::of(&s, &ctx.digest_key, data_key));
                    let learned = Learned {
                        secret: Some((key.clone(), SecretMeta::of(&s.metadata))),
                        fingerprint: Some((key, fingerprint.clone())),
                        ..Learned::default()
                    };
                    (ClientSecret::Found { fingerprint, read: Some(Box::new(s)) }, learned)
                }
                None => (ClientSecret::Missing, Learned::default()),
            })
        }
    }
}

/// Reads a credential Secret, value included.
async fn read_secret(ctx: &Context, namespace: &str, name: &str) -> Result<Option<Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    within(ctx.api_timeout, api.get_opt(name)).await.map_err(|source| Error::ReadClientSecret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    })
}

/// A problem the spec alone shows before any request: plain http without the flag, or a server
/// outside the allow-list.
pub fn spec_problem(ra: &RegistryAccess, policy: &Policy) -> Option<Problem> {
    policy.refusal(&ra.spec.server).map(|(reason, message)| Problem::fix(reason, message))
}

/// The credential a request presents.
pub enum Presented {
    /// A client secret or key read now.
    Ready(Credential),
    /// A token of this ServiceAccount (by name and uid) for `audience`: the apply stage mints it
    /// (a create on the TokenRequest API) right before the request is queued.
    Mint { name: String, uid: String, audience: String },
}

/// A token request ready to queue: where it goes, what it presents, its CA bundle, the inputs
/// digest of the credential actually used, and the version of that credential that allowed it.
pub struct Prepared {
    pub token_url: Url,
    pub presented: Presented,
    pub ca_bundle: Option<Arc<str>>,
    pub inputs: String,
    pub consent: Consent,
}

/// Everything a token request needs: the credential (a secret or key read now, or the
/// ServiceAccount whose token to mint), the token URL and the CA bundle; with what the reads
/// learned.
pub async fn request(
    ra: &RegistryAccess,
    ctx: &Context,
    client: ClientSecret,
) -> Result<(Result<Prepared, Problem>, Learned), Error> {
    if let Some(problem) = spec_problem(ra, &ctx.policy) {
        return Ok((Err(problem), Learned::default()));
    }
    let token_url = match token::token_url(&ra.spec.server, &ra.spec.realm) {
        Ok(url) => url,
        Err(message) => return Ok((Err(Problem::fix(reason::INVALID_SPEC, message)), Learned::default())),
    };
    let namespace = ra.namespace().unwrap_or_default();
    let ((presented, inputs, consent), learned) = match credential(ra, ctx, client, &namespace).await? {
        (Ok(c), learned) => (c, learned),
        (Err(problem), learned) => return Ok((Err(problem), learned)),
    };
    let ca_bundle = match trust::read_ca_bundle(ra, &ctx.client, &namespace, ctx.api_timeout).await? {
        Ok(pem) => pem.map(|pem| ctx.bundles.share(pem)),
        Err(problem) => return Ok((Err(problem), learned)),
    };
    Ok((Ok(Prepared { token_url, presented, ca_bundle, inputs, consent }), learned))
}

/// The credential of a request, its inputs digest and the consent it is sent under; with what
/// reading it learned.
async fn credential(
    ra: &RegistryAccess,
    ctx: &Context,
    client: ClientSecret,
    namespace: &str,
) -> Result<(Result<(Presented, String, Consent), Problem>, Learned), Error> {
    if let ClientSecret::Missing = client {
        return Ok((Err(client.problem(ra).unwrap_or_else(|| credentials::no_source(ra))), Learned::default()));
    }
    if let ClientSecret::ServiceAccount(meta) = &client {
        if let Err(problem) = service_account_check(ra, meta) {
            return Ok((Err(problem), Learned::default()));
        }
        let name = ra.spec.service_account_ref.as_ref().map(|r| r.name.as_str()).unwrap_or_default();
        let audience = match audience(ra) {
            Ok(a) => a,
            Err(problem) => return Ok((Err(problem), Learned::default())),
        };
        let consent =
            Consent::ServiceAccount { key: Key::new(namespace, name), resource_version: meta.resource_version.clone() };
        let presented = Presented::Mint { name: name.to_owned(), uid: meta.uid.clone(), audience };
        return Ok((Ok((presented, sa_inputs(ra, meta), consent)), Learned::default()));
    }
    let CredentialSource::Secret { name, .. } = ra.spec.credential_source() else {
        return Ok((Err(credentials::no_source(ra)), Learned::default()));
    };
    let key = Key::new(namespace, name);
    let (secret, mut learned) = match client {
        ClientSecret::Found { read: Some(s), .. } => (Some(*s), Learned::default()),
        _ => {
            let read = read_secret(ctx, namespace, name).await?;
            let secret = read.as_ref().map(|s| (key.clone(), SecretMeta::of(&s.metadata)));
            (read, Learned { secret, ..Learned::default() })
        }
    };
    let (credentials, fingerprint) = match credentials::extract(ra, secret.as_ref(), &ctx.digest_key) {
        Ok(found) => found,
        Err(problem) => return Ok((Err(problem), learned)),
    };
    let resource_version = secret.as_ref().and_then(|s| s.metadata.resource_version.clone()).unwrap_or_default();
    learned.fingerprint = Some((key.clone(), Arc::new(fingerprint)));
    let consent = Consent::Secret { key, resource_version };
    let value = credentials.client_secret;
    let credential = match ra.spec.client_auth_method {
        ClientAuthMethod::ClientSecretPost => Credential::SecretPost(value),
        ClientAuthMethod::ClientSecretBasic => Credential::SecretBasic(value),
        ClientAuthMethod::ClientSecretJwt => Credential::SecretJwt(value),
        ClientAuthMethod::PrivateKeyJwt => {
            let kid = ra.spec.private_key_ref.as_ref().and_then(|r| r.key_id.clone());
            match SigningKey::from_pem(value.expose_secret(), kid) {
                Ok(key) => Credential::PrivateKey(Arc::new(key)),
                Err(why) => {
                    let name = ra.spec.private_key_ref.as_ref().map(|r| r.name.as_str()).unwrap_or_default();
                    let problem = Problem::fix(
                        reason::PRIVATE_KEY_INVALID,
                        format!("the key in Secret {namespace}/{name} named in spec.privateKeyRef is {why}"),
                    );
                    return Ok((Err(problem), learned));
                }
            }
        }
        ClientAuthMethod::ServiceAccount => return Ok((Err(credentials::no_source(ra)), learned)),
    };
    Ok((Ok((Presented::Ready(credential), credentials.inputs, consent)), learned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ServiceAccountRef;
    use crate::secret::tests::ra;

    fn federated(server: &str, audience: Option<&str>) -> RegistryAccess {
        let mut ra = ra();
        ra.spec.server = server.to_owned();
        ra.spec.client_auth_method = ClientAuthMethod::ServiceAccount;
        ra.spec.client_secret_ref = None;
        ra.spec.service_account_ref =
            Some(ServiceAccountRef { name: "builder".into(), audience: audience.map(str::to_owned) });
        ra
    }

    #[test]
    fn a_service_account_token_goes_only_where_its_annotation_allows() {
        let sa = |issuers: Option<Vec<String>>| ServiceAccountMeta {
            uid: "u".into(),
            resource_version: "1".into(),
            issuers,
            annotation_too_long: false,
        };
        let opted_in = sa(Some(vec!["https://kc.example.com/auth/realms/r".into()]));
        assert!(service_account_check(&federated("https://kc.example.com/auth", None), &opted_in).is_ok());
        // An audience override naming the allowed issuer cannot carry the token to another server.
        let sneaky = federated("https://evil.example", Some("https://kc.example.com/auth/realms/r"));
        let p = service_account_check(&sneaky, &opted_in).unwrap_err();
        assert_eq!(p.reason, reason::SERVICE_ACCOUNT_NOT_OPTED_IN);
        assert!(p.message.contains("https://evil.example/realms/r"), "{}", p.message);
        let silent = sa(None);
        let p = service_account_check(&federated("https://kc.example.com/auth", None), &silent).unwrap_err();
        assert!(p.message.contains("has no annotation") && p.message.contains("kubectl annotate"), "{}", p.message);
    }

    #[test]
    fn a_missing_service_account_is_named_as_such() {
        let p = ClientSecret::Missing.problem(&federated("https://kc.example.com/auth", None)).unwrap();
        assert_eq!(p.reason, reason::SERVICE_ACCOUNT_NOT_FOUND);
        assert!(p.message.contains("billing/builder"), "{}", p.message);
    }
}
