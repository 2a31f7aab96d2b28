//! The end-to-end scenario (`common::scenario`) with the CSR peering method and no fabric,
//! against a two-cluster lab.

mod common;

use common::scenario::{Combo, Fabric, Method};
use liqo_lab::{ClusterSpec, LabSpec};

#[tokio::test]
async fn csr_method_without_fabric() -> Result<(), common::Error> {
    let lab = liqo_lab::shared(|| {
        LabSpec::new([ClusterSpec::new("agent-a"), ClusterSpec::new("agent-b")])
    })
    .await?;
    let combo = Combo {
        method: Method::Csr,
        fabric: Fabric::None,
    };
    common::scenario::run(lab, "agent-a", "agent-b", combo).await
}
