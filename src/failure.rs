//! The one failure vocabulary: every way a refresh can fail as the condition reason a user sees,
//! a message saying what to fix, and whether it passes by itself; and the Kubernetes API errors
//! that end a reconcile early.

use std::time::Duration;

use crate::keycloak::token::TokenError;

/// Condition reasons: each names what a user can act on.
pub mod reason {
    pub const TOKEN_VALID: &str = "TokenValid";
    pub const TOKEN_EXPIRED: &str = "TokenExpired";
    pub const ISSUING: &str = "Issuing";
    pub const REFRESH_SUCCEEDED: &str = "RefreshSucceeded";
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    pub const CLIENT_SECRET_NOT_FOUND: &str = "ClientSecretNotFound";
    pub const CLIENT_SECRET_KEY_MISSING: &str = "ClientSecretKeyMissing";
    pub const CLIENT_SECRET_NOT_OPTED_IN: &str = "ClientSecretNotOptedIn";
    pub const INSECURE_SERVER: &str = "InsecureServer";
    pub const RENEW_BEFORE_TOO_SHORT: &str = "RenewBeforeTooShort";
    pub const TOKEN_READ_ONCE: &str = "TokenReadOnce";
    pub const PRIVATE_KEY_INVALID: &str = "PrivateKeyInvalid";
    pub const SERVICE_ACCOUNT_NOT_FOUND: &str = "ServiceAccountNotFound";
    pub const SERVICE_ACCOUNT_NOT_OPTED_IN: &str = "ServiceAccountNotOptedIn";
    pub const SERVICE_ACCOUNT_TOKEN_REFUSED: &str = "ServiceAccountTokenRefused";
    pub const REQUIRED_ROLES_MISSING: &str = "RequiredRolesMissing";
    pub const ROLES_NOT_IN_TOKEN: &str = "RolesNotInToken";
    pub const QUEUED_TOO_LONG: &str = "QueuedTooLong";
    pub const RENEW_BEFORE_ADJUSTED: &str = "RenewBeforeAdjusted";
    pub const INVALID_CLIENT_CREDENTIALS: &str = "InvalidClientCredentials";
    pub const SERVICE_ACCOUNTS_DISABLED: &str = "ServiceAccountsDisabled";
    pub const INVALID_SCOPE: &str = "InvalidScope";
    pub const REALM_NOT_FOUND: &str = "RealmNotFound";
    pub const TOKEN_REQUEST_REJECTED: &str = "TokenRequestRejected";
    pub const KEYCLOAK_UNAVAILABLE: &str = "KeycloakUnavailable";
    pub const RATE_LIMITED: &str = "RateLimited";
    /// Rate limited with a `Retry-After` past the held token's expiry: not obeyed that long.
    pub const RATE_LIMITED_PAST_EXPIRY: &str = "RateLimitedPastExpiry";
    pub const TLS_ERROR: &str = "TLSError";
    pub const UNEXPECTED_REDIRECT: &str = "UnexpectedRedirect";
    pub const INVALID_TOKEN_RESPONSE: &str = "InvalidTokenResponse";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SERVER_NOT_ALLOWED: &str = "ServerNotAllowed";
    pub const INVALID_CA_BUNDLE: &str = "InvalidCABundle";
    pub const SECRET_WRITE_FAILED: &str = "SecretWriteFailed";
}

/// Why no token could be had, as the user sees it; the message never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The condition reason, a name from [`reason`].
    pub reason: &'static str,
    /// What went wrong and what to fix.
    pub message: String,
    /// Likely to go away by itself (Keycloak down, busy or rate limiting).
    pub transient: bool,
    /// How long the server asked us to wait before asking again (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl Problem {
    /// A problem someone has to fix (a wrong spec, a missing Secret).
    pub fn fix(reason: &'static str, message: impl Into<String>) -> Self {
        Self { reason, message: message.into(), transient: false, retry_after: None }
    }

    /// A problem that is likely to pass by itself.
    pub fn transient(reason: &'static str, message: impl Into<String>) -> Self {
        Self { reason, message: message.into(), transient: true, retry_after: None }
    }
}

impl From<&TokenError> for Problem {
    fn from(e: &TokenError) -> Self {
        Self {
            reason: reason_for(e),
            message: e.to_string(),
            transient: e.is_transient(),
            retry_after: e.retry_after(),
        }
    }
}

/// The condition reason for a failed token request.
pub fn reason_for(e: &TokenError) -> &'static str {
    match e {
        TokenError::Connect { .. } | TokenError::Timeout { .. } | TokenError::ServerError { .. } => {
            reason::KEYCLOAK_UNAVAILABLE
        }
        TokenError::RateLimited { .. } => reason::RATE_LIMITED,
        TokenError::Tls { .. } => reason::TLS_ERROR,
        TokenError::Redirect { .. } => reason::UNEXPECTED_REDIRECT,
        TokenError::InvalidClient { .. } => reason::INVALID_CLIENT_CREDENTIALS,
        TokenError::ServiceAccountsDisabled { .. } => reason::SERVICE_ACCOUNTS_DISABLED,
        TokenError::InvalidScope { .. } => reason::INVALID_SCOPE,
        TokenError::NotFound { .. } => reason::REALM_NOT_FOUND,
        TokenError::Rejected { .. } => reason::TOKEN_REQUEST_REJECTED,
        TokenError::ResponseTooLarge | TokenError::InvalidResponse(_) => reason::INVALID_TOKEN_RESPONSE,
        TokenError::InvalidCaBundle(_) | TokenError::NoTrustStore(_) => reason::INVALID_CA_BUNDLE,
        TokenError::Assertion(_) => reason::PRIVATE_KEY_INVALID,
    }
}

/// Why a reconcile stopped at the Kubernetes API. Token request failures are not errors here:
/// they are [`Problem`]s and end in a condition. The API server's own message is never shown
/// (admission webhooks can put object content in it): only the HTTP status and reason word.
#[derive(Debug, thiserror::Error, strum::EnumDiscriminants)]
#[strum_discriminants(
    name(ErrorKind),
    derive(strum::IntoStaticStr, strum::EnumIter),
    strum(serialize_all = "snake_case")
)]
pub enum Error {
    #[error("reading token Secret {namespace}/{name}: {}", api_summary(source))]
    ReadTokenSecret { namespace: String, name: String, source: kube::Error },
    #[error("reading client Secret {namespace}/{name}: {}", api_summary(source))]
    ReadClientSecret { namespace: String, name: String, source: kube::Error },
    #[error("reading ServiceAccount {namespace}/{name}: {}", api_summary(source))]
    ReadServiceAccount { namespace: String, name: String, source: kube::Error },
    #[error("reading the CA bundle {kind} {namespace}/{name}: {}", api_summary(source))]
    ReadCaBundle { kind: &'static str, namespace: String, name: String, source: kube::Error },
    #[error("creating token Secret {namespace}/{name}: {}", api_summary(source))]
    CreateSecret { namespace: String, name: String, source: kube::Error },
    #[error("writing token Secret {namespace}/{name}: {}", api_summary(source))]
    ApplySecret { namespace: String, name: String, source: kube::Error },
    #[error("retiring former token Secret {namespace}/{name}: {}", api_summary(source))]
    RetireSecret { namespace: String, name: String, source: kube::Error },
    #[error("writing status of RegistryAccess {namespace}/{name}: {}", api_summary(source))]
    ApplyStatus { namespace: String, name: String, source: kube::Error },
}

/// A Kubernetes API failure in words of our own: the HTTP status and the API's reason word (a
/// fixed vocabulary such as `Forbidden` or `Conflict`), never the API server's message text.
pub fn api_summary(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            let mut words: Vec<String> = Vec::new();
            if is_word(&status.reason) {
                words.push(status.reason.clone());
            }
            // Field paths name the part of the object refused (e.g. `type`); they are kept only
            // when they look like a field path.
            let fields: Vec<&str> = status
                .details
                .iter()
                .flat_map(|d| d.causes.iter())
                .map(|c| c.field.as_str())
                .filter(|f| is_field_path(f))
                .take(3)
                .collect();
            if !fields.is_empty() {
                words.push(format!("field {}", fields.join(", ")));
            }
            let words = if words.is_empty() { String::new() } else { format!(" ({})", words.join("; ")) };
            let hint = match status.code {
                401 | 403 => ": the operator lacks a permission (see the RBAC table in docs/operations.md)",
                404 => ": it does not exist (any more)",
                409 => ": it was changed at the same time; retried",
                422 => ": the object cannot be changed that way (an immutable field, such as a Secret's type)",
                429 => ": the Kubernetes API is throttling; retried",
                500..=599 => ": the Kubernetes API failed; retried",
                _ => "",
            };
            format!("the Kubernetes API refused it: HTTP {}{words}{hint}", status.code)
        }
        kube::Error::Service(_) | kube::Error::HyperError(_) => {
            "the Kubernetes API did not answer (connection failed or timed out)".to_owned()
        }
        kube::Error::SerdeError(_) | kube::Error::FromUtf8(_) => {
            "the Kubernetes API's answer could not be read".to_owned()
        }
        _ => "the Kubernetes API call could not be made".to_owned(),
    }
}

/// Runs one Kubernetes API call with a time limit: a connection that stops answering fails the
/// call after `limit` instead of holding its reconcile slot. (A read timeout on the client would
/// also close idle pooled connections, and every call would pay a new TLS handshake.)
pub async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(format!("no answer from the Kubernetes API within {limit:?}").into())),
    }
}

/// A reason word of the API's fixed vocabulary (`Forbidden`, `Invalid`, ...).
fn is_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A field path such as `type`, `metadata.labels` or `data[key]`.
fn is_field_path(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_' | '-' | '/'))
}

impl Error {
    /// Every [`Error::kind`], for metrics that start each series at zero: derived from the
    /// variants, so a new stage is never missing.
    pub fn kinds() -> impl Iterator<Item = &'static str> {
        <ErrorKind as strum::IntoEnumIterator>::iter().map(<&'static str>::from)
    }

    /// The stage that failed, as the `kind` label of the reconcile error metric: the variant's
    /// name in snake case (`read_token_secret`, `apply_status`, ...).
    pub fn kind(&self) -> &'static str {
        ErrorKind::from(self).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_the_stages_in_snake_case() {
        let kinds: Vec<&str> = Error::kinds().collect();
        assert_eq!(
            kinds,
            [
                "read_token_secret",
                "read_client_secret",
                "read_service_account",
                "read_ca_bundle",
                "create_secret",
                "apply_secret",
                "retire_secret",
                "apply_status"
            ]
        );
        let e =
            Error::ApplyStatus { namespace: "n".into(), name: "s".into(), source: kube::Error::Service("x".into()) };
        assert_eq!(e.kind(), "apply_status");
    }

    #[test]
    fn api_errors_are_told_without_the_servers_text() {
        let status = kube::core::Status {
            code: 403,
            reason: "Forbidden".into(),
            message: "denied: the webhook says <object content>".into(),
            ..Default::default()
        };
        let e =
            Error::ApplySecret { namespace: "ns".into(), name: "s".into(), source: kube::Error::Api(Box::new(status)) };
        let text = e.to_string();
        assert_eq!(
            text,
            "writing token Secret ns/s: the Kubernetes API refused it: HTTP 403 (Forbidden): the operator lacks a \
             permission (see the RBAC table in docs/operations.md)"
        );
        assert!(!text.contains("webhook"));
        let cause = |field: &str| kube::core::response::StatusCause {
            field: field.into(),
            message: "field is immutable <object content>".into(),
            reason: "FieldValueInvalid".into(),
        };
        let odd = kube::core::Status {
            code: 422,
            reason: "Bad <b>".into(),
            details: Some(kube::core::response::StatusDetails {
                name: "s".into(),
                group: String::new(),
                kind: "secrets".into(),
                uid: String::new(),
                causes: vec![cause("type"), cause("<script>")],
                retry_after_seconds: 0,
            }),
            ..Default::default()
        };
        let text = api_summary(&kube::Error::Api(Box::new(odd)));
        assert!(text.starts_with("the Kubernetes API refused it: HTTP 422 (field type): "), "{text}");
        assert!(!text.contains('<'), "{text}");
    }

    #[test]
    fn keycloak_outages_and_rate_limits_are_transient_and_keep_retry_after() {
        let down = Problem::from(&TokenError::Connect { url: "u".into(), cause: "refused".into() });
        assert_eq!((down.reason, down.transient), (reason::KEYCLOAK_UNAVAILABLE, true));
        let limited =
            Problem::from(&TokenError::RateLimited { url: "u".into(), retry_after: Some(Duration::from_secs(30)) });
        assert_eq!((limited.reason, limited.transient), (reason::RATE_LIMITED, true));
        assert_eq!(limited.retry_after, Some(Duration::from_secs(30)));
        let wrong = Problem::from(&TokenError::InvalidClient { status: 401, error: "x".into(), description: None });
        assert_eq!((wrong.reason, wrong.transient), (reason::INVALID_CLIENT_CREDENTIALS, false));
    }
}
