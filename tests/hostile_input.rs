//! Property-based fuzzing of what Keycloak (or something posing as it) sends back: the token
//! response parser, the error classifier and the JWT claim decoder must answer every input with a
//! value or an error, never a panic, and never echo the token in an error.
//!
//! Runs for FUZZ_SECONDS (default 20, to keep `make test` short) in the suite; a longer run is
//! `FUZZ_SECONDS=3600 cargo test --release --test hostile_input -- --nocapture`.
//!
//! Runs are replayable: the inputs follow from a seed alone, printed at the start of the run and
//! on failure. The seed is FUZZ_SEED when set (a number, or `random` for a fresh one, printed like
//! any other), else [`DEFAULT_SEED`], so that every `make test` generates the same inputs. The same
//! seed generates the same inputs in the same order: `FUZZ_SEED=<seed>` with at least the
//! FUZZ_SECONDS of the failed run replays a failure. Proptest also shrinks a failing input and
//! saves its case to tests/hostile_input.proptest-regressions, which every later run tries first
//! (commit that file when it holds a real failure).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestRunner};
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

/// The seed of runs that do not set FUZZ_SEED: every such run generates the same inputs.
const DEFAULT_SEED: u64 = 20_260_001;
/// Inputs per proptest run; runs follow one another until FUZZ_SECONDS are spent.
const BATCH: u32 = 64;

/// The seed of this run: FUZZ_SEED (a number, or `random`), else [`DEFAULT_SEED`].
fn seed() -> u64 {
    match std::env::var("FUZZ_SEED") {
        Ok(s) if s.trim() == "random" => rand::random(),
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("FUZZ_SEED={s:?} is neither a number nor `random`")),
        Err(_) => DEFAULT_SEED,
    }
}

/// Every batch's configuration: `BATCH` cases, a failing input shrunk and its case saved beside
/// this file.
fn config() -> Config {
    Config {
        cases: BATCH,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..Config::default()
    }
}

/// What one round gets: a token response body, a failure's status and body, a token.
type Round = (Vec<u8>, (u16, Vec<u8>), String);

fn round() -> impl Strategy<Value = Round> {
    (body(), (300u16..600, body()), jwt_like())
}

/// The runner of the next batch: its RNG drawn from `seeds`, which `seed` alone determines.
fn next_batch(seeds: &mut TestRunner, config: Config) -> TestRunner {
    TestRunner::new_with_rng(config, seeds.new_rng())
}

fn seeded(seed: u64) -> TestRunner {
    TestRunner::new(Config { rng_seed: RngSeed::Fixed(seed), failure_persistence: None, ..Config::default() })
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

fn check_round((body, (status, failure), token): Round) {
    check_token_response(&body);
    check_failure(status, &failure);
    check_jwt(&token);
    // A token response around the generated token, as Keycloak would wrap it.
    let wrapped = serde_json::json!({"access_token": token, "token_type": "Bearer"}).to_string();
    check_token_response(wrapped.as_bytes());
}

#[test]
fn hostile_responses_never_panic() {
    let secs: u64 = std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let seed = seed();
    eprintln!("hostile input: seed {seed} (FUZZ_SEED={seed} FUZZ_SECONDS={secs} replays this run)");
    let (budget, strategy, mut seeds) = (Duration::from_secs(secs), round(), seeded(seed));
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < budget {
        let mut runner = next_batch(&mut seeds, config());
        if let Err(e) = runner.run(&strategy, |r| {
            check_round(r);
            Ok(())
        }) {
            let mut e = e.to_string();
            if e.len() > 4000 {
                let cut = (0..=4000).rev().find(|i| e.is_char_boundary(*i)).unwrap_or(0);
                e = format!("{}... ({} bytes)", &e[..cut], e.len());
            }
            panic!(
                "hostile input failed with seed {seed} after {rounds} rounds; FUZZ_SEED={seed} FUZZ_SECONDS={secs} \
                 replays the run, and the shrunk case is saved to tests/hostile_input.proptest-regressions: {e}"
            );
        }
        rounds += u64::from(BATCH);
    }
    println!("hostile input: seed {seed}, {rounds} rounds of 4 inputs in {:.0?}", start.elapsed());
    assert!(rounds > 100, "only {rounds} rounds ran");
}

/// Debug renderings of the first batch's rounds for `seed`.
fn first_batch(seed: u64) -> Vec<String> {
    let seen = Mutex::new(Vec::new());
    let mut runner = next_batch(&mut seeded(seed), Config { failure_persistence: None, ..config() });
    runner
        .run(&round(), |r| {
            seen.lock().unwrap().push(format!("{r:?}"));
            Ok(())
        })
        .expect("a batch that checks nothing passes");
    seen.into_inner().unwrap()
}

#[test]
fn a_seed_generates_the_same_inputs_every_time() {
    let (a, b) = (first_batch(DEFAULT_SEED), first_batch(DEFAULT_SEED));
    assert_eq!(a.len(), BATCH as usize);
    assert!(a == b, "the same seed generated different inputs");
    assert!(first_batch(DEFAULT_SEED + 1) != a, "another seed generated the same inputs");
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
