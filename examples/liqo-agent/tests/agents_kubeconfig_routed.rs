//! The end-to-end scenario (`common::scenario`) with the other provider of each swappable
//! concern: the kubeconfig peering method (an administrator-issued bundle, no endpoint) and the
//! routed fabric (no tunnel; the lab clusters' pod CIDRs do not overlap), against its own
//! two-cluster lab.

mod common;

use common::scenario::{Combo, Fabric, Method};
use liqo_lab::{ClusterSpec, LabSpec};

#[tokio::test]
async fn kubeconfig_method_with_routed_fabric() -> Result<(), common::Error> {
    // A routed fabric needs disjoint pod networks (the lab's default is the same /16 for all).
    let lab = liqo_lab::shared(|| {
        LabSpec::new([
            ClusterSpec::new("agentk-a").pod_cidr("10.244.0.0/16".parse().expect("a CIDR")),
            ClusterSpec::new("agentk-b").pod_cidr("10.245.0.0/16".parse().expect("a CIDR")),
        ])
    })
    .await?;
    let combo = Combo {
        method: Method::Kubeconfig,
        fabric: Fabric::Routed,
    };
    common::scenario::run(lab, "agentk-a", "agentk-b", combo).await
}
