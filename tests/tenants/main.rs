//! Hostile tenants on the real environment: what one namespace creates (hundreds of servers that
//! hang, reset or rate limit; the largest objects the API server takes; a token server that
//! answers with escape sequences) must not stop another namespace's renewals, grow the operator's
//! memory with what it does not serve, get a credential sent whose consent was withdrawn, or put
//! raw foreign text anywhere a person reads.
//!
//! The operator runs with its default flags: the defaults themselves must hold.

#[path = "../support/mod.rs"]
mod support;

mod consent;
mod memory;
mod origins;
mod series;
mod text;

use consent::*;
use memory::*;
use origins::*;
use series::*;
use text::*;

fn main() {
    support::harness::run(
        "tenants",
        tests![
            hostile_origins_do_not_stop_another_namespaces_renewals,
            the_largest_objects_cost_a_bounded_amount_of_memory,
            consent_withdrawn_while_waiting_stops_the_request,
            foreign_text_is_bounded_and_cleaned_everywhere,
            deleted_objects_leave_no_series,
        ],
        2,
    )
}
