//! Property-based fuzzing of what Keycloak (or something posing as it) sends back: the token
//! response parser, the error classifier and the JWT claim decoder must answer every input with a
//! value or an error, never a panic, and never echo the token in an error.
//!
//! Runs for FUZZ_SECONDS (default 20, to keep `make test` short) in the suite; a longer run is
//! `FUZZ_SECONDS=3600 cargo test --release --test hostile_input -- --nocapture`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use registry_access_operator::keycloak::jwt::decode_claims;
use registry_access_operator::keycloak::token::{TokenError, classify_failure, parse_success};
use reqwest::StatusCode;
use serde_json::Value;

/// Any JSON value, nested a few levels, with numbers at the edges and strings up to 64 KiB.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        prop_oneof![Just(u64::MAX), Just(0u64), Just(300u64), Just(i64::MAX as u64 + 1)].prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        (0usize..65536).prop_map(|n| Value::String("r".repeat(n))),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("access_token".to_owned()),
                    Just("expires_in".to_owned()),
                    Just("token_type".to_owned()),
                    Just("scope".to_owned()),
                    Just("exp".to_owned()),
                    Just("realm_access".to_owned()),
                    Just("roles".to_owned()),
                    Just("error".to_owned()),
                    Just("error_description".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bytes: arbitrary, or JSON, or JSON cut short, or JSON with invalid UTF-8 spliced in.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        json().prop_map(|v| v.to_string().into_bytes()),
        (json(), any::<prop::sample::Index>()).prop_map(|(v, i)| {
            let s = v.to_string().into_bytes();
            let cut = i.index(s.len() + 1);
            s[..cut].to_vec()
        }),
        json().prop_map(|v| {
            let mut s = v.to_string().into_bytes();
            s.insert(s.len() / 2, 0xff);
            s
        }),
    ]
}

/// Token-shaped strings: three segments of base64url (of JSON, of garbage) or not.
fn jwt_like() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        json().prop_map(|v| URL_SAFE_NO_PAD.encode(v.to_string())),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
        "[A-Za-z0-9_=+/!.-]{0,64}",
    ];
    prop_oneof![
        (segment.clone(), segment.clone(), segment.clone()).prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
        prop::collection::vec(segment, 0..6).prop_map(|v| v.join(".")),
        ".{0,200}",
    ]
}

fn check_token_response(body: &[u8]) {
    let now = Timestamp::from_second(1_700_000_000).unwrap();
    match parse_success(body, now) {
        Ok(t) => {
            assert!(t.expires_at > now, "an issued token must expire in the future");
        }
        Err(e) => {
            assert!(matches!(e, TokenError::InvalidResponse(_)), "{e:?}");
            // The error never quotes the body (which may hold a token).
            if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body)
                && let Some(Value::String(t)) = m.get("access_token")
                && t.len() >= 8
            {
                assert!(!e.to_string().contains(t.as_str()), "the error quotes the token");
            }
        }
    }
}

fn check_failure(status: u16, body: &[u8]) {
    let status = StatusCode::from_u16(status).unwrap();
    let e = classify_failure(status, "https://kc.example.com/token", body, None, None);
    let text = e.to_string();
    assert!(text.len() < 2048, "an error message of {} bytes", text.len());
}

fn check_jwt(token: &str) {
    if let Ok(c) = decode_claims(token) {
        assert!(c.realm_roles.len() <= registry_access_operator::keycloak::jwt::MAX_ROLES);
    }
}

#[test]
fn hostile_responses_never_panic() {
    let budget = Duration::from_secs(std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20));
    let mut runner = TestRunner::new(Config::default());
    let (bodies, statuses, tokens) = (body(), (300u16..600, body()), jwt_like());
    let start = Instant::now();
    let mut cases = 0u64;
    while start.elapsed() < budget {
        let b = bodies.new_tree(&mut runner).expect("generate").current();
        check_token_response(&b);
        let (s, b) = statuses.new_tree(&mut runner).expect("generate").current();
        check_failure(s, &b);
        let t = tokens.new_tree(&mut runner).expect("generate").current();
        check_jwt(&t);
        // A token response around the generated token, as Keycloak would wrap it.
        let wrapped = serde_json::json!({"access_token": t, "token_type": "Bearer"}).to_string();
        check_token_response(wrapped.as_bytes());
        cases += 1;
    }
    println!("hostile input: {cases} rounds of 4 inputs in {:.0?}", start.elapsed());
    assert!(cases > 100, "only {cases} rounds ran");
}

#[test]
fn enormous_and_deep_inputs_are_errors_not_panics() {
    let now = Timestamp::now();
    let deep = "[".repeat(100_000);
    assert!(parse_success(deep.as_bytes(), now).is_err());
    let huge_roles =
        serde_json::json!({"exp": now.as_second() + 60, "realm_access": {"roles": vec!["r".repeat(500); 1_000]}});
    let token = format!("h.{}.s", URL_SAFE_NO_PAD.encode(huge_roles.to_string()));
    let c = decode_claims(&token).expect("a large but valid payload decodes");
    assert_eq!(c.realm_roles.len(), registry_access_operator::keycloak::jwt::MAX_ROLES);
    let too_big = format!("h.{}.s", "A".repeat(3 << 20));
    assert_eq!(decode_claims(&too_big), Err(registry_access_operator::keycloak::jwt::JwtError::TooLarge));
    assert!(decode_claims(&too_big).is_err());
    assert!(decode_claims(&format!("h.{}.s", URL_SAFE_NO_PAD.encode("\"just a string\""))).is_err());
}
