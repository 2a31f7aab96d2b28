//! The `NetworkController` end to end: two lab clusters (both with pod CIDR 10.244.0.0/16)
//! peer through `liqo_peering_csr::peer`, each side's fabric runs in its gateway's network
//! namespace through `Netns` while the controllers run on the host (where the lab's API
//! servers listen); the controllers connect the fabrics, exchange their views of each other,
//! report `NetworkReady` and `Tunnel`s, and pods talk at remapped addresses. Unpeering
//! disconnects and removes everything. Needs root, `ip`, `nft`, `ping` and `wireguard-go`.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    runtime::wait::{Condition, await_condition},
};
use liqo_core::{
    ClusterId, NetworkFabric, NetworkParameters, ResourceOffer,
    conditions::is_true,
    crds::{ForeignCluster, NetworkConfig, Tunnel, foreign_cluster_condition::NETWORK_READY},
    names,
};
use liqo_fabric_wireguard::{FabricConfig, GatewayConfig, WireGuardFabric};
use liqo_lab::{ClusterSpec, LabSpec};
use liqo_net::{
    IpamConfig, Links, Netns, NetnsFabric, NetworkController, controller::FINALIZER,
    store::MemoryStore,
};
use liqo_peering_csr::{
    ApiEndpoint, IdentityOptions, LocalIdentity, NetworkSource, OfferPolicy, ProviderConfig,
};
use liqo_wireguard_userspace::{Implementation, Userspace};

type Fabric = NetnsFabric<WireGuardFabric<Userspace, MemoryStore>>;
type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(90);
const ECHO_PORT: u16 = 7100;

/// Starts a fabric inside cluster `i`'s gateway namespace.
async fn fabric(
    t: &Topology,
    i: usize,
    implementation: Implementation,
) -> Result<Fabric, Box<dyn std::error::Error + Send + Sync>> {
    let c = &t.clusters[i];
    let mut local = NetworkParameters::new("10.244.0.0/16".parse()?, "10.96.0.0/12".parse()?);
    local.gateway_endpoint = Some(format!("{}:51820", c.underlay));
    let mut gateway = GatewayConfig::new(&c.iface, 51820);
    gateway.persistent_keepalive = Some(1);
    let config = FabricConfig {
        local,
        ipam: IpamConfig {
            reserved: vec!["172.31.0.0/24".parse()?],
            ..IpamConfig::default()
        },
        gateway,
    };
    let netns = Netns::named(&c.gw)?;
    Ok(NetnsFabric::start(netns, move || async move {
        WireGuardFabric::start(
            Userspace::new(implementation),
            MemoryStore::default(),
            config,
            liqo_fabric_wireguard::generate_private_key(),
        )
        .await
    })
    .await?)
}

async fn wait_fc(
    client: &Client,
    name: &str,
    what: &str,
    cond: impl Condition<ForeignCluster>,
) -> TestResult {
    let api: Api<ForeignCluster> = Api::all(client.clone());
    tokio::time::timeout(WAIT, await_condition(api.clone(), name, cond))
        .await
        .map_err(|_| format!("ForeignCluster {name}: timed out waiting until {what}"))??;
    Ok(())
}

fn network_ready(fc: Option<&ForeignCluster>) -> bool {
    fc.and_then(|f| f.status.as_ref())
        .is_some_and(|s| is_true(&s.conditions, NETWORK_READY))
}

/// Gone, or without our finalizer and our condition.
fn released(fc: Option<&ForeignCluster>) -> bool {
    fc.is_none_or(|f| {
        !f.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|x| x == FINALIZER)
            && f.status
                .as_ref()
                .is_none_or(|s| liqo_core::conditions::find(&s.conditions, NETWORK_READY).is_none())
    })
}

fn link_of(links: &Links, peer: &ClusterId) -> liqo_core::PeerLink {
    links
        .get(peer)
        .unwrap_or_else(|| panic!("no link with {peer}"))
        .link
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_connect_peers_from_peering_state() -> TestResult {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "liqo_net=info,liqo_fabric_wireguard=info,liqo_lab=warn".into()
            }),
        )
        .with_test_writer()
        .try_init();
    let lab =
        liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("net-a"), ClusterSpec::new("net-b")]))
            .await?;
    let (la, lb) = (
        lab.cluster("net-a").ok_or("net-a")?,
        lab.cluster("net-b").ok_or("net-b")?,
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

    // wireguard-go (a child process) and boringtun (in-process threads) must both be born in
    // the gateway's namespace. The same pair peers again for the second one.
    for implementation in [Implementation::wireguard_go(), Implementation::boringtun()] {
        let name = format!("{implementation:?}");
        round(implementation, (&ca, &cb), (&id_a, &id_b), lb)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        // Unpeering removed the tenant namespaces; wait until they are gone before peering again.
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
    }
    Ok(())
}

async fn round(
    implementation: Implementation,
    (ca, cb): (&Client, &Client),
    (id_a, id_b): (&ClusterId, &ClusterId),
    lb: &liqo_lab::Cluster,
) -> TestResult {
    // Everything in namespaces is removed when `t` drops, failure included.
    let mut t = Topology::new();
    let a = t.add_cluster("consumer", 1);
    let b = t.add_cluster("provider", 1);
    // Before the gateways exist: boringtun opens /dev/net/tun without O_CLOEXEC, so a process
    // spawned by this process while a device is open would keep that device alive.
    let pod_b = t.clusters[b].pods[0].ns.clone();
    t.echo_server(&pod_b, ECHO_PORT);
    let fa = Arc::new(fabric(&t, a, implementation.clone()).await?);
    let fb = Arc::new(fabric(&t, b, implementation).await?);
    // The gateways live in their namespaces, not in this process's.
    let host_links = ok(&["ip", "-o", "link"]);
    for c in &t.clusters {
        assert!(
            !host_links.contains(&c.iface),
            "{} made on the host",
            c.iface
        );
        assert!(ok_in(&c.gw, &["ip", "-o", "link"]).contains(&c.iface));
    }
    let result = scenario(&t, (a, b), (ca, cb), (id_a, id_b), (&fa, &fb), lb).await;
    // The gateways go whatever happened.
    let sa = NetworkFabric::shutdown(&*fa).await;
    let sb = NetworkFabric::shutdown(&*fb).await;
    result?;
    sa?;
    sb?;
    for c in &t.clusters {
        assert_clean(&c.gw, &c.iface);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn scenario(
    t: &Topology,
    (a, b): (usize, usize),
    (ca, cb): (&Client, &Client),
    (id_a, id_b): (&ClusterId, &ClusterId),
    (fa, fb): (&Arc<Fabric>, &Arc<Fabric>),
    provider_cluster: &liqo_lab::Cluster,
) -> TestResult {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let controller = |client: &Client, me: &ClusterId, f: &Arc<Fabric>| {
        let c = NetworkController::new(client.clone(), me.clone(), f.clone())
            .with_check_interval(Duration::from_secs(1));
        let links = c.links();
        let mut stop = stop_rx.clone();
        let task = tokio::spawn(c.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
        (links, task)
    };
    let (links_a, run_a) = controller(ca, id_a, fa);
    let (links_b, run_b) = controller(cb, id_b, fb);

    // Peer: a consumes from b; both hand out their gateway's real key and endpoint.
    let provider_config = || {
        ProviderConfig::new(
            ApiEndpoint::new(provider_cluster.api_url(), provider_cluster.ca_cert_pem()),
            OfferPolicy::Absolute(ResourceOffer::new("2", "4Gi", 10)),
            NetworkSource::Fabric(fb.clone()),
        )
    };
    let consumer_network = fa.local_parameters().await?;
    assert!(consumer_network.wireguard_public_key.is_some());
    let grant = liqo_peering_csr::peer(ca, cb, provider_config(), consumer_network.clone()).await?;
    assert_eq!(
        grant.network.wireguard_public_key,
        fb.local_parameters().await?.wireguard_public_key,
        "the provider handed out its gateway's key"
    );

    // NetworkReady on both sides: the link is up and each side applied the other's view.
    wait_fc(ca, id_b.as_str(), "NetworkReady=True", network_ready).await?;
    wait_fc(cb, id_a.as_str(), "NetworkReady=True", network_ready).await?;

    // The views, both on the provider in the consumer's tenant namespace.
    let views: Api<NetworkConfig> = Api::namespaced(cb.clone(), &names::tenant_namespace(id_a));
    let (link_ab, link_ba) = (link_of(&links_a, id_b), link_of(&links_b, id_a));
    let a_view_of_b = views.get(id_b.as_str()).await?;
    let b_view_of_a = views.get(id_a.as_str()).await?;
    assert_eq!(&a_view_of_b.spec.cluster_id, id_b);
    assert_eq!(
        a_view_of_b
            .status
            .as_ref()
            .and_then(|s| s.remapped_pod_cidr),
        Some(link_ab.remote_mappings[0].remapped),
        "the consumer published its view of the provider through its credential"
    );
    assert_eq!(
        b_view_of_a
            .status
            .as_ref()
            .and_then(|s| s.remapped_pod_cidr),
        Some(link_ba.remote_mappings[0].remapped)
    );
    assert!(
        !link_ab.remote_mappings[0].is_identity(),
        "same pod CIDR on both sides must be remapped: {link_ab:?}"
    );
    // Each side learned the other's view of itself.
    let snap = links_a.get(id_b).ok_or("no snapshot")?;
    assert_eq!(snap.view.mappings, link_ba.remote_mappings, "{snap:?}");
    // The virtual kubelet's translator knows both directions: the provider's pods as we reach
    // them, and our pods as the provider reaches them (for reflected EndpointSlices).
    let tr = links_a.translator(id_b).ok_or("no translator")?;
    assert_eq!(tr.mappings(), &link_ab.remote_mappings[..]);
    assert_eq!(tr.local_mappings(), &link_ba.remote_mappings[..], "{tr:?}");
    let our_pod: std::net::IpAddr = "10.244.3.8".parse()?;
    assert_eq!(
        tr.local_for_remote(our_pod),
        link_ba.remote_mappings[0].to_remapped(our_pod)
    );

    // Tunnels report a handshake.
    for (client, peer) in [(ca, id_b), (cb, id_a)] {
        let api: Api<Tunnel> = Api::namespaced(client.clone(), &names::tenant_namespace(peer));
        let has_handshake = |t: Option<&Tunnel>| {
            t.and_then(|t| t.status.as_ref())
                .is_some_and(|s| s.latest_handshake.is_some() && s.interface.is_some())
        };
        tokio::time::timeout(WAIT, await_condition(api, peer.as_str(), has_handshake))
            .await
            .map_err(|_| format!("Tunnel {peer}: no handshake reported"))??;
    }

    // The provider's counters before the pods talk.
    let tunnel_b: Api<Tunnel> = Api::namespaced(cb.clone(), &names::tenant_namespace(id_a));
    let before = tunnel_b
        .get(id_a.as_str())
        .await?
        .status
        .map(|s| (s.rx_bytes, s.tx_bytes))
        .unwrap_or_default();

    // Pods: a's pod reaches b's pod at b's remapped address; b sees a's remapped source.
    let pa = t.clusters[a].pods[0].ns.clone();
    let (ip_a, ip_b) = (t.clusters[a].pods[0].ip, t.clusters[b].pods[0].ip);
    assert_eq!(ip_a, ip_b, "both pods share 10.244.1.2");
    assert!(
        wait_ping(&pa, seen(&link_ab, ip_b), Duration::from_secs(20)),
        "consumer pod -> provider pod"
    );
    let (src, msg) = tcp(
        &pa,
        seen(&link_ab, ip_b),
        ECHO_PORT,
        "hello-through-the-controller",
    );
    assert_eq!(msg, "hello-through-the-controller");
    assert_eq!(
        src,
        seen(&link_ba, ip_a).to_string(),
        "the provider's pod sees the consumer's pod at its remapped address"
    );

    // The Tunnel's counters follow the traffic (the ping and the TCP exchange went through),
    // within a few link-check intervals.
    let counted = |t: Option<&Tunnel>| {
        t.and_then(|t| t.status.as_ref())
            .is_some_and(|s| s.rx_bytes > before.0 && s.tx_bytes > before.1)
    };
    if tokio::time::timeout(
        WAIT,
        await_condition(tunnel_b.clone(), id_a.as_str(), counted),
    )
    .await
    .is_err()
    {
        let now = tunnel_b.get(id_a.as_str()).await?.status;
        return Err(format!(
            "the provider's Tunnel does not count the pods' traffic: before {before:?}, now {now:?}"
        )
        .into());
    }

    // Unpeer: both controllers disconnect and drop their finalizers.
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
    for (f, links, peer) in [(fa, &links_a, id_b), (fb, &links_b, id_a)] {
        assert!(
            f.inner().peers().await.is_empty(),
            "gateway still has peers"
        );
        assert!(links.get(peer).is_none());
    }
    for c in &t.clusters {
        let iface = &c.iface;
        let tables = ok_in(&c.gw, &["nft", "list", "tables"]);
        assert!(!tables.contains("liqo-"), "nft tables left: {tables}");
        assert!(table_routes(&c.gw).trim().is_empty());
        let rules = ok_in(&c.gw, &["ip", "rule"]);
        assert!(!rules.contains(&format!("lookup {TABLE}")), "{rules}");
        let peers = ok_in(&c.gw, &["wg", "show", iface, "peers"]);
        assert!(peers.trim().is_empty(), "WireGuard peers left: {peers}");
    }
    let tunnels: Api<Tunnel> = Api::namespaced(ca.clone(), &names::tenant_namespace(id_b));
    assert!(
        tunnels
            .get_opt(id_b.as_str())
            .await
            .ok()
            .flatten()
            .is_none()
    );

    stop_tx.send(true)?;
    run_a.await??;
    run_b.await??;
    Ok(())
}
