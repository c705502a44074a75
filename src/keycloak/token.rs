//! The Keycloak token client: one OAuth2 client_credentials request and the parsing of its answer.
//!
//! Nothing here knows about Kubernetes. Errors carry what a user needs to fix the problem and
//! never the client secret or the token.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jiff::{SignedDuration, Timestamp};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::keycloak::assertion::{self, Credential, JWT_BEARER};
use crate::{keycloak::jwt, text};

/// Largest token response body accepted; Keycloak's are a few KiB.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Default time allowed to open the TCP and TLS connection to Keycloak.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time allowed for a whole token request, body included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest `expires_in` taken at face value (ten years); anything longer is a broken response.
const MAX_EXPIRES_IN_SECS: i64 = 10 * 365 * 24 * 3600;

/// What the token endpoint is asked for.
pub struct TokenRequest<'a> {
    pub token_url: &'a Url,
    pub client_id: &'a str,
    pub credential: &'a Credential,
    pub scopes: &'a [String],
    /// PEM CA certificates to trust for this request, in addition to the client's own.
    pub ca_bundle: Option<&'a str>,
}

/// A token as issued, with the facts the operator derives from it.
#[derive(Clone)]
pub struct IssuedToken {
    pub access_token: SecretString,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    /// Scope granted, from the response or else the token's claims.
    pub scope: Option<String>,
    /// The token's `realm_access.roles`.
    pub realm_roles: Vec<String>,
    /// The token has a `realm_access` claim at all.
    pub roles_claim: bool,
}

/// What the operator keeps of a token without the token itself: enough to plan its renewal and
/// report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFacts {
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub scope: Option<String>,
    pub realm_roles: Vec<String>,
    /// The token has a `realm_access` claim at all.
    pub roles_claim: bool,
}

impl IssuedToken {
    pub fn facts(&self) -> TokenFacts {
        TokenFacts {
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            scope: self.scope.clone(),
            realm_roles: self.realm_roles.clone(),
            roles_claim: self.roles_claim,
        }
    }
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("access_token", &"[redacted]")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .field("realm_roles", &self.realm_roles)
            .finish()
    }
}

/// Why a token request failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot connect to {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("TLS handshake with {url} failed: {cause}")]
    Tls { url: String, cause: String },
    #[error("no answer from {url} within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("Keycloak answered {status} at {url}")]
    ServerError { url: String, status: u16, retry_after: Option<Duration> },
    #[error("Keycloak is rate limiting token requests (429 at {url}){}", after(.retry_after))]
    RateLimited { url: String, retry_after: Option<Duration> },
    #[error(
        "Keycloak answered {status} with a redirect to {location:?}; redirects are not followed for token requests"
    )]
    Redirect { status: u16, location: Option<String> },
    #[error("Keycloak rejected the client credentials ({status} {error}{}): check clientId and the client's credential (its secret, its key, or the ServiceAccount its Keycloak client is bound to)", describe(.description))]
    InvalidClient { status: u16, error: String, description: Option<String> },
    #[error("the client may not use the client_credentials grant ({status} {error}{}): enable service accounts for the client in Keycloak", describe(.description))]
    ServiceAccountsDisabled { status: u16, error: String, description: Option<String> },
    #[error("Keycloak rejected the requested scope ({status} {error}{}): check spec.scopes", describe(.description))]
    InvalidScope { status: u16, error: String, description: Option<String> },
    #[error("the token endpoint {url} does not exist (404{}): check spec.server and spec.realm", describe(.description))]
    NotFound { url: String, description: Option<String> },
    #[error("Keycloak rejected the token request ({status} {error}{})", describe(.description))]
    Rejected { status: u16, error: String, description: Option<String> },
    #[error("the token response is larger than {MAX_RESPONSE_BYTES} bytes")]
    ResponseTooLarge,
    #[error("the token response is invalid: {0}")]
    InvalidResponse(String),
    #[error("the CA bundle is unusable: {0}")]
    InvalidCaBundle(String),
    /// No extra bundle was given and the system's trust store could not be used: an image
    /// without root certificates.
    #[error(
        "cannot build the HTTPS client: {0}; the operator trusts the system's root certificates (in a container image, /etc/ssl/certs) plus --ca-bundle-file, so the image needs them"
    )]
    NoTrustStore(String),
    #[error("{0}")]
    Assertion(String),
}

/// The realm's issuer, `{server}/realms/{realm}`, from its token endpoint URL: the audience of
/// client assertions.
pub fn realm_issuer(token_url: &Url) -> String {
    let url = token_url.as_str();
    url.strip_suffix("/protocol/openid-connect/token").unwrap_or(url).to_owned()
}

fn after(retry_after: &Option<Duration>) -> String {
    retry_after.map(|d| format!("; it asked to wait {}s", d.as_secs())).unwrap_or_default()
}

fn describe(description: &Option<String>) -> String {
    description.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
}

impl TokenError {
    /// True when the cause is likely to go away by itself (the server is down or busy).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Timeout { .. } | Self::ServerError { .. } | Self::RateLimited { .. }
        )
    }

    /// How long the server asked to wait before the next request (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::ServerError { retry_after, .. } | Self::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Settings of the HTTP client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// PEM CA certificates trusted for every request, in addition to the system roots.
    pub ca_bundle: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { connect_timeout: DEFAULT_CONNECT_TIMEOUT, request_timeout: DEFAULT_REQUEST_TIMEOUT, ca_bundle: None }
    }
}

/// Most distinct per-object CA bundles kept with a client of their own; past that the cache
/// starts again (objects with their own CA are expected to be few).
const MAX_CACHED_CLIENTS: usize = 64;

/// Sends token requests over pooled HTTP clients (keep-alive to each Keycloak server): one for
/// the common trust, and one per distinct extra CA bundle.
#[derive(Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    config: ClientConfig,
    with_ca: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, reqwest::Client>>>,
}

/// Installs the process-wide rustls crypto provider (ring) if none is installed yet.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TokenClient {
    pub fn new(config: ClientConfig) -> Result<Self, TokenError> {
        install_crypto_provider();
        let http = build_client(&config, None)?;
        Ok(Self { http, config, with_ca: Default::default() })
    }

    /// The client that trusts `ca_bundle` in addition to the common trust.
    fn client_for(&self, ca_bundle: Option<&str>) -> Result<reqwest::Client, TokenError> {
        let Some(pem) = ca_bundle else { return Ok(self.http.clone()) };
        use sha2::Digest as _;
        let key = hex::encode(sha2::Sha256::digest(pem.as_bytes()));
        let mut cache = self.with_ca.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let client = build_client(&self.config, Some(pem))?;
        if cache.len() >= MAX_CACHED_CLIENTS {
            cache.clear();
        }
        cache.insert(key, client.clone());
        Ok(client)
    }

    /// Requests a token with the client_credentials grant. `now` is when the request is sent:
    /// `expires_in` counts from then, which errs on the early side.
    pub async fn request(&self, req: &TokenRequest<'_>, now: Timestamp) -> Result<IssuedToken, TokenError> {
        let url = req.token_url.as_str().to_owned();
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let scope = req.scopes.join(" ");
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let http = self.client_for(req.ca_bundle)?;
        let mut builder = http.post(req.token_url.clone()).header(ACCEPT, "application/json");
        let made = assertion::assertion(req.credential, req.client_id, &realm_issuer(req.token_url), now)
            .transpose()
            .map_err(TokenError::Assertion)?;
        match (req.credential, &made) {
            (Credential::SecretPost(secret), _) => {
                form.push(("client_id", req.client_id));
                form.push(("client_secret", secret.expose_secret()));
            }
            (Credential::SecretBasic(secret), _) => {
                builder = builder.header(AUTHORIZATION, basic_auth(req.client_id, secret)?);
            }
            (Credential::ServiceAccountToken(token, _), _) => {
                // Keycloak finds the client from the token's issuer and subject: no client_id.
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", token.expose_secret()));
            }
            (Credential::SecretJwt(_) | Credential::PrivateKey(_), Some(signed)) => {
                form.push(("client_id", req.client_id));
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", signed.expose_secret()));
            }
            (Credential::SecretJwt(_) | Credential::PrivateKey(_), None) => {
                return Err(TokenError::Assertion("no assertion was made".into()));
            }
        }
        let body = serde_urlencoded_form(&form);
        let response = builder
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| self.send_error(&url, e))?;
        let status = response.status();
        let location =
            response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, Timestamp::now()));
        let body = read_limited(response).await.map_err(|e| match e {
            ReadError::TooLarge => TokenError::ResponseTooLarge,
            ReadError::Http(e) => self.send_error(&url, e),
        })?;
        if status.is_success() {
            return parse_success(&body, now);
        }
        Err(classify_failure(status, &url, &body, location, retry_after))
    }

    fn send_error(&self, url: &str, e: reqwest::Error) -> TokenError {
        if e.is_timeout() {
            return TokenError::Timeout { url: url.to_owned(), timeout: self.config.request_timeout };
        }
        // Our own words only: the peer's text (its certificate's names, its alert, an address it
        // resolved to) never reaches a status, so the status is not a probe of what the operator
        // can reach.
        if let Some(cause) = tls_failure(&e) {
            return TokenError::Tls { url: url.to_owned(), cause: cause.to_owned() };
        }
        TokenError::Connect { url: url.to_owned(), cause: connect_failure(&e).to_owned() }
    }
}

/// The sources of an error, looking inside `io::Error`s (whose `source()` skips the error they
/// wrap, which is where rustls puts its own).
fn causes<'a>(e: &'a (dyn std::error::Error + 'static)) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next.take() {
        if out.len() >= 16 {
            break;
        }
        out.push(err);
        next = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    out
}

/// What went wrong in a TLS handshake, in our words; `None` when the failure was not TLS.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let tls = causes(e).into_iter().find_map(|c| c.downcast_ref::<rustls::Error>())?;
    Some(match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => {
                "the server's certificate is not signed by a trusted CA (set spec.tls.caBundle or caBundleRef for a private CA)"
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the server's certificate is not valid for the host name in spec.server"
            }
            C::Expired | C::ExpiredContext { .. } => "the server's certificate has expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "the server's certificate is not valid yet",
            C::Revoked => "the server's certificate is revoked",
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the server's certificate is not meant for TLS servers"
            }
            _ => "the server's certificate was refused",
        },
        rustls::Error::AlertReceived(_) => "the server refused the TLS handshake",
        rustls::Error::NoCertificatesPresented => "the server presented no certificate",
        _ => "the TLS handshake failed",
    })
}

/// Why a connection failed, in our words.
fn connect_failure(e: &reqwest::Error) -> &'static str {
    use std::io::ErrorKind as K;
    let all = causes(e);
    let kind = all.iter().find_map(|c| c.downcast_ref::<std::io::Error>()).map(std::io::Error::kind);
    match kind {
        Some(K::ConnectionRefused) => return "the connection was refused (nothing listens on that port)",
        Some(K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof) => {
            return "the server closed or reset the connection";
        }
        Some(K::TimedOut) => return "the connection timed out",
        Some(K::AddrNotAvailable | K::NetworkUnreachable | K::HostUnreachable) => {
            return "the address cannot be reached";
        }
        _ => {}
    }
    // Classified by our client's own wording, never quoted.
    let chain = all.iter().map(ToString::to_string).collect::<Vec<_>>().join(": ").to_ascii_lowercase();
    if chain.contains("dns error") || chain.contains("failed to lookup address") {
        "the host name cannot be resolved"
    } else if e.is_connect() {
        "the connection could not be opened"
    } else {
        "the connection failed before Keycloak answered"
    }
}

/// Parses PEM CA certificates; at least one is required.
pub fn parse_ca_bundle(pem: &str) -> Result<Vec<reqwest::Certificate>, TokenError> {
    let invalid = |m: String| TokenError::InvalidCaBundle(m);
    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn build_client(config: &ClientConfig, extra: Option<&str>) -> Result<reqwest::Client, TokenError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        // A redirect could carry the client secret to another host.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("registry-access-operator/", env!("CARGO_PKG_VERSION")));
    for pem in config.ca_bundle.iter().map(String::as_str).chain(extra) {
        builder = builder.tls_certs_merge(parse_ca_bundle(pem)?);
    }
    let bundles = config.ca_bundle.is_some() || extra.is_some();
    builder.build().map_err(|e| {
        let cause = error_chain(&e);
        if bundles {
            TokenError::InvalidCaBundle(format!("cannot build a TLS client with it: {cause}"))
        } else {
            TokenError::NoTrustStore(cause)
        }
    })
}

/// The `Authorization: Basic` value of RFC 6749 section 2.3.1: id and secret form-urlencoded first.
fn basic_auth(client_id: &str, secret: &SecretString) -> Result<HeaderValue, TokenError> {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = format!("{}:{}", enc(client_id), enc(secret.expose_secret()));
    let mut value = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(raw)))
        .map_err(|_| TokenError::InvalidResponse("cannot build the Basic authorization header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn serde_urlencoded_form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

/// Reads the body, refusing to buffer more than [`MAX_RESPONSE_BYTES`].
async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, ReadError> {
    if response.content_length().is_some_and(|n| n > MAX_RESPONSE_BYTES as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Http)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Deserialize)]
struct RawTokenResponse {
    access_token: Option<serde_json::Value>,
    token_type: Option<serde_json::Value>,
    expires_in: Option<serde_json::Value>,
    scope: Option<serde_json::Value>,
}

/// Turns a 2xx token response body into an [`IssuedToken`].
pub fn parse_success(body: &[u8], now: Timestamp) -> Result<IssuedToken, TokenError> {
    // Whole seconds, as the Secret records them: the renewal planned now is the one planned after
    // reading the Secret back (and the expiry errs early by less than a second).
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let invalid = |m: &str| TokenError::InvalidResponse(m.to_owned());
    let raw: RawTokenResponse = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .filter(serde_json::Value::is_object)
        .and_then(|v| RawTokenResponse::deserialize(v).ok())
        .ok_or_else(|| invalid("the body is not a JSON object"))?;
    let access_token = match raw.access_token {
        Some(serde_json::Value::String(t)) => t,
        Some(_) => return Err(invalid("access_token is not a string")),
        None => return Err(invalid("access_token is missing")),
    };
    if access_token.is_empty() {
        return Err(invalid("access_token is empty"));
    }
    if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("access_token contains characters not allowed in an HTTP header"));
    }
    match &raw.token_type {
        None => {}
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(serde_json::Value::String(_)) => return Err(invalid("token_type is not Bearer")),
        Some(_) => return Err(invalid("token_type is not a string")),
    }
    let claims = jwt::decode_claims(&access_token).ok();
    let expires_at = match raw.expires_in {
        Some(v) => {
            let secs =
                expires_in_seconds(&v).ok_or_else(|| invalid("expires_in is not a positive number of seconds"))?;
            // The token's own lifetime (`exp - iat`) when it is shorter: a Keycloak whose clock or
            // response disagrees with its token never makes the operator renew late.
            let own = claims.as_ref().and_then(|c| Some(c.exp? - c.iat?)).filter(|l| *l > 0);
            let secs = own.map_or(secs, |own| secs.min(own));
            now.checked_add(SignedDuration::from_secs(secs)).map_err(|_| invalid("expires_in is out of range"))?
        }
        None => {
            let exp = claims
                .as_ref()
                .and_then(|c| c.exp)
                .ok_or_else(|| invalid("neither expires_in nor the token's exp claim gives the expiry"))?;
            Timestamp::from_second(exp).map_err(|_| invalid("the token's exp claim is out of range"))?
        }
    };
    if expires_at <= now {
        return Err(invalid("the token is already expired"));
    }
    let scope = match raw.scope {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => claims.as_ref().and_then(|c| c.scope.clone()),
    }
    .map(|s| text::foreign(&s, text::MAX_SCOPE_CHARS));
    Ok(IssuedToken {
        access_token: SecretString::from(access_token),
        issued_at: now,
        expires_at,
        scope,
        roles_claim: claims.as_ref().is_some_and(|c| c.roles_claim),
        realm_roles: claims.map(|c| c.realm_roles).unwrap_or_default(),
    })
}

fn expires_in_seconds(v: &serde_json::Value) -> Option<i64> {
    let secs = match v {
        serde_json::Value::Number(n) => {
            n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as i64))?
        }
        // Some servers send the number as a string.
        serde_json::Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (1..=MAX_EXPIRES_IN_SECS).contains(&secs).then_some(secs)
}

#[derive(Deserialize, Default)]
struct OAuthError {
    error: Option<String>,
    error_description: Option<String>,
}

/// Names the failure of a non-2xx token response.
pub fn classify_failure(
    status: StatusCode,
    url: &str,
    body: &[u8],
    location: Option<String>,
    retry_after: Option<Duration>,
) -> TokenError {
    let code = status.as_u16();
    if status.is_redirection() {
        return TokenError::Redirect { status: code, location: location.map(|l| sanitize(&l)) };
    }
    if status.is_server_error() {
        return TokenError::ServerError { url: url.to_owned(), status: code, retry_after };
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return TokenError::RateLimited { url: url.to_owned(), retry_after };
    }
    let parsed: OAuthError = serde_json::from_slice(body).unwrap_or_default();
    let error = parsed.error.map(|e| sanitize(&e)).unwrap_or_else(|| "no OAuth2 error code".to_owned());
    let description = parsed.error_description.map(|d| sanitize(&d));
    let service_account = description.as_deref().is_some_and(|d| d.to_ascii_lowercase().contains("service account"));
    match (code, error.as_str()) {
        (404, _) => TokenError::NotFound { url: url.to_owned(), description: description.or(Some(error)) },
        (400 | 401, "unauthorized_client") if service_account => {
            TokenError::ServiceAccountsDisabled { status: code, error, description }
        }
        (400 | 401, "invalid_client" | "unauthorized_client") => {
            TokenError::InvalidClient { status: code, error, description }
        }
        (400, "invalid_scope") => TokenError::InvalidScope { status: code, error, description },
        _ => TokenError::Rejected { status: code, error, description },
    }
}

/// Longest `Retry-After` honoured: a server asking for more is asked again after this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Reads a `Retry-After` header: a number of seconds or an HTTP date (RFC 9110 10.2.3), at most
/// [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
            Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Keeps an error text from Keycloak short and printable.
fn sanitize(s: &str) -> String {
    text::foreign(s, text::MAX_QUOTED_CHARS)
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The token endpoint of a realm: `{server}/realms/{realm}/protocol/openid-connect/token`.
pub fn token_url(server: &str, realm: &str) -> Result<Url, String> {
    let mut url = Url::parse(server).map_err(|e| format!("spec.server is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("spec.server must be an absolute http or https URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("spec.server must not contain user information".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("spec.server must not contain a query or fragment".into());
    }
    url.path_segments_mut().map_err(|_| "spec.server cannot be a base URL".to_owned())?.pop_if_empty().extend([
        "realms",
        realm,
        "protocol",
        "openid-connect",
        "token",
    ]);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keycloak::jwt::tests::jwt;

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn token_url_with_and_without_auth_context_path() {
        assert_eq!(
            token_url("https://kc.example.com/auth", "consent-01-external-system").unwrap().as_str(),
            "https://kc.example.com/auth/realms/consent-01-external-system/protocol/openid-connect/token"
        );
        assert_eq!(
            token_url("https://kc.example.com/", "r").unwrap().as_str(),
            "https://kc.example.com/realms/r/protocol/openid-connect/token"
        );
        assert_eq!(
            token_url("http://127.0.0.1:8080/auth/", "a b/c").unwrap().as_str(),
            "http://127.0.0.1:8080/auth/realms/a%20b%2Fc/protocol/openid-connect/token"
        );
        assert!(token_url("https://user:pw@kc.example.com", "r").unwrap_err().contains("user information"));
        assert!(token_url("ftp://kc.example.com", "r").is_err());
        assert!(token_url("kc.example.com", "r").is_err());
    }

    #[test]
    fn expiry_comes_from_expires_in() {
        let body = serde_json::json!({"access_token": "abc", "expires_in": 300, "token_type": "Bearer", "scope": "profile email"});
        let t = parse_success(body.to_string().as_bytes(), now()).unwrap();
        assert_eq!(t.expires_at, now() + SignedDuration::from_secs(300));
        assert_eq!(t.scope.as_deref(), Some("profile email"));
    }

    #[test]
    fn the_shorter_of_expires_in_and_the_tokens_own_lifetime_counts() {
        let token = jwt(&serde_json::json!({"iat": 1_000, "exp": 1_060}));
        let body = serde_json::json!({"access_token": token, "expires_in": 300});
        let t = parse_success(body.to_string().as_bytes(), now()).unwrap();
        assert_eq!(t.expires_at, now() + SignedDuration::from_secs(60));
        let token = jwt(&serde_json::json!({"iat": 1_000, "exp": 2_000}));
        let body = serde_json::json!({"access_token": token, "expires_in": 300});
        let t = parse_success(body.to_string().as_bytes(), now()).unwrap();
        assert_eq!(t.expires_at, now() + SignedDuration::from_secs(300));
    }

    #[test]
    fn foreign_text_in_a_response_is_cleaned_and_bounded() {
        let role = format!("r\u{1b}[2J{}", "x".repeat(10_000));
        let token = jwt(&serde_json::json!({"exp": now().as_second() + 300, "realm_access": {"roles": [role]}}));
        let scope = format!("profile \u{1b}]0;pwned\u{7} {}", "s".repeat(20_000));
        let body = serde_json::json!({"access_token": token, "expires_in": 300, "scope": scope});
        let t = parse_success(body.to_string().as_bytes(), now()).unwrap();
        let scope = t.scope.unwrap();
        assert!(scope.chars().count() <= crate::text::MAX_SCOPE_CHARS && !scope.contains('\u{1b}'), "{scope}");
        assert!(t.realm_roles[0].chars().count() <= crate::text::MAX_ROLE_CHARS);
        assert!(!t.realm_roles[0].contains('\u{1b}'));
        let location = format!("https://x/{}\u{1b}[0m", "a".repeat(100 * 1024));
        let e = classify_failure(StatusCode::FOUND, "u", b"", Some(location), None);
        let text = e.to_string();
        assert!(text.len() < 1_000 && !text.contains('\u{1b}'), "{} chars", text.len());
    }

    #[test]
    fn expiry_falls_back_to_the_jwt_exp() {
        let exp = now().as_second() + 120;
        let token = jwt(&serde_json::json!({"exp": exp, "realm_access": {"roles": ["trembita-invoker"]}}));
        let body = serde_json::json!({"access_token": token, "token_type": "bearer"});
        let t = parse_success(body.to_string().as_bytes(), now()).unwrap();
        assert_eq!(t.expires_at.as_second(), exp);
        assert_eq!(t.realm_roles, vec!["trembita-invoker"]);
    }

    #[test]
    fn no_expiry_at_all_is_an_error() {
        let body = serde_json::json!({"access_token": "opaque"});
        let err = parse_success(body.to_string().as_bytes(), now()).unwrap_err();
        assert!(err.to_string().contains("neither expires_in"), "{err}");
    }

    #[test]
    fn bad_bodies_are_invalid_responses() {
        for (body, why) in [
            ("not json", "not a JSON object"),
            (r#"{"expires_in": 300}"#, "access_token is missing"),
            (r#"{"access_token": 5, "expires_in": 300}"#, "not a string"),
            (r#"{"access_token": "", "expires_in": 300}"#, "empty"),
            (r#"{"access_token": "a\nb", "expires_in": 300}"#, "HTTP header"),
            (r#"{"access_token": "a", "expires_in": -5}"#, "positive"),
            (r#"{"access_token": "a", "expires_in": "x"}"#, "positive"),
            (r#"{"access_token": "a", "expires_in": 300, "token_type": "DPoP"}"#, "not Bearer"),
        ] {
            let err = parse_success(body.as_bytes(), now()).unwrap_err();
            assert!(matches!(err, TokenError::InvalidResponse(_)), "{body}: {err:?}");
            assert!(err.to_string().contains(why), "{body}: {err}");
        }
    }

    #[test]
    fn classifies_keycloak_errors() {
        let c = |status: u16, body: &str| {
            classify_failure(StatusCode::from_u16(status).unwrap(), "u", body.as_bytes(), None, None)
        };
        assert!(matches!(
            c(401, r#"{"error":"invalid_client","error_description":"Invalid client or Invalid client credentials"}"#),
            TokenError::InvalidClient { status: 401, .. }
        ));
        assert!(matches!(c(400, r#"{"error":"unauthorized_client"}"#), TokenError::InvalidClient { status: 400, .. }));
        assert!(matches!(
            c(
                401,
                r#"{"error":"unauthorized_client","error_description":"Client not enabled to retrieve service account"}"#
            ),
            TokenError::ServiceAccountsDisabled { .. }
        ));
        assert!(matches!(c(400, r#"{"error":"invalid_scope"}"#), TokenError::InvalidScope { .. }));
        assert!(matches!(c(404, r#"{"error":"Realm does not exist"}"#), TokenError::NotFound { .. }));
        assert!(matches!(c(503, "busy"), TokenError::ServerError { status: 503, .. }));
        assert!(c(503, "").is_transient());
        assert!(!c(401, "{}").is_transient());
        assert!(matches!(c(302, ""), TokenError::Redirect { status: 302, .. }));
        assert!(matches!(c(403, "<html>"), TokenError::Rejected { status: 403, .. }));
    }

    #[test]
    fn a_429_is_rate_limiting_and_keeps_retry_after() {
        let wait = Some(Duration::from_secs(30));
        let e = classify_failure(StatusCode::TOO_MANY_REQUESTS, "u", b"{}", None, wait);
        assert!(matches!(e, TokenError::RateLimited { .. }), "{e:?}");
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), wait);
        assert!(e.to_string().contains("wait 30s"), "{e}");
        let e = classify_failure(StatusCode::SERVICE_UNAVAILABLE, "u", b"", None, wait);
        assert_eq!(e.retry_after(), wait);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Mon, 30 Nov 2026 10:01:30 GMT", now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("Mon, 30 Nov 2026 09:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn issued_times_are_whole_seconds() {
        let now: Timestamp = "2026-11-30T10:00:00.750Z".parse().unwrap();
        let t = parse_success(br#"{"access_token": "a.b.c", "expires_in": 300}"#, now).unwrap();
        assert_eq!(t.issued_at, "2026-11-30T10:00:00Z".parse::<Timestamp>().unwrap());
        assert_eq!(t.expires_at, "2026-11-30T10:05:00Z".parse::<Timestamp>().unwrap());
    }

    #[test]
    fn keycloak_descriptions_are_cut_and_stripped() {
        let long = "x".repeat(1000);
        let body = serde_json::json!({"error": "invalid_client", "error_description": format!("a\u{7}b{long}")});
        let err = classify_failure(StatusCode::UNAUTHORIZED, "u", body.to_string().as_bytes(), None, None);
        let TokenError::InvalidClient { description: Some(d), .. } = &err else { panic!("{err:?}") };
        assert!(d.starts_with("a?bx") && d.chars().count() == crate::text::MAX_QUOTED_CHARS, "{d}");
    }

    #[test]
    fn basic_auth_form_urlencodes_id_and_secret() {
        let v = basic_auth("my client", &SecretString::from("p@ss:w/rd")).unwrap();
        assert!(v.is_sensitive());
        let decoded = STANDARD.decode(v.to_str().unwrap().strip_prefix("Basic ").unwrap()).unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), "my+client:p%40ss%3Aw%2Frd");
    }

    #[test]
    fn issued_token_debug_is_redacted() {
        let body = serde_json::json!({"access_token": "VERY-SECRET-TOKEN", "expires_in": 300});
        let t = parse_success(body.to_string().as_bytes(), now()).unwrap();
        assert!(!format!("{t:?}").contains("VERY-SECRET-TOKEN"));
    }
}
