//! The runtime composes test providers: discovery feeds the peer table, peering and fabric run in
//! order with rollback, reflectors are supervised and cleaned up.

use std::time::Duration;

use liqo_core::{
    ClusterIdentity, DiscoveryError, DiscoveryEvent, DiscoverySource, PeeringTarget, Runtime,
    RuntimeError, RuntimeEvent,
    testing::{IdentityFabric, RecordingReflector, StaticDiscovery, TestPeering, advertisement},
};
use tokio::sync::oneshot;

fn me() -> ClusterIdentity {
    ClusterIdentity::new("home".parse().unwrap(), "Home")
}

fn target(id: &str) -> PeeringTarget {
    PeeringTarget {
        cluster_id: Some(id.parse().unwrap()),
        endpoint: format!("https://{id}:6443"),
        expected_fingerprint: None,
    }
}

/// A client that is never used to reach a server (test reflectors do not call the API).
fn offline_client() -> kube::Client {
    let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

async fn next_matching(
    rx: &mut tokio::sync::broadcast::Receiver<RuntimeEvent>,
    pred: impl Fn(&RuntimeEvent) -> bool,
) -> RuntimeEvent {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = rx.recv().await.expect("event channel open");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
    .expect("expected event did not arrive within 5 s")
}

#[test]
fn build_names_every_missing_provider() {
    let err = Runtime::builder(me()).build().unwrap_err();
    assert!(
        matches!(&err, RuntimeError::Incomplete(m) if m == &["Discovery", "PeeringAuthority", "NetworkFabric"])
    );
    assert_eq!(
        err.to_string(),
        "runtime is missing a provider for: Discovery, PeeringAuthority, NetworkFabric"
    );
    let err = Runtime::builder(me())
        .peering(TestPeering::default())
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "runtime is missing a provider for: Discovery, NetworkFabric"
    );
}

#[tokio::test]
async fn discovery_feeds_peer_table_with_precedence_and_expiry() {
    let discovery = StaticDiscovery::new(vec![advertisement("rome", DiscoverySource::Mdns)]);
    let tx = discovery.sender();
    let advertised = discovery.advertised();
    let runtime = Runtime::builder(me())
        .discovery(discovery)
        .peering(TestPeering::default())
        .fabric(IdentityFabric::default())
        .advertise(advertisement("home", DiscoverySource::Manual))
        .build()
        .unwrap();
    let handle = runtime.handle();
    let mut events = handle.subscribe();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));

    let e = next_matching(&mut events, |e| {
        matches!(e, RuntimeEvent::PeerDiscovered(_))
    })
    .await;
    assert!(matches!(e, RuntimeEvent::PeerDiscovered(a) if a.cluster_id.as_str() == "rome"));
    assert_eq!(
        advertised.lock().unwrap().len(),
        1,
        "the runtime advertises this cluster once"
    );

    // A manual record for the same cluster wins over mDNS.
    let mut manual = advertisement("rome", DiscoverySource::Manual);
    manual.peering_endpoint = "https://rome.manual:6443".into();
    tx.send(Ok(DiscoveryEvent::Added(manual))).unwrap();
    next_matching(
        &mut events,
        |e| matches!(e, RuntimeEvent::PeerUpdated(a) if a.source == DiscoverySource::Manual),
    )
    .await;
    // A later mDNS refresh does not override it.
    tx.send(Ok(DiscoveryEvent::Updated(advertisement(
        "rome",
        DiscoverySource::Mdns,
    ))))
    .unwrap();
    // Our own echo is ignored; a problem is reported but the stream goes on.
    tx.send(Ok(DiscoveryEvent::Added(advertisement(
        "home",
        DiscoverySource::Mdns,
    ))))
    .unwrap();
    tx.send(Err(DiscoveryError::MalformedRecord {
        origin: "10.0.0.9".into(),
        reason: "bad TXT".into(),
    }))
    .unwrap();
    next_matching(
        &mut events,
        |e| matches!(e, RuntimeEvent::DiscoveryProblem(m) if m.contains("bad TXT")),
    )
    .await;
    let peers = handle.peers().await;
    assert_eq!(peers.len(), 1, "own echo must not become a peer: {peers:?}");
    assert_eq!(
        peers[&"rome".parse().unwrap()]
            .effective()
            .unwrap()
            .peering_endpoint,
        "https://rome.manual:6443"
    );

    // Expiry of one source keeps the other; expiry of the last removes the unpeered cluster.
    tx.send(Ok(DiscoveryEvent::Expired {
        cluster_id: "rome".parse().unwrap(),
        source: DiscoverySource::Manual,
    }))
    .unwrap();
    next_matching(
        &mut events,
        |e| matches!(e, RuntimeEvent::PeerUpdated(a) if a.source == DiscoverySource::Mdns),
    )
    .await;
    tx.send(Ok(DiscoveryEvent::Expired {
        cluster_id: "rome".parse().unwrap(),
        source: DiscoverySource::Mdns,
    }))
    .unwrap();
    next_matching(&mut events, |e| matches!(e, RuntimeEvent::PeerExpired(_))).await;
    assert!(handle.peers().await.is_empty());

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn auto_peer_is_off_by_default_and_per_source() {
    let discovery = StaticDiscovery::new(vec![
        advertisement("rome", DiscoverySource::Mdns),
        advertisement("oslo", DiscoverySource::Manual),
    ]);
    let peering = TestPeering::default();
    let runtime = Runtime::builder(me())
        .discovery(discovery)
        .peering(peering.clone())
        .fabric(IdentityFabric::default())
        .auto_peer(DiscoverySource::Manual)
        .build()
        .unwrap();
    let handle = runtime.handle();
    let mut events = handle.subscribe();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    let e = next_matching(&mut events, |e| matches!(e, RuntimeEvent::Peered(_))).await;
    assert!(matches!(e, RuntimeEvent::Peered(l) if l.cluster.as_str() == "oslo"));
    // rome came from mDNS, which may not auto-peer.
    assert_eq!(peering.calls(), vec!["request:oslo"]);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn fabric_failure_rolls_back_the_grant() {
    let peering = TestPeering::default();
    let fabric = IdentityFabric::default();
    fabric.fail_connects("no route to gateway");
    let runtime = Runtime::builder(me())
        .discovery(StaticDiscovery::new(vec![]))
        .peering(peering.clone())
        .fabric(fabric.clone())
        .build()
        .unwrap();
    let handle = runtime.handle();
    let err = handle.peer(target("rome")).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Fabric(_)), "{err}");
    assert!(err.to_string().contains("no route to gateway"));
    assert_eq!(peering.calls(), vec!["request:rome", "release:rome"]);
    assert!(handle.peers().await.values().all(|p| !p.is_peered()));
}

#[tokio::test]
async fn a_provider_answering_as_someone_else_is_released() {
    let peering = TestPeering::default();
    peering.answer_as("impostor");
    let fabric = IdentityFabric::default();
    let runtime = Runtime::builder(me())
        .discovery(StaticDiscovery::new(vec![]))
        .peering(peering.clone())
        .fabric(fabric.clone())
        .build()
        .unwrap();
    let err = runtime.handle().peer(target("rome")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "asked to peer with rome but the provider identified as impostor"
    );
    assert_eq!(
        peering.calls(),
        vec!["request:impostor", "release:impostor"]
    );
    assert!(
        fabric.calls().is_empty(),
        "the fabric must not be touched for an impostor"
    );
}

#[tokio::test]
async fn peer_reflect_unpeer_leaves_nothing() {
    let peering = TestPeering::default();
    let fabric = IdentityFabric::default();
    let cms = RecordingReflector::new("ConfigMap");
    let secrets = RecordingReflector::new("Secret").failing_first(2);
    let runtime = Runtime::builder(me())
        .discovery(StaticDiscovery::new(vec![]))
        .peering(peering.clone())
        .fabric(fabric.clone())
        .reflector(cms.clone())
        .reflector(secrets.clone())
        .reflector_backoff(Duration::from_millis(10), Duration::from_millis(40))
        .local_client(offline_client())
        .build()
        .unwrap();
    let handle = runtime.handle();
    let mut events = handle.subscribe();
    let rome = "rome".parse().unwrap();

    assert!(matches!(
        handle.reflect(&rome, "apps", "apps-home").await,
        Err(RuntimeError::NotPeered(_))
    ));
    let link = handle.peer(target("rome")).await.unwrap();
    assert_eq!(
        link.translator()
            .to_local_view("10.244.1.2".parse().unwrap())
            .unwrap()
            .to_string(),
        "10.244.1.2"
    );
    // Peering again is idempotent.
    handle.peer(target("rome")).await.unwrap();
    assert_eq!(peering.calls(), vec!["request:rome"]);

    handle.reflect(&rome, "apps", "apps-home").await.unwrap();
    handle.reflect(&rome, "apps", "apps-home").await.unwrap();
    assert_eq!(handle.reflected_namespaces(&rome).await, vec!["apps"]);
    // The failing reflector is restarted until it runs.
    for _ in 0..2 {
        next_matching(
            &mut events,
            |e| matches!(e, RuntimeEvent::ReflectorFailed { kind, .. } if kind == "Secret"),
        )
        .await;
    }
    tokio::time::timeout(Duration::from_secs(5), async {
        while secrets.log().len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await
        }
    })
    .await
    .expect("secret reflector restarted");

    handle.unpeer(&rome).await.unwrap();
    assert_eq!(
        cms.log(),
        vec![
            "run:rome:apps:apps-home",
            "stop:rome:apps:apps-home",
            "cleanup:rome:apps:apps-home"
        ]
    );
    assert_eq!(secrets.log().last().unwrap(), "cleanup:rome:apps:apps-home");
    assert_eq!(fabric.calls(), vec!["connect:rome", "disconnect:rome"]);
    assert!(fabric.linked().is_empty());
    assert_eq!(peering.calls(), vec!["request:rome", "release:rome"]);
    assert!(handle.peers().await.is_empty());
    assert!(handle.reflected_namespaces(&rome).await.is_empty());
    assert!(matches!(
        handle.unpeer(&rome).await,
        Err(RuntimeError::NotPeered(_))
    ));
}

#[tokio::test]
async fn reflect_without_local_client_is_a_clear_error() {
    let runtime = Runtime::builder(me())
        .discovery(StaticDiscovery::new(vec![]))
        .peering(TestPeering::default())
        .fabric(IdentityFabric::default())
        .build()
        .unwrap();
    let h = runtime.handle();
    h.peer(target("rome")).await.unwrap();
    let err = h
        .reflect(&"rome".parse().unwrap(), "a", "b")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("local Kubernetes client"), "{err}");
}

#[tokio::test]
async fn shutdown_stops_reflection_but_keeps_peerings() {
    let fabric = IdentityFabric::default();
    let peering = TestPeering::default();
    let r = RecordingReflector::new("Pod");
    let runtime = Runtime::builder(me())
        .discovery(StaticDiscovery::new(vec![]))
        .peering(peering.clone())
        .fabric(fabric.clone())
        .reflector(r.clone())
        .local_client(offline_client())
        .build()
        .unwrap();
    let h = runtime.handle();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    h.peer(target("rome")).await.unwrap();
    h.reflect(&"rome".parse().unwrap(), "apps", "apps-home")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while r.log().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await
        }
    })
    .await
    .unwrap();
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(
        r.log(),
        vec!["run:rome:apps:apps-home", "stop:rome:apps:apps-home"],
        "no cleanup on shutdown"
    );
    assert_eq!(fabric.linked().len(), 1, "links survive an agent shutdown");
    assert_eq!(
        peering.calls(),
        vec!["request:rome"],
        "no release on shutdown"
    );
}

#[tokio::test]
async fn concurrent_peer_calls_request_once() {
    let peering = TestPeering::default();
    let runtime = Runtime::builder(me())
        .discovery(StaticDiscovery::new(vec![]))
        .peering(peering.clone())
        .fabric(IdentityFabric::default())
        .build()
        .unwrap();
    let h = runtime.handle();
    let (a, b) = tokio::join!(h.peer(target("rome")), h.peer(target("rome")));
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(peering.calls(), vec!["request:rome"]);
}
