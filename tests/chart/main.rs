//! The Helm chart on the real API server: lint and render, a server-side dry run of what it
//! renders, `helm install` in both scopes, and the operator's binary run with a token of the
//! chart's own ServiceAccount, so that any permission the chart lacks fails the flow.

#[path = "../support/mod.rs"]
mod support;

mod common;
mod installs;
mod pods;
mod rendering;
mod tenancy;
mod upgrade;

use installs::*;
use pods::*;
use rendering::*;
use tenancy::*;
use upgrade::*;

fn main() {
    // Installs in the two scopes share the cluster: one at a time, so that a cluster-wide
    // operator never acts on another test's objects.
    support::harness::run(
        "chart",
        tests![
            lints_and_renders_for_both_scopes,
            alerts_fire_and_stay_quiet_under_promtool,
            renders_safe_defaults_for_a_shared_cluster,
            cluster_wide_install_works_with_the_chart_permissions_only,
            namespaced_install_is_limited_to_its_namespaces,
            leader_election_works_with_the_chart_permissions,
            tenants_use_registryaccess_through_the_standard_roles,
            the_admission_policy_refuses_servers_outside_the_allow_list,
            two_writers_during_an_upgrade_never_write_together,
            the_operator_may_change_only_the_nudge_annotation_of_a_pod,
        ],
        1,
    )
}
