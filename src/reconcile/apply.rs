//! Stage 3 of a reconcile, writes only: the token Secret and the status, each with server-side
//! apply under the operator's one field manager, each within the API time limit.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::Context;
use crate::api::{RegistryAccess, RegistryAccessStatus};
use crate::failure::{Error, within};
use crate::secret::{MANAGED_BY_LABEL, MANAGER, RETIRED_ANNOTATION};

/// Applies the token Secret; returns its new resourceVersion. With `create`, the Secret was not
/// there when it was read: it is first created, empty but for what the operator always sets (its
/// label and owner), with a create that fails if the Secret exists by now. So a Secret someone
/// else created since the read is never taken over: the next reconcile finds it foreign.
pub async fn token_secret(ctx: &Context, ra: &RegistryAccess, desired: &Secret, create: bool) -> Result<String, Error> {
    let (namespace, name) = (ra.namespace().unwrap_or_default(), ra.token_secret_name());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    if create {
        let husk = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())].into()),
                owner_references: ra.controller_owner_ref(&()).map(|r| vec![r]),
                ..Default::default()
            },
            type_: desired.type_.clone(),
            ..Default::default()
        };
        let params = PostParams { field_manager: Some(MANAGER.to_owned()), ..PostParams::default() };
        within(ctx.api_timeout, api.create(&params, &husk)).await.map_err(|source| Error::CreateSecret {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    }
    let written =
        within(ctx.api_timeout, api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(desired)))
            .await
            .map_err(|source| Error::ApplySecret { namespace, name, source })?;
    Ok(written.resource_version().unwrap_or_default())
}

/// Retires a former token Secret of `ra`: applies it with the operator's labels, owner and a
/// retired annotation only, so that server-side apply removes the token keys and annotations the
/// operator had set (keys someone else added stay).
pub async fn retire_secret(ctx: &Context, ra: &RegistryAccess, name: &str, successor: &str) -> Result<(), Error> {
    let namespace = ra.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let husk = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGER},
            "annotations": {RETIRED_ANNOTATION: format!("replaced by Secret {successor} (spec.secret.name)")},
            "ownerReferences": ra.controller_owner_ref(&()).map(|r| vec![r]),
        },
        "type": "Opaque",
    });
    within(ctx.api_timeout, api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&husk)))
        .await
        .map_err(|source| Error::RetireSecret { namespace, name: name.to_owned(), source })?;
    Ok(())
}

/// Applies the status.
pub async fn status(ctx: &Context, ra: &RegistryAccess, status: &RegistryAccessStatus) -> Result<(), Error> {
    let (namespace, name) = (ra.namespace().unwrap_or_default(), ra.name_any());
    let api: Api<RegistryAccess> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": RegistryAccess::api_version(&()),
        "kind": RegistryAccess::kind(&()),
        "status": status,
    });
    within(ctx.api_timeout, api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)))
        .await
        .map_err(|source| Error::ApplyStatus { namespace, name, source })?;
    Ok(())
}
