//! The discovery controller against a real API server (liqo-lab): discovered peers become
//! ForeignClusters with the right spec and status; key mismatches are flagged and never replace
//! the pinned peer; expiry deletes them, except manual and peered ones; orphans are collected
//! after the grace period.
//!
//! One test function, one controller at a time: two controllers on one API server would each
//! judge the other's ForeignClusters.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::wait::{Condition, await_condition, conditions},
};
use liqo_core::{
    DiscoverySource, KeyFingerprint, PROTOCOL_VERSION, PeerAdvertisement, PublicKey,
    conditions::find,
    crds::{
        DiscoverySpec, ForeignCluster, ForeignClusterSpec, PeeringRole,
        foreign_cluster_condition as cond,
    },
    labels,
};
use liqo_discovery::{
    AutoPeerPolicy, ChannelDiscovery, ClaimConflict, CompositeDiscovery, ControllerConfig,
    DiscoveryController,
};
use liqo_lab::{ClusterSpec, LabSpec};
use tokio::{task::JoinHandle, time::timeout};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn fp(seed: u8) -> KeyFingerprint {
    PublicKey::from_bytes(vec![seed]).fingerprint()
}

fn ad(id: &str, ep: &str, key: u8) -> PeerAdvertisement {
    PeerAdvertisement {
        cluster_id: id.parse().unwrap(),
        cluster_name: format!("Cluster {id}"),
        peering_endpoint: ep.into(),
        key_fingerprint: Some(fp(key)),
        protocol_version: PROTOCOL_VERSION,
        source: DiscoverySource::Mdns,
        ttl: Some(Duration::from_secs(120)),
    }
}

async fn client() -> Client {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "liqo_discovery=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let lab = liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("disc")]))
        .await
        .unwrap_or_else(|e| panic!("the lab did not start: {e}"));
    let client = lab.cluster("disc").unwrap().client().unwrap();
    liqo_core::crds::install(&client, &[], "liqo-test")
        .await
        .unwrap_or_else(|e| panic!("installing the CRDs: {e}"));
    client
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), liqo_discovery::ControllerError>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        timeout(WAIT, self.task).await.unwrap().unwrap().unwrap();
    }
}

fn start(client: &Client, discovery: &CompositeDiscovery, config: ControllerConfig) -> Running {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let controller =
        DiscoveryController::new(client.clone(), discovery.clone()).with_config(config);
    let task = tokio::spawn(controller.run(async move { s.cancelled().await }));
    Running { stop, task }
}

/// Waits until the FC `name` satisfies `cond` (watch-based).
async fn wait_fc(
    api: &Api<ForeignCluster>,
    name: &str,
    what: &str,
    cond: impl Condition<ForeignCluster>,
) -> ForeignCluster {
    match timeout(WAIT, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(fc))) => fc,
        Ok(Ok(None)) => panic!("{name}: deleted while waiting for: {what}"),
        Ok(Err(e)) => panic!("{name}: watch failed while waiting for {what}: {e}"),
        Err(_) => panic!(
            "{name}: not {what} within {WAIT:?}; now: {:#?}",
            api.get_opt(name).await.ok().flatten()
        ),
    }
}

/// Waits until the FC `name` is deleted (returns at once if it is gone already).
async fn wait_deleted(api: &Api<ForeignCluster>, name: &str) {
    let Some(fc) = api.get_opt(name).await.unwrap() else {
        return;
    };
    let uid = fc.uid().unwrap();
    match timeout(
        WAIT,
        await_condition(api.clone(), name, conditions::is_deleted(&uid)),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("{name}: watch failed: {e}"),
        Err(_) => panic!(
            "{name}: not deleted within {WAIT:?}; now: {:#?}",
            api.get_opt(name).await.ok().flatten()
        ),
    }
}

fn condition_is(type_: &'static str, status: &'static str) -> impl Condition<ForeignCluster> {
    move |fc: Option<&ForeignCluster>| {
        fc.and_then(|f| f.status.as_ref())
            .and_then(|s| find(&s.conditions, type_))
            .is_some_and(|c| c.status == status)
    }
}

fn status_cond(fc: &ForeignCluster, type_: &str) -> (String, String, String, Option<i64>) {
    let c = find(&fc.status.as_ref().unwrap().conditions, type_)
        .unwrap_or_else(|| panic!("{} has no {type_} condition", fc.name_any()));
    (
        c.status.clone(),
        c.reason.clone(),
        c.message.clone(),
        c.observed_generation,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_peers_become_foreign_clusters() {
    let client = client().await;
    let fcs: Api<ForeignCluster> = Api::all(client.clone());
    let u = format!("{:x}", std::process::id());
    let id = |name: &str| format!("{name}-{u}");

    let (mdns, mdns_h) = ChannelDiscovery::new(DiscoverySource::Mdns);
    let (dns, dns_h) = ChannelDiscovery::new(DiscoverySource::Dns);
    let (manual, manual_h) = ChannelDiscovery::new(DiscoverySource::Manual);
    let discovery = CompositeDiscovery::builder()
        .source(mdns)
        .source(dns)
        .source(manual)
        .build();
    let config = ControllerConfig::default()
        .auto_peer(AutoPeerPolicy::none().allow(DiscoverySource::Dns))
        .local_cluster(id("me").parse().unwrap())
        .orphan_grace(Duration::from_secs(3600));
    let controller = start(&client, &discovery, config);
    let rome = id("rome");

    // 1. Found by mDNS: created with the record's data, the key pinned, auto-peer off.
    mdns_h.upsert(ad(&rome, "https://10.0.0.1:8443", 1));
    let fc = wait_fc(
        &fcs,
        &rome,
        "discovered",
        condition_is(cond::DISCOVERED, "True"),
    )
    .await;
    assert_eq!(fc.spec.cluster_id.as_str(), rome);
    assert_eq!(
        fc.spec.cluster_name.as_deref(),
        Some(format!("Cluster {rome}").as_str())
    );
    assert_eq!(
        fc.spec.peering_endpoint.as_deref(),
        Some("https://10.0.0.1:8443")
    );
    assert_eq!(fc.spec.public_key_fingerprint, Some(fp(1)));
    assert_eq!(
        fc.spec.discovery,
        DiscoverySpec {
            source: DiscoverySource::Mdns,
            auto_peer: false
        }
    );
    assert_eq!(fc.spec.role, PeeringRole::None);
    assert_eq!(
        fc.labels().get(labels::MANAGED_BY).map(String::as_str),
        Some("liqo-discovery")
    );
    assert_eq!(fc.labels().get(labels::REMOTE_CLUSTER_ID), Some(&rome));
    let status = fc.status.clone().unwrap();
    assert_eq!(status.discovery_sources, [DiscoverySource::Mdns]);
    assert!(status.last_seen.is_some());
    let (s, reason, message, generation) = status_cond(&fc, cond::DISCOVERED);
    assert_eq!((s.as_str(), reason.as_str()), ("True", "Reported"));
    assert!(message.contains("mDNS"), "{message}");
    assert_eq!(generation, fc.metadata.generation);
    assert_eq!(status_cond(&fc, cond::KEY_MISMATCH).0, "False");
    // The controller does not own spec.role (whoever peers sets it).
    let owns_role = fc.managed_fields().iter().any(|m| {
        m.manager.as_deref() == Some("liqo-discovery")
            && m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:role"))
    });
    assert!(!owns_role, "{:#?}", fc.managed_fields());

    // 2. DNS reports it too, at another endpoint: DNS wins, auto-peer follows DNS's policy.
    dns_h.upsert(ad(&rome, "https://rome.example.org:443", 1));
    let fc = wait_fc(
        &fcs,
        &rome,
        "moved to DNS",
        |fc: Option<&ForeignCluster>| {
            fc.is_some_and(|f| {
                f.spec.discovery.source == DiscoverySource::Dns
                    && f.status
                        .as_ref()
                        .is_some_and(|s| s.discovery_sources.len() == 2)
            })
        },
    )
    .await;
    assert_eq!(
        fc.spec.peering_endpoint.as_deref(),
        Some("https://rome.example.org:443")
    );
    assert!(
        fc.spec.discovery.auto_peer,
        "DNS is auto-peered by this policy"
    );
    assert_eq!(
        fc.status.as_ref().unwrap().discovery_sources,
        [DiscoverySource::Dns, DiscoverySource::Mdns]
    );

    // 3. mDNS now announces another key: flagged, nothing replaced.
    mdns_h.upsert(ad(&rome, "https://10.6.6.6:8443", 2));
    let fc = wait_fc(
        &fcs,
        &rome,
        "flagged",
        condition_is(cond::KEY_MISMATCH, "True"),
    )
    .await;
    let (_, reason, message, _) = status_cond(&fc, cond::KEY_MISMATCH);
    assert_eq!(reason, "FingerprintMismatch");
    assert!(
        message.contains("mDNS")
            && message.contains(&fp(2).to_string())
            && message.contains(&fp(1).to_string()),
        "{message}"
    );
    assert_eq!(
        fc.spec.public_key_fingerprint,
        Some(fp(1)),
        "the pin never moves"
    );
    assert_eq!(
        fc.spec.peering_endpoint.as_deref(),
        Some("https://rome.example.org:443")
    );
    assert_eq!(
        fc.status.as_ref().unwrap().discovery_sources,
        [DiscoverySource::Dns]
    );
    // A warning event was published.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let warned = timeout(WAIT, async {
        loop {
            let list = events.list(&ListParams::default()).await.unwrap();
            if list.items.iter().any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("KeyMismatch")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(rome.as_str())
            }) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(warned.is_ok(), "no KeyMismatch warning event");

    // 4. Only the mismatching record is left: not discovered, but kept (with its pin).
    dns_h.expire(&rome.parse().unwrap());
    let fc = wait_fc(
        &fcs,
        &rome,
        "undiscovered",
        condition_is(cond::DISCOVERED, "False"),
    )
    .await;
    assert_eq!(status_cond(&fc, cond::DISCOVERED).1, "OnlyMismatchedKeys");
    assert_eq!(fc.spec.public_key_fingerprint, Some(fp(1)));
    assert_eq!(
        fc.spec.peering_endpoint.as_deref(),
        Some("https://rome.example.org:443")
    );

    // 5. Nothing reports it: expired and deleted.
    mdns_h.expire(&rome.parse().unwrap());
    wait_deleted(&fcs, &rome).await;

    // 6. Manual ones stay: an administrator's FC, reported by nobody, then by a Manual source.
    let naples = id("naples");
    let spec = ForeignClusterSpec {
        cluster_id: naples.parse().unwrap(),
        cluster_name: Some("Naples".into()),
        peering_endpoint: Some("https://naples.example.org:6443".into()),
        public_key_fingerprint: Some(fp(3)),
        discovery: DiscoverySpec {
            source: DiscoverySource::Manual,
            auto_peer: false,
        },
        role: PeeringRole::None,
    };
    fcs.create(
        &PostParams::default(),
        &ForeignCluster::new(&naples, spec.clone()),
    )
    .await
    .unwrap();
    let fc = wait_fc(
        &fcs,
        &naples,
        "judged",
        condition_is(cond::DISCOVERED, "False"),
    )
    .await;
    assert_eq!(status_cond(&fc, cond::DISCOVERED).1, "NotReported");
    let mut manual_ad = ad(&naples, "https://naples.example.org:6443", 3);
    manual_ad.ttl = None;
    manual_h.upsert(manual_ad);
    wait_fc(
        &fcs,
        &naples,
        "discovered",
        condition_is(cond::DISCOVERED, "True"),
    )
    .await;
    // mDNS sees it elsewhere with the right key: it is a source, but the hand-made spec stays.
    mdns_h.upsert(ad(&naples, "https://10.0.0.3:1", 3));
    let fc = wait_fc(
        &fcs,
        &naples,
        "two sources",
        |fc: Option<&ForeignCluster>| {
            fc.and_then(|f| f.status.as_ref())
                .is_some_and(|s| s.discovery_sources.len() == 2)
        },
    )
    .await;
    assert_eq!(fc.spec, spec, "the controller never edits a hand-made spec");
    manual_h.expire(&naples.parse().unwrap());
    mdns_h.expire(&naples.parse().unwrap());
    wait_fc(
        &fcs,
        &naples,
        "undiscovered",
        condition_is(cond::DISCOVERED, "False"),
    )
    .await;

    // 7. Peered ones stay, and so do discovered ones an administrator made Manual.
    let turin = id("turin");
    let genoa = id("genoa");
    mdns_h.upsert(ad(&turin, "https://10.0.0.4:1", 4));
    mdns_h.upsert(ad(&genoa, "https://10.0.0.5:1", 5));
    for name in [&turin, &genoa] {
        wait_fc(
            &fcs,
            name,
            "discovered",
            condition_is(cond::DISCOVERED, "True"),
        )
        .await;
    }
    // The peering module records the established role (its own field manager).
    fcs.patch_status(
        &turin,
        &PatchParams::apply("liqo-peering-test").force(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "liqo.io/v1alpha1", "kind": "ForeignCluster",
            "status": {"role": "Provider"},
        })),
    )
    .await
    .unwrap();
    fcs.patch(
        &genoa,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"discovery": {"source": "Manual"}}})),
    )
    .await
    .unwrap();
    mdns_h.expire(&turin.parse().unwrap());
    mdns_h.expire(&genoa.parse().unwrap());
    for name in [&turin, &genoa] {
        wait_fc(
            &fcs,
            name,
            "undiscovered",
            condition_is(cond::DISCOVERED, "False"),
        )
        .await;
    }
    let turin_fc = fcs.get(&turin).await.unwrap();
    assert_eq!(
        turin_fc.status.as_ref().unwrap().role,
        PeeringRole::Provider,
        "our status apply leaves the role alone"
    );

    // 8. This cluster's own announcement never becomes an FC.
    mdns_h.upsert(ad(&id("me"), "https://127.0.0.1:1", 9));
    let venice = id("venice");
    mdns_h.upsert(ad(&venice, "https://10.0.0.6:1", 6));
    wait_fc(
        &fcs,
        &venice,
        "discovered",
        condition_is(cond::DISCOVERED, "True"),
    )
    .await;
    assert!(fcs.get_opt(&id("me")).await.unwrap().is_none());

    // A provider refused a second instance claiming venice with another key (a claim conflict,
    // reported as an error item): flagged on the FC, which keeps its pin and endpoint.
    let mut impostor = ad(&venice, "https://10.6.6.6:1", 66);
    impostor.ttl = Some(Duration::from_secs(600));
    mdns_h.error(liqo_core::DiscoveryError::Other(Box::new(ClaimConflict {
        source_kind: DiscoverySource::Mdns,
        cluster_id: venice.parse().unwrap(),
        instance: "venice-2._liqo._tcp.local.".into(),
        fingerprint: impostor.key_fingerprint,
        owner: format!("{venice}._liqo._tcp.local."),
        owner_fingerprint: Some(fp(6)),
        advertisement: Box::new(impostor),
    })));
    let fc = wait_fc(
        &fcs,
        &venice,
        "flagged",
        condition_is(cond::KEY_MISMATCH, "True"),
    )
    .await;
    assert!(
        status_cond(&fc, cond::KEY_MISMATCH)
            .2
            .contains(&fp(66).to_string())
    );
    assert_eq!(fc.spec.public_key_fingerprint, Some(fp(6)));
    assert_eq!(
        fc.spec.peering_endpoint.as_deref(),
        Some("https://10.0.0.6:1")
    );
    assert_eq!(
        status_cond(&fc, cond::DISCOVERED).0,
        "True",
        "the owner is still trusted"
    );

    // 9. Restart with a short orphan grace: an FC no source reports any more is collected after
    //    the grace, one still reported stays; manual and peered ones stay.
    controller.stop().await;
    mdns_h.expire(&venice.parse().unwrap());
    let milan = id("milan");
    mdns_h.upsert(ad(&milan, "https://10.0.0.7:1", 7));
    let grace = Duration::from_secs(3);
    let config = ControllerConfig::default()
        .local_cluster(id("me").parse().unwrap())
        .orphan_grace(grace);
    let t = std::time::Instant::now();
    let controller = start(&client, &discovery, config);
    wait_fc(
        &fcs,
        &milan,
        "discovered",
        condition_is(cond::DISCOVERED, "True"),
    )
    .await;
    wait_deleted(&fcs, &venice).await;
    assert!(t.elapsed() >= grace, "collected before the grace");
    for name in [&naples, &turin, &genoa, &milan] {
        assert!(
            fcs.get_opt(name).await.unwrap().is_some(),
            "{name} must stay"
        );
    }
    let milan_fc = fcs.get(&milan).await.unwrap();
    assert!(
        !milan_fc.spec.discovery.auto_peer,
        "auto-peer is off by default"
    );

    // Clean up what this test made.
    controller.stop().await;
    for name in [&naples, &turin, &genoa, &milan] {
        let _ = fcs.delete(name, &Default::default()).await;
    }
    drop(discovery);
}
