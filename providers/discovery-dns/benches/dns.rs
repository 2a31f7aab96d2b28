//! DNS discovery latency on loopback, against dnsmasq, beside a baseline:
//!
//! 1. `raw SRV`: one hickory lookup of an instance's SRV record (the floor: one round trip);
//! 2. `raw listing`: the same queries our provider makes (PTR, then SRV+TXT of each instance
//!    concurrently), issued with hickory directly;
//! 3. `provider lookup`: `DnsDiscovery::lookup()` (those queries plus decoding and validation);
//! 4. `record -> ForeignCluster`: a record added to the zone until its ForeignCluster exists in a
//!    real API server (liqo-lab), through the provider (re-querying every 100 ms: TTL 0 clamped
//!    to the minimum), the composite and the controller. It includes the wait for the next
//!    re-query (0-100 ms), which a real zone's TTL replaces.
//!
//! Run: `cargo bench -p liqo-discovery-dns --bench dns` (as root: nothing special is needed for
//! DNS, but the lab's binaries must be available, see liqo-lab).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Dnsmasq, Instance};
use futures::future::join_all;
use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
};
use kube::{
    Api,
    runtime::wait::{await_condition, conditions},
};
use liqo_core::crds::ForeignCluster;
use liqo_discovery::{CompositeDiscovery, DiscoveryController};
use liqo_discovery_dns::{DnsConfig, DnsDiscovery};
use liqo_lab::{ClusterSpec, LabSpec};

const DOMAIN: &str = "bench.test";
const INSTANCES: usize = 5;
const ROUNDS: usize = 200;
const E2E_ROUNDS: usize = 20;

fn instance(id: &str) -> Instance {
    Instance::new(id)
        .srv(0, 0, 8443, &format!("gw.{id}.{DOMAIN}"))
        .txt(&["v=1", &format!("id={id}"), &format!("name=Cluster {id}")])
}

fn stats(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let median = at(0.5);
    println!(
        "{name:<28} n={:<4} min {:>9.3?}  median {:>9.3?}  p90 {:>9.3?}  max {:>9.3?}",
        samples.len(),
        samples[0],
        median,
        at(0.9),
        samples[samples.len() - 1]
    );
    median
}

fn raw_resolver(server: &Dnsmasq) -> TokioResolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = server.port;
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = server.port;
    let ns = NameServerConfig::new(server.addr().ip(), true, vec![udp, tcp]);
    let mut b = TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    b.options_mut().cache_size = 0;
    b.build().unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ids: Vec<String> = (0..INSTANCES).map(|i| format!("bench-{i}")).collect();
    let server = Dnsmasq::start(
        DOMAIN,
        0,
        &ids.iter().map(|i| instance(i)).collect::<Vec<_>>(),
    );
    let raw = raw_resolver(&server);
    let provider = DnsDiscovery::new(
        DnsConfig::new(DOMAIN)
            .nameservers([server.addr()])
            .requery_bounds(Duration::from_millis(100), Duration::from_secs(60)),
    )
    .unwrap();
    let service = format!("_liqo._tcp.{DOMAIN}.");
    // Warm up (sockets, first-use allocations).
    for _ in 0..20 {
        raw.lookup(service.as_str(), RecordType::PTR).await.unwrap();
        provider.lookup().await.unwrap();
    }

    println!(
        "DNS on loopback (dnsmasq {}, {INSTANCES} instances, {ROUNDS} rounds)",
        server.addr()
    );
    let srv_name = format!("bench-0._liqo._tcp.{DOMAIN}.");
    let mut samples = vec![];
    for _ in 0..ROUNDS {
        let t = Instant::now();
        raw.lookup(srv_name.as_str(), RecordType::SRV)
            .await
            .unwrap();
        samples.push(t.elapsed());
    }
    let raw_srv = stats("raw SRV (baseline)", samples);

    let mut samples = vec![];
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let ptr = raw.lookup(service.as_str(), RecordType::PTR).await.unwrap();
        let names: Vec<_> = ptr
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(names.len(), INSTANCES);
        join_all(names.iter().map(|n| async {
            let (a, b) = tokio::join!(
                raw.lookup(n.clone(), RecordType::SRV),
                raw.lookup(n.clone(), RecordType::TXT)
            );
            a.unwrap();
            b.unwrap();
        }))
        .await;
        samples.push(t.elapsed());
    }
    let raw_listing = stats("raw listing (baseline)", samples);

    let mut samples = vec![];
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let listing = provider.lookup().await.unwrap();
        samples.push(t.elapsed());
        assert_eq!(listing.instances.len(), INSTANCES);
    }
    let ours = stats("provider lookup", samples);
    println!(
        "provider lookup / raw listing = {:.2}; provider lookup / raw SRV = {:.2}",
        ours.as_secs_f64() / raw_listing.as_secs_f64(),
        ours.as_secs_f64() / raw_srv.as_secs_f64()
    );

    // Record -> ForeignCluster through the controller, against a real API server.
    let lab = liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("dnsbench")]))
        .await
        .unwrap();
    let client = lab.cluster("dnsbench").unwrap().client().unwrap();
    liqo_core::crds::install(&client, &[], "liqo-bench")
        .await
        .unwrap();
    let mut server = server;
    let discovery = CompositeDiscovery::builder()
        .source(provider.clone())
        .build();
    let controller = DiscoveryController::new(client.clone(), discovery.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(controller.run(async move { s.cancelled().await }));
    let fcs: Api<ForeignCluster> = Api::all(client.clone());
    let mut published = ids.clone();
    for id in &published {
        await_condition(fcs.clone(), id, conditions::is_created())
            .await
            .unwrap();
    }
    let mut samples = vec![];
    for round in 0..E2E_ROUNDS {
        let id = format!("e2e-{round}");
        published.push(id.clone());
        server.restart(&published.iter().map(|i| instance(i)).collect::<Vec<_>>());
        let t = Instant::now();
        await_condition(fcs.clone(), &id, conditions::is_created())
            .await
            .unwrap();
        samples.push(t.elapsed());
    }
    stats("record -> ForeignCluster", samples);
    stop.cancel();
    task.await.unwrap().unwrap();
    for id in &published {
        let _ = fcs.delete(id, &Default::default()).await;
    }
}
