//! The `RegistryAccess` custom resource (`registry-access.io/v1alpha1`): spec, status and defaults.
//!
//! Field doc comments become the CRD's descriptions, so they are written for `kubectl explain`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the custom resource.
pub const GROUP: &str = "registry-access.io";
/// Key of the client secret in the referenced Secret when `clientSecretRef.key` is not set.
pub const DEFAULT_CLIENT_SECRET_KEY: &str = "client_secret";
/// Annotation on a RegistryAccess that requests a new token at once, once per new value:
/// `kubectl annotate ra NAME registry-access.io/refresh-requested-at="$(date -Is)" --overwrite`.
pub const REFRESH_ANNOTATION: &str = "registry-access.io/refresh-requested-at";
/// The pod annotation the operator changes after writing a token Secret the pod mounts (its value:
/// the Secret's name and resourceVersion), so that the pod's kubelet updates the mounted files at
/// once. The only change the operator may make to a pod (the chart's admission policy refuses any
/// other).
pub const TOKEN_WRITTEN_ANNOTATION: &str = "registry-access.io/token-written";
/// Label a client Secret must carry (value `true`) before the operator sends its value to
/// Keycloak: whoever may label Secrets in the namespace decides which ones may leave it.
pub const CLIENT_SECRET_LABEL: &str = "registry-access.io/client-secret";
/// Optional annotation on a client Secret: the Keycloak servers (URL prefixes, comma-separated)
/// its value may be sent to. Without it, any server the operator allows.
pub const ALLOWED_SERVERS_ANNOTATION: &str = "registry-access.io/allowed-servers";
/// Annotation on a ServiceAccount that lets the operator mint tokens of it for Keycloak: the
/// realm issuers (URL prefixes, comma-separated) they may be presented to, e.g.
/// `https://keycloak.example.com/auth/realms/consent-01-external-system`.
pub const KEYCLOAK_ISSUERS_ANNOTATION: &str = "registry-access.io/keycloak-issuers";
/// Suffix of the token Secret's default name (`<metadata.name>-token`).
pub const DEFAULT_SECRET_SUFFIX: &str = "-token";

/// A URL with scheme http or https, a host, no user information, query or fragment.
const URL_PATTERN: &str = r"^https?://[^\s/?#@]+(/[^\s?#]*)?$";
/// A Kubernetes object name (DNS subdomain, RFC 1123).
const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key of a Secret's data.
const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// A positive Go-style duration such as `100s`, `1m30s` or `1.5m`.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";
/// An OAuth2 scope token (RFC 6749 section 3.3).
const SCOPE_PATTERN: &str = r"^[\x21\x23-\x5B\x5D-\x7E]+$";

/// Which Keycloak client's token to keep, and in which Secret.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "registry-access.io",
    version = "v1alpha1",
    kind = "RegistryAccess",
    plural = "registryaccesses",
    shortname = "ra",
    namespaced,
    doc = "RegistryAccess keeps a valid Keycloak access token for one client in a Secret. The operator requests the token with the OAuth2 client_credentials grant from {server}/realms/{realm}/protocol/openid-connect/token (authenticated with a client secret, a signed JWT or a Kubernetes ServiceAccount token), writes it to the Secret named in spec.secret.name (default <name>-token) and requests a new one renewBefore ahead of its expiry, so that pods mounting the Secret always find an unexpired token.",
    status = "RegistryAccessStatus",
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Reason", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].reason"#),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName"),
    printcolumn(name = "Expires", type_ = "date", json_path = ".status.expiresAt"),
    printcolumn(name = "Renew", type_ = "date", json_path = ".status.renewAt", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 247 || (has(self.spec.secret) && has(self.spec.secret.name))")
        .message("metadata.name is too long for the default token Secret name <name>-token: set spec.secret.name"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.clientAuthMethod in ['client_secret_post', 'client_secret_basic', 'client_secret_jwt']) == has(self.clientSecretRef)").message("clientSecretRef is required with clientAuthMethod client_secret_post, client_secret_basic or client_secret_jwt, and not allowed with the others"))]
#[x_kube(validation = Rule::new("(self.clientAuthMethod == 'service_account') == has(self.serviceAccountRef)").message("serviceAccountRef is required with clientAuthMethod service_account, and not allowed with the others"))]
#[x_kube(validation = Rule::new("(self.clientAuthMethod == 'private_key_jwt') == has(self.privateKeyRef)").message("privateKeyRef is required with clientAuthMethod private_key_jwt, and not allowed with the others"))]
pub struct RegistryAccessSpec {
    /// Base URL of the Keycloak server, with or without the legacy `/auth` context path, for
    /// example `https://platform-keycloak.apps.example.com/auth`. The token is requested from
    /// `{server}/realms/{realm}/protocol/openid-connect/token`. Must be an absolute https URL
    /// without user information, query or fragment (plain http only where the operator runs with
    /// `--allow-insecure-http`), among the servers the operator allows.
    #[schemars(length(min = 1, max = 2048), pattern(URL_PATTERN))]
    #[x_kube(validation = Rule::new("isURL(self)").message("server must be an absolute http(s) URL, e.g. https://keycloak.example.com/auth"))]
    pub server: String,

    /// Keycloak realm that the client belongs to, for example `consent-01-external-system`.
    #[schemars(length(min = 1, max = 255))]
    pub realm: String,

    /// Client ID of the external system in that realm, for example `test-ext`.
    #[schemars(length(min = 1, max = 255))]
    pub client_id: String,

    /// How the client authenticates to the token endpoint, and which of the fields below it
    /// needs: `client_secret_post` (the default: client_id and client_secret in the form body)
    /// and `client_secret_basic` (HTTP Basic) need clientSecretRef; `client_secret_jwt` (a JWT
    /// signed with the client secret, which never travels) needs clientSecretRef;
    /// `private_key_jwt` (a JWT signed with the client's private key) needs privateKeyRef;
    /// `service_account` (a token of a Kubernetes ServiceAccount, for a Keycloak client of type
    /// "Signed JWT - Federated": no secret stored anywhere) needs serviceAccountRef.
    #[serde(default)]
    pub client_auth_method: ClientAuthMethod,

    /// The Secret, in this RegistryAccess's namespace, that holds the client secret (methods
    /// client_secret_post, client_secret_basic and client_secret_jwt). The Secret must carry the
    /// label `registry-access.io/client-secret: "true"` (set by someone who may edit Secrets
    /// here), otherwise nothing is sent (reason ClientSecretNotOptedIn); its annotation
    /// `registry-access.io/allowed-servers` can name the only servers it may go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<ClientSecretRef>,

    /// The ServiceAccount, in this namespace, whose token authenticates the client (method
    /// service_account). The operator mints a short-lived token for it with the TokenRequest API,
    /// for the audience of the realm's issuer, and never stores it. The ServiceAccount must opt
    /// in with the annotation `registry-access.io/keycloak-issuers` listing the Keycloak realm
    /// issuers (URL prefixes, comma-separated) its tokens may be presented to, otherwise no
    /// token is minted (reason ServiceAccountNotOptedIn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<ServiceAccountRef>,

    /// The Secret, in this namespace, that holds the client's private key as PEM (RSA or EC
    /// P-256/P-384), for method private_key_jwt. Like a client Secret it must carry the label
    /// `registry-access.io/client-secret: "true"`. The key never leaves: each request carries a
    /// fresh JWT signed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_ref: Option<PrivateKeyRef>,

    /// Realm roles the token must grant (from its `realm_access.roles` claim), for example
    /// `trembita-invoker`. A token lacking any is still written, but Ready is False with reason
    /// RequiredRolesMissing naming them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 128)))]
    pub required_roles: Vec<String>,

    /// OAuth2 scopes to request, sent as the space-separated `scope` parameter. Empty or unset:
    /// no scope parameter, Keycloak grants the client's default scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 128), pattern(SCOPE_PATTERN)))]
    pub scopes: Vec<String>,

    /// URL of the registry's API gateway, for example
    /// `https://external-service-api-consent-02-main.apps.example.com/api/gateway`. Optional; when
    /// set it is copied into the token Secret under the key `registry_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), pattern(URL_PATTERN))]
    pub registry_url: Option<String>,

    /// How long before the token's expiry a new token is requested, as a duration such as `100s`
    /// or `2m`. Default: enough for a pod that mounts the Secret to keep a minute of validity
    /// when the kubelet delivers the new token as late as it can (90s) after one failed token
    /// request: 167s for Keycloak's default 300s tokens, and never less than a third of the
    /// lifetime. A token is renewed no sooner than a quarter of its lifetime (at least 5s) after
    /// it was issued: a longer value is reduced to that, and Degraded says so
    /// (RenewBeforeAdjusted); one under the kubelet's worst-case delivery delay (90s) is reported
    /// as RenewBeforeTooShort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("renewBefore must be a positive duration such as 100s"))]
    pub renew_before: Option<Duration>,

    /// The Secret that receives the token, in this namespace. It is created and owned by this
    /// RegistryAccess and deleted with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretTemplate>,

    /// Whether the running pods of this namespace that mount the token Secret as a volume are
    /// told of each new token: one annotation of each such pod
    /// (`registry-access.io/token-written`) is changed right after the token is written, which
    /// makes its kubelet update the mounted file within about a second instead of at its next
    /// periodic sync (up to 90s later). Default: true (one pod patch per mounting pod per token,
    /// about every two minutes with Keycloak's default 300s tokens). Has no effect where the
    /// operator runs with `--nudge-pods=false`. A pod that reads the token through an
    /// environment variable or a subPath mount never sees a new token either way: Degraded
    /// (TokenReadOnce) names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nudge_pods: Option<bool>,

    /// TLS settings of the connection to Keycloak, for a server whose certificate is signed by a
    /// private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// Trust for Keycloak's certificate, in addition to the system's root CAs and the operator's
/// --ca-bundle-file. Set caBundle or caBundleRef, not both.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.caBundle) && has(self.caBundleRef))").message("set tls.caBundle or tls.caBundleRef, not both"))]
pub struct TlsSpec {
    /// PEM-encoded CA certificates to trust, at most 16 KiB (a larger bundle goes in a ConfigMap
    /// named by caBundleRef).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16384))]
    pub ca_bundle: Option<String>,

    /// A key of a ConfigMap or Secret in this namespace that holds PEM-encoded CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_ref: Option<CaBundleRef>,
}

/// A key of a ConfigMap or Secret in the RegistryAccess's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaBundleRef {
    /// `ConfigMap` or `Secret`.
    pub kind: CaBundleKind,
    /// Name of the ConfigMap or Secret.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key that holds the PEM bundle. Default: `ca.crt`.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253), pattern(SECRET_KEY_PATTERN))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}

/// Where a CA bundle is kept.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CaBundleKind {
    ConfigMap,
    Secret,
}

/// A key of a Secret in the RegistryAccess's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSecretRef {
    /// Name of the Secret. Secrets of other namespaces cannot be referenced.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,

    /// Key of the client secret in that Secret's data. Default: `client_secret`.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = 253), pattern(SECRET_KEY_PATTERN))]
    pub key: String,
}

fn default_client_secret_key() -> String {
    DEFAULT_CLIENT_SECRET_KEY.to_owned()
}

/// A ServiceAccount in the RegistryAccess's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Name of the ServiceAccount.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,

    /// Audience of the minted token. Default: the realm's issuer derived from server and realm,
    /// `{server}/realms/{realm}`, which is what Keycloak requires. Set it only where Keycloak's
    /// public (frontend) URL differs from server. The ServiceAccount's
    /// `registry-access.io/keycloak-issuers` annotation must cover both this audience and the
    /// issuer of server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), pattern(URL_PATTERN))]
    pub audience: Option<String>,
}

/// A private key in a Secret of the RegistryAccess's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrivateKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,

    /// Key of the PEM private key (PKCS#8; PKCS#1 also for RSA) in that Secret's data. Default:
    /// `tls.key` (with cert-manager, set `privateKey.encoding: PKCS8` for EC keys).
    #[serde(default = "default_private_key_key")]
    #[schemars(length(min = 1, max = 253), pattern(SECRET_KEY_PATTERN))]
    pub key: String,

    /// `kid` header of the signed JWTs, for a Keycloak client with several keys. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub key_id: Option<String>,
}

fn default_private_key_key() -> String {
    "tls.key".to_owned()
}

/// How the client authenticates to Keycloak's token endpoint (RFC 6749 section 2.3.1, RFC 7523).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ClientAuthMethod {
    /// `client_id` and `client_secret` as form parameters in the request body.
    #[default]
    #[serde(rename = "client_secret_post")]
    ClientSecretPost,
    /// `Authorization: Basic` with the form-urlencoded client_id and client_secret.
    #[serde(rename = "client_secret_basic")]
    ClientSecretBasic,
    /// A JWT signed (HS256) with the client secret as `client_assertion`.
    #[serde(rename = "client_secret_jwt")]
    ClientSecretJwt,
    /// A JWT signed with the client's private key as `client_assertion`.
    #[serde(rename = "private_key_jwt")]
    PrivateKeyJwt,
    /// A Kubernetes ServiceAccount token as `client_assertion` (Keycloak's federated client
    /// authentication).
    #[serde(rename = "service_account")]
    ServiceAccount,
}

impl ClientAuthMethod {
    /// The name used in the spec and in OAuth2 metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecretPost => "client_secret_post",
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretJwt => "client_secret_jwt",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::ServiceAccount => "service_account",
        }
    }
}

/// Where an object's credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource<'a> {
    /// A key of a Secret of the namespace (client secret or private key).
    Secret { name: &'a str, key: &'a str },
    /// A ServiceAccount of the namespace.
    ServiceAccount { name: &'a str },
    /// The spec names none for its method (refused by the API server's validation).
    Missing,
}

/// Name and extra metadata of the token Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Name of the token Secret. Default: `<metadata.name>-token`. An existing Secret of that
    /// name that this RegistryAccess does not own is never overwritten (reason SecretConflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: Option<String>,

    /// Extra labels for the token Secret, at most 16 (keys up to 317 characters, values up to
    /// 63). `app.kubernetes.io/managed-by` is always set by the operator.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[x_kube(validation = Rule::new("self.all(k, k.size() <= 317)").message("label keys are at most 317 characters (a 253-character prefix, a slash and a 63-character name)"))]
    pub labels: BTreeMap<String, String>,

    /// Extra annotations for the token Secret, at most 8 (keys up to 317 characters, values up to
    /// 1024). Keys under `registry-access.io/` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 8, "additionalProperties" = {"type": "string", "maxLength": 1024}))]
    #[x_kube(validation = Rule::new("self.all(k, k.size() <= 317)").message("annotation keys are at most 317 characters (a 253-character prefix, a slash and a 63-character name)"))]
    pub annotations: BTreeMap<String, String>,
}

/// Observed state of the token, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryAccessStatus {
    /// The metadata.generation that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Name of the Secret that holds the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// When the current token was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,

    /// When the current token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// When the operator requests the next token (expiresAt minus renewBefore, minus a small
    /// jitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_at: Option<Time>,

    /// Realm roles granted to the client, from the token's `realm_access.roles` claim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted_roles: Vec<String>,

    /// Scopes granted with the current token, as returned by Keycloak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,

    /// Token requests that failed in a row since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_attempts: Option<u32>,

    /// When the last token request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,

    /// `Ready`: the Secret holds an unexpired token. `Degraded`: the last attempt to refresh the
    /// token failed; its reason and message say what to fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A RegistryAccess as stored, or the metadata of one that cannot be decoded (written by another
/// version of the CRD): such an object is reported and skipped, never fatal to the watch.
pub type Guarded = kube::core::DeserializeGuard<RegistryAccess>;

impl RegistryAccessSpec {
    /// Where the credential of the spec's method comes from.
    pub fn credential_source(&self) -> CredentialSource<'_> {
        match self.client_auth_method {
            ClientAuthMethod::ClientSecretPost
            | ClientAuthMethod::ClientSecretBasic
            | ClientAuthMethod::ClientSecretJwt => match &self.client_secret_ref {
                Some(r) => CredentialSource::Secret { name: &r.name, key: &r.key },
                None => CredentialSource::Missing,
            },
            ClientAuthMethod::PrivateKeyJwt => match &self.private_key_ref {
                Some(r) => CredentialSource::Secret { name: &r.name, key: &r.key },
                None => CredentialSource::Missing,
            },
            ClientAuthMethod::ServiceAccount => match &self.service_account_ref {
                Some(r) => CredentialSource::ServiceAccount { name: &r.name },
                None => CredentialSource::Missing,
            },
        }
    }
}

impl RegistryAccess {
    /// Name of the token Secret: `spec.secret.name`, or `<metadata.name>-token`.
    pub fn token_secret_name(&self) -> String {
        self.spec
            .secret
            .as_ref()
            .and_then(|s| s.name.clone())
            .unwrap_or_else(|| format!("{}{DEFAULT_SECRET_SUFFIX}", self.metadata.name.as_deref().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn spec() -> RegistryAccessSpec {
        serde_json::from_value(serde_json::json!({
            "server": "https://kc.example.com/auth",
            "realm": "r",
            "clientId": "c",
            "clientSecretRef": {"name": "creds"},
        }))
        .unwrap()
    }

    #[test]
    fn defaults_follow_the_documented_flow() {
        let s = spec();
        assert_eq!(s.client_secret_ref.unwrap().key, "client_secret");
        assert_eq!(s.client_auth_method, ClientAuthMethod::ClientSecretPost);
        assert!(s.scopes.is_empty());
        assert!(s.renew_before.is_none());
    }

    #[test]
    fn token_secret_name_defaults_to_name_dash_token() {
        let mut ra = RegistryAccess::new("consent-02", spec());
        assert_eq!(ra.token_secret_name(), "consent-02-token");
        ra.spec.secret = Some(SecretTemplate { name: Some("custom".into()), ..Default::default() });
        assert_eq!(ra.token_secret_name(), "custom");
    }

    #[test]
    fn renew_before_parses_go_durations() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v["renewBefore"] = "1m30s".into();
        let s: RegistryAccessSpec = serde_json::from_value(v).unwrap();
        let d: std::time::Duration = s.renew_before.unwrap().into();
        assert_eq!(d.as_secs(), 90);
    }

    #[test]
    fn auth_method_names_match_oauth2() {
        let v = serde_json::to_value(ClientAuthMethod::ClientSecretBasic).unwrap();
        assert_eq!(v, "client_secret_basic");
        assert!(serde_json::from_value::<ClientAuthMethod>("basic".into()).is_err());
    }

    #[test]
    fn an_object_of_another_schema_decodes_as_its_metadata() {
        let stored = serde_json::json!({
            "apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
            "metadata": {"name": "drifted", "namespace": "billing", "uid": "u-1"},
            "spec": {"server": 42, "realm": ["not", "a", "string"]},
        });
        let guarded: Guarded = serde_json::from_value(stored).unwrap();
        let invalid = guarded.0.unwrap_err();
        assert_eq!(invalid.metadata.name.as_deref(), Some("drifted"));
        assert_eq!(invalid.metadata.uid.as_deref(), Some("u-1"));
        let good = serde_json::json!({
            "apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
            "metadata": {"name": "fine", "namespace": "billing"}, "spec": spec(),
        });
        assert!(serde_json::from_value::<Guarded>(good).unwrap().0.is_ok());
    }

    #[test]
    fn crd_carries_validation_and_columns() {
        let crd = serde_json::to_string(&RegistryAccess::crd()).unwrap();
        for needle in ["isURL(self)", "duration(self)", "\"ra\"", "Expires", "x-kubernetes-list-map-keys", URL_PATTERN]
        {
            assert!(crd.contains(&needle.replace('\\', "\\\\")), "CRD lacks {needle}");
        }
    }
}
