//! Real worker nodes: kubelet, containerd (with runc and the CNI bridge plugin) and kube-proxy,
//! each node in a network namespace of its own, like kind's node containers.
//!
//! The nodes of every cluster of a lab share one network, `172.30.0.0/16`, a bridge in the
//! namespace `liqo-<id>-nodes`: node `i` of the `c`-th cluster with real nodes is
//! `172.30.<c+1>.<i+2>`. The API servers stay on the host's loopback; the bridge's own address,
//! `172.30.0.1`, forwards each API server's port to it (so kubelets, kube-proxies and, through the
//! `kubernetes` Service, pods reach it), and each API server reaches its nodes and pods through an
//! egress proxy that dials from inside its cluster's first node.

mod cgroups;
pub(crate) mod cleanup;
pub mod config;
mod forward;
mod node;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

pub use node::{REAL_NODE_LABEL, RealNodeInfo};

use self::{
    forward::{Egress, Forwarder, Route},
    node::{NodeSetup, RealNode},
};
use crate::{
    binaries::Binaries,
    cluster::Cluster,
    dataplane::{dataplane_id, ip, ip_batch, netns_path},
    error::{LabError, Result},
    image::{busybox_image, pause_image, write_oci_archive},
    spec::Lifetime,
};

/// The network every real node of a lab is on.
pub const NODES_NETWORK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(172, 30, 0, 0), 16);
/// The address, on [`NODES_NETWORK`], at which every API server of the lab is reached from the
/// nodes (on its own port); it is the API servers' advertised address, so the `kubernetes`
/// Service of a cluster with real nodes points there.
pub const API_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
/// Most real nodes per cluster.
pub const MAX_REAL_NODES: usize = 253;
/// Most clusters with real nodes per lab.
const MAX_CLUSTERS: usize = 250;

/// The programs real nodes need besides the lab's binaries, and the Debian package of each.
const HOST_PROGRAMS: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("nsenter", "util-linux"),
    ("nft", "nftables"),
    ("ip", "iproute2"),
];

/// The address of node `node` of the `cluster`-th cluster with real nodes.
pub(crate) fn node_ip(cluster: usize, node: usize) -> Option<Ipv4Addr> {
    let c = u8::try_from(cluster + 1).ok()?;
    let n = u8::try_from(node + 2).ok()?;
    (c < 255 && n < 255).then(|| Ipv4Addr::new(172, 30, c, n))
}

/// The real nodes of a lab, with what links them to the lab's process.
#[derive(Debug)]
pub(crate) struct RealNodes {
    root: PathBuf,
    nodes_netns: String,
    nodes: Vec<RealNode>,
    images: Vec<PathBuf>,
    forwarder: Option<Forwarder>,
}

impl RealNodes {
    /// Checks the machine, builds the images, writes every node's files and the clean-up script,
    /// creates the nodes' network and starts forwarding. Nothing runs on a node yet.
    pub(crate) async fn prepare(
        root: &Path,
        clusters: &[Cluster],
        binaries: &Binaries,
    ) -> Result<Self> {
        check_host()?;
        let (Some(kubelet), Some(kube_proxy)) = (&binaries.kubelet, &binaries.kube_proxy) else {
            return Err(LabError::Binaries(format!(
                "real nodes need kubelet and kube-proxy in {} (scripts/lab-binaries.sh builds them)",
                binaries.dir.display()
            )));
        };
        let with_nodes: Vec<&Cluster> = clusters
            .iter()
            .filter(|c| c.real_node_count() > 0)
            .collect();
        if with_nodes.len() > MAX_CLUSTERS {
            return Err(LabError::InvalidSpec(format!(
                "at most {MAX_CLUSTERS} clusters can have real nodes"
            )));
        }
        let id = dataplane_id(root);
        let nodes_netns = format!("liqo-{id}-nodes");
        let images_dir = root.join("images");
        std::fs::create_dir_all(&images_dir)
            .map_err(|e| LabError::io("creating", &images_dir, e))?;
        let images = vec![images_dir.join("pause.tar"), images_dir.join("busybox.tar")];
        write_oci_archive(&pause_image(config::PAUSE_IMAGE)?, &images[0])?;
        write_oci_archive(&busybox_image(config::BUSYBOX_IMAGE)?, &images[1])?;

        let mut nodes = Vec::new();
        let mut routes = Vec::new();
        let mut egress = Vec::new();
        for (ci, cluster) in with_nodes.iter().enumerate() {
            let port = cluster.api_port();
            routes.push(Route {
                listen: SocketAddr::from((API_ADDRESS, port)),
                target: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            });
            let api_url = format!("https://{API_ADDRESS}:{port}");
            for (ni, pod_cidr) in cluster.real_node_cidrs().iter().enumerate() {
                let name = format!("{}-node-{ni}", cluster.name());
                let ip = node_ip(ci, ni).ok_or_else(|| {
                    LabError::InvalidSpec(format!("no address for real node {name}"))
                })?;
                let dir = root.join("nodes").join(&name);
                let netns = format!("liqo-{id}-{name}");
                if ni == 0 {
                    egress.push(Egress {
                        socket: cluster.egress_socket(),
                        dial_netns: netns_path(&netns),
                    });
                }
                let info = RealNodeInfo {
                    containerd_socket: dir.join("containerd.sock"),
                    name,
                    cluster: cluster.name().to_owned(),
                    ip,
                    pod_cidr: *pod_cidr,
                    netns: netns.clone(),
                    dir,
                };
                nodes.push(RealNode::prepare(&NodeSetup {
                    info,
                    cluster_cidr: cluster.pod_cidr(),
                    nodes_network: IpNet::V4(NODES_NETWORK),
                    api_url: &api_url,
                    ca: cluster.ca(),
                    ca_file: &cluster.ca_file(),
                    cgroup: netns,
                    kubelet,
                    kube_proxy,
                })?);
            }
        }
        let cgroup_names: Vec<String> = nodes.iter().map(|n| n.cgroup.clone()).collect();
        let mut all_netns: Vec<String> = nodes.iter().map(|n| n.info.netns.clone()).collect();
        all_netns.push(nodes_netns.clone());
        cleanup::write(root, &cgroup_names, &all_netns)?;

        let mut this = Self {
            root: root.to_owned(),
            nodes_netns,
            nodes,
            images,
            forwarder: None,
        };
        this.make_network().await?;
        this.forwarder =
            Some(Forwarder::start(&netns_path(&this.nodes_netns), routes, egress).await?);
        Ok(this)
    }

    async fn make_network(&self) -> Result<()> {
        let ns = &self.nodes_netns;
        ip(None, &["netns", "add", ns]).await?;
        ip_batch(
            Some(ns),
            &[
                "link set lo up".to_owned(),
                "link add br0 type bridge".to_owned(),
                format!(
                    "addr add {API_ADDRESS}/{} dev br0",
                    NODES_NETWORK.prefix_len()
                ),
                "link set br0 up".to_owned(),
            ],
        )
        .await?;
        for (i, n) in self.nodes.iter().enumerate() {
            n.plug(
                ns,
                &format!("n{i}"),
                API_ADDRESS,
                NODES_NETWORK.prefix_len(),
            )
            .await?;
        }
        for n in &self.nodes {
            let peers: Vec<RealNodeInfo> = self
                .nodes
                .iter()
                .filter(|o| o.info.cluster == n.info.cluster)
                .map(|o| o.info.clone())
                .collect();
            n.route_to(&peers).await?;
        }
        Ok(())
    }

    /// Starts every node and waits until each is Ready.
    pub(crate) async fn start(
        &self,
        clusters: &[Cluster],
        lifetime: Lifetime,
        timeout: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        let client_of = |cluster: &str| -> Result<kube::Client> {
            clusters
                .iter()
                .find(|c| c.name() == cluster)
                .ok_or_else(|| LabError::Nodes(format!("no cluster {cluster:?}")))?
                .client()
        };
        futures::future::try_join_all(self.nodes.iter().map(|n| async {
            let client = client_of(&n.info.cluster)?;
            n.start(lifetime, &self.images, &client).await
        }))
        .await?;
        let deadline = Instant::now() + timeout;
        for n in &self.nodes {
            let nodes: Api<Node> = Api::all(client_of(&n.info.cluster)?);
            loop {
                n.ensure_running("waiting for the node to be Ready")?;
                let last = match nodes.get_opt(&n.info.name).await {
                    Ok(Some(node)) if is_ready(&node) => break,
                    Ok(Some(node)) => format!("not Ready yet: {}", ready_message(&node)),
                    Ok(None) => "no Node object yet".to_owned(),
                    Err(e) => e.to_string(),
                };
                if Instant::now() >= deadline {
                    return Err(LabError::Nodes(format!(
                        "{} was not Ready within {timeout:?} ({last}); its logs are in {}",
                        n.info.name,
                        n.info.dir.display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        tracing::info!(nodes = self.nodes.len(), elapsed = ?started.elapsed(), "real nodes ready");
        Ok(())
    }

    /// Every node.
    pub(crate) fn infos(&self) -> Vec<RealNodeInfo> {
        self.nodes.iter().map(|n| n.info.clone()).collect()
    }

    /// The node named `name`.
    pub(crate) fn node(&self, name: &str) -> Option<&RealNode> {
        self.nodes.iter().find(|n| n.info.name == name)
    }

    /// Every running process of the nodes: `(node, component, pid, log)`.
    pub(crate) fn processes(&self) -> Vec<(String, String, u32, PathBuf)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.processes()
                    .map(|(c, pid, log)| (n.info.name.clone(), c.to_owned(), pid, log.to_owned()))
            })
            .collect()
    }

    /// Stops the nodes gracefully, then removes everything they made.
    pub(crate) async fn stop(&mut self) {
        futures::future::join_all(self.nodes.iter().map(RealNode::stop)).await;
        self.kill();
    }

    /// Kills the nodes' processes and removes everything they made (blocking).
    pub(crate) fn kill(&mut self) {
        for n in &self.nodes {
            n.kill_now();
        }
        self.forwarder = None;
        cleanup::run(&self.root);
    }
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ready_message(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.message.clone())
        .unwrap_or_else(|| "no Ready condition".to_owned())
}

/// Real nodes need root (network namespaces, cgroups, mounts) and a few programs.
fn check_host() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::Nodes(
            "real nodes need root (network namespaces, cgroups and container mounts)".to_owned(),
        ));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<String> = HOST_PROGRAMS
        .iter()
        .filter(|(prog, _)| !std::env::split_paths(&path).any(|d| d.join(prog).is_file()))
        .map(|(prog, pkg)| format!("{prog} (Debian package {pkg})"))
        .collect();
    let mut missing = missing;
    if !Path::new(config::CNI_BIN_DIR).join("bridge").is_file() {
        missing.push(format!(
            "the CNI plugins in {} (Debian package containernetworking-plugins)",
            config::CNI_BIN_DIR
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LabError::Nodes(format!(
            "real nodes need programs this machine lacks: {}",
            missing.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_are_distinct_and_bounded() {
        assert_eq!(node_ip(0, 0), Some(Ipv4Addr::new(172, 30, 1, 2)));
        assert_eq!(node_ip(1, 3), Some(Ipv4Addr::new(172, 30, 2, 5)));
        assert_eq!(node_ip(0, 252), Some(Ipv4Addr::new(172, 30, 1, 254)));
        assert_eq!(node_ip(0, 253), None);
        assert_eq!(node_ip(254, 0), None);
        assert!(NODES_NETWORK.contains(&API_ADDRESS));
    }
}
