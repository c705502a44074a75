//! Client authentication without a client secret: ServiceAccount tokens (federated-jwt) and signed
//! JWT assertions.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;

use crate::support::case::*;
use crate::support::k8s::{self, condition, wait_condition};
use crate::support::keycloak::{self, REALM, ROLE};
use crate::support::pki::ClientKeyType;
use crate::support::{self, Env, Result};

/// The environment itself, without the operator: Keycloak accepts as client credentials a
/// ServiceAccount token from the cluster's TokenRequest API (`federated-jwt`, the realm's
/// Kubernetes identity provider reading the API server's keys anonymously over TLS), and
/// assertions signed with an EC and an RSA private key (`client-jwt`) or with a client secret
/// (`client-secret-jwt`); no client_id is sent.
pub async fn environment_supports_secretless_client_authentication(env: Arc<Env>) -> Result<()> {
    use crate::support::pki::client_key;
    let kc = &env.keycloak;
    let audience = kc.issuer(REALM);
    let client = env.cluster.client().await?;
    let ns = "e2e-secretless-environment";
    k8s::create_namespace(&client, ns).await?;
    k8s::create_service_account(&client, ns, "registry-client").await?;

    // A grant with `assertion`, verified; checks the token's `azp` and Keycloak's recorded method.
    let grant = |client_id: String, assertion: String, method: &'static str| async move {
        let response = kc.grant_with_assertion(REALM, &assertion).await?;
        let claims = verified_claims(kc, response["access_token"].as_str().ok_or("no access_token")?).await?;
        assert_eq!(claims["azp"], client_id.as_str(), "{method}");
        let roles = claims["realm_access"]["roles"].as_array().cloned().unwrap_or_default();
        assert!(roles.iter().any(|r| r == ROLE), "{method}: roles {roles:?}");
        let events = kc.grant_events(REALM, &client_id).await?;
        assert_eq!(events.len(), 1, "{method}: {events:?}");
        assert_eq!(events[0]["details"]["client_auth_method"], method, "{events:?}");
        Result::Ok(())
    };

    let federated = unique("federated");
    kc.create_federated_client(REALM, &federated, ns, "registry-client", None).await?;
    let sa_token = k8s::service_account_token(&client, ns, "registry-client", &audience, 600).await?;
    grant(federated, sa_token, "federated-jwt").await?;

    for key_type in [ClientKeyType::EcP256, ClientKeyType::Rsa2048] {
        let key = client_key(key_type, "registry-client")?;
        let client_id = unique(&format!("{key_type:?}").to_lowercase());
        kc.create_private_key_jwt_client(REALM, &client_id, &key, None).await?;
        let assertion = keycloak::client_assertion(&client_id, &audience, key.algorithm(), &key.encoding_key()?)?;
        grant(client_id, assertion, "client-jwt").await?;
    }

    let client_id = unique("secret-jwt");
    let info = kc.create_client_secret_jwt_client(REALM, &client_id, None).await?;
    let secret = jsonwebtoken::EncodingKey::from_secret(info.secret.as_bytes());
    let assertion = keycloak::client_assertion(&client_id, &audience, jsonwebtoken::Algorithm::HS256, &secret)?;
    grant(client_id, assertion, "client-secret-jwt").await?;
    Ok(())
}

/// A ServiceAccount, opted in with its annotation, authenticates the client: no secret is stored
/// anywhere, Keycloak says federated-jwt, tokens are refreshed over several lifetimes; a recreated
/// ServiceAccount gets a new token; a deleted one keeps the last token and says why.
pub async fn service_account_authenticates_without_any_secret(env: Arc<Env>) -> Result<()> {
    let (c, port) = Case::with_metrics(env, "federated", &["--kubelet-sync-period=0s"]).await?;
    let issuer = c.kc().issuer(REALM);
    k8s::put_service_account(&c.client, &c.ns, "registry-client", Some(&issuer)).await?;
    let client_id = unique("federated");
    c.kc().create_federated_client(REALM, &client_id, &c.ns, "registry-client", Some(20)).await?;
    let spec = |sa: &str, client_id: &str| {
        json!({
            "server": c.kc().base_url, "realm": REALM, "clientId": client_id,
            "clientAuthMethod": "service_account", "serviceAccountRef": {"name": sa},
            "requiredRoles": [ROLE],
        })
    };
    c.ra("fed", spec("registry-client", &client_id)).await?;
    let status = c.ready("fed").await?;
    assert!(status.granted_roles.iter().any(|r| r == ROLE), "{:?}", status.granted_roles);
    let first = c.access_token("fed-token").await?;
    let claims = verified_claims(c.kc(), &first).await?;
    assert_eq!(claims["azp"], client_id.as_str());
    let events = c.kc().grant_events(REALM, &client_id).await?;
    assert!(
        events.iter().all(|e| e["details"]["client_auth_method"] == "federated-jwt"),
        "Keycloak's events: {events:?}"
    );
    // Nothing secret is stored: the namespace's only Secret is the token Secret.
    let secrets: Vec<String> = Api::<Secret>::namespaced(c.client.clone(), &c.ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(secrets, ["fed-token"], "Secrets in the namespace");

    // Refreshed over two lifetimes of 20 s tokens.
    let mut seen = BTreeSet::from([first.clone()]);
    let t = Instant::now();
    while seen.len() < 3 {
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!("only {} tokens in 60 s of 20 s tokens", seen.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen.insert(c.access_token("fed-token").await?);
    }

    // Not opted in: its reason, no TokenRequest, no grant (a Keycloak client for it exists).
    k8s::put_service_account(&c.client, &c.ns, "plain", None).await?;
    let plain_client = unique("plain");
    c.kc().create_federated_client(REALM, &plain_client, &c.ns, "plain", None).await?;
    let minted = |text: &str| sample(text, "registry_access_service_account_token_requests_total").unwrap_or(0.0);
    let before = minted(&scrape_until(port, "metrics", |_| true).await?);
    c.ra("plain", spec("plain", &plain_client)).await?;
    let s = wait_condition(
        &c.client,
        &c.ns,
        "plain",
        "Ready",
        "False",
        "ServiceAccountNotOptedIn",
        Duration::from_secs(30),
    )
    .await?;
    let message = condition(&s, "Ready").ok_or("no Ready")?.2;
    assert!(message.contains("kubectl annotate serviceaccount plain"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        minted(&scrape_until(port, "metrics", |_| true).await?),
        before,
        "a TokenRequest for a ServiceAccount that did not opt in"
    );
    assert_eq!(c.kc().grants(REALM, &plain_client).await?, 0);

    // A Keycloak client bound to another ServiceAccount refuses this one's token.
    k8s::put_service_account(&c.client, &c.ns, "other", Some(&issuer)).await?;
    c.ra("other", spec("other", &client_id)).await?;
    wait_condition(&c.client, &c.ns, "other", "Ready", "False", "InvalidClientCredentials", Duration::from_secs(30))
        .await?;

    // Deleted: the last token stays, the reason says why; recreated: a new token at once.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(c.client.clone(), &c.ns);
    sas.delete("registry-client", &DeleteParams::default()).await?;
    let kept = c.access_token("fed-token").await?;
    wait_condition(&c.client, &c.ns, "fed", "Degraded", "True", "ServiceAccountNotFound", Duration::from_secs(30))
        .await?;
    assert!(
        c.access_token("fed-token").await? == kept || c.token_secret("fed-token").await?.is_some(),
        "the token Secret was removed"
    );
    let grants_before = c.kc().grants(REALM, &client_id).await?;
    k8s::put_service_account(&c.client, &c.ns, "registry-client", Some(&issuer)).await?;
    wait_until("a token for the recreated ServiceAccount", Duration::from_secs(15), || async {
        c.kc().grants(REALM, &client_id).await.is_ok_and(|g| g > grants_before)
    })
    .await?;
    c.ready("fed").await?;
    c.finish().await
}

/// private_key_jwt with an EC and an RSA key, client_secret_jwt; a wrong key and an unparsable
/// one get their reasons. Each assertion is single-use in Keycloak: refreshes prove they are fresh.
pub async fn signed_jwt_client_authentication(env: Arc<Env>) -> Result<()> {
    let c = Case::with_operator_args(env, "signed-jwt", &["--kubelet-sync-period=0s"]).await?;
    let mut clients = Vec::new();
    for (kind, name) in [(ClientKeyType::EcP256, "ec"), (ClientKeyType::Rsa2048, "rsa")] {
        let key = support::pki::client_key(kind, name)?;
        let client_id = unique(&format!("pkjwt-{name}"));
        c.kc().create_private_key_jwt_client(REALM, &client_id, &key, Some(20)).await?;
        for line in key.private_key_pem.lines().filter(|l| l.len() > 40) {
            c.sensitive(line);
        }
        let secret = format!("{name}-key");
        k8s::put_client_secret(&c.client, &c.ns, &secret, &[("tls.key", &key.private_key_pem)]).await?;
        c.ra(
            name,
            json!({
                "server": c.kc().base_url, "realm": REALM, "clientId": client_id,
                "clientAuthMethod": "private_key_jwt", "privateKeyRef": {"name": secret},
            }),
        )
        .await?;
        clients.push((name, client_id, key));
    }
    let jwt = c.kc().create_client_secret_jwt_client(REALM, &unique("csjwt"), None).await?;
    c.client_secret("csjwt-creds", &jwt.secret).await?;
    c.ra(
        "csjwt",
        json!({
            "server": c.kc().base_url, "realm": REALM, "clientId": jwt.client_id,
            "clientAuthMethod": "client_secret_jwt", "clientSecretRef": {"name": "csjwt-creds"},
        }),
    )
    .await?;
    for (name, client_id, _) in &clients {
        c.ready(name).await?;
        let claims = verified_claims(c.kc(), &c.access_token(&format!("{name}-token")).await?).await?;
        assert_eq!(claims["azp"], client_id.as_str());
    }
    c.ready("csjwt").await?;
    let events = c.kc().grant_events(REALM, &jwt.client_id).await?;
    assert!(events.iter().all(|e| e["details"]["client_auth_method"] == "client-secret-jwt"), "{events:?}");

    // Three tokens of 20 s each for the EC client: three fresh assertions accepted.
    let (_, ec_client, _) = &clients[0];
    wait_until("three grants with fresh assertions", Duration::from_secs(60), || async {
        c.kc().grants(REALM, ec_client).await.is_ok_and(|g| g >= 3)
    })
    .await?;
    c.ready("ec").await?;

    // The wrong key (the RSA client's key for the EC client) and an unparsable one.
    let (_, _, rsa_key) = &clients[1];
    k8s::put_client_secret(&c.client, &c.ns, "ec-key", &[("tls.key", &rsa_key.private_key_pem)]).await?;
    wait_condition(&c.client, &c.ns, "ec", "Degraded", "True", "InvalidClientCredentials", Duration::from_secs(30))
        .await?;
    k8s::put_client_secret(
        &c.client,
        &c.ns,
        "rsa-key",
        &[("tls.key", "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")],
    )
    .await?;
    let s = wait_condition(&c.client, &c.ns, "rsa", "Degraded", "True", "PrivateKeyInvalid", Duration::from_secs(30))
        .await?;
    assert!(condition(&s, "Degraded").ok_or("no Degraded")?.2.contains("rsa-key"));
    c.finish().await
}
