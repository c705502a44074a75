//! Token requests between a reconcile and Keycloak: the fair [`queue`] (pure, on the caller's
//! clock), the [`issuer`] that sends what the queue releases, and the per-object [`state`] a
//! result is recorded in until the next reconcile reads it.
//!
//! A reconcile only queues here and never waits for Keycloak; nothing here writes to the
//! Kubernetes API: an outcome comes back as another reconcile of the object.

pub mod issuer;
pub mod queue;
pub mod state;
