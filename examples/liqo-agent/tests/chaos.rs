//! Issue #14, crash recovery under load: the set-up of `dataplane.rs` (two lab clusters with the
//! same pod CIDR and the lab's data plane, one `liqo-agent` per cluster with its wireguard-go in
//! the cluster's gateway network namespace, a peering, an offloaded Deployment, a client pod at
//! home), then faults, each injected while the Deployment scales (replicas alternate 2 and 4):
//!
//! 1. `kill -9` of the consumer's agent, restarted with the same command (as a kubelet would);
//! 2. the same for the provider's agent;
//! 3. `kill -9` of the consumer's wireguard-go (the agent's supervisor starts it again);
//! 4. all three at once, then both agents restarted;
//! 5. the provider's kube-apiserver stopped for 15 s, then started again;
//! 6. the gateways cut off from each other for 60 s (WireGuard's UDP dropped in the consumer's
//!    gateway namespace), then joined again;
//! 7. the consumer cut off from the provider's API server for 60 s: the credentials the provider
//!    issues name a relay of the test's, which then holds back every byte (a black hole).
//!
//! Faults 1-4 are injected `ROUNDS` times; 5 to 7, which last, once each at the end, and their
//! recovery is timed from the moment they end.
//!
//! After each fault, recovery is: both agents ready, both ForeignClusters NetworkReady, the
//! virtual node Ready, exactly the desired pods at home (Running, on the virtual node, none
//! terminating) and, on the provider, exactly one ShadowPod and one Running pod per local pod,
//! same name and origin uid (nothing lost, nothing duplicated, no orphan), one wireguard-go per
//! gateway, and every offloaded pod answering HTTP from the client through the tunnel and the
//! double NAT. The time from the fault to all of that is printed per fault, with p50/p95.
//!
//! Needs root, `ip`, `nft`, `setpriv` and `wireguard-go` (as CI has), and the lab's binaries.

mod common;

use common::{
    Agent, Error, failure, free_port, http_get,
    workload::{
        apply, client_pod, field, named, network_ready, node_ready, offload_namespace,
        provider_intent, running_ip, web_deployment,
    },
};

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Event, Node, Pod},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use liqo_core::{
    ClusterId,
    crds::{ForeignCluster, NamespaceMappingStrategy, foreign_cluster_condition},
};
use liqo_lab::{Cluster, ClusterSpec, Component, DataPlane, Lab, LabSpec, WorkerSpec};
use liqo_vk::{names, shadow::ShadowPod};
use liqo_wireguard_userspace::{leftovers::marked_for, socket_path};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

type TestResult = Result<(), Error>;

/// The longest a set-up step may take.
const WAIT: Duration = Duration::from_secs(90);
/// The longest a recovery may take (generous: the machine may be loaded).
const RECOVERY: Duration = Duration::from_secs(180);
/// How many times each kind of fault is injected.
const ROUNDS: usize = 5;
const CONSUMER: &str = "ch-a";
const PROVIDER: &str = "ch-b";
const POD_CIDR: &str = "10.244.0.0/16";
const OFFLOADED_NS: &str = "ch-offload";
const RUST_LOG: &str = "info,liqo_vk=debug,liqo_net=debug,liqo_fabric_wireguard=debug,liqo_wireguard_userspace=debug,kube_runtime=warn";

async fn lab() -> &'static Lab {
    liqo_lab::shared(|| {
        let cluster = |name: &str| {
            ClusterSpec::new(name)
                .pod_cidr(POD_CIDR.parse().expect("a CIDR"))
                .workers(1, WorkerSpec::new("4", "8Gi", 20))
        };
        LabSpec::new([cluster(CONSUMER), cluster(PROVIDER)])
    })
    .await
    .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

/// The WireGuard interface of `cluster`'s agent: unique on the machine (control sockets are
/// shared by every network namespace) and at most 15 characters.
fn interface(cluster: &str) -> String {
    let short = cluster.trim_start_matches("ch-");
    format!("lqch{short}{}", std::process::id() % 100_000)
}

/// Removes, pass or fail, the test's directory and whatever WireGuard state of ours survives the
/// agents (daemons marked for our interfaces, by pid, and their control sockets).
struct Leftovers {
    dir: PathBuf,
    interfaces: Vec<String>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for iface in &self.interfaces {
            for d in marked_for(iface) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &d.pid.to_string()])
                    .status();
            }
            let _ = std::fs::remove_file(socket_path(iface));
        }
        // LIQO_CHAOS_KEEP_LOGS=1 keeps the agents' logs for a look after the run.
        if std::env::var_os("LIQO_CHAOS_KEEP_LOGS").is_some() {
            eprintln!("chaos: agents' logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One cluster's agent as a supervisor runs it: the same command each time, a new log per start.
struct Supervised {
    name: &'static str,
    config: PathBuf,
    metrics: String,
    dir: PathBuf,
    logs: Vec<PathBuf>,
    agent: Option<Agent>,
}

impl Supervised {
    /// Writes `cluster`'s configuration (as `dataplane.rs` does) and starts its agent.
    fn new(
        dir: &Path,
        cluster: &Cluster,
        kubeconfig: &Path,
        dp: &DataPlane,
        api_server: Option<SocketAddr>,
    ) -> Result<Self, Error> {
        let name = if cluster.name() == CONSUMER {
            CONSUMER
        } else {
            PROVIDER
        };
        let gw = dp
            .gateway(name)
            .ok_or_else(|| format!("the data plane has no gateway for {name}"))?;
        let (metrics_port, peering_port, webhook_port) = (free_port(), free_port(), free_port());
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "kubeconfig: {kubeconfig}\n\
                 installCrds: false\n\
                 metricsAddr: 127.0.0.1:{metrics_port}\n\
                 cluster:\n  name: {name}\n  id: {name}\n  podCidr: {pod}\n  serviceCidr: {svc}\n\
                 discovery:\n  mdns: {{enabled: false}}\n  foreignClusters: true\n\
                 peering:\n  listen: 127.0.0.1:{peering_port}\n  \
                 endpoint: https://127.0.0.1:{peering_port}\n  policy: AcceptAll\n  \
                 credentialLifetimeSeconds: 600\n  offer: {{cpu: '4', memory: 8Gi, pods: 20}}\n\
                 {api_server}\
                 network:\n  enabled: true\n  backend: userspace\n  \
                 implementation: wireguard-go\n  interface: {iface}\n  listenPort: 51820\n  \
                 endpoint: {wan}:51820\n  netns: {netns}\n\
                 virtualKubelet:\n  consumer:\n    enabled: true\n    \
                 webhook: 127.0.0.1:{webhook_port}\n    heartbeatSeconds: 2\n  \
                 provider:\n    enabled: true\n",
                kubeconfig = kubeconfig.display(),
                pod = cluster.pod_cidr(),
                svc = cluster.service_cidr(),
                iface = interface(name),
                wan = gw.wan_address,
                netns = gw.netns_path.display(),
                // Where consumers reach this API server (the credentials it issues name it).
                api_server = api_server
                    .map(|a| format!("  apiServer: https://{a}\n"))
                    .unwrap_or_default(),
            ),
        )?;
        let mut s = Self {
            name,
            config,
            metrics: format!("127.0.0.1:{metrics_port}"),
            dir: dir.to_owned(),
            logs: vec![],
            agent: None,
        };
        s.start()?;
        Ok(s)
    }

    fn start(&mut self) -> Result<(), Error> {
        let log = self
            .dir
            .join(format!("{}-{}.log", self.name, self.logs.len() + 1));
        self.logs.push(log.clone());
        self.agent = Some(Agent::spawn(
            &self.config,
            &[],
            self.metrics.clone(),
            log,
            RUST_LOG,
        )?);
        Ok(())
    }

    /// `kill -9`: the agent cleans nothing up.
    async fn crash(&mut self) -> TestResult {
        match self.agent.take() {
            Some(a) => a.kill().await,
            None => Err(format!("{}'s agent is not running", self.name).into()),
        }
    }

    fn agent(&self) -> Result<&Agent, Error> {
        self.agent
            .as_ref()
            .ok_or_else(|| format!("{}'s agent is not running", self.name).into())
    }

    /// Every refusal by the API server in any of its runs' logs, but those `excused`.
    fn refusals(&self, excused: &[Excused]) -> Vec<String> {
        self.logs
            .iter()
            .flat_map(|l| common::refusals(l))
            .filter(|line| !excused.iter().any(|e| e.covers(line)))
            .collect()
    }
}

/// Watch-backed caches of everything recovery is judged on; `changed` fires on every event.
struct World {
    local_pods: Store<Pod>,
    shadows: Store<ShadowPod>,
    remote_pods: Store<Pod>,
    consumer_fc: Store<ForeignCluster>,
    provider_fc: Store<ForeignCluster>,
    node: Store<Node>,
    changed: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn cache<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let changed = changed.clone();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    tasks.push(tokio::spawn(async move {
        stream
            .for_each(|_| {
                changed.notify_one();
                futures::future::ready(())
            })
            .await;
    }));
    store
}

impl World {
    fn start(a: &Client, b: &Client, twin: &str, node: &str) -> Self {
        let changed = Arc::new(Notify::new());
        let mut tasks = vec![];
        let origin = watcher::Config::default().labels(names::ORIGIN_POD_UID);
        Self {
            local_pods: cache(
                Api::namespaced(a.clone(), OFFLOADED_NS),
                watcher::Config::default().labels("app=web"),
                &changed,
                &mut tasks,
            ),
            shadows: cache(
                Api::namespaced(b.clone(), twin),
                watcher::Config::default(),
                &changed,
                &mut tasks,
            ),
            remote_pods: cache(
                Api::namespaced(b.clone(), twin),
                origin,
                &changed,
                &mut tasks,
            ),
            consumer_fc: cache(Api::all(a.clone()), named(PROVIDER), &changed, &mut tasks),
            provider_fc: cache(Api::all(b.clone()), named(CONSUMER), &changed, &mut tasks),
            node: cache(Api::all(a.clone()), named(node), &changed, &mut tasks),
            changed,
            tasks,
        }
    }

    /// The offloaded pods (name, address at home) if every object is as recovery requires,
    /// else what is not.
    fn settled(&self, desired: usize, node: &str) -> Result<Vec<(String, Ipv4Addr)>, String> {
        for (side, store) in [
            ("consumer", &self.consumer_fc),
            ("provider", &self.provider_fc),
        ] {
            let fcs = store.state();
            if !fcs.iter().any(|fc| network_ready(fc)) {
                let reason = fcs
                    .iter()
                    .filter_map(|fc| fc.status.as_ref())
                    .flat_map(|s| s.conditions.iter())
                    .find(|c| c.type_ == foreign_cluster_condition::NETWORK_READY)
                    .map(|c| format!("{} {}", c.status, c.reason))
                    .unwrap_or_else(|| "absent".into());
                return Err(format!(
                    "the {side}'s ForeignCluster is not NetworkReady ({reason})"
                ));
            }
        }
        if !self.node.state().iter().any(|n| node_ready(n)) {
            return Err("the virtual node is not Ready".into());
        }
        // Local pods: name -> (uid, address); every one Running on the virtual node.
        let mut local = BTreeMap::new();
        for p in self.local_pods.state() {
            let name = p.name_any();
            if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node) {
                return Err(format!("local pod {name} is not on the virtual node"));
            }
            let ip = running_ip(&p).ok_or_else(|| format!("local pod {name} is not Running"))?;
            local.insert(name, (p.uid().unwrap_or_default(), ip));
        }
        if local.len() != desired {
            return Err(format!("{} local pods, {desired} desired", local.len()));
        }
        // ShadowPods and remote pods: one each per local pod, same name and origin uid.
        let matches = |kind: &str, meta: &ObjectMeta| -> Result<(), String> {
            let name = meta.name.clone().unwrap_or_default();
            let uid = meta
                .labels
                .as_ref()
                .and_then(|l| l.get(names::ORIGIN_POD_UID));
            match local.get(&name) {
                None => Err(format!("orphan {kind} {name}")),
                Some((u, _)) if uid != Some(u) => Err(format!(
                    "{kind} {name} is for uid {uid:?}, the local pod is {u}"
                )),
                Some(_) if meta.deletion_timestamp.is_some() => {
                    Err(format!("{kind} {name} is terminating"))
                }
                Some(_) => Ok(()),
            }
        };
        let shadows = self.shadows.state();
        for s in &shadows {
            matches("ShadowPod", &s.metadata)?;
        }
        if shadows.len() != desired {
            return Err(format!("{} ShadowPods, {desired} desired", shadows.len()));
        }
        let remote = self.remote_pods.state();
        for p in &remote {
            matches("remote pod", &p.metadata)?;
            if running_ip(p).is_none() {
                return Err(format!("remote pod {} is not Running", p.name_any()));
            }
        }
        if remote.len() != desired {
            return Err(format!("{} remote pods, {desired} desired", remote.len()));
        }
        Ok(local
            .into_iter()
            .map(|(name, (_, ip))| (name, ip))
            .collect())
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    ConsumerAgent,
    ProviderAgent,
    ConsumerDaemon,
    All,
    ProviderApiServer,
    Partition,
    ApiPartition,
}

/// A restarted API server refuses requests for a moment while its authorizer's caches fill
/// (RBAC answers 403 to everyone): refusals logged from `from` until the recovery that follows
/// (`until`, open while it runs) are not the agents' fault.
struct Excused {
    from: Timestamp,
    until: Option<Timestamp>,
}

impl Excused {
    fn covers(&self, line: &str) -> bool {
        let Some(at) = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| {
                v["timestamp"]
                    .as_str()
                    .and_then(|t| t.parse::<Timestamp>().ok())
            })
        else {
            return false;
        };
        at >= self.from && self.until.is_none_or(|u| at <= u)
    }
}

/// How long the provider's API server stays down.
const APISERVER_DOWN: Duration = Duration::from_secs(15);
/// How long the gateways cannot reach each other.
const PARTITION: Duration = Duration::from_secs(60);

/// A TCP relay to an API server that can fall silent: while silenced it holds back every byte
/// both ways and accepts new connections it never answers, as a network that drops packets
/// would (a black hole, not a refused connection).
struct BlackHole {
    addr: SocketAddr,
    silent: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    async fn start(target: SocketAddr) -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (silent, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(relay(ri, wo, rx.clone()), relay(ro, wi, rx));
                });
            }
        });
        Ok(Self { addr, silent, task })
    }

    fn silence(&self, on: bool) {
        self.silent.send_replace(on);
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut silent: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if silent.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// WireGuard's UDP dropped both ways in a gateway's network namespace while it lives (removed on
/// drop, pass or fail).
struct Partition {
    netns: PathBuf,
}

impl Partition {
    const TABLE: &'static str = "liqo-chaos-partition";

    fn start(netns: &Path) -> Result<Self, Error> {
        let p = Self {
            netns: netns.to_owned(),
        };
        let rules = format!(
            "table inet {t} {{\n\
               chain in {{ type filter hook input priority -10; udp dport 51820 drop; udp sport 51820 drop; }}\n\
               chain out {{ type filter hook output priority -10; udp dport 51820 drop; udp sport 51820 drop; }}\n\
             }}\n",
            t = Self::TABLE
        );
        let mut child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", p.netns.display()))
            .args(["nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(
            child.stdin.as_mut().ok_or("no stdin for nft")?,
            rules.as_bytes(),
        )?;
        drop(child.stdin.take());
        if !child.wait()?.success() {
            return Err("nft refused the partition's rules".into());
        }
        Ok(p)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .args(["nft", "delete", "table", "inet", Self::TABLE])
            .status();
    }
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Self::ConsumerAgent => "kill -9 consumer agent",
            Self::ProviderAgent => "kill -9 provider agent",
            Self::ConsumerDaemon => "kill -9 consumer wireguard-go",
            Self::All => "kill -9 all three",
            Self::ProviderApiServer => "provider kube-apiserver down 15 s",
            Self::Partition => "gateways partitioned 60 s",
            Self::ApiPartition => "consumer cut off from the provider's API server 60 s",
        }
    }
}

/// The one wireguard-go marked for `iface`, if there is exactly one.
fn daemon(iface: &str) -> Option<i32> {
    match marked_for(iface).as_slice() {
        [d] => Some(d.pid),
        _ => None,
    }
}

fn kill_9(pid: i32) -> TestResult {
    let rc = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    if !rc.success() {
        return Err(format!("kill -KILL {pid} failed").into());
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fault_recovers_with_nothing_lost() -> TestResult {
    let started = Instant::now();
    let lab = lab().await;
    let (ca, cb) = (
        lab.cluster(CONSUMER).ok_or("no consumer cluster")?,
        lab.cluster(PROVIDER).ok_or("no provider cluster")?,
    );
    let (a, b): (Client, Client) = (ca.client()?, cb.client()?);

    // Drop order (reverse of declaration): agents, then leftovers, then the data plane.
    let dp = DataPlane::start(lab).await?;
    let leftovers = Leftovers {
        dir: std::env::temp_dir().join(format!("liqo-agent-chaos-{}", std::process::id())),
        interfaces: vec![interface(CONSUMER), interface(PROVIDER)],
    };
    std::fs::create_dir_all(&leftovers.dir)?;
    for iface in &leftovers.interfaces {
        // A stale socket of an earlier run with the same pid would only be reclaimed; start clean.
        let _ = std::fs::remove_file(socket_path(iface));
    }
    let (sa_a, sa_b) = (
        common::install_deploy(ca).await?,
        common::install_deploy(cb).await?,
    );
    // The consumer reaches the provider's API server through a relay the test can silence.
    let relay = BlackHole::start(SocketAddr::from(([127, 0, 0, 1], cb.api_port()))).await?;
    let mut consumer = Supervised::new(&leftovers.dir, ca, &sa_a, &dp, None)?;
    let mut provider = Supervised::new(&leftovers.dir, cb, &sa_b, &dp, Some(relay.addr))?;

    // The peering and the offloaded Deployment, as in dataplane.rs.
    let info = {
        let agents = [consumer.agent()?, provider.agent()?];
        common::until("the provider's cluster info", &agents, WAIT, || async {
            liqo_core::info::read(&b).await.ok().flatten()
        })
        .await?
    };
    let prov_id: ClusterId = PROVIDER.parse()?;
    let fc = provider_intent(&prov_id, info)?;
    apply(&Api::<ForeignCluster>::all(a.clone()), PROVIDER, &fc).await?;
    {
        let agents = [consumer.agent()?, provider.agent()?];
        offload_namespace(&a, OFFLOADED_NS, &agents).await?;
    }
    let deployments = Api::<Deployment>::namespaced(a.clone(), OFFLOADED_NS);
    let mut desired = 2;
    apply(&deployments, "web", &web_deployment(OFFLOADED_NS, desired)).await?;
    apply(
        &Api::<Pod>::namespaced(a.clone(), "default"),
        "client",
        &client_pod(),
    )
    .await?;
    let client_ns = {
        let agents = [consumer.agent()?, provider.agent()?];
        dp.wait_pods(WAIT, |nets| {
            nets.iter()
                .any(|n| n.cluster == CONSUMER && n.namespace == "default" && n.name == "client")
        })
        .await
        .map_err(|e| failure("the client's network", &agents, e))?
        .into_iter()
        .find(|n| n.cluster == CONSUMER && n.name == "client")
        .ok_or("no network for the client")?
        .netns_path
    };

    let node = names::node_name(&prov_id);
    let local_id: ClusterId = CONSUMER.parse()?;
    let twin = names::twin_namespace(
        NamespaceMappingStrategy::DefaultName,
        OFFLOADED_NS,
        &local_id,
        None,
    )?;
    let (consumer_iface, provider_iface) = (interface(CONSUMER), interface(PROVIDER));
    let consumer_gw = dp
        .gateway(CONSUMER)
        .ok_or("the data plane has no gateway for the consumer")?
        .netns_path
        .clone();
    let probe = Probe {
        world: World::start(&a, &b, &twin, &node),
        node,
        client_ns,
        interfaces: [consumer_iface.clone(), provider_iface.clone()],
    };

    let t0 = Instant::now();
    let mut excused: Vec<Excused> = vec![];
    let first = recovered(&probe, &consumer, &provider, desired as usize, t0, &excused).await?;
    let mut pods = first.pods.clone();
    let set_up = started.elapsed();
    eprintln!(
        "chaos: peered, {desired} pods offloaded and answering in {:.1}s ({:.1}s since start); \
         waited on: {}",
        first.took.as_secs_f64(),
        set_up.as_secs_f64(),
        first.waited()
    );

    let mut results: Vec<(Fault, Duration)> = vec![];
    let kills = [
        Fault::ConsumerAgent,
        Fault::ProviderAgent,
        Fault::ConsumerDaemon,
        Fault::All,
    ];
    let lasting = [
        (ROUNDS + 1, Fault::ProviderApiServer),
        (ROUNDS + 1, Fault::Partition),
        (ROUNDS + 1, Fault::ApiPartition),
    ];
    let schedule = (1..=ROUNDS)
        .flat_map(|round| kills.map(|f| (round, f)))
        .chain(lasting);
    {
        for (round, fault) in schedule {
            let before = desired;
            desired = if desired == 2 { 4 } else { 2 };
            let one = |iface: &str| {
                daemon(iface).ok_or_else(|| format!("not exactly one wireguard-go for {iface}"))
            };
            let (old_consumer, old_provider) = (one(&consumer_iface)?, one(&provider_iface)?);
            // The fault lands while the Deployment scales.
            apply(&deployments, "web", &web_deployment(OFFLOADED_NS, desired)).await?;
            let mut since = Instant::now();
            match fault {
                Fault::ConsumerAgent => {
                    consumer.crash().await?;
                    consumer.start()?;
                }
                Fault::ProviderAgent => {
                    provider.crash().await?;
                    provider.start()?;
                }
                Fault::ConsumerDaemon => kill_9(old_consumer)?,
                Fault::All => {
                    kill_9(old_consumer)?;
                    let (c, p) = tokio::join!(consumer.crash(), provider.crash());
                    c?;
                    p?;
                    consumer.start()?;
                    provider.start()?;
                }
                // Lasting faults: recovery counts from their end.
                Fault::ProviderApiServer => {
                    excused.push(Excused {
                        from: Timestamp::now(),
                        until: None,
                    });
                    cb.stop_component(Component::ApiServer).await?;
                    tokio::time::sleep(APISERVER_DOWN).await;
                    cb.start_component(Component::ApiServer).await?;
                    since = Instant::now();
                }
                Fault::ApiPartition => {
                    relay.silence(true);
                    let start = Instant::now();
                    // The cut is real: the consumer's probe of the provider fails and its
                    // virtual node stops being Ready.
                    let nodes: Api<Node> = Api::all(a.clone());
                    let mut effective = false;
                    while start.elapsed() < PARTITION / 2 {
                        if nodes
                            .get_opt(&probe.node)
                            .await?
                            .is_some_and(|n| !node_ready(&n))
                        {
                            effective = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    assert!(
                        effective,
                        "the consumer still reached the provider's API server"
                    );
                    tokio::time::sleep(PARTITION.saturating_sub(start.elapsed())).await;
                    relay.silence(false);
                    since = Instant::now();
                }
                Fault::Partition => {
                    let cut = Partition::start(&consumer_gw)?;
                    let start = Instant::now();
                    // The cut is real: HTTP through the tunnel stops.
                    let metrics = [&consumer.agent()?.metrics, &provider.agent()?.metrics];
                    let mut effective = false;
                    while start.elapsed() < PARTITION / 2 {
                        if let Err(why) = check(&probe, desired as usize, metrics).await
                            && why.starts_with("GET ")
                        {
                            effective = true;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    assert!(
                        effective,
                        "the partition did not stop traffic through the tunnel"
                    );
                    tokio::time::sleep(PARTITION.saturating_sub(start.elapsed())).await;
                    drop(cut);
                    since = Instant::now();
                }
            }
            let r = recovered(
                &probe,
                &consumer,
                &provider,
                desired as usize,
                since,
                &excused,
            )
            .await?;
            if let Some(open) = excused.last_mut().filter(|e| e.until.is_none()) {
                open.until = Some(Timestamp::now());
            }
            let (took, now) = (r.took, r.pods.clone());
            // A killed agent's daemon (stopped by the kernel) and a killed daemon are replaced;
            // the other gateway's daemon is left alone.
            let (consumer_hit, provider_hit) = match fault {
                Fault::ConsumerAgent | Fault::ConsumerDaemon => (true, false),
                Fault::ProviderAgent => (false, true),
                Fault::All => (true, true),
                Fault::ProviderApiServer | Fault::Partition | Fault::ApiPartition => (false, false),
            };
            for (iface, old, hit) in [
                (&consumer_iface, old_consumer, consumer_hit),
                (&provider_iface, old_provider, provider_hit),
            ] {
                let now = daemon(iface);
                assert_eq!(
                    now != Some(old),
                    hit,
                    "{}: wireguard-go for {iface} was pid {old}, is {now:?}",
                    fault.name()
                );
            }
            eprintln!(
                "chaos: {} (round {round}), replicas {before}->{desired}: recovered in {:.1}s; \
                 {desired} local pods, {desired} ShadowPods, {desired} remote pods, lost 0, \
                 duplicated 0, orphans 0; waited on: {}",
                fault.name(),
                took.as_secs_f64(),
                r.waited()
            );
            // Scaling up keeps every pod and adds some, scaling down only removes: a pod
            // replaced at home would be one lost (and its remote twin with it).
            let kept = if desired > before {
                pods.is_subset(&now)
            } else {
                now.is_subset(&pods)
            };
            if !kept {
                return Err(format!(
                    "{}: pods {pods:?} became {now:?} scaling {before}->{desired}; events:\n{}",
                    fault.name(),
                    events(&a).await
                )
                .into());
            }
            pods = now;
            results.push((fault, took));
        }
    }

    // SIGTERM: both agents exit 0 and stop their WireGuard daemons.
    for s in [&mut consumer, &mut provider] {
        let agent = s.agent.take().ok_or("an agent is not running")?;
        assert_eq!(agent.terminate().await?, 0, "{}'s agent exit code", s.name);
    }
    let refused: Vec<String> = consumer
        .refusals(&excused)
        .into_iter()
        .chain(provider.refusals(&excused))
        .collect();
    assert!(refused.is_empty(), "refusals:\n{}", refused.join("\n"));
    for iface in [&consumer_iface, &provider_iface] {
        assert!(
            marked_for(iface).is_empty(),
            "no wireguard-go for {iface} survives its agent"
        );
    }

    let mut all: Vec<Duration> = results.iter().map(|(_, d)| *d).collect();
    all.sort();
    let kinds: Vec<String> = [
        Fault::ConsumerAgent,
        Fault::ProviderAgent,
        Fault::ConsumerDaemon,
        Fault::All,
        Fault::ProviderApiServer,
        Fault::Partition,
        Fault::ApiPartition,
    ]
    .iter()
    .map(|k| {
        let n = results.iter().filter(|(f, _)| f.name() == k.name()).count();
        format!("{} x{n}", k.name())
    })
    .collect();
    eprintln!(
        "chaos: {} injections ({}), recovery p50 {:.1}s p95 {:.1}s max {:.1}s, lost 0, \
         duplicated 0; total {:.0}s",
        all.len(),
        kinds.join(", "),
        percentile(&all, 0.50).as_secs_f64(),
        percentile(&all, 0.95).as_secs_f64(),
        all.last().copied().unwrap_or_default().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(probe);
    drop(leftovers);
    dp.stop().await?;
    Ok(())
}

/// What recovery is judged on.
struct Probe {
    world: World,
    node: String,
    /// The client pod's network namespace.
    client_ns: PathBuf,
    /// The consumer's and the provider's WireGuard interfaces.
    interfaces: [String; 2],
}

/// A recovery: how long it took, the offloaded pods, and what it waited on when.
struct Recovery {
    took: Duration,
    pods: BTreeSet<String>,
    waited: Vec<(Duration, String)>,
}

impl Recovery {
    fn waited(&self) -> String {
        self.waited
            .iter()
            .map(|(t, w)| format!("{:.1}s {w}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Waits until everything has recovered (see [`Recovery`]) since `since`.
async fn recovered(
    probe: &Probe,
    consumer: &Supervised,
    provider: &Supervised,
    desired: usize,
    since: Instant,
    excused: &[Excused],
) -> Result<Recovery, Error> {
    let deadline = since + RECOVERY;
    let mut waited: Vec<(Duration, String)> = vec![];
    loop {
        let refused: Vec<String> = consumer
            .refusals(excused)
            .into_iter()
            .chain(provider.refusals(excused))
            .collect();
        if !refused.is_empty() {
            return Err(format!(
                "an agent was refused by the API server:\n{}",
                refused.join("\n")
            )
            .into());
        }
        let metrics = [&consumer.agent()?.metrics, &provider.agent()?.metrics];
        let why = match check(probe, desired, metrics).await {
            Ok(pods) => {
                return Ok(Recovery {
                    took: since.elapsed(),
                    pods,
                    waited,
                });
            }
            Err(why) => why,
        };
        // What recovery waited on, each reason once with when it was first seen.
        let kind: String = why.split(':').next().unwrap_or_default().to_owned();
        if waited.last().is_none_or(|(_, w)| *w != kind) {
            waited.push((since.elapsed(), kind));
        }
        if Instant::now() > deadline {
            let agents: Vec<&Agent> = [consumer.agent.as_ref(), provider.agent.as_ref()]
                .into_iter()
                .flatten()
                .collect();
            return Err(failure(
                "recovery",
                &agents,
                format!("not within {RECOVERY:?}: {why}"),
            ));
        }
        // Woken by any change of the watched objects; HTTP, /readyz and /proc are re-checked at
        // least every half second.
        let _ =
            tokio::time::timeout(Duration::from_millis(500), probe.world.changed.notified()).await;
    }
}

/// Everything recovery requires, `Err` with what is missing.
/// `Ok` with the offloaded pods' names.
async fn check(
    probe: &Probe,
    desired: usize,
    metrics: [&String; 2],
) -> Result<BTreeSet<String>, String> {
    for m in metrics {
        if !matches!(http_get(m, "/readyz").await, Ok((200, _))) {
            return Err(format!("the agent at {m} is not ready"));
        }
    }
    for iface in &probe.interfaces {
        if daemon(iface).is_none() {
            return Err(format!("not exactly one wireguard-go for {iface}"));
        }
    }
    let pods = probe.world.settled(desired, &probe.node)?;
    let names = pods.iter().map(|(n, _)| n.clone()).collect();
    for (name, ip) in pods {
        let url = format!("http://{ip}:8080/");
        let body = liqo_lab::http_get_in(&probe.client_ns, &url, Duration::from_secs(3))
            .await
            .map_err(|e| format!("GET {url} ({name}): {e}"))?;
        if field(&body, "pod") != Some(name.as_str()) || field(&body, "cluster") != Some(PROVIDER) {
            return Err(format!(
                "GET {url}: expected pod {name} on {PROVIDER}: {body}"
            ));
        }
    }
    Ok(names)
}

/// The consumer's events about the offloaded namespace's pods and the nodes, oldest first, one
/// a line: what happened to a pod that went missing.
async fn events(a: &Client) -> String {
    let mut lines = vec![];
    for api in [
        Api::<Event>::namespaced(a.clone(), OFFLOADED_NS),
        Api::<Event>::namespaced(a.clone(), "default"),
    ] {
        match api.list(&Default::default()).await {
            Ok(list) => lines.extend(list.items.into_iter().map(|e| {
                let at = e
                    .last_timestamp
                    .map(|t| t.0)
                    .or(e.event_time.map(|t| t.0))
                    .or(e.metadata.creation_timestamp.map(|t| t.0))
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                let line = format!(
                    "{at} {}/{} {} {}: {}",
                    e.involved_object.kind.unwrap_or_default(),
                    e.involved_object.name.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.source.and_then(|s| s.component).unwrap_or_default(),
                    e.message.unwrap_or_default()
                );
                (at, line)
            })),
            Err(e) => lines.push((String::new(), format!("listing events: {e}"))),
        }
    }
    lines.sort();
    lines
        .into_iter()
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}
