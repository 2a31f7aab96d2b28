//! Offloading benchmark, the way Liqo measures itself: the time from just before creating a
//! Deployment of N replicas to the last of its pods seen Ready by a watch, offloaded (to a
//! provider, through the virtual node) versus vanilla (the consumer's own kwok nodes), in the
//! same lab. Also reports the consumer agent's peak memory (VmHWM of the `liqo-vk-agent`
//! process, reset before each offloaded run) and the latency from a local pod's creation to its
//! remote pod's creation, both as first seen by watches of this process.
//!
//! ```text
//! cargo bench -p liqo-vk --bench offload -- [--sizes 100,1000] [--runs 3] [--pod-workers 32]
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client, ResourceExt,
    api::DeleteParams,
    runtime::{WatchStreamExt, watcher},
};
use liqo_core::{ResourceOffer, crds::PodOffloadingStrategy, labels};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec, WorkerSpec};
use tokio::process::Child;

const CONSUMER: &str = "bench-consumer";
const PROVIDER: &str = "bench-provider";
const PODS_PER_WORKER: u32 = 250;

struct Opts {
    sizes: Vec<usize>,
    runs: usize,
    pod_workers: usize,
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        sizes: vec![100, 1000],
        runs: 3,
        pod_workers: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sizes" => {
                o.sizes = it
                    .next()
                    .ok_or("--sizes needs a value")?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|e| format!("--sizes: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--runs" => {
                o.runs = it
                    .next()
                    .ok_or("--runs needs a value")?
                    .parse()
                    .map_err(|e| format!("--runs: {e}"))?
            }
            "--pod-workers" => {
                o.pod_workers = it
                    .next()
                    .ok_or("--pod-workers needs a value")?
                    .parse()
                    .map_err(|e| format!("--pod-workers: {e}"))?
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

fn agent(role: &str, cluster: &Cluster, extra: &[String]) -> BoxResult<Child> {
    spawn_vk_agent(role, cluster, extra, "liqo_vk=warn")
}

fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn reset_peak(pid: u32) {
    // "5" resets the peak resident set size (VmHWM) to the current one.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[derive(Default)]
struct Seen {
    local_created: HashMap<String, Instant>,
    remote_created: HashMap<String, Instant>,
    ready: HashSet<String>,
}

/// Watches (a high-QPS measuring client: kube-rs does not rate-limit) local pods and, when
/// offloaded, remote pods; creates the Deployment; returns when `n` local pods are Ready, with,
/// per offloaded pod, the delay from its local creation to its remote creation.
async fn measure(
    local: &Client,
    ns: &str,
    n: usize,
    remote: Option<(&Client, String)>,
) -> BoxResult<(Duration, Vec<Duration>)> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (tx, mut rx) = tokio::sync::watch::channel(0usize);
    let (synced_tx, mut synced_rx) = tokio::sync::mpsc::channel::<()>(2);
    let watches = usize::from(remote.is_some()) + 1;
    let s = seen.clone();
    let stx = synced_tx.clone();
    let local_watch = watcher(
        Api::<Pod>::namespaced(local.clone(), ns),
        watcher::Config::default().labels("app=bench"),
    )
    .default_backoff()
    .for_each(move |ev| {
        match ev {
            Ok(watcher::Event::InitDone) => {
                let _ = stx.try_send(());
            }
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                let mut g = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                g.local_created
                    .entry(p.name_any())
                    .or_insert_with(Instant::now);
                if is_ready(&p) {
                    g.ready.insert(p.name_any());
                }
                let _ = tx.send(g.ready.len());
            }
            _ => {}
        }
        futures::future::ready(())
    });
    let local_task = tokio::spawn(local_watch);
    let remote_task = remote.map(|(client, twin)| {
        let s = seen.clone();
        let stx = synced_tx.clone();
        tokio::spawn(
            watcher(
                Api::<Pod>::namespaced(client.clone(), &twin),
                watcher::Config::default(),
            )
            .default_backoff()
            .for_each(move |ev| {
                match ev {
                    Ok(watcher::Event::InitDone) => {
                        let _ = stx.try_send(());
                    }
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        if let Some(origin) = p.annotations().get(liqo_vk::names::ORIGIN_POD) {
                            let mut g = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            g.remote_created
                                .entry(origin.clone())
                                .or_insert_with(Instant::now);
                        }
                    }
                    _ => {}
                }
                futures::future::ready(())
            }),
        )
    });
    for _ in 0..watches {
        synced_rx.recv().await.ok_or("watch ended")?;
    }
    let t0 = Instant::now();
    let mut d = deployment("bench", i32::try_from(n)?, "nginx");
    if let Some(spec) = d.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        spec.termination_grace_period_seconds = Some(0);
    }
    create(&Api::<Deployment>::namespaced(local.clone(), ns), &d).await?;
    tokio::time::timeout(Duration::from_secs(1800), rx.wait_for(|r| *r >= n))
        .await
        .map_err(|_| format!("{n} pods not Ready in {ns} after 30 min"))??;
    let elapsed = t0.elapsed();
    local_task.abort();
    if let Some(t) = remote_task {
        t.abort();
    }
    let g = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let latencies = g
        .remote_created
        .iter()
        .filter_map(|(name, r)| Some(r.saturating_duration_since(*g.local_created.get(name)?)))
        .collect();
    Ok((elapsed, latencies))
}

/// The offloading path's own latency, without a burst's queues: 20 pods one after the other,
/// each from local creation to remote creation, both as first seen by long-running watches
/// (proven live by a warm-up pod seen on both sides first).
async fn probe(c: &Client, p: &Client) -> TestResult {
    let ns = "probe";
    offload(c, ns, spec(PodOffloadingStrategy::Remote)).await?;
    wait_offloading(c, ns, "Ready").await?;
    let twin = format!("{ns}-{CONSUMER}");
    type SeenMap = Arc<Mutex<HashMap<String, Instant>>>;
    let watch = |api: Api<Pod>, seen: SeenMap, tx: tokio::sync::watch::Sender<usize>| {
        tokio::spawn(
            watcher(api, watcher::Config::default())
                .default_backoff()
                .for_each(move |ev| {
                    if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev {
                        let mut g = seen
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        g.entry(p.name_any()).or_insert_with(Instant::now);
                        let _ = tx.send(g.len());
                    }
                    futures::future::ready(())
                }),
        )
    };
    let (local_seen, remote_seen): (SeenMap, SeenMap) = Default::default();
    let (ltx, mut lrx) = tokio::sync::watch::channel(0);
    let (rtx, mut rrx) = tokio::sync::watch::channel(0);
    let lw = watch(Api::namespaced(c.clone(), ns), local_seen.clone(), ltx);
    let rw = watch(Api::namespaced(p.clone(), &twin), remote_seen.clone(), rtx);
    let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
    let mut lat = vec![];
    for i in 0..21 {
        let name = format!("probe-{i}");
        let pod = Pod {
            metadata: meta(&name),
            spec: Some(pod_spec("nginx")),
            status: None,
        };
        create(&pods, &pod).await?;
        let wait = async {
            lrx.wait_for(|n| *n > i).await?;
            rrx.wait_for(|n| *n > i).await?;
            Ok::<_, tokio::sync::watch::error::RecvError>(())
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .map_err(|_| format!("probe pod {name} not offloaded"))??;
        if i == 0 {
            continue; // the warm-up pod
        }
        let l = local_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&name)
            .copied();
        let r = remote_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&name)
            .copied();
        if let (Some(l), Some(r)) = (l, r) {
            lat.push(r.saturating_duration_since(l));
        }
    }
    lw.abort();
    rw.abort();
    let (p50, p95) = (pct(&mut lat, 0.5), pct(&mut lat, 0.95));
    println!(
        "single pods, one at a time: local creation → remote creation p50 {:.0} ms, p95 {:.0} ms ({} pods)",
        p50.as_secs_f64() * 1000.0,
        p95.as_secs_f64() * 1000.0,
        lat.len()
    );
    Api::<liqo_core::crds::NamespaceOffloading>::namespaced(c.clone(), ns)
        .delete("offloading", &DeleteParams::default())
        .await?;
    Ok(())
}

async fn wait_empty(client: &Client, ns: &str) -> TestResult {
    wait_for(
        Api::<Pod>::namespaced(client.clone(), ns),
        watcher::Config::default(),
        &format!("no pods in {ns}"),
        Duration::from_secs(1800),
        |p| p.is_empty(),
    )
    .await?;
    Ok(())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

async fn run(o: Opts) -> TestResult {
    let max = o.sizes.iter().copied().max().unwrap_or(100);
    let workers = max.div_ceil(PODS_PER_WORKER as usize - 10) + 1;
    let worker = WorkerSpec::new("1000", "4Ti", PODS_PER_WORKER);
    let lab = Lab::start(LabSpec::new([
        ClusterSpec::new(CONSUMER).workers(workers, worker.clone()),
        ClusterSpec::new(PROVIDER).workers(workers, worker),
    ]))
    .await?;
    let r = bench(&lab, &o).await;
    lab.stop().await?;
    r
}

async fn bench(lab: &Lab, o: &Opts) -> TestResult {
    let consumer = lab.cluster(CONSUMER).ok_or("no consumer")?;
    let provider = lab.cluster(PROVIDER).ok_or("no provider")?;
    let (c, p) = (consumer.client()?, provider.client()?);
    install_crds(&c, &[]).await?;
    install_crds(&p, &[]).await?;
    let offer = ResourceOffer::new("100000", "1000Ti", 100_000);
    simulate_peering(consumer, &id(CONSUMER), provider, &id(PROVIDER), offer).await?;
    let _provider_agent = agent("provider", provider, &[])?;
    let consumer_agent = agent(
        "consumer",
        consumer,
        &[
            "--webhook".into(),
            "127.0.0.1:0".into(),
            "--map".into(),
            format!("{PROVIDER}=10.244.0.0/16:10.71.0.0/16"),
            "--pod-workers".into(),
            o.pod_workers.to_string(),
        ],
    )?;
    let pid = consumer_agent.id().ok_or("agent has no pid")?;
    wait_for(
        Api::<Node>::all(c.clone()),
        watcher::Config::default().labels(&format!(
            "{}={}",
            labels::TYPE,
            labels::TYPE_VIRTUAL_NODE
        )),
        "the virtual node Ready",
        WAIT,
        |ns| {
            ns.iter().any(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        },
    )
    .await?;
    probe(&c, &p).await?;
    let idle = proc_kib(pid, "VmRSS:").unwrap_or(0);
    println!("agent idle RSS: {:.1} MiB", idle as f64 / 1024.0);
    println!(
        "| N | run | vanilla (s) | offloaded (s) | ratio | local → remote creation in the burst, p50 / p95 (ms) | agent peak RSS (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &o.sizes {
        let (mut ratios, mut p50s, mut peaks, mut vans, mut offs) =
            (vec![], vec![], vec![], vec![], vec![]);
        for run in 0..o.runs {
            let vns = format!("van-{n}-{run}");
            ensure_namespace(&c, &vns, &[]).await?;
            let (vanilla, _) = measure(&c, &vns, n, None).await?;
            Api::<Deployment>::namespaced(c.clone(), &vns)
                .delete("bench", &DeleteParams::background())
                .await?;
            wait_empty(&c, &vns).await?;

            let ons = format!("off-{n}-{run}");
            offload(&c, &ons, spec(PodOffloadingStrategy::Remote)).await?;
            wait_offloading(&c, &ons, "Ready").await?;
            reset_peak(pid);
            let twin = format!("{ons}-{CONSUMER}");
            let (offloaded, mut lat) = measure(&c, &ons, n, Some((&p, twin.clone()))).await?;
            let peak = proc_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
            Api::<Deployment>::namespaced(c.clone(), &ons)
                .delete("bench", &DeleteParams::background())
                .await?;
            wait_empty(&c, &ons).await?;
            wait_empty(&p, &twin).await?;

            let ratio = offloaded.as_secs_f64() / vanilla.as_secs_f64();
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let (p50, p95) = (pct(&mut lat, 0.5), pct(&mut lat, 0.95));
            println!(
                "| {n} | {run} | {:.2} | {:.2} | {ratio:.2} | {:.0} / {:.0} | {peak:.1} |",
                vanilla.as_secs_f64(),
                offloaded.as_secs_f64(),
                ms(p50),
                ms(p95),
            );
            ratios.push(ratio);
            p50s.push(ms(p50));
            peaks.push(peak);
            vans.push(vanilla.as_secs_f64());
            offs.push(offloaded.as_secs_f64());
        }
        println!(
            "| {n} | median | {:.2} | {:.2} | {:.2} | {:.0} | max {:.1} |",
            median(&vans),
            median(&offs),
            median(&ratios),
            median(&p50s),
            peaks.iter().copied().fold(0.0, f64::max)
        );
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("offload bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(o).await {
        eprintln!("offload bench failed: {e}");
        std::process::exit(1);
    }
}
