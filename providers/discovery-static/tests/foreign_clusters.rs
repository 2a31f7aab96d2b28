//! ForeignClusterDiscovery against a real API server (liqo-lab): hand-made Manual FCs are
//! reported, changed and removed; FCs made by components, or not Manual, are not.

use std::time::Duration;

use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use liqo_core::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream, PublicKey,
    crds::{DiscoverySpec, ForeignCluster, ForeignClusterSpec, PeeringRole},
    labels,
};
use liqo_discovery_static::ForeignClusterDiscovery;
use liqo_lab::{ClusterSpec, LabSpec};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(30);

fn fc(name: &str, source: DiscoverySource, endpoint: Option<&str>) -> ForeignCluster {
    ForeignCluster::new(
        name,
        ForeignClusterSpec {
            cluster_id: name.parse().unwrap(),
            cluster_name: Some(format!("Cluster {name}")),
            peering_endpoint: endpoint.map(Into::into),
            public_key_fingerprint: Some(
                PublicKey::from_bytes(name.as_bytes().to_vec()).fingerprint(),
            ),
            discovery: DiscoverySpec {
                source,
                auto_peer: false,
            },
            role: PeeringRole::None,
        },
    )
}

fn show(item: Result<DiscoveryEvent, DiscoveryError>) -> String {
    match item {
        Ok(DiscoveryEvent::Added(a)) => format!("added {} {}", a.cluster_id, a.peering_endpoint),
        Ok(DiscoveryEvent::Updated(a)) => {
            format!("updated {} {}", a.cluster_id, a.peering_endpoint)
        }
        Ok(DiscoveryEvent::Expired { cluster_id, .. }) => format!("expired {cluster_id}"),
        Err(e) => format!("error {e}"),
    }
}

async fn next(s: &mut DiscoveryStream) -> String {
    show(
        timeout(WAIT, s.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_made_foreign_clusters_are_manual_peers() {
    let lab = liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("static")]))
        .await
        .unwrap_or_else(|e| panic!("the lab did not start: {e}"));
    let client = lab.cluster("static").unwrap().client().unwrap();
    liqo_core::crds::install(&client, &[], "liqo-test")
        .await
        .unwrap_or_else(|e| panic!("installing the CRDs: {e}"));
    let fcs: Api<ForeignCluster> = Api::all(client.clone());
    let u = format!("{:x}", std::process::id());
    let name = |n: &str| format!("{n}-{u}");
    let pp = PostParams::default();

    // Present before the watch starts: reported by the initial list.
    fcs.create(
        &pp,
        &fc(
            &name("early"),
            DiscoverySource::Manual,
            Some("https://early:1"),
        ),
    )
    .await
    .unwrap();
    let source = ForeignClusterDiscovery::new(client.clone());
    let mut s = source.watch().await.unwrap();
    assert_eq!(
        next(&mut s).await,
        format!("added {} https://early:1", name("early"))
    );

    // Not reported: discovered ones, ones made by a component, and it says why for a Manual one
    // without an endpoint.
    fcs.create(
        &pp,
        &fc(
            &name("found"),
            DiscoverySource::Mdns,
            Some("https://found:1"),
        ),
    )
    .await
    .unwrap();
    let mut managed = fc(
        &name("managed"),
        DiscoverySource::Manual,
        Some("https://managed:1"),
    );
    managed
        .labels_mut()
        .insert(labels::MANAGED_BY.into(), "liqo-discovery".into());
    fcs.create(&pp, &managed).await.unwrap();
    fcs.create(&pp, &fc(&name("noep"), DiscoverySource::Manual, None))
        .await
        .unwrap();
    let e = next(&mut s).await;
    assert!(
        e.contains(&name("noep")) && e.contains("peeringEndpoint"),
        "{e}"
    );

    // Changed, then deleted.
    fcs.patch(
        &name("early"),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"peeringEndpoint": "https://early:2"}})),
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut s).await,
        format!("updated {} https://early:2", name("early"))
    );
    fcs.delete(&name("early"), &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(next(&mut s).await, format!("expired {}", name("early")));

    for n in ["found", "managed", "noep"] {
        let _ = fcs.delete(&name(n), &DeleteParams::default()).await;
    }
}
