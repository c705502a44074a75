//! Client credentials as presented to Keycloak's token endpoint: a client secret, or a JWT
//! assertion (RFC 7523) signed with the client secret or the client's private key, or a
//! Kubernetes ServiceAccount token. Assertions are made fresh for each request, just before it
//! is sent, and never stored.

use std::sync::Arc;

use jiff::Timestamp;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// `client_assertion_type` of a JWT assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of an assertion: Keycloak refuses ones issued more than 60 s before use by default.
const ASSERTION_LIFETIME_SECS: i64 = 60;

/// How a request authenticates the client.
#[derive(Clone)]
pub enum Credential {
    /// `client_secret_post`: client_id and client_secret in the form.
    SecretPost(SecretString),
    /// `client_secret_basic`: HTTP Basic.
    SecretBasic(SecretString),
    /// `client_secret_jwt`: an HS256 assertion made with the client secret.
    SecretJwt(SecretString),
    /// `private_key_jwt`: an assertion signed with the client's private key.
    PrivateKey(Arc<SigningKey>),
    /// `service_account`: a ServiceAccount token, sent as the assertion without client_id, and
    /// when it was minted.
    ServiceAccountToken(SecretString, std::time::Instant),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Self::SecretPost(_) => "SecretPost",
            Self::SecretBasic(_) => "SecretBasic",
            Self::SecretJwt(_) => "SecretJwt",
            Self::PrivateKey(_) => "PrivateKey",
            Self::ServiceAccountToken(..) => "ServiceAccountToken",
        };
        write!(f, "Credential::{kind}(..)")
    }
}

/// A private key ready to sign assertions, with the algorithm it signs with.
pub struct SigningKey {
    key: EncodingKey,
    alg: Algorithm,
    kid: Option<String>,
}

impl SigningKey {
    /// Reads a PEM private key: RSA (PKCS#1 or PKCS#8, signs RS256) or EC P-256 / P-384
    /// (PKCS#8, ES256 / ES384). The key is tried by signing a test assertion, so an unusable key
    /// is found here, not when a request is due. The error never contains key material.
    pub fn from_pem(pem: &str, kid: Option<String>) -> Result<Self, String> {
        let candidates = [
            (EncodingKey::from_rsa_pem(pem.as_bytes()), Algorithm::RS256),
            (EncodingKey::from_ec_pem(pem.as_bytes()), Algorithm::ES256),
            (EncodingKey::from_ec_pem(pem.as_bytes()), Algorithm::ES384),
        ];
        for (key, alg) in candidates {
            let Ok(key) = key else { continue };
            let candidate = Self { key, alg, kid: kid.clone() };
            if candidate.sign("probe", "probe", Timestamp::UNIX_EPOCH).is_ok() {
                return Ok(candidate);
            }
        }
        Err("not a PEM private key the operator can sign with (RSA in PKCS#1 or PKCS#8, or EC P-256/P-384 in PKCS#8)"
            .to_owned())
    }

    /// The algorithm the key signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    fn sign(&self, client_id: &str, audience: &str, now: Timestamp) -> Result<SecretString, String> {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        encode(&header, &claims(client_id, audience, now), &self.key)
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: i64,
    exp: i64,
}

fn claims<'a>(client_id: &'a str, audience: &'a str, now: Timestamp) -> Claims<'a> {
    let jti = hex::encode(rand::random::<[u8; 16]>());
    let iat = now.as_second();
    Claims { iss: client_id, sub: client_id, aud: audience, jti, iat, exp: iat + ASSERTION_LIFETIME_SECS }
}

fn encode(header: &Header, claims: &Claims<'_>, key: &EncodingKey) -> Result<SecretString, String> {
    jsonwebtoken::encode(header, claims, key)
        .map(SecretString::from)
        .map_err(|e| format!("cannot sign the client assertion: {e}"))
}

/// A fresh assertion for `client_id` and `audience` (the realm's issuer): `iss` = `sub` = the
/// client id, a unique `jti`, `exp` 60 s after `now`. `None` for the credentials that are not
/// made into an assertion here (secrets sent as they are, ServiceAccount tokens).
pub fn assertion(
    credential: &Credential,
    client_id: &str,
    audience: &str,
    now: Timestamp,
) -> Option<Result<SecretString, String>> {
    match credential {
        Credential::SecretJwt(secret) => {
            let key = EncodingKey::from_secret(secret.expose_secret().as_bytes());
            Some(encode(&Header::new(Algorithm::HS256), &claims(client_id, audience, now), &key))
        }
        Credential::PrivateKey(key) => Some(key.sign(client_id, audience, now)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};

    #[derive(serde::Deserialize)]
    struct Decoded {
        iss: String,
        sub: String,
        aud: String,
        jti: String,
        iat: i64,
        exp: i64,
    }

    fn verify(token: &str, key: &DecodingKey, alg: Algorithm) -> Decoded {
        let mut v = Validation::new(alg);
        v.set_audience(&["https://kc.example.com/auth/realms/r"]);
        v.validate_exp = false;
        decode::<Decoded>(token, key, &v).unwrap().claims
    }

    #[test]
    fn a_client_secret_jwt_is_fresh_and_short_lived() {
        let secret = SecretString::from("s3cret");
        let cred = Credential::SecretJwt(secret);
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let aud = "https://kc.example.com/auth/realms/r";
        let a = assertion(&cred, "client", aud, now).unwrap().unwrap();
        let b = assertion(&cred, "client", aud, now).unwrap().unwrap();
        let (a, b) = (a.expose_secret().to_owned(), b.expose_secret().to_owned());
        let key = DecodingKey::from_secret(b"s3cret");
        let (ca, cb) = (verify(&a, &key, Algorithm::HS256), verify(&b, &key, Algorithm::HS256));
        assert_eq!((ca.iss.as_str(), ca.sub.as_str(), ca.aud.as_str()), ("client", "client", aud));
        assert_eq!((ca.iat, ca.exp), (1_700_000_000, 1_700_000_060));
        assert_ne!(ca.jti, cb.jti, "each assertion is single-use");
        assert!(!a.contains("s3cret"));
    }

    #[test]
    fn an_unusable_key_is_refused_without_echoing_it() {
        let e =
            SigningKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", None).err().unwrap();
        assert!(!e.contains("AAAA"), "{e}");
        assert!(SigningKey::from_pem("", None).is_err());
        assert!(format!("{:?}", Credential::SecretPost(SecretString::from("x"))).ends_with("(..)"));
    }

    #[test]
    fn an_ec_key_signs_es256_with_its_kid() {
        let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let pem = pem.as_str();
        let key = SigningKey::from_pem(pem, Some("k1".into())).unwrap();
        assert_eq!(key.algorithm(), Algorithm::ES256);
        let cred = Credential::PrivateKey(Arc::new(key));
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let token = assertion(&cred, "client", "https://kc.example.com/auth/realms/r", now).unwrap().unwrap();
        let header = jsonwebtoken::decode_header(token.expose_secret()).unwrap();
        assert_eq!((header.alg, header.kid.as_deref()), (Algorithm::ES256, Some("k1")));
        let sa = Credential::ServiceAccountToken(SecretString::from("t"), std::time::Instant::now());
        assert!(assertion(&sa, "c", "a", now).is_none());
    }
}
