//! Interop with Debian's avahi in network namespaces: avahi-browse sees our advertisement with
//! the right TXT fields; services published with avahi-publish are found by ours; malformed and
//! conflicting ones are reported, never trusted.

mod common;

use std::time::Duration;

use common::{Avahi, Link, Proc, mdns_peer};
use liqo_core::PublicKey;

const WAIT: Duration = Duration::from_secs(20);

fn fp(seed: u8) -> String {
    PublicKey::from_bytes(vec![seed]).fingerprint().to_string()
}

#[test]
fn avahi_and_liqo_mdns_interoperate() {
    let link = Link::new();
    let u = common::unique();
    let avahi = Avahi::start(&link.b, &format!("liqo-t-avahi-{u}"));

    // Ours advertises in namespace A; avahi-browse in namespace B resolves it.
    let ours = format!("ours-{u}");
    let ep = format!("https://{}:8443", link.a.addr);
    let key = fp(7);
    let mut peer = mdns_peer(
        "ours",
        &link.a,
        &[
            "--browse",
            "--advertise",
            "--id",
            &ours,
            "--name",
            "Our Cluster",
            "--endpoint",
            &ep,
            "--fingerprint",
            &key,
        ],
    );
    let mut browse = Proc::spawn(
        "avahi-browse",
        avahi.client("avahi-browse").args([
            "--resolve",
            "--parsable",
            "--no-db-lookup",
            "_liqo._tcp",
        ]),
    );
    // "=;iface;IPv4;<instance>;_liqo._tcp;local;<host>;<address>;<port>;<txt...>"
    let line = browse.wait_line(WAIT, |l| {
        l.starts_with("=;") && l.contains(&format!(";{ours};"))
    });
    let fields: Vec<&str> = line.splitn(10, ';').collect();
    assert_eq!(fields[6], format!("{ours}.local"), "{line}");
    assert_eq!(fields[7], link.a.addr, "{line}");
    assert_eq!(fields[8], "8443", "{line}");
    for txt in [
        "\"v=1\"".to_owned(),
        format!("\"id={ours}\""),
        "\"name=Our Cluster\"".to_owned(),
        format!("\"ep={ep}\""),
        format!("\"fp={key}\""),
    ] {
        assert!(fields[9].contains(&txt), "TXT {txt} missing in {line}");
    }
    drop(browse);

    // avahi-publish in B, without `ep` (the endpoint comes from the address and SRV port) ...
    let theirs = format!("theirs-{u}");
    let _good = Proc::spawn(
        "avahi-publish good",
        avahi.client("avahi-publish").args([
            "-s",
            &theirs,
            "_liqo._tcp",
            "7443",
            "v=1",
            &format!("id={theirs}"),
            "name=Published by avahi",
            &format!("fp={}", fp(8)),
        ]),
    );
    let found = peer.wait_event(WAIT, "added", |v| v["ad"]["clusterId"] == theirs.as_str());
    assert_eq!(
        found["ad"]["peeringEndpoint"],
        format!("https://{}:7443", link.b.addr).as_str()
    );
    assert_eq!(found["ad"]["clusterName"], "Published by avahi");
    assert_eq!(found["ad"]["keyFingerprint"], fp(8).as_str());
    // ... one with a malformed id, one from a newer protocol, one without the id ...
    let _bad = Proc::spawn(
        "avahi-publish bad",
        avahi.client("avahi-publish").args([
            "-s",
            &format!("bad-{u}"),
            "_liqo._tcp",
            "1",
            "v=1",
            "id=Not_A_Label",
        ]),
    );
    let _v9 = Proc::spawn(
        "avahi-publish v9",
        avahi.client("avahi-publish").args([
            "-s",
            &format!("v9-{u}"),
            "_liqo._tcp",
            "1",
            "v=9",
            "id=x",
        ]),
    );
    let _noid = Proc::spawn(
        "avahi-publish noid",
        avahi
            .client("avahi-publish")
            .args(["-s", &format!("noid-{u}"), "_liqo._tcp", "1", "v=1"]),
    );
    // ... and, once that cluster is known, an impostor: its cluster id under another instance,
    // with another key. (Published together, either could be resolved first: a provider has no
    // way to tell which came first, so the test does not race them.)
    let impostor = Proc::spawn(
        "avahi-publish impostor",
        avahi.client("avahi-publish").args([
            "-s",
            &format!("zz-impostor-{u}"),
            "_liqo._tcp",
            "7443",
            "v=1",
            &format!("id={theirs}"),
            &format!("fp={}", fp(9)),
        ]),
    );

    for why in ["key \"id\"", "protocol version 9", "\"id\" is missing"] {
        peer.seen_or_wait(WAIT, "error", |v| {
            v["message"].as_str().is_some_and(|m| m.contains(why))
        });
    }
    // The impostor is reported and never replaces the first claim.
    let conflict = peer.seen_or_wait(WAIT, "error", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("zz-impostor") && m.contains("is ignored"))
    });
    assert!(conflict["message"].as_str().unwrap().contains(&fp(9)));
    assert!(
        !peer
            .seen
            .iter()
            .any(|l| l.contains(&fp(9)) && !l.contains("\"error\"")),
        "the impostor's key was accepted: {:#?}",
        peer.seen
    );
    drop(impostor);

    // Withdrawn by avahi (goodbye): ours expires it.
    drop(_good);
    peer.wait_event(WAIT, "expired", |v| v["clusterId"] == theirs.as_str());
    peer.stop(Duration::from_secs(10));
}
