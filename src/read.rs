//! Stage 1 of a reconcile, reads only: the token Secret (from memory while the watch shows it
//! unchanged since the operator wrote or checked it), the client Secret's fingerprint (from memory
//! while the watch shows it unchanged), and, only for a request about to be queued, the client
//! secret itself and the CA bundle.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};

use crate::api::RegistryAccess;
use crate::credentials::{self, Fingerprint};
use crate::failure::{Error, Problem, reason, within};
use crate::index::Key;
use crate::issuer::OwnedRequest;
use crate::policy::Policy;
use crate::reconcile::Context;
use crate::secret::{self, Observed};
use crate::token;
use crate::trust;

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
    if !matches!(observed, Observed::Held(_)) {
        ctx.states.set_known(&uid, None);
    }
    Ok(TokenSecret { observed, live })
}

/// The client Secret as far as the decision needs it.
pub enum ClientSecret {
    /// It exists: its fingerprint, and the Secret itself when it had to be read.
    Found {
        fingerprint: Arc<Fingerprint>,
        read: Option<Box<Secret>>,
    },
    Missing,
}

impl ClientSecret {
    /// The digest of the request inputs, when the client Secret exists and may be sent.
    pub fn inputs(&self, ra: &RegistryAccess) -> Option<String> {
        match self {
            Self::Found { fingerprint, .. } => fingerprint.inputs(ra),
            Self::Missing => None,
        }
    }

    /// Why the next request would fail because of the client Secret, if it would.
    pub fn problem(&self, ra: &RegistryAccess) -> Option<Problem> {
        match self {
            Self::Found { fingerprint, .. } => fingerprint.check(ra).err(),
            Self::Missing => Some(credentials::not_found(ra)),
        }
    }
}

/// The client Secret's fingerprint, from memory while the watch shows the version it was taken
/// of; otherwise the Secret is read and a new fingerprint taken.
pub async fn client_secret(ra: &RegistryAccess, ctx: &Context) -> Result<ClientSecret, Error> {
    let key = Key::new(&ra.namespace().unwrap_or_default(), &ra.spec.client_secret_ref.name);
    if let Some(fingerprint) = ctx.index.fingerprint(&key) {
        return Ok(ClientSecret::Found { fingerprint, read: None });
    }
    Ok(match read_client_secret(ra, ctx).await? {
        Some(s) => {
            let fingerprint = Arc::new(Fingerprint::of(&s, &ctx.digest_key));
            ctx.index.set_fingerprint(key, fingerprint.clone());
            ClientSecret::Found { fingerprint, read: Some(Box::new(s)) }
        }
        None => ClientSecret::Missing,
    })
}

/// Reads the client Secret, value included.
async fn read_client_secret(ra: &RegistryAccess, ctx: &Context) -> Result<Option<Secret>, Error> {
    let (namespace, name) = (ra.namespace().unwrap_or_default(), ra.spec.client_secret_ref.name.clone());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    within(ctx.api_timeout, api.get_opt(&name)).await.map_err(|source| Error::ReadClientSecret {
        namespace,
        name,
        source,
    })
}

/// A problem the spec alone shows before any request: plain http without the flag, or a server
/// outside the allow-list.
pub fn spec_problem(ra: &RegistryAccess, policy: &Policy) -> Option<Problem> {
    policy.refusal(&ra.spec.server).map(|(reason, message)| Problem::fix(reason, message))
}

/// Everything a token request needs: the client secret (read now), the token URL and the CA
/// bundle. The request inputs returned are those of the client Secret actually read.
pub async fn request(
    ra: &RegistryAccess,
    ctx: &Context,
    client: ClientSecret,
) -> Result<Result<(OwnedRequest, String), Problem>, Error> {
    if let Some(problem) = spec_problem(ra, &ctx.policy) {
        return Ok(Err(problem));
    }
    let token_url = match token::token_url(&ra.spec.server, &ra.spec.realm) {
        Ok(url) => url,
        Err(message) => return Ok(Err(Problem::fix(reason::INVALID_SPEC, message))),
    };
    let namespace = ra.namespace().unwrap_or_default();
    let secret = match client {
        ClientSecret::Missing => None,
        ClientSecret::Found { read: Some(s), .. } => Some(*s),
        ClientSecret::Found { read: None, .. } => read_client_secret(ra, ctx).await?,
    };
    let credentials = match credentials::extract(ra, secret.as_ref(), &ctx.digest_key) {
        Ok((credentials, fingerprint)) => {
            let key = Key::new(&namespace, &ra.spec.client_secret_ref.name);
            ctx.index.set_fingerprint(key, Arc::new(fingerprint));
            credentials
        }
        Err(problem) => return Ok(Err(problem)),
    };
    let ca_bundle = match trust::read_ca_bundle(ra, &ctx.client, &namespace, ctx.api_timeout).await? {
        Ok(pem) => pem,
        Err(problem) => return Ok(Err(problem)),
    };
    let request = OwnedRequest {
        token_url,
        client_id: ra.spec.client_id.clone(),
        client_secret: credentials.client_secret,
        auth_method: ra.spec.client_auth_method,
        scopes: ra.spec.scopes.clone(),
        ca_bundle,
    };
    Ok(Ok((request, credentials.inputs)))
}
