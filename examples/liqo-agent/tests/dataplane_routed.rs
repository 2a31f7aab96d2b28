//! The agent's network end to end over the routed fabric (`network.fabric: Routed`): two clusters
//! with disjoint pod CIDRs that the lab's wan routes to each other, no tunnel, no NAT. The
//! scenario, shared with `dataplane.rs`, is in `common/dataplane.rs`.
//!
//! Needs root, `ip` and `nft` (as CI has).

mod common;

use common::{
    dataplane::{Fabric, offloaded_pod_answers},
    scenario::Method,
};

#[tokio::test]
async fn offloaded_pod_answers_at_its_real_ip_over_routed_pod_networks() -> Result<(), common::Error>
{
    offloaded_pod_answers(Method::Csr, Fabric::Routed).await
}
