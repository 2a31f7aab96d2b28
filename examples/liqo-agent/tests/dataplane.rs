//! The agent's network end to end over the WireGuard fabric (`network.fabric: WireGuard`): two
//! clusters with the same pod CIDR, the request goes through the tunnel and the double NAT. The
//! scenario, shared with `dataplane_routed.rs`, is in `common/dataplane.rs`.
//!
//! Needs root, `ip`, `nft` and `wireguard-go` (as CI has).

mod common;

use common::{
    dataplane::{Fabric, offloaded_pod_answers},
    scenario::Method,
};

#[tokio::test]
async fn offloaded_pod_answers_through_the_tunnel_and_the_double_nat() -> Result<(), common::Error>
{
    offloaded_pod_answers(Method::Csr, Fabric::WireGuard).await
}
