//! What the watches have seen: the keyed [`index`]es of Secrets and ServiceAccounts the objects
//! name, the [`scopes`] that merge the watches of several namespaces into one stream, and the
//! [`relist`] catalogue they use to find what vanished while a watch was away; and the [`pods`]
//! of namespaces with objects, as far as token delivery needs them.
//!
//! Only watch events (and reads that fill in a missed object) change what is kept here; nothing
//! here writes to the Kubernetes API.

pub mod index;
pub mod pods;
pub mod relist;
pub mod scopes;
