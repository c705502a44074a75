//! A throw-away certificate authority for the test cluster: serving and client certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use super::Result;

/// A certificate and its private key, PEM-encoded.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

pub struct Ca {
    pub cert: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?.pem();
        Ok(Self { cert, issuer: Issuer::new(params, key) })
    }

    /// A serving certificate for the given DNS names and IP addresses.
    pub fn server(&self, names: &[&str]) -> Result<Pair> {
        let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?.pem();
        Ok(Pair { cert, key: key.serialize_pem() })
    }

    /// A client certificate: Kubernetes reads the user from CN and the groups from O.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<Pair> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?.pem();
        Ok(Pair { cert, key: key.serialize_pem() })
    }
}

/// A fresh ECDSA P-256 key pair for service account tokens: (private key, public key) in PEM.
pub fn signing_key() -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// The key type of a private_key_jwt client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKeyType {
    /// RSA 2048, signing RS256.
    Rsa2048,
    /// ECDSA P-256, signing ES256.
    EcP256,
}

/// A private_key_jwt client's key pair: the private key (PKCS#8 PEM) and a self-signed
/// certificate of its public key (PEM and DER), as a Keycloak client registers it.
pub struct ClientKey {
    pub key_type: ClientKeyType,
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub private_key_pem: String,
    pub certificate_pem: String,
    pub certificate_der: Vec<u8>,
}

impl ClientKey {
    /// The JWS algorithm the key signs with.
    pub fn algorithm(&self) -> jsonwebtoken::Algorithm {
        match self.key_type {
            ClientKeyType::Rsa2048 => jsonwebtoken::Algorithm::RS256,
            ClientKeyType::EcP256 => jsonwebtoken::Algorithm::ES256,
        }
    }

    /// The private key as a signing key for [`jsonwebtoken::encode`].
    pub fn encoding_key(&self) -> Result<jsonwebtoken::EncodingKey> {
        let pem = self.private_key_pem.as_bytes();
        Ok(match self.key_type {
            ClientKeyType::Rsa2048 => jsonwebtoken::EncodingKey::from_rsa_pem(pem)?,
            ClientKeyType::EcP256 => jsonwebtoken::EncodingKey::from_ec_pem(pem)?,
        })
    }

    /// The public key as a JWK Set (one key, with its `alg`), e.g. for Keycloak's `jwks.string`.
    pub fn jwks(&self) -> Result<serde_json::Value> {
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&self.encoding_key()?, self.algorithm())?;
        Ok(serde_json::json!({ "keys": [jwk] }))
    }
}

/// A fresh key pair for a private_key_jwt client, with a self-signed certificate whose common
/// name is `name`. EC keys come from rcgen; RSA keys from the `openssl` command, because rcgen
/// with ring cannot generate RSA keys: without `openssl` this fails, it never skips.
pub fn client_key(key_type: ClientKeyType, name: &str) -> Result<ClientKey> {
    let key = match key_type {
        ClientKeyType::EcP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        ClientKeyType::Rsa2048 => {
            KeyPair::from_pkcs8_pem_and_sign_algo(&rsa_2048_pkcs8_pem()?, &rcgen::PKCS_RSA_SHA256)?
        }
    };
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key)?;
    Ok(ClientKey {
        key_type,
        private_key_pem: key.serialize_pem(),
        certificate_pem: cert.pem(),
        certificate_der: cert.der().to_vec(),
    })
}

/// A new RSA 2048 private key in PKCS#8 PEM, from `openssl genpkey`.
fn rsa_2048_pkcs8_pem() -> Result<String> {
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .output()
        .map_err(|e| format!("cannot run `openssl genpkey` to make an RSA test key (is openssl installed?): {e}"))?;
    if !out.status.success() {
        return Err(format!("openssl genpkey failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)).into());
    }
    let pem = String::from_utf8(out.stdout)?;
    if !pem.starts_with("-----BEGIN PRIVATE KEY-----") {
        return Err("openssl genpkey did not print a PKCS#8 private key".into());
    }
    Ok(pem)
}
