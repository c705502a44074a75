//! The token client against a local HTTP server written here, for the answers a real Keycloak
//! cannot be made to give (garbage, hangs, huge bodies) and to check the exact request sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use jiff::{SignedDuration, Timestamp};
use registry_access_operator::api::ClientAuthMethod;
use registry_access_operator::keycloak::assertion::Credential;
use registry_access_operator::keycloak::token::{ClientConfig, TokenClient, TokenError, TokenRequest};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

mod support;
use support::http::{RawRequest, read_request};

const SECRET: &str = "s3cr3t/with+odd&chars";

/// What the server answers.
#[derive(Clone)]
enum Answer {
    /// Status line, extra headers, body.
    Respond(u16, Vec<(String, String)>, Vec<u8>),
    /// A chunked body of this many bytes, no Content-Length.
    Chunked(usize),
    /// Accept the request and never answer.
    Hang,
}

/// Serves `answer` to every connection on 127.0.0.1 and records the requests.
async fn server(answer: Answer) -> (Url, Arc<Mutex<Vec<RawRequest>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (answer, log) = (answer.clone(), log.clone());
            tokio::spawn(async move {
                let Some(req) = read_request(&mut sock).await else { return };
                log.lock().unwrap().push(req);
                match answer {
                    Answer::Respond(status, headers, body) => {
                        let mut head =
                            format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                        for (k, v) in headers {
                            head.push_str(&format!("{k}: {v}\r\n"));
                        }
                        head.push_str("\r\n");
                        let _ = sock.write_all(head.as_bytes()).await;
                        let _ = sock.write_all(&body).await;
                    }
                    Answer::Chunked(n) => {
                        let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n").await;
                        let chunk = vec![b' '; 64 * 1024];
                        let mut sent = 0;
                        while sent < n {
                            let part = &chunk[..chunk.len().min(n - sent)];
                            if sock.write_all(format!("{:x}\r\n", part.len()).as_bytes()).await.is_err()
                                || sock.write_all(part).await.is_err()
                                || sock.write_all(b"\r\n").await.is_err()
                            {
                                return;
                            }
                            sent += part.len();
                        }
                        let _ = sock.write_all(b"0\r\n\r\n").await;
                    }
                    Answer::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
                }
            });
        }
    });
    let url = Url::parse(&format!("http://{addr}/auth/realms/r/protocol/openid-connect/token")).unwrap();
    (url, seen)
}

fn json(status: u16, body: serde_json::Value) -> Answer {
    Answer::Respond(status, vec![("Content-Type".into(), "application/json".into())], body.to_string().into_bytes())
}

fn client() -> TokenClient {
    TokenClient::new(ClientConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_millis(800),
        ca_bundle: None,
    })
    .unwrap()
}

async fn request(
    url: &Url,
    method: ClientAuthMethod,
    scopes: &[String],
) -> Result<registry_access_operator::keycloak::token::IssuedToken, TokenError> {
    let secret = SecretString::from(SECRET);
    let credential = match method {
        ClientAuthMethod::ClientSecretBasic => Credential::SecretBasic(secret),
        ClientAuthMethod::ClientSecretJwt => Credential::SecretJwt(secret),
        ClientAuthMethod::ServiceAccount => {
            Credential::ServiceAccountToken(SecretString::from("sa.token.value"), std::time::Instant::now())
        }
        _ => Credential::SecretPost(secret),
    };
    let req = TokenRequest { token_url: url, client_id: "test-ext", credential: &credential, scopes, ca_bundle: None };
    client().request(&req, Timestamp::now()).await
}

fn unsigned_jwt(claims: serde_json::Value) -> String {
    let e = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    format!("{}.{}.{}", e(br#"{"alg":"none"}"#), e(claims.to_string().as_bytes()), e(b"sig"))
}

#[tokio::test]
async fn client_secret_post_sends_the_documented_form() {
    let (url, seen) =
        server(json(200, serde_json::json!({"access_token": "tok", "expires_in": 300, "token_type": "Bearer"}))).await;
    let before = Timestamp::now();
    let t = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap();
    assert_eq!(t.access_token.expose_secret(), "tok");
    let lifetime = t.expires_at.duration_since(before);
    // Whole seconds from when the request was sent: early by less than a second, never late.
    assert!(lifetime > SignedDuration::from_secs(299) && lifetime < SignedDuration::from_secs(302), "{lifetime:?}");
    assert_eq!(t.expires_at.subsec_nanosecond(), 0);
    let r = seen.lock().unwrap()[0].clone();
    assert_eq!(r.request_line, "POST /auth/realms/r/protocol/openid-connect/token HTTP/1.1");
    assert_eq!(r.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert_eq!(
        r.body_text(),
        "grant_type=client_credentials&client_id=test-ext&client_secret=s3cr3t%2Fwith%2Bodd%26chars"
    );
    assert_eq!(r.header("authorization"), None);
}

#[tokio::test]
async fn client_secret_basic_sends_credentials_in_the_header_only() {
    let (url, seen) = server(json(200, serde_json::json!({"access_token": "tok", "expires_in": 60}))).await;
    request(&url, ClientAuthMethod::ClientSecretBasic, &["openid".into(), "profile".into()]).await.unwrap();
    let r = seen.lock().unwrap()[0].clone();
    assert_eq!(r.body_text(), "grant_type=client_credentials&scope=openid+profile");
    let auth = r.header("authorization").unwrap().strip_prefix("Basic ").unwrap();
    let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(auth).unwrap()).unwrap();
    assert_eq!(decoded, "test-ext:s3cr3t%2Fwith%2Bodd%26chars");
}

#[tokio::test]
async fn assertions_are_sent_as_rfc_7523_says() {
    let (url, seen) = server(json(200, serde_json::json!({"access_token": "tok", "expires_in": 60}))).await;
    request(&url, ClientAuthMethod::ServiceAccount, &[]).await.unwrap();
    request(&url, ClientAuthMethod::ClientSecretJwt, &[]).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    // A ServiceAccount token: the assertion as is, and no client_id (Keycloak finds the client
    // from the token).
    assert_eq!(
        seen[0].body_text(),
        "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion=sa.token.value"
    );
    assert_eq!(seen[0].header("authorization"), None);
    // client_secret_jwt: an HS256 assertion for the realm's issuer; the secret itself never travels.
    let body = seen[1].body_text();
    assert!(body.starts_with("grant_type=client_credentials&client_id=test-ext&client_assertion_type="), "{body}");
    assert!(!body.contains("s3cr3t"), "{body}");
    let assertion = body.rsplit("client_assertion=").next().unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&[url.as_str().trim_end_matches("/protocol/openid-connect/token")]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        assertion,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!((claims["iss"].as_str(), claims["sub"].as_str()), (Some("test-ext"), Some("test-ext")));
    assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 60);
}

#[tokio::test]
async fn expiry_falls_back_to_the_jwt_exp_without_expires_in() {
    let exp = Timestamp::now().as_second() + 120;
    let token = unsigned_jwt(serde_json::json!({"exp": exp, "realm_access": {"roles": ["trembita-invoker"]}}));
    let (url, _) = server(json(200, serde_json::json!({"access_token": token, "token_type": "Bearer"}))).await;
    let t = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap();
    assert_eq!(t.expires_at.as_second(), exp);
    assert_eq!(t.realm_roles, vec!["trembita-invoker"]);
}

#[tokio::test]
async fn invalid_client_is_invalid_credentials() {
    for (status, error) in
        [(401, "invalid_client"), (400, "invalid_client"), (401, "unauthorized_client"), (400, "unauthorized_client")]
    {
        let (url, _) = server(json(
            status,
            serde_json::json!({"error": error, "error_description": "Invalid client or Invalid client credentials"}),
        ))
        .await;
        let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
        assert!(matches!(err, TokenError::InvalidClient { .. }), "{status} {error}: {err:?}");
        assert!(!err.is_transient());
        assert!(!err.to_string().contains(SECRET));
    }
}

#[tokio::test]
async fn server_errors_are_transient() {
    let (url, _) = server(Answer::Respond(503, vec![], b"unavailable".to_vec())).await;
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::ServerError { status: 503, .. }), "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn a_hung_server_times_out() {
    let (url, _) = server(Answer::Hang).await;
    let start = std::time::Instant::now();
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(start.elapsed() < Duration::from_secs(10), "the request timeout was not applied");
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = Url::parse(&format!("http://127.0.0.1:{port}/token")).unwrap();
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn non_json_and_missing_token_are_invalid_responses() {
    for answer in [
        Answer::Respond(200, vec![], b"<html>login</html>".to_vec()),
        json(200, serde_json::json!({"token_type": "Bearer", "expires_in": 300})),
        json(200, serde_json::json!({"access_token": "tok", "expires_in": 0})),
    ] {
        let (url, _) = server(answer).await;
        let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
        assert!(matches!(err, TokenError::InvalidResponse(_)), "{err:?}");
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let big = vec![b' '; (1 << 20) + 1];
    let (url, _) = server(Answer::Respond(200, vec![], big)).await;
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::ResponseTooLarge), "with Content-Length: {err:?}");
    let (url, _) = server(Answer::Chunked(4 << 20)).await;
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::ResponseTooLarge), "chunked: {err:?}");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (target, target_seen) = server(json(200, serde_json::json!({"access_token": "tok", "expires_in": 300}))).await;
    let (url, _) = server(Answer::Respond(307, vec![("Location".into(), target.to_string())], vec![])).await;
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::Redirect { status: 307, .. }), "{err:?}");
    assert!(target_seen.lock().unwrap().is_empty(), "the client secret was sent to the redirect target");
}

#[tokio::test]
async fn realm_not_found_and_bad_scope_have_their_own_errors() {
    let (url, _) = server(json(404, serde_json::json!({"error": "Realm does not exist"}))).await;
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::NotFound { .. }), "{err:?}");
    let (url, _) =
        server(json(400, serde_json::json!({"error": "invalid_scope", "error_description": "Invalid scopes: bogus"})))
            .await;
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &["bogus".into()]).await.unwrap_err();
    assert!(matches!(err, TokenError::InvalidScope { .. }), "{err:?}");
}

/// A TLS server on 127.0.0.1 whose certificate (signed by `ca`) names only `names`; it completes
/// handshakes and then closes.
async fn tls_server(ca: &support::pki::Ca, names: &[&str]) -> Url {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pair = ca.server(names).unwrap();
    let certs = CertificateDer::pem_slice_iter(pair.cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
    registry_access_operator::keycloak::token::install_crypto_provider();
    let config =
        tokio_rustls::rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(sock).await;
            });
        }
    });
    Url::parse(&format!("https://{addr}/auth/realms/r/protocol/openid-connect/token")).unwrap()
}

async fn request_with_ca(url: &Url, ca_bundle: Option<&str>) -> TokenError {
    let credential = Credential::SecretPost(SecretString::from(SECRET));
    let req = TokenRequest { token_url: url, client_id: "test-ext", credential: &credential, scopes: &[], ca_bundle };
    client().request(&req, Timestamp::now()).await.unwrap_err()
}

#[tokio::test]
async fn tls_failures_are_told_in_our_words_without_the_peers_names() {
    let ca = support::pki::Ca::new("probe-ca").unwrap();
    let hidden = "internal-billing-db.corp.example";
    let url = tls_server(&ca, &[hidden]).await;
    // Trusted CA, wrong name: the names the certificate holds are not echoed.
    let err = request_with_ca(&url, Some(&ca.cert)).await;
    assert!(matches!(err, TokenError::Tls { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("not valid for the host name"), "{text}");
    assert!(!text.contains("internal-billing") && !text.contains("corp.example"), "{text}");
    // Untrusted CA: said so, and nothing of the certificate either.
    let err = request_with_ca(&url, None).await;
    let text = err.to_string();
    assert!(text.contains("not signed by a trusted CA"), "{text}");
    assert!(!text.contains("internal-billing") && !text.contains("probe-ca"), "{text}");
}

#[tokio::test]
async fn a_reset_connection_is_told_in_our_words() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            // Close at once with a reset.
            let _ = sock.set_zero_linger();
            drop(sock);
        }
    });
    let url = Url::parse(&format!("http://{addr}/token")).unwrap();
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("closed or reset"), "{err}");
}

#[tokio::test]
async fn a_long_location_is_quoted_cut_and_an_escape_refused() {
    let location = format!("https://x.example/{}", "a".repeat(100 * 1024));
    let (url, _) = server(Answer::Respond(302, vec![("Location".into(), location)], vec![])).await;
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TokenError::Redirect { status: 302, .. }), "{err:?}");
    assert!(text.chars().count() < 400 && text.contains('…'), "{text}");
    // A control character is not allowed in a header: the answer is refused whole.
    let (url, _) = server(Answer::Respond(302, vec![("Location".into(), "https://x/\u{1b}[2J".into())], vec![])).await;
    let err = request(&url, ClientAuthMethod::ClientSecretPost, &[]).await.unwrap_err();
    assert!(matches!(err, TokenError::Connect { .. }) && !err.to_string().contains('\u{1b}'), "{err:?}");
}
