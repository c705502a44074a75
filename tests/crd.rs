//! The committed CRD is exactly what the binary prints: a test fails when they drift.

use std::process::Command;

#[test]
fn committed_crd_matches_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_registry-access-operator")).arg("crd").output().expect("run the binary");
    assert!(out.status.success(), "crd failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).expect("UTF-8");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/registryaccesses.registry-access.io.yaml");
    let committed = std::fs::read_to_string(path).expect("read crds/");
    assert!(
        printed == committed,
        "crds/ is out of date: run `cargo run -- crd > crds/registryaccesses.registry-access.io.yaml` (or `make crds`)"
    );
}
