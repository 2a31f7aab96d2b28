//! The routed fabric under liqo-net's `NetworkController`, as the WireGuard fabric runs in
//! `providers/wireguard-userspace/tests/controller.rs`: two lab clusters peer through
//! `liqo_peering_csr::peer`, each side's controller drives a `RoutedFabric`. With disjoint pod
//! CIDRs both sides report `NetworkReady`, publish identity views of each other and write no
//! `Tunnel` (there is none); with the same pod CIDR both refuse the link (`ConnectFailed`,
//! naming both CIDRs). Unpeering releases everything. Needs only the lab's binaries: the fabric
//! makes nothing on the host.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    runtime::wait::{Condition, await_condition},
};
use liqo_core::{
    CidrMapping, ClusterId, NetworkFabric, NetworkParameters, ResourceOffer,
    conditions::{find, is_true},
    crds::{ForeignCluster, NetworkConfig, Tunnel, foreign_cluster_condition::NETWORK_READY},
    names,
};
use liqo_fabric_routed::RoutedFabric;
use liqo_lab::{ClusterSpec, LabSpec};
use liqo_net::{NetworkController, controller::FINALIZER};
use liqo_peering_csr::{
    ApiEndpoint, IdentityOptions, LocalIdentity, NetworkSource, OfferPolicy, ProviderConfig,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(90);

fn params(pod: &str, external: &str) -> NetworkParameters {
    let mut p = NetworkParameters::new(pod.parse().unwrap(), "10.96.0.0/12".parse().unwrap());
    p.external_cidr = Some(external.parse().unwrap());
    p
}

async fn wait_fc(
    client: &Client,
    name: &str,
    what: &str,
    cond: impl Condition<ForeignCluster>,
) -> TestResult {
    let api: Api<ForeignCluster> = Api::all(client.clone());
    if tokio::time::timeout(WAIT, await_condition(api.clone(), name, cond))
        .await
        .is_err()
    {
        let now = api.get_opt(name).await?.and_then(|f| f.status);
        return Err(
            format!("ForeignCluster {name}: timed out waiting until {what}: {now:?}").into(),
        );
    }
    Ok(())
}

fn network_ready(fc: Option<&ForeignCluster>) -> bool {
    fc.and_then(|f| f.status.as_ref())
        .is_some_and(|s| is_true(&s.conditions, NETWORK_READY))
}

/// `NetworkReady=False` with `reason`, its message containing `text`.
fn refused(reason: &'static str, text: String) -> impl Condition<ForeignCluster> {
    move |fc: Option<&ForeignCluster>| {
        fc.and_then(|f| f.status.as_ref())
            .and_then(|s| find(&s.conditions, NETWORK_READY))
            .is_some_and(|c| c.status == "False" && c.reason == reason && c.message.contains(&text))
    }
}

/// Gone, or without the network finalizer and condition.
fn released(fc: Option<&ForeignCluster>) -> bool {
    fc.is_none_or(|f| {
        !f.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|x| x == FINALIZER)
            && f.status
                .as_ref()
                .is_none_or(|s| find(&s.conditions, NETWORK_READY).is_none())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_link_routed_clusters_and_refuse_overlaps() -> TestResult {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "liqo_net=info,liqo_fabric_routed=info,liqo_lab=warn".into()),
        )
        .with_test_writer()
        .try_init();
    let lab = liqo_lab::shared(|| {
        LabSpec::new([ClusterSpec::new("routed-a"), ClusterSpec::new("routed-b")])
    })
    .await?;
    let (la, lb) = (
        lab.cluster("routed-a").ok_or("routed-a")?,
        lab.cluster("routed-b").ok_or("routed-b")?,
    );
    let (ca, cb) = (la.client()?, lb.client()?);
    liqo_core::crds::install(&ca, &[], "liqo-test").await?;
    liqo_core::crds::install(&cb, &[], "liqo-test").await?;
    let options = IdentityOptions::default();
    let id_a = LocalIdentity::load_or_create(&ca, &options)
        .await?
        .id()
        .clone();
    let id_b = LocalIdentity::load_or_create(&cb, &options)
        .await?
        .id()
        .clone();
    let provider = params("10.245.0.0/16", "10.251.0.0/16");

    // Disjoint networks: linked.
    round(
        (&ca, &cb),
        (&id_a, &id_b),
        lb,
        (params("10.244.0.0/16", "10.250.0.0/16"), provider.clone()),
        None,
    )
    .await
    .map_err(|e| format!("disjoint networks: {e}"))?;
    for (client, peer) in [(&cb, &id_a), (&ca, &id_b)] {
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = names::tenant_namespace(peer);
        tokio::time::timeout(
            WAIT,
            await_condition(api, &ns, |n: Option<&Namespace>| n.is_none()),
        )
        .await
        .map_err(|_| format!("namespace {ns} not removed after unpeering"))??;
    }
    // The same pod CIDR on both sides: refused on both, naming both CIDRs.
    round(
        (&ca, &cb),
        (&id_a, &id_b),
        lb,
        (params("10.245.0.0/16", "10.250.0.0/16"), provider),
        Some("pod CIDR 10.245.0.0/16 overlaps this cluster's pod CIDR 10.245.0.0/16"),
    )
    .await
    .map_err(|e| format!("overlapping networks: {e}"))?;
    Ok(())
}

/// Peers `a` (consumer) with `b` (provider) over routed fabrics with `networks`, checks the
/// outcome (`refusal`: the text both sides' `NetworkReady` must show), then unpeers.
async fn round(
    (ca, cb): (&Client, &Client),
    (id_a, id_b): (&ClusterId, &ClusterId),
    provider_cluster: &liqo_lab::Cluster,
    (net_a, net_b): (NetworkParameters, NetworkParameters),
    refusal: Option<&str>,
) -> TestResult {
    let fa = Arc::new(RoutedFabric::new(net_a));
    let fb = Arc::new(RoutedFabric::new(net_b.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let controller = |client: &Client, me: &ClusterId, f: &Arc<RoutedFabric>| {
        let c = NetworkController::new(client.clone(), me.clone(), f.clone())
            .with_check_interval(Duration::from_secs(1));
        let links = c.links();
        let mut stop = stop_rx.clone();
        let task = tokio::spawn(c.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
        (links, task)
    };
    let (links_a, run_a) = controller(ca, id_a, &fa);
    let (links_b, run_b) = controller(cb, id_b, &fb);

    let provider_config = || {
        let fabric: Arc<dyn NetworkFabric> = fb.clone();
        ProviderConfig::new(
            ApiEndpoint::new(provider_cluster.api_url(), provider_cluster.ca_cert_pem()),
            OfferPolicy::Absolute(ResourceOffer::new("2", "4Gi", 10)),
            NetworkSource::Fabric(fabric),
        )
    };
    let consumer_network = fa.local_parameters().await?;
    let grant = liqo_peering_csr::peer(ca, cb, provider_config(), consumer_network.clone()).await?;
    assert_eq!(grant.network.pod_cidr, net_b.pod_cidr);
    assert_eq!(
        grant.network.wireguard_public_key, None,
        "a routed fabric announces no gateway"
    );

    match refusal {
        None => {
            wait_fc(ca, id_b.as_str(), "NetworkReady=True", network_ready).await?;
            wait_fc(cb, id_a.as_str(), "NetworkReady=True", network_ready).await?;
            // Both views, on the provider in the consumer's tenant namespace, are identities.
            let views: Api<NetworkConfig> =
                Api::namespaced(cb.clone(), &names::tenant_namespace(id_a));
            for (about, real) in [(id_b, net_b.pod_cidr), (id_a, consumer_network.pod_cidr)] {
                let v = views.get(about.as_str()).await?;
                assert_eq!(&v.spec.cluster_id, about);
                assert_eq!(v.spec.remote_pod_cidr, real);
                assert_eq!(
                    v.status.as_ref().and_then(|s| s.remapped_pod_cidr),
                    Some(real),
                    "{v:?}"
                );
            }
            // Each side's link and learned view are identities.
            for (links, peer, theirs, ours) in [
                (&links_a, id_b, &net_b, &consumer_network),
                (&links_b, id_a, &consumer_network, &net_b),
            ] {
                let snap = links.get(peer).ok_or("no link")?;
                assert_eq!(
                    snap.link.remote_mappings,
                    vec![
                        CidrMapping::identity(theirs.pod_cidr),
                        CidrMapping::identity(theirs.external_cidr.ok_or("external")?)
                    ]
                );
                assert_eq!(snap.view.state, liqo_net::controller::ViewState::Applied);
                assert_eq!(
                    snap.view.mappings,
                    vec![
                        CidrMapping::identity(ours.pod_cidr),
                        CidrMapping::identity(ours.external_cidr.ok_or("external")?)
                    ]
                );
                let ip = "10.245.3.4".parse()?;
                let tr = links.translator(peer).ok_or("no translator")?;
                assert_eq!(
                    tr.to_local_view(ip).ok(),
                    (theirs.pod_cidr.contains(ip)).then_some(ip)
                );
            }
            // No tunnel, so no Tunnel objects.
            for (client, peer) in [(ca, id_b), (cb, id_a)] {
                let api: Api<Tunnel> =
                    Api::namespaced(client.clone(), &names::tenant_namespace(peer));
                assert!(api.get_opt(peer.as_str()).await?.is_none());
            }
            assert_eq!(fa.peers(), vec![id_b.clone()]);
            assert_eq!(fb.peers(), vec![id_a.clone()]);
        }
        Some(text) => {
            let cond = |t: &str| refused("ConnectFailed", t.to_owned());
            wait_fc(
                ca,
                id_b.as_str(),
                "NetworkReady=False ConnectFailed",
                cond(text),
            )
            .await?;
            wait_fc(
                cb,
                id_a.as_str(),
                "NetworkReady=False ConnectFailed",
                cond(text),
            )
            .await?;
            assert!(fa.peers().is_empty() && fb.peers().is_empty());
            assert!(links_a.get(id_b).is_none() && links_b.get(id_a).is_none());
        }
    }

    liqo_peering_csr::unpeer(ca, cb, provider_config(), consumer_network).await?;
    wait_fc(
        ca,
        id_b.as_str(),
        "released by the network controller",
        released,
    )
    .await?;
    wait_fc(
        cb,
        id_a.as_str(),
        "released by the network controller",
        released,
    )
    .await?;
    assert!(fa.peers().is_empty() && fb.peers().is_empty());
    stop_tx.send(true)?;
    run_a.await??;
    run_b.await??;
    Ok(())
}
