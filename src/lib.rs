//! registry-access-operator: keeps a fresh Keycloak client_credentials access token in a Secret
//! for every `RegistryAccess` object.
//!
//! The tree follows one object's way through the operator:
//! - [`watch`]: what the watches have seen (indexes of Secrets and ServiceAccounts, scopes);
//! - [`reconcile`]: one reconcile in four stages, read, decide (pure), apply, report;
//! - [`requests`]: token requests waiting in a fair queue and the issuer that sends them, outside
//!   any reconcile, and what the operator remembers of each object between reconciles;
//! - [`keycloak`]: what is sent to Keycloak and what comes back (the token client, client
//!   assertions, JWT claims, trust);
//! - [`runtime`]: the process around it (leader election, probes, logging).
//!
//! [`controller`] only wires them together. The resource ([`api`]), the token Secret ([`secret`]),
//! the failure vocabulary ([`failure`]), foreign text ([`text`]), the operator's [`policy`] and
//! its [`metrics`] are shared by all; [`reference`] renders the CRD's field reference for the docs.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod failure;
pub mod keycloak;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod reference;
pub mod requests;
pub mod runtime;
pub mod secret;
pub mod text;
pub mod watch;
