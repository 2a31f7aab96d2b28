//! One cluster's pod watcher: a network namespace, a veth to the gateway and an HTTP server for
//! every labelled pod bound to a lab worker node.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{
    DEFAULT_POD_PORT, GATEWAY_MAC, NETNS_LABEL, NEXT_HOP, PodNetwork,
    http::{Identity, bind, serve},
    netns::{ip, ip_batch, netns_path, pod_netns_name},
};
use crate::{
    cluster::{KWOK_NODE_ANNOTATION, KWOK_NODE_ANNOTATION_VALUE},
    error::{LabError, Result},
};

/// Label of the SDK's virtual nodes (`liqo.io/type=virtual-node`).
const NODE_TYPE_LABEL: &str = "liqo.io/type";
const VIRTUAL_NODE: &str = "virtual-node";
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// `(namespace, name)` of a pod.
pub(crate) type PodKey = (String, String);
/// Every pod network of the data plane, by `(cluster, namespace, name)`.
pub(crate) type PodTable = BTreeMap<(String, String, String), PodNetwork>;

/// What a pod needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    uid: String,
    ip: Ipv4Addr,
    port: u16,
    node: String,
}

/// What runs for a pod.
struct Running {
    want: Want,
    net: PodNetwork,
    server: JoinHandle<()>,
}

pub(crate) struct ClusterWatch {
    pub(crate) id: String,
    pub(crate) cluster: String,
    pub(crate) gateway_netns: String,
    pub(crate) client: kube::Client,
    pub(crate) table: Arc<watch::Sender<PodTable>>,
}

struct State {
    w: ClusterWatch,
    /// The latest object of every labelled pod the watch reported.
    seen: HashMap<PodKey, Pod>,
    running: HashMap<PodKey, Running>,
    /// Node name → whether it is a lab worker (kwok-managed, not a virtual node).
    workers: HashMap<String, bool>,
    failures: HashMap<PodKey, u32>,
    next_veth: u32,
    requeue: mpsc::UnboundedSender<PodKey>,
}

/// Watches the cluster's labelled pods and keeps their network namespaces in line until the
/// future is dropped. `synced` fires once the first complete listing has been handled.
pub(crate) async fn run(w: ClusterWatch, synced: oneshot::Sender<()>) {
    let api: Api<Pod> = Api::all(w.client.clone());
    let config = watcher::Config::default().labels(&format!("{NETNS_LABEL}=true"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let (requeue, mut requeued) = mpsc::unbounded_channel();
    let mut st = State {
        w,
        seen: HashMap::new(),
        running: HashMap::new(),
        workers: HashMap::new(),
        failures: HashMap::new(),
        next_veth: 0,
        requeue,
    };
    let mut listing: Option<HashMap<PodKey, Pod>> = None;
    let mut synced = Some(synced);
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Apply(pod)) => {
                        let key = key_of(&pod);
                        st.seen.insert(key.clone(), pod);
                        st.reconcile(key).await;
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        let key = key_of(&pod);
                        st.seen.remove(&key);
                        st.reconcile(key).await;
                    }
                    Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        listing.get_or_insert_default().insert(key_of(&pod), pod);
                    }
                    Ok(watcher::Event::InitDone) => {
                        let fresh = listing.take().unwrap_or_default();
                        let mut keys: HashSet<PodKey> = st.seen.keys().cloned().collect();
                        keys.extend(st.running.keys().cloned());
                        keys.extend(fresh.keys().cloned());
                        st.seen = fresh;
                        for key in keys {
                            st.reconcile(key).await;
                        }
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                    }
                    Err(e) => tracing::warn!(
                        cluster = %st.w.cluster,
                        "watching pods labelled {NETNS_LABEL}=true (retrying with backoff): {e}"
                    ),
                }
            }
            Some(key) = requeued.recv() => st.reconcile(key).await,
        }
    }
}

fn key_of(pod: &Pod) -> PodKey {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// The first TCP containerPort of the pod, else [`DEFAULT_POD_PORT`].
fn pod_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .find_map(|p| u16::try_from(p.container_port).ok().filter(|p| *p != 0))
        .unwrap_or(DEFAULT_POD_PORT)
}

fn pod_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

impl State {
    fn owner(&self) -> String {
        format!("cluster {:?}", self.w.cluster)
    }

    async fn is_worker(&mut self, node: &str) -> Result<bool> {
        if let Some(known) = self.workers.get(node) {
            return Ok(*known);
        }
        let api: Api<Node> = Api::all(self.w.client.clone());
        let found = api.get_opt(node).await.map_err(|source| LabError::Kube {
            owner: self.owner(),
            action: format!("reading node {node}"),
            source,
        })?;
        // A node that does not exist (yet) is not cached: it may be created later.
        let Some(found) = found else { return Ok(false) };
        let meta = &found.metadata;
        let kwok = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(KWOK_NODE_ANNOTATION))
            .is_some_and(|v| v == KWOK_NODE_ANNOTATION_VALUE);
        let virtual_node = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(NODE_TYPE_LABEL))
            .is_some_and(|v| v == VIRTUAL_NODE);
        let worker = kwok && !virtual_node;
        self.workers.insert(node.to_owned(), worker);
        Ok(worker)
    }

    async fn want(&mut self, key: &PodKey) -> Result<Option<Want>> {
        let Some(pod) = self.seen.get(key) else {
            return Ok(None);
        };
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return Ok(None);
        }
        let Some(ip_text) = status.and_then(|s| s.pod_ip.as_deref()) else {
            return Ok(None);
        };
        let Ok(ip) = ip_text.parse::<Ipv4Addr>() else {
            tracing::warn!(
                cluster = %self.w.cluster, pod = %format!("{}/{}", key.0, key.1),
                "pod IP {ip_text} is not IPv4: the lab's data plane serves IPv4 only"
            );
            return Ok(None);
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return Ok(None);
        };
        let want = Want {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            ip,
            port: pod_port(pod),
            node,
        };
        if !self.is_worker(&want.node).await? {
            return Ok(None);
        }
        Ok(Some(want))
    }

    /// Brings one pod's network in line with its latest object; failures are retried with
    /// capped exponential backoff.
    async fn reconcile(&mut self, key: PodKey) {
        match self.reconcile_once(&key).await {
            Ok(()) => {
                self.failures.remove(&key);
            }
            Err(e) => {
                let n = self.failures.entry(key.clone()).or_default();
                *n = n.saturating_add(1);
                let delay = Duration::from_millis(250)
                    .saturating_mul(1 << (*n).min(8))
                    .min(MAX_RETRY_DELAY);
                tracing::warn!(
                    cluster = %self.w.cluster, pod = %format!("{}/{}", key.0, key.1),
                    "pod network: {e}; retrying in {delay:?}"
                );
                let tx = self.requeue.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(key);
                });
            }
        }
    }

    async fn reconcile_once(&mut self, key: &PodKey) -> Result<()> {
        let want = self.want(key).await?;
        if let Some(r) = self.running.get(key)
            && want.as_ref() == Some(&r.want)
            && !r.server.is_finished()
        {
            return Ok(());
        }
        if let Some(r) = self.running.remove(key) {
            self.teardown(key, r).await?;
        }
        if let Some(want) = want {
            self.setup(key, want).await?;
        }
        Ok(())
    }

    async fn teardown(&mut self, key: &PodKey, r: Running) -> Result<()> {
        // The server's sockets would keep the namespace alive: close them first.
        r.server.abort();
        let _ = r.server.await;
        let removed = remove_pod_links(&self.w.gateway_netns, &r.net).await;
        // Published once the namespace is gone (or failed to go: the retry will not find it
        // running any more, and stop removes every namespace anyway).
        self.w.table.send_modify(|t| {
            t.remove(&(self.w.cluster.clone(), key.0.clone(), key.1.clone()));
        });
        removed?;
        tracing::info!(cluster = %self.w.cluster, pod = %format!("{}/{}", key.0, key.1), ip = %r.net.ip, "pod network removed");
        Ok(())
    }

    async fn setup(&mut self, key: &PodKey, want: Want) -> Result<()> {
        let netns = pod_netns_name(&self.w.id, &self.w.cluster, &key.0, &key.1);
        let veth = format!("p{}", self.next_veth);
        self.next_veth = self.next_veth.wrapping_add(1);
        let net = PodNetwork {
            cluster: self.w.cluster.clone(),
            namespace: key.0.clone(),
            name: key.1.clone(),
            uid: want.uid.clone(),
            node: want.node.clone(),
            ip: want.ip,
            port: want.port,
            netns_path: netns_path(&netns),
            netns,
            gateway_interface: veth,
        };
        if net.netns_path.exists() {
            // Left over by a failed attempt.
            let _ = ip(None, &["netns", "del", &net.netns]).await;
        }
        let server = match self.build(&net).await {
            Ok(s) => s,
            Err(e) => {
                if let Err(cleanup) = remove_pod_links(&self.w.gateway_netns, &net).await {
                    tracing::warn!("cleaning up after a failed pod network: {cleanup}");
                }
                return Err(e);
            }
        };
        tracing::info!(
            cluster = %self.w.cluster, pod = %format!("{}/{}", key.0, key.1), ip = %net.ip,
            port = net.port, netns = %net.netns, "pod network ready"
        );
        self.w.table.send_modify(|t| {
            t.insert(
                (net.cluster.clone(), net.namespace.clone(), net.name.clone()),
                net.clone(),
            );
        });
        self.running
            .insert(key.clone(), Running { want, net, server });
        Ok(())
    }

    async fn build(&self, net: &PodNetwork) -> Result<JoinHandle<()>> {
        let (ip_host, ip_cidr, mac) = (
            net.ip.to_string(),
            format!("{}/32", net.ip),
            pod_mac(net.ip),
        );
        let veth = &net.gateway_interface;
        ip(None, &["netns", "add", &net.netns]).await?;
        ip_batch(
            Some(&self.w.gateway_netns),
            &[
                format!(
                    "link add {veth} address {GATEWAY_MAC} type veth peer name eth0 address \
                     {mac} netns {}",
                    net.netns
                ),
                format!("link set {veth} up"),
                format!("route replace {ip_cidr} dev {veth}"),
                format!("neigh replace {ip_host} lladdr {mac} dev {veth} nud permanent"),
            ],
        )
        .await?;
        ip_batch(
            Some(&net.netns),
            &[
                "link set lo up".to_owned(),
                format!("addr add {ip_cidr} dev eth0"),
                "link set eth0 up".to_owned(),
                format!("neigh replace {NEXT_HOP} lladdr {GATEWAY_MAC} dev eth0 nud permanent"),
                format!("route add {NEXT_HOP}/32 dev eth0 scope link"),
                format!("route add default via {NEXT_HOP} dev eth0"),
            ],
        )
        .await?;
        let listener = bind(&net.netns_path, net.port).await.map_err(|e| {
            LabError::DataPlane(format!(
                "pod {}/{} of cluster {:?}: listening on 0.0.0.0:{} in {}: {e}",
                net.namespace, net.name, net.cluster, net.port, net.netns
            ))
        })?;
        let me = Arc::new(Identity {
            cluster: net.cluster.clone(),
            namespace: net.namespace.clone(),
            pod: net.name.clone(),
            ip: net.ip,
        });
        Ok(tokio::spawn(serve(listener, me)))
    }
}

/// Removes a pod's veth (both ends) and its namespace; missing pieces are fine.
async fn remove_pod_links(gateway_netns: &str, net: &PodNetwork) -> Result<()> {
    let link = ip(
        Some(gateway_netns),
        &["link", "del", &net.gateway_interface],
    )
    .await;
    let netns = if net.netns_path.exists() {
        ip(None, &["netns", "del", &net.netns]).await
    } else {
        Ok(())
    };
    match link {
        Err(LabError::NetCommand { message, .. })
            if message.contains("Cannot find device") || message.contains("does not exist") => {}
        other => other?,
    }
    netns
}
