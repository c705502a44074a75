//! registry-access-operator: keeps a fresh Keycloak client_credentials access token in a Secret
//! for every `RegistryAccess` object.
//!
//! The pipeline of one reconcile: [`controller`] reads the token Secret and the client Secret,
//! [`decide`] chooses (pure) between requesting a token and waiting, [`token`] talks to Keycloak,
//! [`secret`] and [`status`] build (pure) what is written back.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod credentials;
pub mod decide;
pub mod events;
pub mod jwt;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod probes;
pub mod schedule;
pub mod secret;
pub mod status;
pub mod telemetry;
pub mod token;
pub mod trust;
