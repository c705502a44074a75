//! Decoding of the claims the operator reads from an access token (expiry, realm roles, scope).
//!
//! The operator is not the token's audience and does not verify its signature: it only reads the
//! payload to learn when the token expires and what it grants, for the status. Every malformed
//! input is an error, never a panic.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// Largest payload segment the decoder accepts (the token response itself is capped at 1 MiB).
const MAX_PAYLOAD_LEN: usize = 1 << 20;
/// At most this many roles are kept for the status; a token with more is still accepted.
pub const MAX_ROLES: usize = 64;

/// The claims of an access token that the operator uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// `exp`, seconds since the Unix epoch.
    pub exp: Option<i64>,
    /// `iat`, seconds since the Unix epoch.
    pub iat: Option<i64>,
    /// `realm_access.roles`.
    pub realm_roles: Vec<String>,
    /// The token has a `realm_access` claim (lightweight access tokens have none).
    pub roles_claim: bool,
    /// `scope`.
    pub scope: Option<String>,
    /// `iss`, `azp` (or `client_id`), `sub` and `aud`: who issued the token to whom, for
    /// `kubectl registry-access inspect`.
    pub issuer: Option<String>,
    pub client: Option<String>,
    pub subject: Option<String>,
    pub audience: Vec<String>,
}

/// Why a token's claims could not be read. Messages never contain the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the access token is not a JWT (expected three dot-separated parts)")]
    NotAJwt,
    #[error("the access token's payload is larger than {MAX_PAYLOAD_LEN} bytes")]
    TooLarge,
    #[error("the access token's payload is not valid base64url")]
    Base64,
    #[error("the access token's payload is not a JSON object: {0}")]
    Json(String),
}

#[derive(Deserialize)]
struct RawClaims {
    exp: Option<NumericDate>,
    iat: Option<NumericDate>,
    realm_access: Option<RealmAccess>,
    scope: Option<serde_json::Value>,
    iss: Option<serde_json::Value>,
    azp: Option<serde_json::Value>,
    client_id: Option<serde_json::Value>,
    sub: Option<serde_json::Value>,
    aud: Option<serde_json::Value>,
}

/// Longest issuer, client, subject or audience kept (each); longer ones are cut.
const MAX_NAME_CHARS: usize = 256;
/// At most this many audiences are kept.
const MAX_AUDIENCES: usize = 16;

/// A claim that should be a string, cleaned of control characters; anything else is absent.
fn name(v: Option<&serde_json::Value>) -> Option<String> {
    v.and_then(serde_json::Value::as_str).map(|s| crate::text::foreign(s, MAX_NAME_CHARS))
}

#[derive(Deserialize)]
struct RealmAccess {
    #[serde(default)]
    roles: Vec<serde_json::Value>,
}

/// A JSON number of seconds; RFC 7519 allows fractions.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumericDate {
    Int(i64),
    Float(f64),
}

impl NumericDate {
    fn seconds(&self) -> Option<i64> {
        match *self {
            Self::Int(i) => Some(i),
            Self::Float(f) if f.is_finite() && f.abs() < 1e15 => Some(f.trunc() as i64),
            Self::Float(_) => None,
        }
    }
}

/// Reads the claims of a compact-serialized JWT without verifying its signature.
pub fn decode_claims(token: &str) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::NotAJwt);
    };
    if payload.len() > MAX_PAYLOAD_LEN * 4 / 3 + 4 {
        return Err(JwtError::TooLarge);
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).map_err(|_| JwtError::Base64)?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| JwtError::Json(e.classify_message()))?;
    if !value.is_object() {
        return Err(JwtError::Json("the payload is not an object".to_owned()));
    }
    let raw = RawClaims::deserialize(value).map_err(|e| JwtError::Json(e.classify_message()))?;
    Ok(Claims {
        roles_claim: raw.realm_access.is_some(),
        exp: raw.exp.as_ref().and_then(NumericDate::seconds),
        iat: raw.iat.as_ref().and_then(NumericDate::seconds),
        realm_roles: raw
            .realm_access
            .map(|ra| {
                ra.roles
                    .into_iter()
                    .filter_map(|r| r.as_str().map(|r| crate::text::foreign(r, crate::text::MAX_ROLE_CHARS)))
                    .take(MAX_ROLES)
                    .collect()
            })
            .unwrap_or_default(),
        scope: raw.scope.and_then(|s| s.as_str().map(|s| crate::text::foreign(s, crate::text::MAX_SCOPE_CHARS))),
        issuer: name(raw.iss.as_ref()),
        client: name(raw.azp.as_ref()).or_else(|| name(raw.client_id.as_ref())),
        subject: name(raw.sub.as_ref()),
        audience: match raw.aud {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| name(Some(v))).take(MAX_AUDIENCES).collect(),
            one => name(one.as_ref()).into_iter().collect(),
        },
    })
}

/// A short, secret-free description of a serde_json error (its category and position).
trait ClassifyMessage {
    fn classify_message(&self) -> String;
}

impl ClassifyMessage for serde_json::Error {
    fn classify_message(&self) -> String {
        // serde_json's Display may quote parts of the input; keep only category and position.
        format!("{:?} error at line {} column {}", self.classify(), self.line(), self.column())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds an unsigned compact JWT with the given payload, as tests need.
    pub(crate) fn jwt(payload: &serde_json::Value) -> String {
        let enc = |v: &[u8]| URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            enc(br#"{"alg":"RS256","typ":"JWT"}"#),
            enc(payload.to_string().as_bytes()),
            enc(b"signature")
        )
    }

    #[test]
    fn reads_keycloak_claims() {
        let token = jwt(&serde_json::json!({
            "exp": 1657295325, "iat": 1657295025,
            "realm_access": {"roles": ["trembita-invoker"]},
            "scope": "profile email",
        }));
        let c = decode_claims(&token).unwrap();
        assert_eq!(c.exp, Some(1657295325));
        assert_eq!(c.iat, Some(1657295025));
        assert_eq!(c.realm_roles, vec!["trembita-invoker"]);
        assert_eq!(c.scope.as_deref(), Some("profile email"));
    }

    #[test]
    fn reads_who_issued_the_token_to_whom() {
        let c = decode_claims(&jwt(&serde_json::json!({
            "iss": "https://kc/realms/r", "client_id": "c", "sub": "u", "aud": ["account", 7, "x\u{1b}[2J"],
        })))
        .unwrap();
        assert_eq!(c.issuer.as_deref(), Some("https://kc/realms/r"));
        assert_eq!(c.client.as_deref(), Some("c"));
        assert_eq!(c.subject.as_deref(), Some("u"));
        assert_eq!(c.audience, vec!["account", "x?[2J"]);
        let c = decode_claims(&jwt(&serde_json::json!({"azp": "a", "client_id": "c", "aud": "one"}))).unwrap();
        assert_eq!((c.client.as_deref(), c.audience), (Some("a"), vec!["one".to_owned()]));
    }

    #[test]
    fn decodes_the_documented_example_token() {
        // The example response in the platform's documentation (payload only; the signature is theirs).
        let payload = "eyJleHAiOjE2NTcyOTUzMjUsImlhdCI6MTY1NzI5NTAyNSwicmVhbG1fYWNjZXNzIjp7InJvbGVzIjpbInRyZW1iaXRhLWludm9rZXIiXX0sInNjb3BlIjoicHJvZmlsZSBlbWFpbCJ9";
        let c = decode_claims(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig")).unwrap();
        assert_eq!(c.exp, Some(1657295325));
        assert_eq!(c.realm_roles, vec!["trembita-invoker"]);
    }

    #[test]
    fn missing_claims_are_none() {
        let c = decode_claims(&jwt(&serde_json::json!({}))).unwrap();
        assert_eq!(c, Claims::default());
    }

    #[test]
    fn fractional_and_wrongly_typed_claims_do_not_panic() {
        let c = decode_claims(&jwt(&serde_json::json!({
            "exp": 1.5e9, "realm_access": {"roles": ["a", 1, null, {"x": 1}]}, "scope": ["not", "a", "string"],
        })))
        .unwrap();
        assert_eq!(c.exp, Some(1_500_000_000));
        assert_eq!(c.realm_roles, vec!["a"]);
        assert_eq!(c.scope, None);
        assert!(decode_claims(&jwt(&serde_json::json!({"exp": "soon"}))).is_err());
        assert!(decode_claims(&jwt(&serde_json::json!({"exp": 1e300}))).unwrap().exp.is_none());
    }

    #[test]
    fn malformed_tokens_are_errors() {
        assert_eq!(decode_claims("opaque-token"), Err(JwtError::NotAJwt));
        assert_eq!(decode_claims("a.b.c.d"), Err(JwtError::NotAJwt));
        assert_eq!(decode_claims("a.!!!.c"), Err(JwtError::Base64));
        assert!(matches!(decode_claims(&format!("a.{}.c", URL_SAFE_NO_PAD.encode(b"[1,2]"))), Err(JwtError::Json(_))));
        assert!(matches!(
            decode_claims(&format!("a.{}.c", URL_SAFE_NO_PAD.encode([0xff, 0xfe]))),
            Err(JwtError::Json(_))
        ));
    }

    #[test]
    fn error_messages_do_not_echo_the_payload() {
        let secretish = URL_SAFE_NO_PAD.encode(br#"{"exp": "SECRET-VALUE-123"#);
        let err = decode_claims(&format!("h.{secretish}.s")).unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }
}
