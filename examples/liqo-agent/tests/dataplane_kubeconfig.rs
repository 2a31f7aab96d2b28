//! The data-plane scenario (`common::dataplane`) with the kubeconfig peering method over the
//! WireGuard fabric: the provider's administrator issues a bundle from both clusters' published
//! networks (gateway endpoints and keys), no peering endpoint anywhere, and a pod of the consumer
//! reaches the offloaded pod through the tunnel and the double NAT.

mod common;

use common::{
    dataplane::{Fabric, offloaded_pod_answers},
    scenario::Method,
};

#[tokio::test]
async fn offloaded_pod_answers_after_a_bundle_peering() -> Result<(), common::Error> {
    offloaded_pod_answers(Method::Kubeconfig, Fabric::WireGuard).await
}
