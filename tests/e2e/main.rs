//! End-to-end tests against real programs: etcd, kube-apiserver, kube-controller-manager and
//! Keycloak, with the operator's built binary run as a separate process per test.
//!
//! The environment is started once (see `support`), every test gets its own namespace and its
//! own operator watching it, and every test ends with a check that no token or client secret
//! reached the operator's logs, the statuses or the Events. The tests are grouped by subject in
//! the modules below; the harness knows them by their bare names (`e2e::<name>`).

#[path = "../support/mod.rs"]
mod support;

mod availability;
mod client_auth;
mod client_secrets;
mod issuance;
mod observability;
mod plugin;
mod pods;
mod servers;
mod token_secrets;

use availability::*;
use client_auth::*;
use client_secrets::*;
use issuance::*;
use observability::*;
use plugin::*;
use pods::*;
use servers::*;
use token_secrets::*;

fn main() {
    // Most of a test is waiting for tokens to age: run several at once.
    support::harness::run(
        "e2e",
        tests![
            issues_a_verified_token_for_the_documented_client,
            refreshes_before_every_expiry,
            rotated_and_wrong_client_secrets,
            survives_a_keycloak_outage,
            restart_issues_no_new_tokens,
            restores_an_edited_or_deleted_token_secret,
            allow_list_refuses_other_servers,
            metrics_and_events_follow_tokens_and_failures,
            refresh_on_demand,
            startup_with_many_objects_is_spread_and_capped,
            leader_failover_keeps_tokens_fresh,
            kubectl_plugin_status_renew_inspect_check,
            dashboard_and_alerts_use_only_exported_metrics,
            private_ca_is_trusted_only_when_given,
            garbage_collection_and_foreign_secrets,
            client_secrets_stay_in_their_namespace,
            a_client_secret_that_did_not_opt_in_is_never_sent,
            plain_http_is_refused_without_the_flag,
            only_a_new_client_secret_value_issues_a_token,
            renaming_the_token_secret_retires_the_old_one,
            too_short_slack_is_warned,
            environment_supports_secretless_client_authentication,
            service_account_authenticates_without_any_secret,
            signed_jwt_client_authentication,
            required_roles_are_checked,
            mounting_pods_are_nudged_after_each_new_token,
            a_pod_that_reads_the_token_once_is_reported,
        ],
        4,
    )
}
