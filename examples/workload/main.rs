//! A workload's view of the token: reads the mounted `access_token` every second and logs its
//! issue and expiry times and how long it has left, never the token itself.
//!
//! `workload [FILE]` reads FILE (default `/var/run/registry-access/access_token`);
//! `workload --env VAR` reads the environment variable VAR instead (what a pod that takes the
//! token from `env.valueFrom.secretKeyRef` sees: the value of the container's start, forever).
//! One JSON line per second on stdout, for example
//! `{"at_ms":1764500000123,"iat":1764499990,"exp":1764500290,"remaining_s":289,"changed":false,"expired":false}`;
//! `changed` is true on the first read of a token with a new `iat`. The node suite
//! (`tests/node/`) and `make demo` read these lines from the pod's log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the token comes from.
enum Source {
    File(String),
    Env(String),
}

impl Source {
    fn read(&self) -> Result<String, String> {
        match self {
            Source::File(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}")),
            Source::Env(var) => std::env::var(var).map_err(|_| format!("environment variable {var} is not set")),
        }
    }
}

/// The `iat` and `exp` claims of a JWT, read with the operator's own decoder, or why they could
/// not be read (never the token).
fn times(token: &str) -> Result<(i64, i64), String> {
    let claims = registry_access_operator::keycloak::jwt::decode_claims(token.trim()).map_err(|e| e.to_string())?;
    Ok((claims.iat.ok_or("the JWT has no iat")?, claims.exp.ok_or("the JWT has no exp")?))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let source = match (args.next(), args.next()) {
        (Some(flag), Some(var)) if flag == "--env" => Source::Env(var),
        (Some(path), None) if !path.starts_with('-') => Source::File(path),
        (None, _) => Source::File("/var/run/registry-access/access_token".into()),
        _ => {
            eprintln!("usage: workload [FILE] | workload --env VAR");
            std::process::exit(2);
        }
    };
    let mut last_iat = None;
    loop {
        let at_ms = now_ms();
        let line = match source.read().and_then(|t| times(&t)) {
            Ok((iat, exp)) => {
                let changed = last_iat != Some(iat);
                last_iat = Some(iat);
                let remaining_s = exp - at_ms.div_euclid(1000);
                serde_json::json!({
                    "at_ms": at_ms, "iat": iat, "exp": exp, "remaining_s": remaining_s,
                    "changed": changed, "expired": remaining_s <= 0,
                })
            }
            Err(error) => serde_json::json!({"at_ms": at_ms, "error": error}),
        };
        println!("{line}");
        std::thread::sleep(Duration::from_millis(1000 - (now_ms().rem_euclid(1000)) as u64));
    }
}
