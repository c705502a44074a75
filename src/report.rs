//! Stage 4 of a reconcile: the status (written only when it changed), the object's metrics, and
//! the Events its change calls for; and the report of an object that cannot be decoded.

use kube::Resource;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use tracing::warn;

use crate::api::{RegistryAccess, RegistryAccessStatus};
use crate::apply;
use crate::events::{self, Severity};
use crate::failure::Error;
use crate::index::Key;
use crate::reconcile::Context;

/// What a reconcile found, for the report.
pub struct Report<'a> {
    pub status: &'a RegistryAccessStatus,
    /// A new token was written.
    pub issued: bool,
    /// Unix time the held token expires.
    pub expires_at: Option<i64>,
    pub ready: bool,
}

/// Writes the status when it changed, the object's metrics and the Events of the change.
pub async fn object(ctx: &Context, ra: &RegistryAccess, r: Report<'_>) -> Result<(), Error> {
    let key =
        Key::new(ra.meta().namespace.as_deref().unwrap_or_default(), ra.meta().name.as_deref().unwrap_or_default());
    if ra.status.as_ref() != Some(r.status) {
        apply::status(ctx, ra, r.status).await?;
    }
    ctx.metrics.set_object(&key.namespace, &key.name, r.expires_at, r.ready);
    let reference = ra.object_ref(&());
    for notice in events::notices(ra.status.as_ref(), r.status, r.issued) {
        let event = KubeEvent {
            type_: match notice.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: notice.reason,
            note: Some(notice.note),
            action: "RefreshToken".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, "cannot write an Event");
        }
    }
    Ok(())
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
