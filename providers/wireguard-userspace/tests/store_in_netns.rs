//! The agent's construction of the fabric (`examples/liqo-agent/src/network.rs`): the IPAM's
//! `NetworkConfigStore` is made on the host from a fresh client (no pooled connection to
//! reuse), and the fabric, store calls included, runs inside the gateway's namespace through
//! `NetnsFabric`. The store's first list and its save must reach the lab's API server on the
//! host's loopback (issue #14: `listing NetworkConfig: ServiceError: client error (Connect)`).
//! Needs root, `ip`, `nft` and `wireguard-go`, and the lab's binaries.

mod common;

use common::*;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use liqo_core::{NetworkFabric, NetworkParameters, crds::NetworkConfig};
use liqo_fabric_wireguard::{FabricConfig, GatewayConfig, WireGuardFabric};
use liqo_lab::{ClusterSpec, LabSpec};
use liqo_net::{IpamConfig, Netns, NetnsFabric, store::NetworkConfigStore};
use liqo_wireguard_userspace::{Implementation, Userspace};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const NAMESPACE: &str = "liqo-system";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_config_store_works_from_the_gateway_namespace() -> TestResult {
    let lab = liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("ns-store")])).await?;
    let cluster = lab.cluster("ns-store").ok_or("ns-store")?;
    let admin = cluster.client()?;
    liqo_core::crds::install(&admin, &[], "liqo-test").await?;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }

    let mut t = Topology::new();
    let a = t.add_cluster("rome", 0);
    let c = &t.clusters[a];
    let mut local = NetworkParameters::new("10.244.0.0/16".parse()?, "10.96.0.0/12".parse()?);
    local.gateway_endpoint = Some(format!("{}:51820", c.underlay));
    let config = FabricConfig {
        local,
        ipam: IpamConfig {
            reserved: vec!["172.31.0.0/24".parse()?],
            ..IpamConfig::default()
        },
        gateway: GatewayConfig::new(&c.iface, 51820),
    };
    // A client nobody has used yet, as the agent's store may get one with no idle connection.
    let store = NetworkConfigStore::new(cluster.client()?, NAMESPACE)?;
    let fabric = NetnsFabric::start(Netns::named(&c.gw)?, move || async move {
        WireGuardFabric::start(
            Userspace::new(Implementation::wireguard_go()),
            store,
            config,
            liqo_fabric_wireguard::generate_private_key(),
        )
        .await
    })
    .await?;

    // A peer with the same pod CIDR: the remapped allocation is saved from the namespace.
    let mut peer = NetworkParameters::new("10.244.0.0/16".parse()?, "10.96.0.0/12".parse()?);
    peer.gateway_endpoint = Some("172.31.0.9:51820".into());
    peer.wireguard_public_key = Some(liqo_fabric_wireguard::public_key_of(
        &liqo_fabric_wireguard::generate_private_key(),
    ));
    let link = fabric.connect(&"milan".parse()?, &peer).await?;
    let nc = Api::<NetworkConfig>::namespaced(admin.clone(), NAMESPACE)
        .get("milan")
        .await?;
    let saved = nc.status.and_then(|s| s.remapped_pod_cidr);
    assert!(
        link.remote_mappings
            .iter()
            .any(|m| Some(m.remapped) == saved),
        "{saved:?} vs {link:?}"
    );
    fabric.disconnect(&"milan".parse()?).await?;
    fabric.shutdown().await?;
    drop(fabric);
    assert_clean(&t.clusters[a].gw, &t.clusters[a].iface);
    Ok(())
}
