//! One real node: its network namespace, cgroup, containerd, kubelet and kube-proxy.

use std::{
    ffi::OsString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use kube::api::{Api, ObjectMeta, PostParams};

use super::config;
use crate::{
    cluster::{LAB_CLUSTER_LABEL, write_file},
    dataplane::{ip, ip_batch, netns_path},
    error::{LabError, Result},
    kubeconfig::KubeconfigSpec,
    pki::{CertifiedKey, issue_client_cert},
    process::{CommandSpec, STOP_GRACE, Supervised},
    spec::Lifetime,
};

/// Label the lab puts on its real nodes (value `true`), so tests can pin pods to them.
pub const REAL_NODE_LABEL: &str = "lab.liqo.io/real-node";
/// How long a node's containerd gets to open its socket.
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(60);

/// A real node of a lab cluster, as the lab made it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RealNodeInfo {
    /// The Node's name, `<cluster>-node-<i>`.
    pub name: String,
    /// Its cluster.
    pub cluster: String,
    /// Its address on the lab's nodes network (its `InternalIP`).
    pub ip: Ipv4Addr,
    /// Its slice of the cluster's pod CIDR (`spec.podCIDR`).
    pub pod_cidr: IpNet,
    /// Its network namespace (`liqo-<id>-<name>`), where its kubelet, containerd, kube-proxy and
    /// CNI bridge live.
    pub netns: String,
    /// Its directory: configs, logs (`*.log`), containerd's and the kubelet's state.
    pub dir: PathBuf,
    /// Its containerd's socket (`ctr -a <socket> -n k8s.io ...`).
    pub containerd_socket: PathBuf,
}

/// What a node needs from its cluster.
pub(crate) struct NodeSetup<'a> {
    pub(crate) info: RealNodeInfo,
    pub(crate) cluster_cidr: IpNet,
    pub(crate) nodes_network: IpNet,
    pub(crate) api_url: &'a str,
    pub(crate) ca: &'a CertifiedKey,
    pub(crate) ca_file: &'a Path,
    pub(crate) cgroup: String,
    pub(crate) kubelet: &'a Path,
    pub(crate) kube_proxy: &'a Path,
}

/// A started real node.
#[derive(Debug)]
pub(crate) struct RealNode {
    pub(crate) info: RealNodeInfo,
    pub(crate) cgroup: String,
    processes: [Supervised; 3],
}

fn nodes_err(node: &str, step: &str, e: impl std::fmt::Display) -> LabError {
    LabError::Nodes(format!("{node}: {step}: {e}"))
}

impl RealNode {
    /// Writes the node's files and returns it, not started.
    pub(crate) fn prepare(s: &NodeSetup<'_>) -> Result<Self> {
        let info = s.info.clone();
        let dir = &info.dir;
        for d in [dir.clone(), dir.join("cni"), dir.join("kubelet")] {
            std::fs::create_dir_all(&d).map_err(|e| LabError::io("creating", &d, e))?;
        }
        let owner = format!("node {:?}", info.name);
        let kubeconfig = |file: &str, user: &str, creds: &CertifiedKey| -> Result<PathBuf> {
            let path = dir.join(file);
            let yaml = KubeconfigSpec {
                context: &info.cluster,
                cluster: &info.cluster,
                user,
                server: s.api_url,
                ca_pem: &s.ca.cert_pem,
                credentials: creds,
            }
            .render(&path)?;
            write_file(&path, &yaml, 0o600)?;
            Ok(path)
        };
        let kubelet_creds = issue_client_cert(
            s.ca,
            &owner,
            &format!("system:node:{}", info.name),
            &["system:nodes"],
        )?;
        let kubelet_kc = kubeconfig("kubelet.kubeconfig", "kubelet", &kubelet_creds)?;
        let proxy_creds = issue_client_cert(s.ca, &owner, "system:kube-proxy", &[])?;
        let proxy_kc = kubeconfig("kube-proxy.kubeconfig", "kube-proxy", &proxy_creds)?;

        write_file(
            &dir.join("containerd.toml"),
            &config::containerd_toml(dir),
            0o644,
        )?;
        write_file(
            &dir.join("cni").join("10-liqo-lab.conflist"),
            &config::cni_conflist(dir, info.pod_cidr),
            0o644,
        )?;
        write_file(
            &dir.join("kubelet.yaml"),
            &config::kubelet_yaml(&config::KubeletParams {
                dir,
                ca_file: s.ca_file,
                cgroup_root: &s.cgroup,
                pod_cidr: info.pod_cidr,
            }),
            0o644,
        )?;
        write_file(
            &dir.join("kube-proxy.yaml"),
            &config::kube_proxy_yaml(&proxy_kc, &info.name, info.ip, s.cluster_cidr),
            0o644,
        )?;
        write_file(
            &dir.join("node.nft"),
            &config::node_nft(info.pod_cidr, s.nodes_network),
            0o644,
        )?;

        let netns_arg = format!("--net={}", netns_path(&info.netns).display());
        let in_netns = |component: &str, binary: &Path, args: Vec<OsString>| {
            let mut all: Vec<OsString> = vec![netns_arg.clone().into(), "--".into(), binary.into()];
            all.extend(args);
            Supervised::new(CommandSpec {
                owner: owner.clone(),
                component: component.to_owned(),
                binary: PathBuf::from("nsenter"),
                args: all,
                log: dir.join(format!("{component}.log")),
                workdir: dir.clone(),
            })
        };
        let containerd = in_netns(
            "containerd",
            Path::new("containerd"),
            vec!["--config".into(), dir.join("containerd.toml").into()],
        );
        let kubelet = in_netns(
            "kubelet",
            s.kubelet,
            vec![
                "--config".into(),
                dir.join("kubelet.yaml").into(),
                "--kubeconfig".into(),
                kubelet_kc.into(),
                "--root-dir".into(),
                dir.join("kubelet").into(),
                "--hostname-override".into(),
                info.name.clone().into(),
                "--node-ip".into(),
                info.ip.to_string().into(),
            ],
        );
        let kube_proxy = in_netns(
            "kube-proxy",
            s.kube_proxy,
            vec!["--config".into(), dir.join("kube-proxy.yaml").into()],
        );
        Ok(Self {
            info,
            cgroup: s.cgroup.clone(),
            processes: [containerd, kubelet, kube_proxy],
        })
    }

    /// Creates the node's network namespace, plugged into the nodes' bridge in `nodes_netns`
    /// through the veth peer `peer`, with a default route to `gateway`.
    pub(crate) async fn plug(
        &self,
        nodes_netns: &str,
        peer: &str,
        gateway: Ipv4Addr,
        prefix: u8,
    ) -> Result<()> {
        let ns = &self.info.netns;
        ip(None, &["netns", "add", ns]).await?;
        ip(
            None,
            &[
                "link",
                "add",
                "name",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                nodes_netns,
            ],
        )
        .await?;
        ip_batch(
            Some(nodes_netns),
            &[
                format!("link set {peer} master br0"),
                format!("link set {peer} up"),
            ],
        )
        .await?;
        ip_batch(
            Some(ns),
            &[
                "link set lo up".to_owned(),
                format!("addr add {}/{prefix} dev eth0", self.info.ip),
                "link set eth0 up".to_owned(),
                format!("route add default via {gateway}"),
            ],
        )
        .await?;
        let path = netns_path(ns);
        crate::dataplane::in_netns(&path, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        })
        .await
        .map_err(|e| nodes_err(&self.info.name, "enabling IP forwarding", e))?;
        run(
            "nft",
            &[
                format!("--net={}", path.display()),
                "--".to_owned(),
                "nft".to_owned(),
                "-f".to_owned(),
                self.info.dir.join("node.nft").display().to_string(),
            ],
            "nsenter",
        )
        .await
        .map_err(|e| nodes_err(&self.info.name, "loading its nftables rules", e))
    }

    /// Routes the pod CIDR slices of the cluster's other nodes through their addresses.
    pub(crate) async fn route_to(&self, others: &[RealNodeInfo]) -> Result<()> {
        let lines: Vec<String> = others
            .iter()
            .filter(|o| o.name != self.info.name)
            .map(|o| format!("route add {} via {}", o.pod_cidr, o.ip))
            .collect();
        if lines.is_empty() {
            return Ok(());
        }
        ip_batch(Some(&self.info.netns), &lines).await
    }

    /// Starts containerd, imports `images`, registers the Node and starts kubelet and kube-proxy.
    pub(crate) async fn start(
        &self,
        lifetime: Lifetime,
        images: &[PathBuf],
        client: &kube::Client,
    ) -> Result<()> {
        let name = &self.info.name;
        super::cgroups::create(&self.cgroup)
            .map_err(|e| nodes_err(name, "creating its cgroup", e))?;
        let [containerd, kubelet, kube_proxy] = &self.processes;
        containerd.start(lifetime).await?;
        let deadline = Instant::now() + CONTAINERD_TIMEOUT;
        let socket = self.info.containerd_socket.display().to_string();
        loop {
            containerd.ensure_running("waiting for its socket")?;
            match run(
                "ctr",
                &["-a".to_owned(), socket.clone(), "version".to_owned()],
                "ctr",
            )
            .await
            {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(containerd.spec.timeout(
                        "waiting for its socket",
                        CONTAINERD_TIMEOUT,
                        e,
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        for image in images {
            self.import_image(image).await?;
        }
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    [
                        (LAB_CLUSTER_LABEL.to_owned(), self.info.cluster.clone()),
                        (REAL_NODE_LABEL.to_owned(), "true".to_owned()),
                        ("kubernetes.io/hostname".to_owned(), name.clone()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: Some(self.info.pod_cidr.to_string()),
                pod_cidrs: Some(vec![self.info.pod_cidr.to_string()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        match Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(nodes_err(name, "creating its Node", e)),
        }
        kubelet.start(lifetime).await?;
        kube_proxy.start(lifetime).await?;
        Ok(())
    }

    /// Imports an OCI image archive into the node's containerd (namespace `k8s.io`, the one the
    /// kubelet uses).
    pub(crate) async fn import_image(&self, archive: &Path) -> Result<()> {
        run(
            "ctr",
            &[
                "-a".to_owned(),
                self.info.containerd_socket.display().to_string(),
                "-n".to_owned(),
                "k8s.io".to_owned(),
                "images".to_owned(),
                "import".to_owned(),
                archive.display().to_string(),
            ],
            "ctr",
        )
        .await
        .map_err(|e| {
            nodes_err(
                &self.info.name,
                &format!("importing {}", archive.display()),
                e,
            )
        })
    }

    /// Checks that every process of the node still runs.
    pub(crate) fn ensure_running(&self, phase: &str) -> Result<()> {
        for p in &self.processes {
            p.ensure_running(phase)?;
        }
        Ok(())
    }

    /// Stops kube-proxy and the kubelet, then containerd.
    pub(crate) async fn stop(&self) {
        let [containerd, kubelet, kube_proxy] = &self.processes;
        let (a, b) = tokio::join!(kube_proxy.stop(STOP_GRACE), kubelet.stop(STOP_GRACE));
        for r in [a, b, containerd.stop(STOP_GRACE).await] {
            if let Err(e) = r {
                tracing::warn!("{e}");
            }
        }
    }

    /// Kills every process of the node at once.
    pub(crate) fn kill_now(&self) {
        for p in &self.processes {
            p.kill_now();
        }
    }

    /// The node's processes: `(component, pid, log)`.
    pub(crate) fn processes(&self) -> impl Iterator<Item = (&str, u32, &Path)> {
        self.processes.iter().filter_map(|p| {
            p.pid()
                .map(|pid| (p.spec.component.as_str(), pid, p.spec.log.as_path()))
        })
    }
}

/// Runs `program args...` and returns its stderr (or stdout) as the error when it fails.
async fn run(shown: &str, args: &[String], program: &str) -> std::result::Result<(), String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    Err(format!(
        "{shown} {} failed ({}): {text}",
        args.join(" "),
        out.status
    ))
}
