//! The lab's data plane (see [`DataPlane`]).

mod daemon;
mod http;
mod netns;
mod pods;

use std::{
    io::Write,
    net::Ipv4Addr,
    path::PathBuf,
    process::{ChildStdin, Command, Stdio},
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

pub(crate) use self::netns::{ip, ip_batch};
pub(crate) use daemon::DAEMON_STOP_GRACE;
pub use daemon::{DataPlaneRecord, run_daemon, start_daemon};
pub use http::http_get_in;
pub(crate) use netns::in_netns;
pub use netns::{NETNS_DIR, dataplane_id, gateway_netns_name, netns_path, pod_netns_name};

use self::{
    netns::{prefix, remove_with_prefix, wan_netns},
    pods::{ClusterWatch, PodTable},
};
use crate::{
    cluster::make_client,
    error::{LabError, Result},
    kubeconfig::client_config,
    lab::Lab,
    process::spawn_from_spawner_thread,
    state::LabState,
};

/// Label that asks the lab's data plane for a network namespace for a pod (value `true`).
pub const NETNS_LABEL: &str = "lab.liqo.io/netns";
/// Port of a pod's HTTP server when the pod declares no TCP containerPort.
pub const DEFAULT_POD_PORT: u16 = 8080;
/// The wan network: gateway `i` (in cluster order) gets `192.168.240.<i+1>/24`.
pub const WAN_NETWORK: &str = "192.168.240.0/24";
/// Name of the gateway namespace's interface on the wan bridge.
pub const WAN_INTERFACE: &str = "wan0";
/// Link-local next hop of every pod's default route (the gateway side of its veth).
const NEXT_HOP: &str = "169.254.1.1";
/// MAC address of the gateway side of every pod veth (each on its own link, so they never clash).
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// How long [`DataPlane`] waits for the first listing of each cluster's pods.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
const WAN_PREFIX_LEN: u8 = 24;
const MAX_CLUSTERS: usize = 250;

/// One cluster's gateway namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Gateway {
    /// The cluster's name.
    pub cluster: String,
    /// The namespace's name, `liqo-<id>-<cluster>-gw`.
    pub netns: String,
    /// Its path, `/run/netns/<netns>`, for the WireGuard gateway to run in.
    pub netns_path: PathBuf,
    /// Its address on the wan bridge (the WireGuard endpoint host other clusters dial).
    pub wan_address: Ipv4Addr,
    /// Prefix length of [`wan_address`](Self::wan_address)'s network.
    pub wan_prefix_len: u8,
    /// The interface carrying [`wan_address`](Self::wan_address) ([`WAN_INTERFACE`]).
    pub wan_interface: String,
}

/// A pod's network namespace, as the data plane made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PodNetwork {
    /// The cluster.
    pub cluster: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's uid.
    pub uid: String,
    /// The worker node the pod is bound to.
    pub node: String,
    /// The pod IP (on `eth0`, as a /32).
    pub ip: Ipv4Addr,
    /// The port of its HTTP server.
    pub port: u16,
    /// The namespace's name, `liqo-<id>-<cluster>.<namespace>.<pod>` (see [`pod_netns_name`]).
    pub netns: String,
    /// Its path, `/run/netns/<netns>`.
    pub netns_path: PathBuf,
    /// The gateway side of the pod's veth, in the gateway namespace.
    pub gateway_interface: String,
}

/// The lab's data plane: real network namespaces for labelled pods, one gateway namespace per
/// cluster, and a "wan" bridge between the gateways.
///
/// ```text
///  netns liqo-<id>-wan:  br0 ── gw0 ┄┄┐   gw1 ┄┄┐ ...
///                                    │          │    (veth pairs)
///  netns liqo-<id>-<a>-gw:  wan0 192.168.240.1/24          netns liqo-<id>-<b>-gw: wan0 .2/24
///     p0 ┄┄ eth0 in liqo-<id>-<a>.<ns>.<pod>  (podIP/32, default via 169.254.1.1)
///     p1 ┄┄ eth0 in ...
/// ```
///
/// Every pod labelled [`NETNS_LABEL`]`=true`, bound to one of the lab's (kwok) worker nodes and
/// holding an IPv4 `podIP` gets a namespace whose `eth0` carries `podIP/32` with a default route
/// via the link-local next hop `169.254.1.1` (a permanent neighbour entry: the gateway side of the
/// veth). The gateway namespace routes `podIP/32` to that veth and forwards (`ip_forward=1`), so
/// pods of one cluster reach each other through their gateway, and a WireGuard gateway placed in
/// the gateway namespace (by its path, [`Gateway::netns_path`]) carries them to other clusters
/// over the wan bridge ([`Gateway::wan_address`] is its endpoint host). Pods on other nodes (e.g.
/// virtual nodes, `liqo.io/type=virtual-node`) are left alone.
///
/// Each pod namespace runs a tiny HTTP/1.1 server on the pod's first TCP containerPort (default
/// [`DEFAULT_POD_PORT`]) answering `200` with one line:
/// `pod=<name> namespace=<ns> cluster=<cluster> ip=<podIP> client=<source address as seen>`.
/// [`DataPlane::http_get`] (or [`http_get_in`] given a namespace path) sends a request from inside
/// a pod's namespace.
///
/// The pods are watched (kube-runtime watcher, one per cluster); a deleted pod, or one whose IP
/// changed, loses its namespace, veth and server. Everything runs on one thread of the data plane
/// with its own Tokio runtime, so a data plane does not depend on the runtime that started it.
/// [`DataPlane::stop`] and dropping remove every namespace (and with them every link) the data
/// plane made; a watchdog process removes them if this process dies first.
///
/// ```no_run
/// # async fn demo() -> Result<(), liqo_lab::LabError> {
/// use liqo_lab::{ClusterSpec, DataPlane, Lab, LabSpec};
///
/// let lab = Lab::start(LabSpec::new([ClusterSpec::new("a"), ClusterSpec::new("b")])).await?;
/// let dp = DataPlane::start(&lab).await?;
/// let gw = dp.gateway("a").expect("exists");
/// println!("gateway of a: {} (wan {})", gw.netns_path.display(), gw.wan_address);
/// // Once pod default/web-0 (labelled lab.liqo.io/netns=true) has its namespace:
/// let body = dp.http_get("a", "default", "web-0", "http://10.244.1.1:8080/").await?;
/// println!("{body}"); // pod=... namespace=... cluster=... ip=... client=...
/// dp.stop().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DataPlane {
    id: String,
    wan_netns: String,
    gateways: Vec<Gateway>,
    pods: watch::Receiver<PodTable>,
    worker: Option<Worker>,
    watchdog: Option<NetnsWatchdog>,
}

#[derive(Debug)]
struct Worker {
    shutdown: CancellationToken,
    done: Option<oneshot::Receiver<()>>,
    thread: JoinHandle<()>,
}

impl DataPlane {
    /// Starts the data plane of every cluster of `lab`. Returns once every gateway is up and each
    /// cluster's labelled pods have been listed and given their namespaces.
    pub async fn start(lab: &Lab) -> Result<DataPlane> {
        let names: Vec<&str> = lab.clusters().iter().map(|c| c.name()).collect();
        Self::start_clusters(lab, &names).await
    }

    /// Starts the data plane of the named clusters of `lab` (gateway addresses follow the order
    /// of `names`).
    pub async fn start_clusters(lab: &Lab, names: &[&str]) -> Result<DataPlane> {
        let mut clusters = Vec::new();
        for name in names {
            let c = lab.cluster(name).ok_or_else(|| {
                LabError::DataPlane(format!("the lab has no cluster named {name:?}"))
            })?;
            clusters.push((c.name().to_owned(), c.config()));
        }
        Self::start_with(dataplane_id(lab.root()), clusters).await
    }

    /// Starts the data plane of every cluster of a lab known by its state file (e.g. a detached
    /// lab; this is what `liqo-lab up --dataplane` runs in its background process).
    pub async fn start_from_state(state: &LabState) -> Result<DataPlane> {
        let mut clusters = Vec::new();
        for c in &state.clusters {
            let yaml = std::fs::read_to_string(&c.kubeconfig)
                .map_err(|e| LabError::io("reading", &c.kubeconfig, e))?;
            clusters.push((c.name.clone(), client_config(&yaml, &c.kubeconfig).await?));
        }
        Self::start_with(dataplane_id(&state.root), clusters).await
    }

    async fn start_with(id: String, clusters: Vec<(String, kube::Config)>) -> Result<DataPlane> {
        if clusters.is_empty() || clusters.len() > MAX_CLUSTERS {
            return Err(LabError::DataPlane(format!(
                "a data plane serves 1 to {MAX_CLUSTERS} clusters, not {}",
                clusters.len()
            )));
        }
        for (name, _) in &clusters {
            if name.is_empty() || name.contains(['.', '/']) || name.len() > 40 {
                return Err(LabError::DataPlane(format!(
                    "cluster name {name:?} cannot name a network namespace"
                )));
            }
        }
        let wan = wan_netns(&id);
        if netns_path(&wan).exists() {
            return Err(LabError::DataPlane(format!(
                "a data plane of this lab is already running (network namespace {wan} exists); \
                 stop it first"
            )));
        }
        // Leftovers of a data plane that died without cleaning up.
        remove_with_prefix(&prefix(&id))?;
        let gateways: Vec<Gateway> = clusters
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let netns = gateway_netns_name(&id, name);
                Gateway {
                    cluster: name.clone(),
                    netns_path: netns_path(&netns),
                    netns,
                    // i < MAX_CLUSTERS < 254.
                    wan_address: Ipv4Addr::new(192, 168, 240, u8::try_from(i + 1).unwrap_or(254)),
                    wan_prefix_len: WAN_PREFIX_LEN,
                    wan_interface: WAN_INTERFACE.to_owned(),
                }
            })
            .collect();
        let (table_tx, table_rx) = watch::channel(PodTable::new());
        let mut dp = DataPlane {
            watchdog: Some(NetnsWatchdog::start(&prefix(&id)).await?),
            id,
            wan_netns: wan,
            gateways,
            pods: table_rx,
            worker: None,
        };
        // From here on, dropping `dp` on error removes whatever was made.
        dp.build_topology().await?;
        let table = Arc::new(table_tx);
        // Clients are made on the data plane's own runtime (a kube::Client is bound to the
        // runtime it was made on): only configurations cross.
        let watches: Vec<ClusterSetup> = clusters
            .into_iter()
            .zip(&dp.gateways)
            .map(|((name, config), gw)| (config, name, gw.netns.clone()))
            .collect();
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let id = dp.id.clone();
        let token = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("liqo-lab-dataplane".to_owned())
            .spawn(move || {
                run_worker(id, watches, table, token, ready_tx);
                let _ = done_tx.send(());
            })
            .map_err(|e| LabError::DataPlane(format!("starting the data-plane thread: {e}")))?;
        dp.worker = Some(Worker {
            shutdown,
            done: Some(done_rx),
            thread,
        });
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(LabError::DataPlane(
                    "the data-plane thread ended during start-up".to_owned(),
                ));
            }
        }
        tracing::info!(id = %dp.id, clusters = dp.gateways.len(), "data plane ready");
        Ok(dp)
    }

    async fn build_topology(&self) -> Result<()> {
        let wan = &self.wan_netns;
        ip(None, &["netns", "add", wan]).await?;
        ip_batch(
            Some(wan),
            &[
                "link set lo up".to_owned(),
                "link add br0 type bridge".to_owned(),
                "link set br0 up".to_owned(),
            ],
        )
        .await?;
        for (i, gw) in self.gateways.iter().enumerate() {
            let port = format!("gw{i}");
            ip(None, &["netns", "add", &gw.netns]).await?;
            ip_batch(
                Some(&gw.netns),
                &[
                    "link set lo up".to_owned(),
                    format!("link add {WAN_INTERFACE} type veth peer name {port} netns {wan}"),
                    format!(
                        "addr add {}/{} dev {WAN_INTERFACE}",
                        gw.wan_address, gw.wan_prefix_len
                    ),
                    format!("link set {WAN_INTERFACE} up"),
                ],
            )
            .await?;
            ip_batch(
                Some(wan),
                &[
                    format!("link set {port} master br0"),
                    format!("link set {port} up"),
                ],
            )
            .await?;
            netns::in_netns(&gw.netns_path, || {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            })
            .await
            .map_err(|e| {
                LabError::DataPlane(format!("enabling ip_forward in {}: {e}", gw.netns))
            })?;
        }
        Ok(())
    }

    /// The data plane's id: every namespace it makes is named `liqo-<id>-...`
    /// ([`dataplane_id`] of the lab's root directory).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The namespace of the wan bridge (`liqo-<id>-wan`).
    pub fn wan_netns(&self) -> &str {
        &self.wan_netns
    }

    /// Every cluster's gateway, in the order the clusters were given.
    pub fn gateways(&self) -> &[Gateway] {
        &self.gateways
    }

    /// The gateway of `cluster`.
    pub fn gateway(&self, cluster: &str) -> Option<&Gateway> {
        self.gateways.iter().find(|g| g.cluster == cluster)
    }

    /// Every pod network that exists now, ordered by cluster, namespace and name.
    pub fn pods(&self) -> Vec<PodNetwork> {
        self.pods.borrow().values().cloned().collect()
    }

    /// The network of one pod, if it exists now.
    pub fn pod(&self, cluster: &str, namespace: &str, pod: &str) -> Option<PodNetwork> {
        self.pods
            .borrow()
            .get(&(cluster.to_owned(), namespace.to_owned(), pod.to_owned()))
            .cloned()
    }

    /// Waits (without polling) until `ready` holds for the current pod networks, then returns
    /// them; fails after `timeout` with the pod networks that exist then.
    pub async fn wait_pods(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&[PodNetwork]) -> bool,
    ) -> Result<Vec<PodNetwork>> {
        let mut rx = self.pods.clone();
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|t| ready(&t.values().cloned().collect::<Vec<_>>())),
        )
        .await;
        match waited {
            Ok(Ok(t)) => Ok(t.values().cloned().collect()),
            Ok(Err(_)) => Err(LabError::DataPlane("the data plane stopped".to_owned())),
            Err(_) => {
                let now: Vec<String> = self
                    .pods()
                    .iter()
                    .map(|p| format!("{}:{}/{}={}", p.cluster, p.namespace, p.name, p.ip))
                    .collect();
                Err(LabError::DataPlane(format!(
                    "pod networks not as expected after {timeout:?}; they are: [{}]",
                    now.join(", ")
                )))
            }
        }
    }

    /// Sends `GET url` from inside the network namespace of pod `namespace/pod` of `cluster` and
    /// returns the answer's body (see [`http_get_in`]; 10 s timeout).
    pub async fn http_get(
        &self,
        cluster: &str,
        namespace: &str,
        pod: &str,
        url: &str,
    ) -> Result<String> {
        let net = self
            .pod(cluster, namespace, pod)
            .ok_or_else(|| LabError::NoPodNetwork {
                cluster: cluster.to_owned(),
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
            })?;
        http_get_in(&net.netns_path, url, Duration::from_secs(10)).await
    }

    /// Stops the watchers and servers and removes every namespace (and so every link) the data
    /// plane made.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(w) = &mut self.worker {
            w.shutdown.cancel();
            if let Some(done) = w.done.take() {
                let _ = done.await;
            }
        }
        let prefix = prefix(&self.id);
        let removed = tokio::task::spawn_blocking(move || remove_with_prefix(&prefix))
            .await
            .unwrap_or_else(|e| Err(LabError::DataPlane(format!("removing namespaces: {e}"))));
        // Nothing is left to remove by now; this joins the finished thread and disarms the
        // watchdog.
        let released = self.release();
        removed.and(released)
    }

    /// Joins the worker thread, removes the namespaces and disarms the watchdog.
    fn release(&mut self) -> Result<()> {
        if let Some(w) = self.worker.take() {
            w.shutdown.cancel();
            let _ = w.thread.join();
        }
        let removed = remove_with_prefix(&prefix(&self.id));
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        removed
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("removing the data plane's namespaces: {e}");
        }
    }
}

/// A cluster's client configuration, name and gateway namespace.
type ClusterSetup = (kube::Config, String, String);

/// The data plane's thread: one Tokio runtime running every cluster's pod watcher until
/// `shutdown`; dropping the runtime closes every server socket.
fn run_worker(
    id: String,
    watches: Vec<ClusterSetup>,
    table: Arc<watch::Sender<PodTable>>,
    shutdown: CancellationToken,
    ready: oneshot::Sender<Result<()>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(LabError::DataPlane(format!(
                "building the data plane's Tokio runtime: {e}"
            ))));
            return;
        }
    };
    rt.block_on(async move {
        let mut synced = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for (config, cluster, gateway_netns) in watches {
            let client = match make_client(config, &format!("cluster {cluster:?}")) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let (tx, rx) = oneshot::channel();
            synced.push((cluster.clone(), rx));
            tasks.spawn(pods::run(
                ClusterWatch {
                    id: id.clone(),
                    cluster,
                    gateway_netns,
                    client,
                    table: table.clone(),
                },
                tx,
            ));
        }
        let wait_all = async {
            let mut late = Vec::new();
            let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
            for (cluster, rx) in synced {
                if tokio::time::timeout_at(deadline, rx).await.is_err() {
                    late.push(cluster);
                }
            }
            if late.is_empty() {
                Ok(())
            } else {
                Err(LabError::DataPlane(format!(
                    "the pods of cluster(s) {} were not listed within {SYNC_TIMEOUT:?} (is the \
                     API server up?)",
                    late.join(", ")
                )))
            }
        };
        tokio::select! {
            r = wait_all => { let _ = ready.send(r); }
            () = shutdown.cancelled() => return,
        }
        shutdown.cancelled().await;
        tasks.shutdown().await;
    });
    // Dropping the runtime drops every server (and its sockets) still around.
    drop(rt);
}

/// A `sh` that deletes the data plane's namespaces once this process is gone (it waits for EOF on
/// a pipe only this process holds).
#[derive(Debug)]
struct NetnsWatchdog {
    child: std::process::Child,
    stdin: Option<ChildStdin>,
}

const NETNS_WATCHDOG: &str = r#"read -r _
for f in /run/netns/"$1"*; do
  [ -e "$f" ] && ip netns del "${f##*/}"
done
exit 0"#;

impl NetnsWatchdog {
    async fn start(prefix: &str) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(NETNS_WATCHDOG)
            .arg("liqo-lab-netns-watchdog")
            .arg(prefix)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = spawn_from_spawner_thread(cmd).await.map_err(|e| {
            LabError::DataPlane(format!("starting the clean-up watchdog (sh): {e}"))
        })?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    fn disarm(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
    }
}

/// Removes every namespace of data plane `id` (blocking).
pub(crate) fn remove_netns_of(id: &str) -> Result<()> {
    remove_with_prefix(&prefix(id))
}
