//! The DNS provider against a real DNS server process (dnsmasq) on loopback.

mod common;

use std::time::{Duration, Instant};

use common::{Dnsmasq, Instance};
use futures::StreamExt;
use liqo_core::{Discovery, DiscoveryError, DiscoveryEvent, DiscoveryStream, PublicKey};
use liqo_discovery::ClaimConflict;
use liqo_discovery_dns::{DnsConfig, DnsDiscovery};
use tokio::time::timeout;

const DOMAIN: &str = "liqo.test";
const TTL: u32 = 2;

fn fp(seed: u8) -> String {
    PublicKey::from_bytes(vec![seed]).fingerprint().to_string()
}

fn txt(id: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["v=1".to_owned(), format!("id={id}")];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn cluster(id: &str, target: &str, key: u8) -> Instance {
    let fpv = format!("fp={}", fp(key));
    let t = txt(id, &[&fpv]);
    Instance::new(id)
        .srv(0, 0, 8443, target)
        .txt(&t.iter().map(String::as_str).collect::<Vec<_>>())
}

fn provider(server: &Dnsmasq) -> DnsDiscovery {
    DnsDiscovery::new(
        DnsConfig::new(DOMAIN)
            .nameservers([server.addr()])
            .requery_bounds(Duration::from_millis(500), Duration::from_secs(30))
            .query_timeout(Duration::from_millis(500)),
    )
    .unwrap()
}

fn show(item: &Result<DiscoveryEvent, DiscoveryError>) -> String {
    match item {
        Ok(DiscoveryEvent::Added(a)) => format!("added {} {}", a.cluster_id, a.peering_endpoint),
        Ok(DiscoveryEvent::Updated(a)) => {
            format!("updated {} {}", a.cluster_id, a.peering_endpoint)
        }
        Ok(DiscoveryEvent::Expired { cluster_id, .. }) => format!("expired {cluster_id}"),
        Err(e) => format!("error {e}"),
    }
}

/// The next item that is not a refresh of an unchanged record (`updated` with the same data is
/// what every re-query yields).
async fn next_change(s: &mut DiscoveryStream, within: Duration, seen: &mut Vec<String>) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let item = timeout(deadline - tokio::time::Instant::now(), s.next())
            .await
            .unwrap_or_else(|_| panic!("no change within {within:?}; seen {seen:?}"))
            .expect("the stream goes on");
        let text = show(&item);
        if let Ok(DiscoveryEvent::Updated(a)) = &item
            && seen.contains(&format!("added {} {}", a.cluster_id, a.peering_endpoint))
        {
            continue;
        }
        if text.starts_with("updated") && seen.contains(&text) {
            continue;
        }
        seen.push(text.clone());
        return text;
    }
}

#[tokio::test]
async fn records_added_and_removed_show_up_after_their_ttl() {
    let mut server = Dnsmasq::start(DOMAIN, TTL, &[cluster("rome", "gw.rome.liqo.test", 1)]);
    let dns = provider(&server);

    // One lookup: the TTLs are dnsmasq's local-ttl.
    let listing = dns.lookup().await.unwrap();
    assert_eq!(listing.instances.len(), 1, "{listing:?}");
    assert_eq!(listing.ttl, Some(Duration::from_secs(u64::from(TTL))));
    let rome = &listing.instances[0];
    assert_eq!(rome.record.cluster_id.as_str(), "rome");
    assert_eq!(
        rome.record.peering_endpoint,
        "https://gw.rome.liqo.test:8443"
    );
    assert_eq!(rome.record.key_fingerprint.unwrap().to_string(), fp(1));

    let mut s = dns.watch().await.unwrap();
    let mut seen = vec![];
    let bound = Duration::from_secs(u64::from(TTL) + 3);
    assert_eq!(
        next_change(&mut s, bound, &mut seen).await,
        "added rome https://gw.rome.liqo.test:8443"
    );

    // A cluster is added to the zone.
    server.restart(&[
        cluster("rome", "gw.rome.liqo.test", 1),
        cluster("milan", "gw.milan.liqo.test", 2),
    ]);
    let t = Instant::now();
    assert_eq!(
        next_change(&mut s, bound, &mut seen).await,
        "added milan https://gw.milan.liqo.test:8443"
    );
    eprintln!("addition seen after {:?} (TTL {TTL} s)", t.elapsed());

    // Its endpoint changes.
    server.restart(&[
        cluster("rome", "gw.rome.liqo.test", 1),
        cluster("milan", "gw2.milan.liqo.test", 2),
    ]);
    assert_eq!(
        next_change(&mut s, bound, &mut seen).await,
        "updated milan https://gw2.milan.liqo.test:8443"
    );

    // Rome is removed from the zone.
    server.restart(&[cluster("milan", "gw2.milan.liqo.test", 2)]);
    let t = Instant::now();
    assert_eq!(next_change(&mut s, bound, &mut seen).await, "expired rome");
    eprintln!("removal seen after {:?} (TTL {TTL} s)", t.elapsed());

    // The server goes away: errors are reported, the record is kept until its TTL has passed
    // since the last successful lookup, then expires.
    server.stop();
    let t = Instant::now();
    let mut errors = 0;
    loop {
        let e = next_change(&mut s, Duration::from_secs(15), &mut seen).await;
        if e.starts_with("error") {
            assert!(e.contains("DNS"), "{e}");
            errors += 1;
            continue;
        }
        assert_eq!(e, "expired milan");
        break;
    }
    // The failure is reported before (or with) the expiry, never silently.
    assert!(errors >= 1);
    eprintln!("expired {:?} after the server stopped", t.elapsed());
}

#[tokio::test]
async fn srv_priority_and_weight_order_the_endpoints() {
    let server = Dnsmasq::start(
        DOMAIN,
        30,
        &[Instance::new("rome")
            .srv(20, 100, 7443, "backup.liqo.test")
            .srv(10, 40, 8443, "gw2.liqo.test")
            .srv(10, 60, 8443, "gw1.liqo.test")
            .srv(10, 60, 8443, ".")
            // The TXT ep loses against the SRV records.
            .txt(&["v=1", "id=rome", "ep=https://txt.liqo.test:1"])],
    );
    let listing = provider(&server).lookup().await.unwrap();
    assert!(listing.problems.is_empty(), "{:?}", listing.problems);
    let rome = &listing.instances[0];
    let order: Vec<String> = rome.endpoints.iter().map(|e| e.url()).collect();
    assert_eq!(
        order,
        [
            "https://gw1.liqo.test:8443",
            "https://gw2.liqo.test:8443",
            "https://backup.liqo.test:7443"
        ]
    );
    assert_eq!(rome.record.peering_endpoint, "https://gw1.liqo.test:8443");
    assert_eq!(
        (rome.endpoints[0].priority, rome.endpoints[0].weight),
        (10, 60)
    );
}

#[tokio::test]
async fn bad_records_are_reported_and_never_replace_a_claim() {
    let long = format!("pad={}", "x".repeat(250));
    let server = Dnsmasq::start(
        DOMAIN,
        30,
        &[
            cluster("rome", "gw.rome.liqo.test", 1),
            // The same cluster id from another instance with another key.
            Instance::new("zz-impostor")
                .srv(0, 0, 8443, "evil.liqo.test")
                .txt(&["v=1", "id=rome", &format!("fp={}", fp(9))]),
            // Malformed id, missing fields, wrong version, bad port, no TXT, oversized TXT.
            Instance::new("bad-id")
                .srv(0, 0, 1, "h.liqo.test")
                .txt(&["v=1", "id=Not_OK"]),
            Instance::new("no-id")
                .srv(0, 0, 1, "h.liqo.test")
                .txt(&["v=1"]),
            Instance::new("v9")
                .srv(0, 0, 1, "h.liqo.test")
                .txt(&["v=9", "id=x"]),
            Instance::new("port0")
                .srv(0, 0, 0, "h.liqo.test")
                .txt(&["v=1", "id=port0"]),
            Instance::new("no-txt").srv(0, 0, 1, "h.liqo.test"),
            Instance::new("huge")
                .srv(0, 0, 1, "h.liqo.test")
                .txt(&["v=1", "id=huge", &long, &long, &long, &long, &long, &long]),
        ],
    );
    let dns = provider(&server);
    let mut s = dns.watch().await.unwrap();
    let mut events = vec![];
    let mut conflicts = vec![];
    // One lookup round yields everything at once; read until it is all there.
    while events.len() < 8 {
        let item = timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap();
        if let Err(e) = &item
            && let Some(c) = ClaimConflict::find(e)
        {
            conflicts.push(c.clone());
        }
        events.push(show(&item));
    }
    let added: Vec<&String> = events.iter().filter(|e| e.starts_with("added")).collect();
    assert_eq!(
        added,
        ["added rome https://gw.rome.liqo.test:8443"],
        "{events:#?}"
    );
    let errors = events
        .iter()
        .filter(|e| e.starts_with("error"))
        .collect::<Vec<_>>();
    let expect = [
        ("bad-id", "key \"id\""),
        ("no-id", "\"id\" is missing"),
        ("v9", "protocol version 9"),
        ("port0", "\"ep\" is missing"),
        ("no-txt", "no TXT record"),
        ("huge", "at most 1300"),
    ];
    for (instance, why) in expect {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(instance) && e.contains(why)),
            "no error for {instance} ({why}) in {errors:#?}"
        );
    }
    assert_eq!(conflicts.len(), 1, "{events:#?}");
    assert_eq!(conflicts[0].instance, "zz-impostor._liqo._tcp.liqo.test.");
    assert_eq!(conflicts[0].owner_fingerprint.unwrap().to_string(), fp(1));
}
