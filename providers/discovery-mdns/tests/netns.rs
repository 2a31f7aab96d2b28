//! mDNS between two network namespaces joined by a veth pair (real multicast): each peer finds
//! the other; a graceful stop expires at once (goodbye); a killed peer is flushed by `verify`;
//! the interface selection is honoured.

mod common;

use std::time::Duration;

use common::{Link, mdns_peer};
use liqo_core::PublicKey;

const WAIT: Duration = Duration::from_secs(15);

fn arg_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn fp(seed: u8) -> String {
    PublicKey::from_bytes(vec![seed]).fingerprint().to_string()
}

#[test]
fn two_namespaces_find_each_other_and_expire() {
    let link = Link::new();
    let u = common::unique();
    let (alpha, beta) = (format!("alpha-{u}"), format!("beta-{u}"));
    let ep_a = format!("https://{}:8443", link.a.addr);
    let ep_b = format!("https://{}:9443", link.b.addr);
    let fp_a = fp(1);
    let fp_b = fp(2);
    let args = |id: &str, ep: &str, f: &str| {
        vec![
            "--browse".to_owned(),
            "--advertise".to_owned(),
            "--id".to_owned(),
            id.to_owned(),
            "--name".to_owned(),
            format!("Cluster {id}"),
            "--endpoint".to_owned(),
            ep.to_owned(),
            "--fingerprint".to_owned(),
            f.to_owned(),
        ]
    };
    let va = args(&alpha, &ep_a, &fp_a);
    let vb = args(&beta, &ep_b, &fp_b);
    let mut a = mdns_peer("alpha", &link.a, &arg_refs(&va));
    let mut b = mdns_peer("beta", &link.b, &arg_refs(&vb));

    // Each finds the other, with every field of the record.
    let seen_by_a = a.wait_event(WAIT, "added", |v| v["ad"]["clusterId"] == beta.as_str());
    assert_eq!(seen_by_a["ad"]["peeringEndpoint"], ep_b.as_str());
    assert_eq!(seen_by_a["ad"]["keyFingerprint"], fp_b.as_str());
    assert_eq!(
        seen_by_a["ad"]["clusterName"],
        format!("Cluster {beta}").as_str()
    );
    assert_eq!(seen_by_a["ad"]["protocolVersion"], 1);
    assert_eq!(seen_by_a["ad"]["source"], "mDNS");
    assert_eq!(seen_by_a["ad"]["ttl"], 120);
    let seen_by_b = b.wait_event(WAIT, "added", |v| v["ad"]["clusterId"] == alpha.as_str());
    assert_eq!(seen_by_b["ad"]["peeringEndpoint"], ep_a.as_str());
    assert_eq!(seen_by_b["ad"]["keyFingerprint"], fp_a.as_str());

    // Neither reports itself (its own announcement comes back on the wire).
    for p in [&a, &b] {
        let own = if p.name == "alpha" { &alpha } else { &beta };
        assert!(
            !p.seen.iter().any(|l| l.contains("\"added\"") && l.contains(&format!("\"clusterId\":\"{own}\""))),
            "{} reported itself: {:#?}",
            p.name,
            p.seen
        );
    }

    // Interface selection: in beta's namespace, a browser bound to loopback hears a peer
    // announcing on loopback, and never alpha, which only the veth carries.
    common::ip(&[
        "-n",
        &link.b.ns.name,
        "link",
        "set",
        "lo",
        "multicast",
        "on",
    ]);
    let gamma = format!("gamma-{u}");
    let _g = common::Proc::spawn(
        "gamma-lo",
        common::in_ns(&link.b.ns, common::liqo_mdns()).args([
            "--advertise",
            "--interface",
            "lo",
            "--id",
            &gamma,
            "--endpoint",
            "https://127.0.0.1:1443",
        ]),
    );
    let mut lo_only = common::Proc::spawn(
        "beta-lo",
        common::in_ns(&link.b.ns, common::liqo_mdns()).args(["--browse", "--interface", "lo"]),
    );
    lo_only.wait_event(WAIT, "added", |v| v["ad"]["clusterId"] == gamma.as_str());
    b.send(&format!("verify {alpha}")); // makes alpha answer on the veth again
    assert!(
        lo_only
            .line_within(Duration::from_secs(3), |l| l.contains(&alpha))
            .is_none(),
        "a loopback-only browser heard alpha: {:#?}",
        lo_only.seen
    );
    assert!(
        !b.seen.iter().any(|l| l.contains(&gamma)),
        "the veth-only browser heard a loopback-only peer: {:#?}",
        b.seen
    );
    drop(lo_only);

    // A graceful stop sends goodbye packets: the peer expires at once.
    b.stop(Duration::from_secs(10));
    a.wait_event(WAIT, "expired", |v| v["clusterId"] == beta.as_str());

    // It comes back, then dies without a goodbye: verify flushes it (RFC 6762 §10.4).
    let mut b = mdns_peer("beta", &link.b, &arg_refs(&vb));
    a.wait_event(WAIT, "added", |v| v["ad"]["clusterId"] == beta.as_str());
    b.kill();
    a.send(&format!("verify {beta}"));
    a.wait_event(WAIT, "expired", |v| v["clusterId"] == beta.as_str());

    a.stop(Duration::from_secs(10));
}
