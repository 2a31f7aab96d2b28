//! # liqo-lab: real Kubernetes control planes on one machine
//!
//! `liqo-lab` starts N real Kubernetes clusters on the local machine for tests, benchmarks and
//! demos: one etcd shared by every cluster (each under its own `--etcd-prefix=/<name>`) and, per
//! cluster, kube-apiserver, kube-controller-manager, kube-scheduler and
//! [kwok](https://kwok.sigs.k8s.io), which plays the kubelet of the worker nodes the lab creates.
//! Pods get scheduled onto those workers, turn `Running` and receive IPs from their node's slice
//! of the cluster's pod CIDR; no container actually runs. Nothing is mocked: RBAC, admission,
//! controllers, CSR signing and the scheduler are the real ones.
//!
//! ```no_run
//! # async fn demo() -> Result<(), liqo_lab::LabError> {
//! use liqo_lab::{ClusterSpec, Lab, LabSpec};
//!
//! let lab = Lab::start(LabSpec::new([ClusterSpec::new("lab-a"), ClusterSpec::new("lab-b")])).await?;
//! let a = lab.cluster("lab-a").expect("exists");
//! let client = a.client()?; // admin kube::Client
//! println!("{} at {}, kubeconfig {}", a.name(), a.api_url(), a.kubeconfig_path().display());
//! lab.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Binaries
//! The lab runs `etcd kube-apiserver kube-controller-manager kube-scheduler kwok` and kwok's stage
//! files (`kwok-stages/*.yaml`) from one directory, found by [`locate_binaries`]: the spec's
//! [`LabSpec::binaries`], else `$LIQO_LAB_BIN_DIR`, else the last line printed by
//! `scripts/lab-binaries.sh` of the workspace (`$LIQO_LAB_BINARIES_SCRIPT` overrides), which
//! builds them from Go modules once (Kubernetes v1.34.4, etcd v3.6.16, kwok v0.8.0) and caches
//! them.
//!
//! ## Kubernetes version
//! SDK libraries never choose the `k8s-openapi` version feature. This crate is not one of them:
//! it is a test harness tied to the version of the binaries it runs (v1.34), so it enables
//! `k8s-openapi/v1_34` itself, and crates whose tests depend on it get that feature.
//!
//! ## Process lifetime
//! * [`Lifetime::Attached`] (tests): every component runs under `setpriv --pdeathsig KILL`,
//!   forked by one dedicated thread that lives as long as the process, so the components die when
//!   the test binary exits, even by SIGKILL. A watchdog (`sh` waiting for EOF on a pipe only the
//!   lab holds) then removes the lab's directory and port reservations. Dropping the [`Lab`]
//!   kills everything at once; [`Lab::stop`] stops it gracefully.
//! * [`Lifetime::Detached`] (the `liqo-lab up` command): processes run in their own process
//!   groups and survive; `<root>/lab.json` ([`LabState`]) records them and [`down`] stops them.
//!
//! ## Ports
//! Each lab reserves its ports (etcd client and peer, one API server port per cluster) in
//! 20000..=31999 with a file per port under `std::env::temp_dir()/liqo-lab-ports/` holding the
//! owner's pid and start time, so labs of concurrent test binaries never collide. Reservations of
//! dead owners are taken over. kube-controller-manager and kube-scheduler run with
//! `--secure-port=0`, kwok opens no port.
//!
//! ## Layout of a lab's directory
//! ```text
//! <root>/lab.json                          state (pids, ports, paths)
//! <root>/etcd/etcd.log, data/
//! <root>/<cluster>/admin.kubeconfig        admin (O=system:masters), context = cluster name
//! <root>/<cluster>/logs/<component>.log    kube-apiserver, kube-controller-manager, ...
//! <root>/<cluster>/pki/                    ca.crt/key (serving, client and CSR-signing CA), sa.key/pub
//! <root>/<cluster>/kubeconfig/             the components' kubeconfigs
//! <root>/<cluster>/users/                  kubeconfigs made by Cluster::user_kubeconfig
//! ```
//!
//! ## Data plane
//! [`DataPlane::start`] gives a lab real networking for chosen pods: a gateway network namespace
//! per cluster on a shared "wan" bridge (192.168.240.0/24), and for every pod labelled
//! [`NETNS_LABEL`]`=true` on a lab worker node a namespace with the pod's IP behind its cluster's
//! gateway, running a one-line HTTP server ([`DataPlane::http_get`] calls it from another pod).
//! `liqo-lab up --dataplane` runs it in a background process for a detached lab
//! ([`start_dataplane_daemon`]); `liqo-lab http` sends a request from a pod's namespace.
//!
//! ## Images
//! [`write_oci_archive`] builds a reproducible one-layer OCI image archive from an [`ImageSpec`]
//! (files, directories, symlinks, run configuration) without registry or docker, ready for
//! `ctr images import`; [`busybox_image`] and [`pause_image`] are a workload image and a pod
//! sandbox image made of the host's static busybox (Debian package `busybox-static`).
//!
//! ## Sharing one lab per test binary
//! Starting a lab takes seconds; [`shared`] starts one per test binary on first use and hands the
//! same `&'static Lab` to every test. Each `#[tokio::test]` has its own runtime, so get clients
//! with [`Cluster::client`] in each test rather than sharing one.

#![warn(missing_docs)]

mod binaries;
mod cluster;
mod dataplane;
mod error;
mod exec;
mod image;
mod kubeconfig;
mod lab;
mod manifest;
mod net;
mod nodes;
mod pki;
mod ports;
mod process;
mod procfs;
mod shared;
mod spec;
mod state;

pub use binaries::{
    BIN_DIR_ENV, BINARIES_SCRIPT_ENV, Binaries, default_binaries_script, locate_binaries,
};
pub use cluster::{
    Cluster, Component, KWOK_NODE_ANNOTATION, KWOK_NODE_ANNOTATION_VALUE, LAB_CLUSTER_LABEL,
};
pub use dataplane::{
    DEFAULT_POD_PORT, DataPlane, DataPlaneRecord, Gateway, NETNS_DIR, NETNS_LABEL, PodNetwork,
    WAN_INTERFACE, WAN_NETWORK, dataplane_id, gateway_netns_name, http_get_in, netns_path,
    pod_netns_name, run_daemon as run_dataplane_daemon, start_daemon as start_dataplane_daemon,
};
pub use error::{ComponentFailure, LabError, Result};
pub use exec::{exec_in_pod, exec_in_pod_until};
pub use image::{
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, BUSYBOX_APPLETS, HOST_BUSYBOX, ImageDigests,
    ImageSpec, MEDIA_TYPE_CONFIG, MEDIA_TYPE_INDEX, MEDIA_TYPE_LAYER, MEDIA_TYPE_MANIFEST,
    busybox_image, busybox_image_from, pause_image, pause_image_from, write_oci_archive,
};
pub use ipnet::IpNet;
pub use lab::{Lab, ProcessInfo};
pub use manifest::{
    apply_document, read_manifest, wait_until_allowed, wait_until_refused, wait_until_refused_by,
};
pub use net::{first_service_ip, node_pod_cidrs};
pub use nodes::{
    API_ADDRESS, MAX_REAL_NODES, NODES_NETWORK, REAL_NODE_LABEL, RealNodeInfo,
    config::{BUSYBOX_IMAGE, PAUSE_IMAGE},
};
pub use pki::{CertifiedKey, MAX_CERT_GROUPS};
pub use ports::{FIRST_PORT, LAST_PORT};
pub use procfs::ProcessToken;
pub use shared::shared;
pub use spec::{
    ClusterSpec, DEFAULT_POD_CIDR, DEFAULT_READY_TIMEOUT, DEFAULT_SERVICE_CIDR, LabSpec, Lifetime,
    WorkerSpec,
};
pub use state::{ClusterRecord, DownOutcome, LabState, ProcessRecord, STATE_FILE, down};
