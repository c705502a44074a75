//! The committed CRD is exactly what the binary prints: a test fails when they drift.

use std::process::Command;

#[test]
fn committed_crd_matches_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_registry-access-operator")).arg("crd").output().expect("run the binary");
    assert!(out.status.success(), "crd failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).expect("UTF-8");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/registryaccesses.registry-access.io.yaml");
    let committed = std::fs::read_to_string(path).expect("read crds/");
    assert!(printed == committed, "crds/ is out of date: run `make crds`");
}

#[test]
fn chart_crds_match_the_top_level_crds() {
    let root = env!("CARGO_MANIFEST_DIR");
    let top = std::fs::read_to_string(format!("{root}/crds/registryaccesses.registry-access.io.yaml")).expect("crds/");
    let chart = std::fs::read_to_string(format!(
        "{root}/charts/registry-access-operator/crds/registryaccesses.registry-access.io.yaml"
    ))
    .expect("chart crds/");
    assert!(top == chart, "charts/registry-access-operator/crds/ differs from crds/: run `make crds`");
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/charts/registry-access-operator/Chart.yaml"))
            .expect("Chart.yaml");
    let app_version = chart.lines().find_map(|l| l.strip_prefix("appVersion: ")).expect("appVersion");
    assert_eq!(app_version.trim_matches('"'), env!("CARGO_PKG_VERSION"));
}
