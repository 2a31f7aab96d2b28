//! mDNS discovery latency between two network namespaces joined by a veth pair, beside a
//! baseline: avahi-browse, in the same namespace as our browser, resolving the same
//! announcement.
//!
//! Per round a fresh cluster is advertised by `liqo-mdns` in namespace A (time 0 is when its
//! registration is handed to the mDNS daemon, which then probes for name conflicts as RFC 6762
//! §8.1 requires, then announces). In namespace B:
//!
//! - `liqo-mdns` (this crate's provider) reports it `added`;
//! - `avahi-browse --resolve` prints it resolved (baseline);
//! - the provider's events are relayed into a `CompositeDiscovery` and the `DiscoveryController`
//!   running against a real API server (liqo-lab): the round ends when its ForeignCluster exists.
//!
//! Then the advertiser stops gracefully and the round waits for the expiry on both browsers.
//!
//! Run as root: `cargo bench -p liqo-discovery-mdns --bench mdns`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{Avahi, Link, Proc, in_ns, liqo_mdns};
use kube::{
    Api,
    runtime::wait::{await_condition, conditions},
};
use liqo_core::{DiscoverySource, PeerAdvertisement, crds::ForeignCluster};
use liqo_discovery::{ChannelDiscovery, CompositeDiscovery, DiscoveryController};
use liqo_lab::{ClusterSpec, LabSpec};
use serde_json::Value;
use tokio::{sync::mpsc, task::block_in_place};

const ROUNDS: usize = 15;
const WAIT: Duration = Duration::from_secs(20);

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

fn stats(name: &str, mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<34} n={:<3} min {:>7.1} ms  median {:>7.1} ms  p90 {:>7.1} ms  max {:>7.1} ms",
        samples.len(),
        samples[0],
        at(0.5),
        at(0.9),
        samples[samples.len() - 1]
    );
    at(0.5)
}

/// Lines of a child's stdout, stamped with the wall clock when read (by a thread of its own).
fn stamped_lines(child: &mut std::process::Child) -> mpsc::UnboundedReceiver<(u128, String)> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((now_us(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let link = Link::new();
    let u = common::unique();
    let avahi = Avahi::start(&link.b, &format!("liqo-bench-{u}"));

    // Our browser in B; its events are relayed to the controller and timed.
    let mut browser = in_ns(&link.b.ns, liqo_mdns())
        .args(["--browse", "--interface", &link.b.ifname])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ours = stamped_lines(&mut browser);
    // The baseline browser in B.
    let mut avahi_browse = avahi
        .client("avahi-browse")
        .args(["--resolve", "--parsable", "--no-db-lookup", "_liqo._tcp"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut theirs = stamped_lines(&mut avahi_browse);

    // The controller, against a real API server.
    let lab = liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("mdnsbench")]))
        .await
        .unwrap();
    let client = lab.cluster("mdnsbench").unwrap().client().unwrap();
    liqo_core::crds::install(&client, &[], "liqo-bench")
        .await
        .unwrap();
    let (relay, relay_h) = ChannelDiscovery::new(DiscoverySource::Mdns);
    let discovery = CompositeDiscovery::builder().source(relay).build();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let controller = tokio::spawn(
        DiscoveryController::new(client.clone(), discovery.clone())
            .run(async move { s.cancelled().await }),
    );
    let fcs: Api<ForeignCluster> = Api::all(client.clone());

    let (mut t_ours, mut t_avahi, mut t_fc, mut t_pipeline) = (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let id = format!("bench-{u}-{round}");
        let ep = format!("https://{}:8443", link.a.addr);
        let mut advertiser = Proc::spawn(
            "advertiser",
            in_ns(&link.a.ns, liqo_mdns()).args([
                "--advertise",
                "--interface",
                &link.a.ifname,
                "--id",
                &id,
                "--endpoint",
                &ep,
            ]),
        );
        let advertised = block_in_place(|| advertiser.wait_event(WAIT, "advertised", |_| true));
        let t0 = advertised["t_us"].as_u64().unwrap() as u128;

        let fc_watch = tokio::spawn({
            let fcs = fcs.clone();
            let id = id.clone();
            async move {
                await_condition(fcs, &id, conditions::is_created())
                    .await
                    .unwrap();
                now_us()
            }
        });
        let (mut got_ours, mut got_avahi) = (None, None);
        while got_ours.is_none() || got_avahi.is_none() {
            tokio::select! {
                Some((_, line)) = ours.recv() => {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    if v["event"] == "added" && v["ad"]["clusterId"] == id.as_str() {
                        got_ours = Some(v["t_us"].as_u64().unwrap() as u128);
                        let ad: PeerAdvertisement = serde_json::from_value(v["ad"].clone()).unwrap();
                        relay_h.upsert(ad);
                    }
                }
                Some((t, line)) = theirs.recv() => {
                    if line.starts_with("=;") && line.contains(&format!(";{id};")) {
                        got_avahi = Some(t);
                    }
                }
                () = tokio::time::sleep(WAIT) => panic!("round {round}: not discovered within {WAIT:?}"),
            }
        }
        let t_created = tokio::time::timeout(WAIT, fc_watch).await.unwrap().unwrap();
        t_ours.push((got_ours.unwrap() - t0) as f64 / 1000.0);
        t_avahi.push((got_avahi.unwrap() - t0) as f64 / 1000.0);
        t_fc.push((t_created - t0) as f64 / 1000.0);
        t_pipeline.push((t_created - got_ours.unwrap()) as f64 / 1000.0);

        // Goodbye, and wait for both browsers to drop it.
        block_in_place(|| advertiser.stop(WAIT));
        let (mut gone_ours, mut gone_avahi) = (false, false);
        while !(gone_ours && gone_avahi) {
            tokio::select! {
                Some((_, line)) = ours.recv() => {
                    if line.contains("\"expired\"") && line.contains(&id) {
                        gone_ours = true;
                        relay_h.expire(&id.parse().unwrap());
                    }
                }
                Some((_, line)) = theirs.recv() => {
                    if line.starts_with("-;") && line.contains(&format!(";{id};")) {
                        gone_avahi = true;
                    }
                }
                () = tokio::time::sleep(WAIT) => panic!("round {round}: not expired within {WAIT:?}"),
            }
        }
    }
    println!(
        "mDNS between two network namespaces over a veth ({ROUNDS} rounds, time 0 = registration)"
    );
    let a = stats("liqo-mdns browser: added", t_ours);
    let b = stats("avahi-browse: resolved (baseline)", t_avahi);
    stats("advertisement -> ForeignCluster", t_fc);
    stats("added -> ForeignCluster", t_pipeline);
    println!("liqo-mdns / avahi-browse = {:.2}", a / b);

    stop.cancel();
    controller.await.unwrap().unwrap();
    let _ = browser.kill();
    let _ = browser.wait();
    let _ = avahi_browse.kill();
    let _ = avahi_browse.wait();
    drop(avahi);
    drop(link);
}
