//! Kubernetes helpers of the end-to-end tests: namespaces, Secrets, RegistryAccess objects, and
//! waiting for what the operator writes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use registry_access_operator::api::{
    CLIENT_SECRET_LABEL, KEYCLOAK_ISSUERS_ANNOTATION, RegistryAccess, RegistryAccessStatus,
};
use serde_json::Value;

use super::Result;

/// Field manager of the tests' own writes.
const TEST_MANAGER: &str = "e2e-test";

pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// Creates or updates a ServiceAccount; with `issuers`, annotated so that the operator may
/// present its tokens to those Keycloak issuers.
pub async fn put_service_account(client: &Client, ns: &str, name: &str, issuers: Option<&str>) -> Result<()> {
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(name.to_owned());
    if let Some(issuers) = issuers {
        sa.metadata.annotations = Some([(KEYCLOAK_ISSUERS_ANNOTATION.to_owned(), issuers.to_owned())].into());
    }
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    api.patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&sa)).await?;
    Ok(())
}

pub async fn create_service_account(client: &Client, ns: &str, name: &str) -> Result<()> {
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns).create(&PostParams::default(), &sa).await?;
    Ok(())
}

/// A token of the ServiceAccount `ns`/`name` from the TokenRequest API, for exactly the given
/// audience, asking for `expiration_secs` (the API server refuses less than 600 and may give
/// less than asked).
pub async fn service_account_token(
    client: &Client,
    ns: &str,
    name: &str,
    audience: &str,
    expiration_secs: i64,
) -> Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(expiration_secs),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let response = api.create_token_request(name, &PostParams::default(), &request).await?;
    let status = response.status.ok_or("TokenRequest answered without a status")?;
    Ok(status.token)
}

/// Creates or replaces a Secret with the given string data.
pub async fn put_secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) -> Result<()> {
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_owned());
    s.data = Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect());
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    api.patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&s)).await?;
    Ok(())
}

/// Creates or replaces a client Secret: [`put_secret`] with the opt-in label that lets the
/// operator send its value to Keycloak.
pub async fn put_client_secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) -> Result<()> {
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_owned());
    s.metadata.labels = Some([(CLIENT_SECRET_LABEL.to_owned(), "true".to_owned())].into());
    s.data = Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect());
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    api.patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&s)).await?;
    Ok(())
}

/// The data of a Secret as strings, if it exists.
pub async fn secret_data(client: &Client, ns: &str, name: &str) -> Result<Option<BTreeMap<String, String>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    Ok(api.get_opt(name).await?.map(|s| {
        s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned())).collect()
    }))
}

/// Creates or updates a RegistryAccess from its spec (JSON).
pub async fn apply_ra(client: &Client, ns: &str, name: &str, spec: Value) -> Result<()> {
    let obj = serde_json::json!({
        "apiVersion": "registry-access.io/v1alpha1",
        "kind": "RegistryAccess",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    });
    let api: Api<RegistryAccess> = Api::namespaced(client.clone(), ns);
    api.patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&obj)).await?;
    Ok(())
}

pub async fn ra_status(client: &Client, ns: &str, name: &str) -> Result<Option<RegistryAccessStatus>> {
    let api: Api<RegistryAccess> = Api::namespaced(client.clone(), ns);
    Ok(api.get_opt(name).await?.and_then(|r| r.status))
}

/// (status, reason, message) of a condition.
pub fn condition(status: &RegistryAccessStatus, type_: &str) -> Option<(String, String, String)> {
    status.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the object's condition has the given status and reason; returns the status.
pub async fn wait_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
    timeout: Duration,
) -> Result<RegistryAccessStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = ra_status(client, ns, name).await?;
        if let Some(s) = s.as_ref()
            && condition(s, type_).is_some_and(|(st, re, _)| st == status && re == reason)
        {
            return Ok(s.clone());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "timed out after {timeout:?} waiting for {ns}/{name} {type_}={status} ({reason}); last conditions: {:?}",
                s.map(|s| s.conditions)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
