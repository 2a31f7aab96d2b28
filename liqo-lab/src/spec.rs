//! What a lab is made of: [`LabSpec`], [`ClusterSpec`], [`WorkerSpec`], [`Lifetime`].

use std::{collections::HashSet, net::IpAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};

/// Default pod CIDR of a cluster. Every cluster gets the same one unless told otherwise: overlapping
/// pod CIDRs between clusters are what multi-cluster networking has to cope with.
pub const DEFAULT_POD_CIDR: &str = "10.244.0.0/16";
/// Default service CIDR of a cluster (the same for every cluster, on purpose).
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";
/// Default time the lab waits for each start-up phase of a component.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(240);

/// How the lab's processes relate to the process that started them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lifetime {
    /// The processes die with the process that started the lab, even when it is killed with
    /// SIGKILL (each runs under `setpriv --pdeathsig KILL`), and when the [`Lab`](crate::Lab) is
    /// dropped or stopped. A watchdog removes the lab's directory once the starting process is gone.
    /// This is what tests want.
    #[default]
    Attached,
    /// The processes outlive the process that started the lab, in their own process groups. The
    /// lab's state (pids, ports, paths) is written to `<root>/lab.json` so that
    /// [`down`](crate::down) (the CLI's `liqo-lab down`) can stop them later. Dropping a detached
    /// [`Lab`](crate::Lab) leaves it running.
    Detached,
}

/// The size of one kwok-simulated worker node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// CPU capacity as a Kubernetes quantity, e.g. `"8"`.
    pub cpu: String,
    /// Memory capacity as a Kubernetes quantity, e.g. `"32Gi"`.
    pub memory: String,
    /// Maximum number of pods on the node.
    pub pods: u32,
}

impl Default for WorkerSpec {
    /// 8 CPUs, 32 GiB of memory, 110 pods.
    fn default() -> Self {
        Self {
            cpu: "8".to_owned(),
            memory: "32Gi".to_owned(),
            pods: 110,
        }
    }
}

impl WorkerSpec {
    /// A worker of the given CPU and memory capacity (Kubernetes quantities) and pod count.
    pub fn new(cpu: impl Into<String>, memory: impl Into<String>, pods: u32) -> Self {
        Self {
            cpu: cpu.into(),
            memory: memory.into(),
            pods,
        }
    }
}

/// One Kubernetes cluster of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterSpec {
    /// The cluster's name: a DNS-1123 label of at most 40 characters (not `etcd`). It names the
    /// cluster's directory, its etcd prefix, its kubeconfig context and its worker nodes.
    pub name: String,
    /// The pod CIDR; each worker node gets a distinct slice of it as its `spec.podCIDR`, and kwok
    /// gives pods addresses from their node's slice.
    pub pod_cidr: IpNet,
    /// The service CIDR (`--service-cluster-ip-range`).
    pub service_cidr: IpNet,
    /// The worker nodes the lab creates, named `<cluster>-worker-<i>`.
    pub workers: Vec<WorkerSpec>,
    /// Extra IP addresses for the API server's serving certificate (e.g. an address at which peers
    /// reach it through a tunnel).
    pub extra_sans: Vec<IpAddr>,
    /// Real worker nodes (kubelet, containerd, kube-proxy), named `<cluster>-node-<i>`, besides
    /// the kwok workers. They need root, an [attached](Lifetime::Attached) lab and the Debian
    /// packages containerd, runc, containernetworking-plugins and busybox-static.
    pub real_nodes: usize,
}

impl ClusterSpec {
    /// A cluster with the default pod CIDR (10.244.0.0/16), service CIDR (10.96.0.0/16) and two
    /// workers of 8 CPUs, 32 GiB and 110 pods.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            pod_cidr: default_net(DEFAULT_POD_CIDR),
            service_cidr: default_net(DEFAULT_SERVICE_CIDR),
            workers: vec![WorkerSpec::default(); 2],
            extra_sans: Vec::new(),
            real_nodes: 0,
        }
    }

    /// Sets the pod CIDR.
    #[must_use]
    pub fn pod_cidr(mut self, cidr: IpNet) -> Self {
        self.pod_cidr = cidr;
        self
    }

    /// Sets the service CIDR.
    #[must_use]
    pub fn service_cidr(mut self, cidr: IpNet) -> Self {
        self.service_cidr = cidr;
        self
    }

    /// Replaces the workers with `count` workers of the given size.
    #[must_use]
    pub fn workers(mut self, count: usize, size: WorkerSpec) -> Self {
        self.workers = vec![size; count];
        self
    }

    /// Adds one worker.
    #[must_use]
    pub fn worker(mut self, size: WorkerSpec) -> Self {
        self.workers.push(size);
        self
    }

    /// Sets the number of real worker nodes (see [`real_nodes`](Self::real_nodes)).
    #[must_use]
    pub fn real_nodes(mut self, count: usize) -> Self {
        self.real_nodes = count;
        self
    }

    /// Adds an IP address to the API server's serving certificate.
    #[must_use]
    pub fn extra_san(mut self, ip: IpAddr) -> Self {
        self.extra_sans.push(ip);
        self
    }

    fn validate(&self) -> Result<()> {
        let name = &self.name;
        let valid = !name.is_empty()
            && name.len() <= 40
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if !valid {
            return Err(LabError::InvalidSpec(format!(
                "cluster name {name:?} must be a DNS-1123 label (lowercase letters, digits and \
                 '-', at most 40 characters)"
            )));
        }
        if matches!(
            name.as_str(),
            "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false"
        ) {
            return Err(LabError::InvalidSpec(format!(
                "cluster name {name:?} reads as a boolean in the YAML 1.1 of the Kubernetes \
                 components' kubeconfigs; choose another name"
            )));
        }
        if name == "etcd" {
            return Err(LabError::InvalidSpec(
                "cluster name \"etcd\" is reserved for the lab's etcd directory".to_owned(),
            ));
        }
        if matches!(self.pod_cidr, IpNet::V4(_)) != matches!(self.service_cidr, IpNet::V4(_)) {
            return Err(LabError::InvalidSpec(format!(
                "cluster {name:?}: pod CIDR {} and service CIDR {} must be of the same IP family",
                self.pod_cidr, self.service_cidr
            )));
        }
        let max_len = self.service_cidr.max_prefix_len();
        if self.service_cidr.prefix_len() + 2 > max_len {
            return Err(LabError::InvalidSpec(format!(
                "cluster {name:?}: service CIDR {} is too small",
                self.service_cidr
            )));
        }
        if self.real_nodes > crate::nodes::MAX_REAL_NODES {
            return Err(LabError::InvalidSpec(format!(
                "cluster {name:?}: at most {} real nodes",
                crate::nodes::MAX_REAL_NODES
            )));
        }
        if self.real_nodes > 0 && !matches!(self.pod_cidr, IpNet::V4(_)) {
            return Err(LabError::InvalidSpec(format!(
                "cluster {name:?}: real nodes need an IPv4 pod CIDR"
            )));
        }
        for (i, w) in self.workers.iter().enumerate() {
            if w.cpu.trim().is_empty() || w.memory.trim().is_empty() || w.pods == 0 {
                return Err(LabError::InvalidSpec(format!(
                    "cluster {name:?}: worker {i} needs a cpu, a memory and a non-zero pod count"
                )));
            }
        }
        Ok(())
    }
}

fn default_net(s: &str) -> IpNet {
    // Invariant: the defaults are valid CIDR literals (checked by a unit test).
    s.parse()
        .unwrap_or_else(|_| unreachable!("{s} is a valid CIDR"))
}

/// A whole lab: one shared etcd and the given clusters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LabSpec {
    /// The clusters, started concurrently.
    pub clusters: Vec<ClusterSpec>,
    /// The lab's root directory. When unset, a fresh directory under
    /// `std::env::temp_dir()/liqo-lab/`. If set it must be missing or empty; the lab removes it
    /// when stopped.
    pub root: Option<PathBuf>,
    /// Whether the processes die with this process.
    pub lifetime: Lifetime,
    /// A directory with the binaries (`etcd kube-apiserver kube-controller-manager kube-scheduler
    /// kwok` and `kwok-stages/`). When unset: `$LIQO_LAB_BIN_DIR`, else the output of
    /// `scripts/lab-binaries.sh` (see [`locate_binaries`](crate::locate_binaries)).
    pub binaries: Option<PathBuf>,
    /// How long to wait for each start-up phase (etcd healthy, API server ready, default service
    /// account created, workers ready).
    pub ready_timeout: Duration,
}

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            clusters: Vec::new(),
            root: None,
            lifetime: Lifetime::Attached,
            binaries: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

impl LabSpec {
    /// An attached lab with the given clusters.
    pub fn new(clusters: impl IntoIterator<Item = ClusterSpec>) -> Self {
        Self {
            clusters: clusters.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Adds a cluster.
    #[must_use]
    pub fn cluster(mut self, cluster: ClusterSpec) -> Self {
        self.clusters.push(cluster);
        self
    }

    /// Sets the root directory.
    #[must_use]
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Sets the lifetime.
    #[must_use]
    pub fn lifetime(mut self, lifetime: Lifetime) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Sets the directory of the binaries.
    #[must_use]
    pub fn binaries(mut self, dir: impl Into<PathBuf>) -> Self {
        self.binaries = Some(dir.into());
        self
    }

    /// Sets the timeout of each start-up phase.
    #[must_use]
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.clusters.is_empty() {
            return Err(LabError::InvalidSpec(
                "a lab needs at least one cluster".to_owned(),
            ));
        }
        let mut names = HashSet::new();
        for c in &self.clusters {
            c.validate()?;
            if !names.insert(c.name.as_str()) {
                return Err(LabError::InvalidSpec(format!(
                    "cluster name {:?} is used twice",
                    c.name
                )));
            }
        }
        if self.lifetime == Lifetime::Detached && self.clusters.iter().any(|c| c.real_nodes > 0) {
            return Err(LabError::InvalidSpec(
                "real nodes need an attached lab: the process that starts the lab forwards the \
                 traffic between the API servers and the nodes"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let c = ClusterSpec::new("lab-a");
        assert_eq!(c.pod_cidr.to_string(), DEFAULT_POD_CIDR);
        assert_eq!(c.service_cidr.to_string(), DEFAULT_SERVICE_CIDR);
        assert_eq!(c.workers.len(), 2);
        LabSpec::new([c.clone(), ClusterSpec::new("lab-b")])
            .validate()
            .expect("valid");
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(LabSpec::new([]).validate().is_err());
        for bad in [
            "",
            "Lab",
            "-a",
            "a-",
            "a_b",
            "etcd",
            "y",
            "no",
            &"x".repeat(41),
        ] {
            assert!(
                LabSpec::new([ClusterSpec::new(bad)]).validate().is_err(),
                "{bad:?} accepted"
            );
        }
        let dup = LabSpec::new([ClusterSpec::new("a"), ClusterSpec::new("a")]);
        assert!(dup.validate().is_err());
        let mixed = ClusterSpec::new("a").service_cidr("fd00::/108".parse().expect("cidr"));
        assert!(LabSpec::new([mixed]).validate().is_err());
        let no_pods = ClusterSpec::new("a").workers(1, WorkerSpec::new("1", "1Gi", 0));
        assert!(LabSpec::new([no_pods]).validate().is_err());
    }
}
