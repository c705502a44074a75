//! The Keycloak side: what is sent to a token endpoint and what comes back. The token client
//! ([`token`]), client credentials and signed assertions ([`assertion`]), the client Secret's
//! consent rules ([`credentials`]) and the key its fingerprints are made with ([`digest_key`]),
//! JWT claims ([`jwt`]), ServiceAccount tokens minted moments ago ([`minted`]) and CA bundles
//! ([`trust`]).
//!
//! Nothing here writes to the Kubernetes API except the digest key's own Secret, and nothing here
//! knows of reconciles or queues: a request is sent when the issuer says so.

pub mod assertion;
pub mod credentials;
pub mod digest_key;
pub mod jwt;
pub mod minted;
pub mod token;
pub mod trust;
