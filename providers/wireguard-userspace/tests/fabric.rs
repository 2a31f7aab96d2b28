//! The fabric with real parts: network namespaces, veths, nftables, rtnetlink and userspace
//! WireGuard (wireguard-go and boringtun). Needs root (as CI runs), `ip`, `nft`, `ping` and
//! `wireguard-go`.

mod common;

use std::time::Duration;

use common::*;
use liqo_core::{LinkState, LinkStatus, PeerLink};
use serde_json::json;

fn status(t: &mut Topology, i: usize, cluster: &str) -> LinkStatus {
    serde_json::from_value(
        t.agent(i)
            .call(json!({"op": "status", "cluster": cluster}))
            .unwrap(),
    )
    .unwrap()
}

/// Pods of two clusters that both use 10.244.0.0/16 reach each other at remapped addresses,
/// both ways, and each side sees the other's remapped address as the source.
fn two_clusters(implementation: &str) {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 2);
    let b = t.add_cluster("milan", 1);
    t.start(a, implementation);
    t.start(b, implementation);
    let (la, lb) = t.link(a, b);
    assert_eq!(la.remote_mappings[0].real.to_string(), "10.244.0.0/16");
    assert!(
        !la.remote_mappings[0].is_identity(),
        "overlapping CIDR must be remapped: {la:?}"
    );
    assert!(!lb.remote_mappings[0].is_identity(), "{lb:?}");

    let (a1, a2, b1) = (
        t.clusters[a].pods[0].ns.clone(),
        t.clusters[a].pods[1].ns.clone(),
        t.clusters[b].pods[0].ns.clone(),
    );
    let (a1_ip, a2_ip, b1_ip) = (
        t.clusters[a].pods[0].ip,
        t.clusters[a].pods[1].ip,
        t.clusters[b].pods[0].ip,
    );
    // rome's pod 10.244.1.2 and milan's pod 10.244.1.2 share an address; each reaches the
    // other at its remapped one.
    assert_eq!(a1_ip, b1_ip);
    assert!(ping(&a1, seen(&la, b1_ip), 3), "rome pod -> milan pod");
    assert!(ping(&b1, seen(&lb, a2_ip), 3), "milan pod -> rome pod 2");

    t.echo_server(&b1, 7000);
    let (src, msg) = tcp(&a1, seen(&la, b1_ip), 7000, "hello-from-rome");
    assert_eq!(msg, "hello-from-rome");
    assert_eq!(
        src,
        seen(&lb, a1_ip).to_string(),
        "milan sees rome's pod at its remapped address"
    );
    t.echo_server(&a2, 7001);
    let (src, msg) = tcp(&b1, seen(&lb, a2_ip), 7001, "ciao-da-milano");
    assert_eq!(msg, "ciao-da-milano");
    assert_eq!(
        src,
        seen(&la, b1_ip).to_string(),
        "rome sees milan's pod at its remapped address"
    );

    let s = status(&mut t, a, "milan");
    assert_eq!(s.state, LinkState::Connected, "{s:?}");
    assert!(s.rx_bytes > 0 && s.tx_bytes > 0, "{s:?}");
    let e = t
        .agent(a)
        .call(json!({"op": "status", "cluster": "paris"}))
        .unwrap_err();
    assert!(e.contains("no link with cluster paris"), "{e}");

    // Connecting again converges to the same state: same link, same rules, same peers.
    let gw = t.clusters[a].gw.clone();
    let iface = t.clusters[a].iface.clone();
    let table = format!("liqo-{iface}");
    let rules_before = ok_in(&gw, &["nft", "list", "table", "inet", &table]);
    let wg_before = ok_in(&gw, &["wg", "show", &iface, "allowed-ips"]);
    let pb = t.agent(b).call(json!({"op": "params"})).unwrap();
    let again: PeerLink = serde_json::from_value(
        t.agent(a)
            .call(json!({"op": "connect", "cluster": "milan", "params": pb}))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(again.remote_mappings, la.remote_mappings);
    assert_eq!(
        again.local_mappings, lb.remote_mappings,
        "the link reports how milan maps rome"
    );
    assert_eq!(
        ok_in(&gw, &["nft", "list", "table", "inet", &table]),
        rules_before
    );
    assert_eq!(
        ok_in(&gw, &["wg", "show", &iface, "allowed-ips"]),
        wg_before
    );
    assert!(
        rules_before.contains("ip saddr set ip saddr &")
            && rules_before.contains("ip daddr set ip daddr &")
            && !rules_before.contains("type nat"),
        "{rules_before}"
    );
    assert!(ping(&a1, seen(&la, b1_ip), 1));

    // Disconnecting removes exactly that peer's state; the interface stays for others.
    t.agent(a)
        .call(json!({"op": "disconnect", "cluster": "milan"}))
        .unwrap();
    t.agent(a)
        .call(json!({"op": "disconnect", "cluster": "milan"}))
        .unwrap();
    assert!(
        !in_ns(&gw, &["nft", "list", "table", "inet", &table])
            .status
            .success()
    );
    assert!(table_routes(&gw).trim().is_empty());
    assert!(
        ok_in(&gw, &["wg", "show", &iface, "peers"])
            .trim()
            .is_empty()
    );
    assert!(!ping(&a1, seen(&la, b1_ip), 1));

    t.shutdown_all();
    for c in &t.clusters {
        assert_clean(&c.gw, &c.iface);
    }
}

#[test]
fn two_clusters_same_pod_cidr_wireguard_go() {
    two_clusters("wireguard-go");
}

#[test]
fn two_clusters_same_pod_cidr_boringtun() {
    two_clusters("boringtun");
}

/// Three clusters, all 10.244.0.0/16, every pair connected over one interface per gateway.
#[test]
fn three_clusters_full_mesh() {
    let mut t = Topology::new();
    for id in ["rome", "milan", "turin"] {
        let i = t.add_cluster(id, 1);
        t.start(i, "wireguard-go");
    }
    let mut links = std::collections::BTreeMap::new();
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        let (la, lb) = t.link(a, b);
        links.insert((a, b), la);
        links.insert((b, a), lb);
    }
    // Each gateway gave its two peers distinct ranges although they share one real CIDR.
    assert_ne!(
        links[&(0, 1)].remote_mappings[0].remapped,
        links[&(0, 2)].remote_mappings[0].remapped
    );
    for i in 0..3 {
        t.echo_server(&t.clusters[i].pods[0].ns.clone(), 7000);
    }
    for (&(a, b), link) in &links {
        let from = t.clusters[a].pods[0].ns.clone();
        let target = seen(link, t.clusters[b].pods[0].ip);
        assert!(
            ping(&from, target, 2),
            "{} -> {}",
            t.clusters[a].id,
            t.clusters[b].id
        );
        let msg = format!("{}-to-{}", t.clusters[a].id, t.clusters[b].id);
        let (src, echoed) = tcp(&from, target, 7000, &msg);
        assert_eq!(echoed, msg);
        assert_eq!(
            src,
            seen(&links[&(b, a)], t.clusters[a].pods[0].ip).to_string(),
            "{msg}: source as the receiver maps the sender"
        );
    }
    t.shutdown_all();
    for c in &t.clusters {
        assert_clean(&c.gw, &c.iface);
    }
}

fn wireguard_go_pid(ns: &str) -> Option<String> {
    ok(&["ip", "netns", "pids", ns])
        .split_whitespace()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "wireguard-go")
        })
        .map(str::to_owned)
}

/// Killing one side's wireguard-go: the supervisor starts it again, the gateway reapplies its
/// configuration, and traffic resumes with no manual action.
#[test]
fn killed_daemon_is_restarted_and_traffic_resumes() {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 1);
    let b = t.add_cluster("milan", 1);
    t.start(a, "wireguard-go");
    t.start(b, "wireguard-go");
    let (la, lb) = t.link(a, b);
    let (a1, b1) = (
        t.clusters[a].pods[0].ns.clone(),
        t.clusters[b].pods[0].ns.clone(),
    );
    let target = seen(&la, t.clusters[b].pods[0].ip);
    assert!(ping(&a1, target, 2));
    t.echo_server(&b1, 7000);

    for victim in [a, b] {
        let gw = t.clusters[victim].gw.clone();
        let old = wireguard_go_pid(&gw).expect("wireguard-go runs in the gateway namespace");
        ok(&["kill", "-9", &old]);
        assert!(
            wait_ping(&a1, target, Duration::from_secs(20)),
            "traffic did not resume after killing {}'s daemon",
            t.clusters[victim].id
        );
        let new = wireguard_go_pid(&gw).expect("restarted");
        assert_ne!(new, old);
        let (src, msg) = tcp(&a1, target, 7000, "still-here");
        assert_eq!(
            (src.as_str(), msg.as_str()),
            (
                seen(&lb, t.clusters[a].pods[0].ip).to_string().as_str(),
                "still-here"
            )
        );
    }
    let s = status(&mut t, a, "milan");
    assert_eq!(s.state, LinkState::Connected, "{s:?}");
    t.shutdown_all();
    for c in &t.clusters {
        assert_clean(&c.gw, &c.iface);
    }
}

/// boringtun runs in the agent's process; its device stops when its control socket is
/// removed (as an administrator or a cleanup script might). It is recreated, reconfigured, and
/// traffic resumes.
#[test]
fn stopped_boringtun_device_is_recreated_and_traffic_resumes() {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 1);
    let b = t.add_cluster("milan", 1);
    t.start(a, "boringtun");
    t.start(b, "boringtun");
    let (la, _) = t.link(a, b);
    let a1 = t.clusters[a].pods[0].ns.clone();
    let target = seen(&la, t.clusters[b].pods[0].ip);
    assert!(ping(&a1, target, 2));
    let (gw, iface) = (t.clusters[b].gw.clone(), t.clusters[b].iface.clone());
    let index = |gw: &str| -> Option<String> {
        let o = in_ns(gw, &["ip", "-o", "link", "show", &iface]);
        o.status.success().then(|| {
            String::from_utf8_lossy(&o.stdout)
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
    };
    let before = index(&gw).expect("interface exists");
    let sock = format!("/var/run/wireguard/{iface}.sock");
    std::fs::remove_file(&sock).unwrap();
    // The device notices within a second and stops; a new interface replaces it.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while index(&gw).is_none_or(|i| i == before) {
        assert!(
            std::time::Instant::now() < deadline,
            "the device was not recreated"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        wait_ping(&a1, target, Duration::from_secs(20)),
        "traffic did not resume"
    );
    assert!(
        std::path::Path::new(&sock).exists(),
        "the recreated device serves its socket again"
    );
    t.shutdown_all();
    for c in &t.clusters {
        assert_clean(&c.gw, &c.iface);
    }
}

/// Another program flushes the gateway's nftables ruleset, policy rules and routes (a firewall
/// reload, a cleanup script): the gateway notices at its next resync, makes them again, and
/// traffic resumes with no manual action.
#[test]
fn state_removed_by_another_program_is_made_again() {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 1);
    let b = t.add_cluster("milan", 1);
    for i in [a, b] {
        let mut cfg = t.config(i, "wireguard-go");
        cfg["resync"] = 1.into();
        t.start_with(i, &cfg).unwrap();
    }
    let (la, lb) = t.link(a, b);
    let (a1, b1) = (
        t.clusters[a].pods[0].ns.clone(),
        t.clusters[b].pods[0].ns.clone(),
    );
    t.echo_server(&b1, 7001);
    let target = seen(&la, t.clusters[b].pods[0].ip);
    assert!(ping(&a1, target, 2));
    let (gw, iface) = (t.clusters[a].gw.clone(), t.clusters[a].iface.clone());
    let table = format!("liqo-{iface}");
    let rules = || ok_in(&gw, &["ip", "rule", "show", "pref", "1818"]);
    let (nat_before, rules_before) = (
        ok_in(&gw, &["nft", "list", "table", "inet", &table]),
        rules(),
    );
    assert!(rules_before.contains("lookup 1818"), "{rules_before}");

    ok_in(&gw, &["nft", "flush", "ruleset"]);
    while in_ns(&gw, &["ip", "rule", "del", "pref", "1818"])
        .status
        .success()
    {}
    ok_in(&gw, &["ip", "route", "flush", "table", "1818"]);

    assert!(
        wait_ping(&a1, target, Duration::from_secs(20)),
        "traffic did not resume after the gateway's state was flushed"
    );
    assert_eq!(
        ok_in(&gw, &["nft", "list", "table", "inet", &table]),
        nat_before,
        "the NAT table is back as it was"
    );
    assert_eq!(rules(), rules_before, "the policy rules are back");
    let (src, msg) = tcp(&a1, target, 7001, "again");
    assert_eq!(msg, "again");
    assert_eq!(
        src,
        seen(&lb, t.clusters[a].pods[0].ip).to_string(),
        "double NAT again"
    );
    t.shutdown_all();
    for c in &t.clusters {
        assert_clean(&c.gw, &c.iface);
    }
}

/// Bad configuration gives an error saying what is wrong, and nothing stays half-made.
#[test]
fn bad_configuration_is_refused_and_leaves_nothing() {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 1);
    let b = t.add_cluster("milan", 1);
    let (gw, iface) = (t.clusters[a].gw.clone(), t.clusters[a].iface.clone());

    // An invalid private key: the gateway does not start, nothing is created.
    let mut cfg = t.config(a, "wireguard-go");
    cfg["privateKey"] = json!("not-a-key");
    let e = t.start_with(a, &cfg).expect_err("must fail");
    assert!(
        e.contains("WireGuard private key: expected 32 bytes in base64"),
        "{e}"
    );
    assert_clean(&gw, &iface);

    // The local pod CIDR inside a reserved subnet.
    let mut cfg = t.config(a, "wireguard-go");
    cfg["reserved"] = json!(["10.244.128.0/17"]);
    let e = t.start_with(a, &cfg).expect_err("must fail");
    assert!(
        e.contains("local pod CIDR 10.244.0.0/16 clashes with reserved subnet 10.244.128.0/17"),
        "{e}"
    );
    assert_clean(&gw, &iface);

    // A pool too small for the peer's /16: exhausted, and the failed connect leaves no peer,
    // route, rule or NAT table.
    let mut cfg = t.config(a, "wireguard-go");
    cfg["pools"] = json!(["10.70.0.0/24"]);
    t.start_with(a, &cfg).unwrap();
    t.start(b, "wireguard-go");
    let pb = t.agent(b).call(json!({"op": "params"})).unwrap();
    let e = t
        .agent(a)
        .call(json!({"op": "connect", "cluster": "milan", "params": pb}))
        .unwrap_err();
    assert!(
        e.contains("address pool exhausted: no free /16 left for cluster milan in 10.70.0.0/24"),
        "{e}"
    );
    let table = format!("liqo-{iface}");
    assert!(
        !in_ns(&gw, &["nft", "list", "table", "inet", &table])
            .status
            .success()
    );
    assert!(table_routes(&gw).trim().is_empty());
    assert!(!ok_in(&gw, &["ip", "rule"]).contains(&format!("lookup {TABLE}")));
    assert!(
        ok_in(&gw, &["wg", "show", &iface, "peers"])
            .trim()
            .is_empty()
    );

    // Invalid peer parameters: a key that is not 32 bytes, no key at all, a bad endpoint.
    let mut bad = pb.clone();
    bad["wireguardPublicKey"] = json!("AAAA");
    let e = t
        .agent(a)
        .call(json!({"op": "connect", "cluster": "milan", "params": bad}))
        .unwrap_err();
    assert!(e.contains("decodes to 3 bytes, not 32"), "{e}");
    let mut bad = pb.clone();
    bad.as_object_mut().unwrap().remove("wireguardPublicKey");
    let e = t
        .agent(a)
        .call(json!({"op": "connect", "cluster": "milan", "params": bad}))
        .unwrap_err();
    assert!(
        e.contains("cluster milan sent no WireGuard public key"),
        "{e}"
    );
    let mut bad = pb.clone();
    bad["gatewayEndpoint"] = json!("172.31.0.2");
    let e = t
        .agent(a)
        .call(json!({"op": "connect", "cluster": "milan", "params": bad}))
        .unwrap_err();
    assert!(
        e.contains("gateway endpoint \"172.31.0.2\" of cluster milan: expected host:port"),
        "{e}"
    );
    // A peer announcing this gateway's own key.
    let pa = t.agent(a).call(json!({"op": "params"})).unwrap();
    let mut bad = pb.clone();
    bad["wireguardPublicKey"] = pa["wireguardPublicKey"].clone();
    let e = t
        .agent(a)
        .call(json!({"op": "connect", "cluster": "milan", "params": bad}))
        .unwrap_err();
    assert!(e.contains("announces this gateway's own public key"), "{e}");
    assert!(
        ok_in(&gw, &["wg", "show", &iface, "peers"])
            .trim()
            .is_empty()
    );
    assert!(table_routes(&gw).trim().is_empty());

    // A mapping of a network that is not ours.
    let e = t.agent(a).call(json!({"op": "set_local_mappings", "cluster": "milan", "mappings": [{"real": "10.1.0.0/16", "remapped": "10.70.0.0/16"}]})).unwrap_err();
    assert!(
        e.contains("maps 10.1.0.0/16 which is not a pod or external CIDR of this cluster"),
        "{e}"
    );

    // The interface name is machine-wide for userspace WireGuard: a second gateway (in another
    // namespace) with the same name is refused, and the first keeps working.
    let mut cfg = t.config(b, "wireguard-go");
    cfg["interface"] = json!(iface);
    let other = t.clusters[b].gw.clone();
    let e = Agent::start(&other, &cfg).err().expect("must fail");
    assert!(
        e.contains(&format!(
            "interface name {iface} is already served by another WireGuard daemon"
        )) && e.contains("still running"),
        "{e}"
    );
    assert!(ok_in(&gw, &["wg", "show", &iface, "listen-port"]).trim() == "51820");

    t.shutdown_all();
    for c in &t.clusters {
        assert_clean(&c.gw, &c.iface);
    }
}

/// Allocations persist: a gateway restarted with the same store gives its peers the same
/// ranges, and a peer connected after the restart gets another one.
#[test]
fn restart_keeps_allocations() {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 1);
    let b = t.add_cluster("milan", 1);
    let c = t.add_cluster("turin", 1);
    let store = std::env::temp_dir().join(format!("liqo-alloc-{}.json", unique()));
    let mut cfg = t.config(a, "wireguard-go");
    cfg["storeFile"] = json!(store);
    cfg["privateKey"] = json!(liqo_fabric_wireguard::generate_private_key().to_base64());
    t.start_with(a, &cfg).unwrap();
    t.start(b, "wireguard-go");
    t.start(c, "wireguard-go");
    let (before, _) = t.link(a, b);
    let stored = std::fs::read_to_string(&store).unwrap();
    assert!(
        stored.contains("milan")
            && stored.contains(&before.remote_mappings[0].remapped.to_string()),
        "{stored}"
    );

    let r = t.agent(a).call(json!({"op": "shutdown"}));
    assert_eq!(r, Ok(json!("stopped")));
    assert_clean(&t.clusters[a].gw, &t.clusters[a].iface);
    t.start_with(a, &cfg).unwrap();
    let (after, _) = t.link(a, b);
    assert_eq!(after.remote_mappings, before.remote_mappings);
    assert!(ping(
        &t.clusters[a].pods[0].ns,
        seen(&after, t.clusters[b].pods[0].ip),
        2
    ));
    let (turin, _) = t.link(a, c);
    assert_ne!(
        turin.remote_mappings[0].remapped,
        after.remote_mappings[0].remapped
    );

    t.shutdown_all();
    for cl in &t.clusters {
        assert_clean(&cl.gw, &cl.iface);
    }
    let _ = std::fs::remove_file(&store);
}
