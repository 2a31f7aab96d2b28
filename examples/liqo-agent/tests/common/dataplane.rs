//! The agent's network composition end to end, once per fabric (`network.fabric`) and peering
//! method (`peering.method`; the test binaries `dataplane.rs`, `dataplane_routed.rs` and
//! `dataplane_kubeconfig.rs` each run one combination, on a lab of their own): two lab
//! clusters and the lab's data plane, one `liqo-agent` per cluster, a peering, an offloaded
//! Deployment, and an HTTP request from a pod of the consumer to the offloaded pod. Then SIGTERM:
//! both agents exit 0 and leave nothing behind.
//!
//! - [`Fabric::WireGuard`], as `scripts/demo.sh` shows it by hand: both clusters have the same pod
//!   CIDR (10.244.0.0/16), each agent runs its WireGuard gateway (userspace, wireguard-go) in the
//!   cluster's gateway network namespace, and the request goes through the tunnel and the double
//!   NAT; no WireGuard daemon or control socket survives the agents. Needs `wireguard-go`.
//! - [`Fabric::Routed`]: disjoint pod CIDRs that the underlay routes (the test adds, in each
//!   gateway namespace, a route to the other cluster's pod CIDR via its wan address), no tunnel:
//!   the request reaches the pod at its real IP from the client's real IP.
//!
//! With [`Method::Kubeconfig`], the provider's administrator issues a peering bundle from both
//! clusters' published networks (gateway endpoints and keys included) instead of the consumer's
//! request over HTTPS.
//!
//! The agents run as the ServiceAccount of `deploy/` (its RBAC and admission guard applied, CRDs
//! installed by the admin), and none of their requests may be refused.
//!
//! Needs root, `ip` and `nft` (as CI has).
#![allow(dead_code)] // Each test binary uses what it needs.

use super::{
    Agent, Error, failure, free_port, http_get,
    scenario::{Method, peer_through_a_bundle},
    until,
    workload::{
        apply, client_pod, field, named, network_ready, node_ready, offload_namespace,
        provider_intent, running_ip, watch_for, web_deployment,
    },
};

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Node, Pod},
};
use kube::{Api, Client, runtime::watcher};
use liqo_core::{ClusterId, crds::ForeignCluster};
use liqo_lab::{Cluster, ClusterSpec, DataPlane, IpNet, Lab, LabSpec, WorkerSpec};

type TestResult = Result<(), Error>;

/// The longest any single step may take.
const WAIT: Duration = Duration::from_secs(60);
const CONSUMER: &str = "dp-a";
const PROVIDER: &str = "dp-b";
const OFFLOADED_NS: &str = "dp-offload";

/// The fabric the agents run (`network.fabric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fabric {
    /// A WireGuard gateway per cluster; the clusters share their pod CIDR.
    WireGuard,
    /// No tunnel: disjoint pod CIDRs routed by the underlay.
    Routed,
}

impl Fabric {
    /// The pod CIDRs of the consumer and the provider.
    fn pod_cidrs(self) -> (&'static str, &'static str) {
        match self {
            Self::WireGuard => ("10.244.0.0/16", "10.244.0.0/16"),
            Self::Routed => ("10.244.0.0/16", "10.245.0.0/16"),
        }
    }
}

/// The lab of this test binary (one per process), with the pod CIDRs `fabric` needs.
async fn lab(fabric: Fabric) -> &'static Lab {
    liqo_lab::shared(|| {
        let cluster = |name: &str, pod_cidr: &str| {
            ClusterSpec::new(name)
                .pod_cidr(pod_cidr.parse().expect("a CIDR"))
                .workers(1, WorkerSpec::new("4", "8Gi", 20))
        };
        let (consumer, provider) = fabric.pod_cidrs();
        LabSpec::new([cluster(CONSUMER, consumer), cluster(PROVIDER, provider)])
    })
    .await
    .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

/// The underlay of [`Fabric::Routed`]: in each gateway namespace, a route to every other
/// cluster's pod CIDR via that cluster's gateway on the wan.
fn route_pod_networks(lab: &Lab, dp: &DataPlane) -> TestResult {
    for gw in dp.gateways() {
        for other in dp.gateways().iter().filter(|o| o.cluster != gw.cluster) {
            let cidr = lab
                .cluster(&other.cluster)
                .ok_or("no such cluster")?
                .pod_cidr()
                .to_string();
            let via = other.wan_address.to_string();
            let out = std::process::Command::new("ip")
                .args(["-n", &gw.netns, "route", "replace", &cidr, "via", &via])
                .output()?;
            if !out.status.success() {
                return Err(format!(
                    "ip -n {} route replace {cidr} via {via}: {}",
                    gw.netns,
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
        }
    }
    Ok(())
}

/// The WireGuard interface of `cluster`'s agent: unique on the machine (control sockets are
/// shared by every network namespace) and at most 15 characters.
fn interface(cluster: &str) -> String {
    let short = cluster.trim_start_matches("dp-");
    format!("lqdp{short}{}", std::process::id() % 100_000)
}

fn socket_path(iface: &str) -> PathBuf {
    Path::new("/run/wireguard").join(format!("{iface}.sock"))
}

/// Pids of the wireguard-go daemons serving `iface` (`wireguard-go -f <iface>`).
fn wireguard_go_pids(iface: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"wireguard-go"))
                && args.get(1) == Some(&&b"-f"[..])
                && args.get(2) == Some(&iface.as_bytes())
        })
        .collect()
}

/// Removes, pass or fail, the test's directory and whatever WireGuard state of ours survives the
/// agents (daemons of our interfaces, by pid, and their control sockets).
struct Leftovers {
    dir: PathBuf,
    interfaces: Vec<String>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for iface in &self.interfaces {
            for pid in wireguard_go_pids(iface) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            let _ = std::fs::remove_file(socket_path(iface));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the agent of `cluster`, authenticated by `kubeconfig`.
fn start_agent(
    dir: &Path,
    cluster: &Cluster,
    kubeconfig: &Path,
    dp: &DataPlane,
    method: Method,
    fabric: Fabric,
) -> Result<Agent, Error> {
    let name = cluster.name();
    let gw = dp
        .gateway(name)
        .ok_or_else(|| format!("the data plane has no gateway for {name}"))?;
    let (metrics_port, peering_port, webhook_port) = (free_port(), free_port(), free_port());
    let config = dir.join(format!("{name}.yaml"));
    let network = match fabric {
        Fabric::WireGuard => format!(
            "network:\n  enabled: true\n  backend: userspace\n  \
             implementation: wireguard-go\n  interface: {iface}\n  listenPort: 51820\n  \
             endpoint: {wan}:51820\n  netns: {netns}\n",
            iface = interface(name),
            wan = gw.wan_address,
            netns = gw.netns_path.display(),
        ),
        Fabric::Routed => "network:\n  enabled: true\n  fabric: Routed\n".to_owned(),
    };
    std::fs::write(
        &config,
        format!(
            "kubeconfig: {kubeconfig}\n\
                 installCrds: false\n\
                 metricsAddr: 127.0.0.1:{metrics_port}\n\
                 cluster:\n  name: {name}\n  id: {name}\n  podCidr: {pod}\n  serviceCidr: {svc}\n\
                 discovery:\n  mdns: {{enabled: false}}\n  foreignClusters: true\n\
                 peering:\n{peering}  offer: {{cpu: '4', memory: 8Gi, pods: 20}}\n\
                 {network}\
                 virtualKubelet:\n  consumer:\n    enabled: true\n    \
                 webhook: 127.0.0.1:{webhook_port}\n    heartbeatSeconds: 2\n  \
                 provider:\n    enabled: true\n",
            kubeconfig = kubeconfig.display(),
            peering = match method {
                Method::Csr => format!(
                    "  listen: 127.0.0.1:{peering_port}\n  \
                     endpoint: https://127.0.0.1:{peering_port}\n  policy: AcceptAll\n  \
                     credentialLifetimeSeconds: 600\n"
                ),
                Method::Kubeconfig => "  method: Kubeconfig\n".to_owned(),
            },
            pod = cluster.pod_cidr(),
            svc = cluster.service_cidr(),
        ),
    )?;
    Agent::spawn(
        &config,
        &[],
        format!("127.0.0.1:{metrics_port}"),
        dir.join(format!("{name}.log")),
        "info,liqo_net=debug,liqo_fabric_wireguard=debug,liqo_wireguard_userspace=debug,kube_runtime=warn",
    )
}

/// The scenario of the [module docs](self) with `method` over `fabric`.
pub async fn offloaded_pod_answers(method: Method, fabric: Fabric) -> TestResult {
    let started = Instant::now();
    let lab = lab(fabric).await;
    let (ca, cb) = (
        lab.cluster(CONSUMER).ok_or("no consumer cluster")?,
        lab.cluster(PROVIDER).ok_or("no provider cluster")?,
    );
    let (a, b): (Client, Client) = (ca.client()?, cb.client()?);
    let pod_cidr: IpNet = cb.pod_cidr();

    // Drop order (reverse of declaration): agents, then leftovers, then the data plane.
    let dp = DataPlane::start(lab).await?;
    if fabric == Fabric::Routed {
        route_pod_networks(lab, &dp)?;
    }
    let leftovers = Leftovers {
        dir: std::env::temp_dir().join(format!("liqo-agent-dataplane-{}", std::process::id())),
        interfaces: match fabric {
            Fabric::WireGuard => vec![interface(CONSUMER), interface(PROVIDER)],
            Fabric::Routed => vec![],
        },
    };
    std::fs::create_dir_all(&leftovers.dir)?;
    for iface in &leftovers.interfaces {
        // A stale socket of an earlier run with the same pid would only be reclaimed; start clean.
        let _ = std::fs::remove_file(socket_path(iface));
    }

    // What deploy/ installs, as the admin; the agents run as its ServiceAccount.
    let (sa_a, sa_b) = (
        super::install_deploy(ca).await?,
        super::install_deploy(cb).await?,
    );
    let consumer = start_agent(&leftovers.dir, ca, &sa_a, &dp, method, fabric)?;
    let provider = start_agent(&leftovers.dir, cb, &sa_b, &dp, method, fabric)?;
    let agents = [&consumer, &provider];
    for agent in agents {
        until("/readyz 200", &agents, WAIT, || async {
            matches!(http_get(&agent.metrics, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await?;
    }
    // Each gateway serves its control socket from its own wireguard-go.
    for iface in &leftovers.interfaces {
        assert!(
            socket_path(iface).exists(),
            "{} exists",
            socket_path(iface).display()
        );
        assert_eq!(
            wireguard_go_pids(iface).len(),
            1,
            "one wireguard-go for {iface}"
        );
    }

    let prov_id: ClusterId = PROVIDER.parse()?;
    match method {
        Method::Csr => {
            // `liqoctl peer`: the consumer declares the provider (endpoint and pinned key).
            let info = until("the provider's cluster info", &agents, WAIT, || async {
                liqo_core::info::read(&b).await.ok().flatten()
            })
            .await?;
            assert_eq!(info.cluster_id.as_str(), PROVIDER);
            let fc = provider_intent(&prov_id, info)?;
            apply(&Api::<ForeignCluster>::all(a.clone()), PROVIDER, &fc).await?;
        }
        Method::Kubeconfig => {
            peer_through_a_bundle(ca, cb, &CONSUMER.parse()?, &prov_id, &agents).await?
        }
    }

    // The tunnel comes up on both sides, and the virtual node on the consumer.
    watch_for(
        "NetworkReady on the consumer's ForeignCluster",
        &agents,
        Api::<ForeignCluster>::all(a.clone()),
        named(PROVIDER),
        |fc| network_ready(fc).then_some(()),
    )
    .await?;
    watch_for(
        "NetworkReady on the provider's ForeignCluster",
        &agents,
        Api::<ForeignCluster>::all(b.clone()),
        named(CONSUMER),
        |fc| network_ready(fc).then_some(()),
    )
    .await?;
    let node = liqo_vk::names::node_name(&prov_id);
    watch_for(
        "the virtual node Ready",
        &agents,
        Api::<Node>::all(a.clone()),
        named(&node),
        |n| node_ready(n).then_some(()),
    )
    .await?;
    let peered = started.elapsed();

    // Offload a namespace (pods only on the provider), a Deployment in it and a client at home.
    offload_namespace(&a, OFFLOADED_NS, &agents).await?;
    apply(
        &Api::<Deployment>::namespaced(a.clone(), OFFLOADED_NS),
        "web",
        &web_deployment(OFFLOADED_NS, 1),
    )
    .await?;
    apply(
        &Api::<Pod>::namespaced(a.clone(), "default"),
        "client",
        &client_pod(),
    )
    .await?;

    // The offloaded pod runs on the virtual node with the address the consumer reaches it at.
    let (web, seen_ip) = watch_for(
        "the offloaded pod Running with a pod IP",
        &agents,
        Api::<Pod>::namespaced(a.clone(), OFFLOADED_NS),
        watcher::Config::default().labels("app=web"),
        |p| {
            let on_virtual_node =
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str());
            let ip = running_ip(p)?;
            on_virtual_node.then(|| (p.metadata.name.clone().unwrap_or_default(), ip))
        },
    )
    .await?;
    let client_ip = watch_for(
        "the client pod Running with a pod IP",
        &agents,
        Api::<Pod>::namespaced(a.clone(), "default"),
        named("client"),
        running_ip,
    )
    .await?;

    // The data plane gave the client (consumer) and the real pod (provider) their namespaces.
    let nets = dp
        .wait_pods(WAIT, |nets| {
            nets.iter()
                .any(|n| n.cluster == CONSUMER && n.namespace == "default" && n.name == "client")
                && nets.iter().any(|n| n.cluster == PROVIDER && n.name == web)
        })
        .await
        .map_err(|e| failure("the pod networks", &agents, e))?;
    let real = nets
        .iter()
        .find(|n| n.cluster == PROVIDER && n.name == web)
        .ok_or("no network for the real pod")?;
    let client_net = nets
        .iter()
        .find(|n| n.cluster == CONSUMER && n.name == "client")
        .ok_or("no network for the client")?;
    assert_eq!(
        client_net.ip, client_ip,
        "the client's namespace has its IP"
    );
    assert!(
        pod_cidr.contains(&std::net::IpAddr::V4(real.ip)),
        "the real pod's IP {} is in the provider's pod CIDR {pod_cidr}",
        real.ip
    );
    match fabric {
        Fabric::WireGuard => {
            assert!(
                !pod_cidr.contains(&std::net::IpAddr::V4(seen_ip)),
                "the consumer sees the offloaded pod at {seen_ip}, remapped out of the shared \
                 pod CIDR {pod_cidr} (its real IP is {})",
                real.ip
            );
            assert_ne!(seen_ip, real.ip);
        }
        Fabric::Routed => assert_eq!(
            seen_ip, real.ip,
            "routed flat, the consumer sees the offloaded pod at its real IP"
        ),
    }

    // WireGuard: consumer:client -> <remapped IP>:8080 -> tunnel -> provider's NAT -> the real
    // pod. Routed: client -> the real pod's IP, through the underlay's routes.
    let url = format!("http://{seen_ip}:8080/");
    let last = std::cell::RefCell::new(String::new());
    let body = until(
        "an HTTP answer from the offloaded pod",
        &agents,
        WAIT,
        || async {
            match dp.http_get(CONSUMER, "default", "client", &url).await {
                Ok(body) => Some(body),
                Err(e) => {
                    *last.borrow_mut() = e.to_string();
                    None
                }
            }
        },
    )
    .await
    .map_err(|e| format!("{e}\nlast error: {}", last.borrow()))?;
    assert_eq!(field(&body, "cluster"), Some(PROVIDER), "{body}");
    assert_eq!(field(&body, "pod"), Some(web.as_str()), "{body}");
    assert_eq!(
        field(&body, "namespace"),
        Some(real.namespace.as_str()),
        "{body}"
    );
    assert_eq!(
        field(&body, "ip"),
        Some(real.ip.to_string().as_str()),
        "the pod answers with its real IP: {body}"
    );
    let client_seen = field(&body, "client").ok_or_else(|| format!("no client= in {body}"))?;
    let client_seen = client_seen.split(':').next().unwrap_or_default();
    match fabric {
        Fabric::WireGuard => assert_ne!(
            client_seen,
            client_ip.to_string(),
            "the provider sees the consumer's client remapped, not at its real IP: {body}"
        ),
        Fabric::Routed => assert_eq!(
            client_seen,
            client_ip.to_string(),
            "routed flat, the provider sees the consumer's client at its real IP: {body}"
        ),
    }
    let answered = started.elapsed();
    if fabric == Fabric::Routed {
        // No gateway: nothing of liqo's in the gateway namespaces (no NAT table, no interface).
        for gw in dp.gateways() {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &gw.netns, "nft", "list", "tables"])
                .output()?;
            let tables = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && !tables.contains("liqo"),
                "nftables of {}: {tables}",
                gw.netns
            );
        }
    }

    // SIGTERM: both agents exit 0 and stop their WireGuard daemons.
    super::stop_cleanly(consumer, provider).await?;
    for iface in &leftovers.interfaces {
        assert!(
            wireguard_go_pids(iface).is_empty(),
            "no wireguard-go for {iface} survives its agent"
        );
    }
    // The kernel removes a TUN interface once its last descriptor is closed, shortly after the
    // daemon's death.
    let wireguard_clusters = match fabric {
        Fabric::WireGuard => vec![CONSUMER, PROVIDER],
        Fabric::Routed => vec![],
    };
    for cluster in wireguard_clusters {
        let gw = dp.gateway(cluster).ok_or("no gateway")?;
        let iface = interface(cluster);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let shown = std::process::Command::new("ip")
                .args(["-n", &gw.netns, "link", "show", &iface])
                .output()?;
            if !shown.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the WireGuard interface {iface} is still in {} 10s after its agent exited: {}",
                gw.netns,
                String::from_utf8_lossy(&shown.stdout)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The agent removes its gateway on SIGTERM: the daemon's control socket is gone too.
    let stale: Vec<String> = leftovers
        .interfaces
        .iter()
        .map(|i| socket_path(i))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        stale.is_empty(),
        "WireGuard control sockets left after SIGTERM: {stale:?}"
    );
    let interfaces = leftovers.interfaces.clone();
    drop(leftovers);
    for iface in interfaces {
        assert!(!socket_path(&iface).exists(), "{iface}'s socket removed");
    }
    let gateways: Vec<PathBuf> = dp.gateways().iter().map(|g| g.netns_path.clone()).collect();
    dp.stop().await?;
    for path in gateways {
        assert!(!path.exists(), "{} removed", path.display());
    }
    eprintln!(
        "peered in {peered:?}, answered in {answered:?}, done in {:?}; client {client_ip} -> \
         {seen_ip}:8080 answered: {body}",
        started.elapsed()
    );
    Ok(())
}
