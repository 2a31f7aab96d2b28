//! A liqo-rs agent of your own: one provider per trait, composed by `liqo_runtime::Agent`.
//! Swapping a provider changes one line: `CsrAuthority` from liqo-peering-csr for the peering
//! method, `WireGuardFabric` from liqo-fabric-wireguard for the fabric, any `Discovery` for
//! `FixedPeers` (the first two take a few lines to build: see examples/liqo-agent).
//!
//! Run it with a kubeconfig for the cluster (`$KUBECONFIG`, or in-cluster), `CLUSTER_ID` set to
//! this cluster's id, and `POD_CIDR` / `SERVICE_CIDR` set to its networks.
#![forbid(unsafe_code)]

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use liqo_core::{
    ClusterId, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream,
    NetworkParameters, PeerAdvertisement,
};

/// A provider of our own: peers from a fixed list.
struct FixedPeers(Vec<PeerAdvertisement>);

#[async_trait]
impl Discovery for FixedPeers {
    fn source(&self) -> DiscoverySource {
        DiscoverySource::Manual
    }
    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let found = self.0.iter().cloned().map(|p| Ok(DiscoveryEvent::Added(p)));
        Ok(futures::stream::iter(found.collect::<Vec<_>>())
            .chain(futures::stream::pending())
            .boxed())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt::init();
    let env = |name: &str| std::env::var(name).map_err(|e| format!("{name}: {e}"));
    let me: ClusterId = env("CLUSTER_ID")?.parse()?;
    let network = NetworkParameters::new(env("POD_CIDR")?.parse()?, env("SERVICE_CIDR")?.parse()?);
    let client = kube::Client::try_default().await?;
    liqo_core::crds::install(&client, &[], "own-agent").await?;

    liqo_runtime::Agent::builder(client.clone(), me.clone())
        .discovery(FixedPeers(vec![]))
        .peering(Arc::new(liqo_peering_kubeconfig::KubeconfigAuthority::new(
            client.clone(),
            me.clone(),
        )))
        .fabric(Arc::new(liqo_fabric_routed::RoutedFabric::new(network)))
        .reflectors(liqo_reflectors_k8s::all())
        .consumer(Default::default(), liqo_vk::PodReflector::new(me.clone()))
        .provider(liqo_vk::ProviderAgent::new(client, me))
        .build()
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
