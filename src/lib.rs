//! registry-access-operator: keeps a fresh Keycloak client_credentials access token in a Secret
//! for every `RegistryAccess` object.
//!
//! One reconcile ([`reconcile`]) is four stages: [`read`] what the object refers to, [`decide`]
//! (pure) between requesting a token and waiting, [`apply`] the writes, [`report`] the status,
//! metrics and Events. Token requests wait in the [`queue`] and are sent by the [`issuer`], never
//! in a reconcile. [`controller`] only wires watches, [`index`]es and the issuer together.
#![forbid(unsafe_code)]

pub mod api;
pub mod apply;
pub mod assertion;
pub mod controller;
pub mod credentials;
pub mod decide;
pub mod digest_key;
pub mod events;
pub mod failure;
pub mod index;
pub mod issuer;
pub mod jwt;
pub mod leader;
pub mod metrics;
pub mod minted;
pub mod policy;
pub mod probes;
pub mod queue;
pub mod read;
pub mod reconcile;
pub mod reference;
pub mod report;
pub mod schedule;
pub mod scopes;
pub mod secret;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod text;
pub mod token;
pub mod trust;
