//! The process around the controller: [`leader`] election, the HTTP [`probes`] and metrics
//! endpoint, and logging ([`telemetry`]). Nothing here knows of RegistryAccess objects.

pub mod leader;
pub mod probes;
pub mod telemetry;
