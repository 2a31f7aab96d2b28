//! Allocations persisted as `NetworkConfig` objects and the `NetworkReady` condition written to
//! a `ForeignCluster`, against a real API server from the lab.

use std::time::{Duration, SystemTime};

use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, api::PostParams};
use liqo_core::{
    ClusterId, DiscoverySource, NetworkParameters,
    conditions::{find, is_true},
    crds::{
        DiscoverySpec, ForeignCluster, ForeignClusterSpec, NetworkConfig, PeeringRole,
        foreign_cluster_condition::NETWORK_READY,
    },
};
use liqo_lab::{ClusterSpec, Lab, LabSpec};
use liqo_net::{
    Ipam, IpamConfig,
    checker::{link_status, report_network_ready},
    store::{ALLOCATED, AllocationStore, NetworkConfigStore},
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn id(s: &str) -> ClusterId {
    s.parse().unwrap()
}

fn params(pod: &str) -> NetworkParameters {
    NetworkParameters::new(pod.parse().unwrap(), "10.96.0.0/12".parse().unwrap())
}

#[tokio::test]
async fn allocations_and_link_conditions_live_in_objects() -> TestResult {
    let lab = Lab::start(LabSpec::new([ClusterSpec::new("net-a")])).await?;
    let client = lab.cluster("net-a").ok_or("cluster missing")?.client()?;
    liqo_core::crds::install(&client, &[], "liqo-net-test").await?;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("liqo".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;

    // An allocation made before a "restart" is what a new IPAM over a new store finds.
    let local = params("10.244.0.0/16");
    let store = NetworkConfigStore::new(client.clone(), "liqo")?;
    let mut ipam = Ipam::new(&local, IpamConfig::default())?;
    let milan = ipam.allocate(&id("milan"), &params("10.244.0.0/16"))?;
    store.save(&milan).await?;
    store.save(&milan).await?;
    let nc = Api::<NetworkConfig>::namespaced(client.clone(), "liqo")
        .get("milan")
        .await?;
    let status = nc.status.ok_or("NetworkConfig without status")?;
    assert_eq!(status.remapped_pod_cidr, Some(milan.pod.remapped));
    assert!(is_true(&status.conditions, ALLOCATED));
    assert_eq!(nc.spec.remote_pod_cidr.to_string(), "10.244.0.0/16");

    let mut restarted = Ipam::new(&local, IpamConfig::default())?;
    restarted.restore(
        NetworkConfigStore::new(client.clone(), "liqo")?
            .load()
            .await?,
    )?;
    assert_eq!(restarted.get(&id("milan")), Some(&milan));
    let turin = restarted.allocate(&id("turin"), &params("10.244.0.0/16"))?;
    assert_ne!(turin.pod.remapped, milan.pod.remapped);

    store.remove(&id("milan")).await?;
    store.remove(&id("milan")).await?;
    assert!(store.load().await?.is_empty());

    // The link checker's status becomes the ForeignCluster's NetworkReady condition, written
    // only when it changes.
    let fcs: Api<ForeignCluster> = Api::all(client.clone());
    let fc = ForeignCluster::new(
        "milan",
        ForeignClusterSpec {
            cluster_id: id("milan"),
            cluster_name: None,
            peering_endpoint: None,
            public_key_fingerprint: None,
            discovery: DiscoverySpec {
                source: DiscoverySource::Manual,
                auto_peer: false,
            },
            role: PeeringRole::Provider,
        },
    );
    fcs.create(&PostParams::default(), &fc).await?;
    let now = SystemTime::now();
    let up = link_status(Some(now), 10, 10, now, Duration::from_secs(180));
    assert!(report_network_ready(&fcs, "milan", &up).await?);
    assert!(!report_network_ready(&fcs, "milan", &up).await?);
    let got = fcs.get_status("milan").await?.status.ok_or("no status")?;
    assert!(
        is_true(&got.conditions, NETWORK_READY),
        "{:?}",
        got.conditions
    );
    let down = link_status(
        Some(now - Duration::from_secs(600)),
        10,
        10,
        now,
        Duration::from_secs(180),
    );
    assert!(report_network_ready(&fcs, "milan", &down).await?);
    let got = fcs.get_status("milan").await?.status.ok_or("no status")?;
    let c = find(&got.conditions, NETWORK_READY).ok_or("no condition")?;
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "TunnelDisconnected")
    );
    let e = report_network_ready(&fcs, "paris", &up)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("reading ForeignCluster paris"), "{e}");

    lab.stop().await?;
    Ok(())
}
