//! Stage 4 of a reconcile: the status (written only when it changed), the object's metrics, and
//! the Events its change calls for; and the report of an object that cannot be decoded.

use kube::api::PostParams;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::{Api, Resource};
use tracing::warn;

use super::Context;
use crate::api::{RegistryAccess, RegistryAccessStatus};
use crate::failure::Error;
use crate::reconcile::apply;
use crate::reconcile::events;
use crate::watch::index::Key;

/// What a reconcile found, for the report.
pub struct Report<'a> {
    pub status: &'a RegistryAccessStatus,
    /// False right after a request was queued: its outcome follows in moments, and the status is
    /// written once, then.
    pub write_status: bool,
    /// A new token was written.
    pub issued: bool,
    /// Unix time the held token expires.
    pub expires_at: Option<i64>,
    pub ready: bool,
    /// Required roles the token lacks (-1: it has no roles claim); `None` without requiredRoles.
    pub missing_roles: Option<i64>,
}

/// Writes the status when it changed, the object's metrics, and the Events of the change (which
/// go with the status write: a status not written announces nothing).
pub async fn object(ctx: &Context, ra: &RegistryAccess, r: Report<'_>) -> Result<(), Error> {
    let key = Key::of(ra);
    ctx.metrics.set_object(&key.namespace, &key.name, r.expires_at, r.ready, r.missing_roles);
    let degraded = r.status.conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True");
    ctx.metrics.set_degraded(&key.namespace, &key.name, degraded.map(|c| c.reason.as_str()));
    let uid = ra.meta().uid.as_deref().unwrap_or_default();
    let digest = digest(r.status);
    if !r.write_status || !status_changed(ctx.states.status_written(uid), ra.status.as_ref(), r.status, digest) {
        return Ok(());
    }
    apply::status(ctx, ra, r.status).await?;
    ctx.states.set_status_written(uid, digest);
    let notices = events::notices(ra.status.as_ref(), r.status, r.issued);
    if !notices.is_empty() {
        let reference = ra.object_ref(&());
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(ctx.client.clone(), &key.namespace);
        for notice in &notices {
            let event = events::event(notice, &reference, &ctx.instance, jiff::Timestamp::now());
            if let Err(e) = crate::failure::within(ctx.api_timeout, api.create(&PostParams::default(), &event)).await {
                warn!(error = %e, "cannot write an Event");
            }
        }
    }
    Ok(())
}

/// Whether `new` differs from the status the object has. The operator's own last write is the
/// truth when there is one: the object read may predate it (the watch has not brought it back
/// yet), in either direction. After a restart there is none, and the object read is compared.
fn status_changed(
    written: Option<u64>,
    stored: Option<&RegistryAccessStatus>,
    new: &RegistryAccessStatus,
    digest: u64,
) -> bool {
    match written {
        Some(last) => last != digest,
        None => stored != Some(new),
    }
}

fn digest(status: &RegistryAccessStatus) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(status).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// An object stored in a form this operator cannot read (another version of the CRD): logged,
/// counted in `registry_access_undecodable_objects`, and left alone until it changes.
pub fn undecodable(ctx: &Context, key: Key, invalid: &InvalidObject) -> Action {
    warn!(
        namespace = %key.namespace,
        name = %key.name,
        error = %invalid.error,
        "RegistryAccess cannot be decoded by this operator version; skipping it until it changes"
    );
    ctx.set_undecodable(key, true);
    Action::await_change()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(reason: &str) -> RegistryAccessStatus {
        RegistryAccessStatus { scope: Some(reason.to_owned()), ..RegistryAccessStatus::default() }
    }

    #[test]
    fn the_last_write_wins_over_a_stale_read() {
        let (old, issuing, fresh) = (status("old"), status("issuing"), status("old"));
        // Issuing was written; the object read still shows the old status, equal to the new one.
        assert!(status_changed(Some(digest(&issuing)), Some(&old), &fresh, digest(&fresh)));
        // The new status was written already; a read that predates it does not write it again.
        assert!(!status_changed(Some(digest(&fresh)), Some(&issuing), &fresh, digest(&fresh)));
        // After a restart the object read is all there is.
        assert!(!status_changed(None, Some(&old), &fresh, digest(&fresh)));
        assert!(status_changed(None, Some(&issuing), &fresh, digest(&fresh)));
    }
}
