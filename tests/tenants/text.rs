//! Foreign text (escape sequences, enormous values, certificate names) is bounded and cleaned
//! wherever a person reads it.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::case::*;
use crate::support::http::read_request;
use crate::support::k8s::{condition, wait_condition};
use crate::support::keycloak::REALM;
use crate::support::{self, Env, Result};

/// An unsigned JWT with these claims (the operator reads, never verifies, an access token).
pub fn unsigned_jwt(claims: &Value) -> String {
    let e = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!("{}.{}.{}", e(br#"{"alg":"none"}"#), e(claims.to_string().as_bytes()), e(b"sig"))
}

pub const ESC: char = '\u{1b}';

/// A token server whose answers carry escape sequences: roles and a scope with terminal escapes
/// (realm `escape`), a 100 KiB `Location` (realm `redirect`) and one with an escape (realm
/// `redirect-escape`).
pub async fn hostile_token_server() -> Result<(String, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(req) = read_request(&mut sock).await else { return };
                let answer = if req.path().contains("/realms/redirect") {
                    // 100 KiB; or with an escape, which no HTTP header may hold.
                    let location = if req.path().contains("/realms/redirect-escape/") {
                        format!("https://x.example/{ESC}[2J")
                    } else {
                        format!("https://x.example/{}", "a".repeat(100 * 1024))
                    };
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                } else {
                    let now = Timestamp::now().as_second();
                    let roles = json!(["ok-role", format!("{ESC}[31mred{ESC}[0m"), "r".repeat(5000)]);
                    let token = unsigned_jwt(&json!({"iat": now, "exp": now + 300, "realm_access": {"roles": roles}}));
                    let scope = format!("profile {ESC}]0;owned\u{7} {}", "s".repeat(20_000));
                    let body =
                        json!({"access_token": token, "token_type": "Bearer", "expires_in": 300, "scope": scope})
                            .to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = sock.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok((format!("http://127.0.0.1:{port}/auth"), task))
}

/// True when `s` holds an unprintable character (an escape, a bidirectional override).
pub fn unprintable(s: &str) -> bool {
    s.chars().any(|c| c != '\n' && c != '\t' && registry_access_operator::text::unprintable(c))
}

/// Escape sequences in a role and the scope, a 100 KiB `Location`, a certificate with long names:
/// the status, Events, token Secret annotations, logs and the kubectl plugin's output hold none of
/// the raw text and nothing over the caps.
pub async fn foreign_text_is_bounded_and_cleaned_everywhere(env: Arc<Env>) -> Result<()> {
    let c = Case::with_operator_args(env, "ten-text", &["--kubelet-sync-period=0s"]).await?;
    let (server, _task) = hostile_token_server().await?;
    c.client_secret("creds", "text-secret-value").await?;
    c.ra("escape", json!({"server": server, "realm": "escape", "clientId": "x", "clientSecretRef": {"name": "creds"}}))
        .await?;
    for realm in ["redirect", "redirect-escape"] {
        c.ra(realm, json!({"server": server, "realm": realm, "clientId": "x", "clientSecretRef": {"name": "creds"}}))
            .await?;
    }
    // A TLS server whose certificate names a long internal host: never echoed.
    let ca = support::pki::Ca::new("internal-ca")?;
    let hidden = format!("{}.internal-billing.corp.example", "n".repeat(60));
    let tls = tls_origin(&ca, &hidden).await?;
    c.ra("tls", json!({"server": tls.0, "realm": REALM, "clientId": "x", "clientSecretRef": {"name": "creds"}}))
        .await?;

    let s = wait_condition(&c.client, &c.ns, "escape", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    assert!(s.granted_roles.iter().all(|r| r.chars().count() <= 128 && !unprintable(r)), "{:?}", s.granted_roles);
    assert!(s.granted_roles.iter().any(|r| r.contains("[31mred")), "the role is kept, cleaned: {:?}", s.granted_roles);
    let scope = s.scope.clone().unwrap_or_default();
    assert!(scope.chars().count() <= 512 && !unprintable(&scope), "scope of {} chars", scope.chars().count());
    let token_secret: Secret = Api::namespaced(c.client.clone(), &c.ns).get("escape-token").await?;
    for (k, v) in token_secret.metadata.annotations.unwrap_or_default() {
        assert!(v.chars().count() <= 1024 && !unprintable(&v), "annotation {k} of {} chars", v.chars().count());
    }
    let s =
        wait_condition(&c.client, &c.ns, "redirect", "Ready", "False", "UnexpectedRedirect", Duration::from_secs(30))
            .await?;
    let (_, _, message) = condition(&s, "Degraded").ok_or("no Degraded")?;
    assert!(
        message.chars().count() < 1000 && !unprintable(&message),
        "Degraded message of {} chars",
        message.chars().count()
    );
    assert!(
        message.contains("https://x.example/aaa") && message.contains('…'),
        "the Location is quoted, cut: {message}"
    );
    // An escape in a header: the HTTP client refuses the answer whole, told in our words.
    let s = wait_condition(
        &c.client,
        &c.ns,
        "redirect-escape",
        "Ready",
        "False",
        "KeycloakUnavailable",
        Duration::from_secs(30),
    )
    .await?;
    let (_, _, message) = condition(&s, "Degraded").ok_or("no Degraded")?;
    assert!(message.contains("failed before Keycloak answered") && !unprintable(&message), "{message}");
    let s = wait_condition(&c.client, &c.ns, "tls", "Ready", "False", "TLSError", Duration::from_secs(30)).await?;
    let (_, _, message) = condition(&s, "Degraded").ok_or("no Degraded")?;
    assert!(message.contains("not signed by a trusted CA") && !message.contains("internal-billing"), "{message}");

    // Events and logs.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.client.clone(), &c.ns);
    for e in events.list(&Default::default()).await? {
        let note = e.note.unwrap_or_default();
        assert!(note.chars().count() < 1100 && !unprintable(&note), "Event note of {} chars", note.chars().count());
        assert!(!note.contains("internal-billing"), "{note}");
    }
    let logs = c.operator.logs();
    assert!(!logs.contains(ESC) && !logs.contains('\u{7}'), "an escape reached the logs");
    assert!(!logs.contains("internal-billing"), "the certificate's names reached the logs");
    assert!(!logs.contains(&"a".repeat(1000)), "the Location reached the logs whole");

    // The kubectl plugin prints what the cluster holds, escaped.
    for args in [
        vec!["-n", c.ns.as_str(), "status"],
        vec!["-n", c.ns.as_str(), "status", "escape"],
        vec!["-n", c.ns.as_str(), "inspect", "escape"],
    ] {
        let (ok, stdout, stderr) = plugin(&c.env.cluster.kubeconfig, &args)?;
        assert!(ok, "kubectl registry-access {args:?} failed: {stderr}");
        assert!(
            !unprintable(&stdout) && !unprintable(&stderr),
            "kubectl registry-access {args:?} printed a raw escape"
        );
    }
    c.finish().await
}

/// A TLS origin whose certificate (signed by `ca`, which the operator does not trust) names only
/// `name`.
pub async fn tls_origin(ca: &support::pki::Ca, name: &str) -> Result<(String, JoinHandle<()>)> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pair = ca.server(&[name])?;
    let certs = CertificateDer::pem_slice_iter(pair.cert.as_bytes()).collect::<std::result::Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes())?;
    let config = tokio_rustls::rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(sock).await;
            });
        }
    });
    Ok((format!("https://127.0.0.1:{port}/auth"), task))
}
