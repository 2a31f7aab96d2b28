//! The configuration files of a real node: containerd, CNI, kubelet, kube-proxy, and the API
//! server's egress selector. Pure rendering, so each is unit-tested without a node.

use std::{net::Ipv4Addr, path::Path};

use ipnet::IpNet;

/// Name of the sandbox ("pause") image every node's containerd is configured with.
pub const PAUSE_IMAGE: &str = "liqo.lab/pause:local";
/// Name of the workload image (static busybox) every real node has.
pub const BUSYBOX_IMAGE: &str = "liqo.lab/busybox:local";
/// Where Debian's `containernetworking-plugins` puts the CNI plugins.
pub(crate) const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// containerd 1.6's config (version 2) for a node whose files live in `dir`.
///
/// `restrict_oom_score_adj` because the lab runs without CAP_SYS_RESOURCE on some machines: runc
/// fails to start a sandbox whose oom_score_adj (-998) is below containerd's own. Network
/// namespaces go under the state dir so that removing a node never leaves `cni-*` entries in
/// `/run/netns`.
pub(crate) fn containerd_toml(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni"
"#
    )
}

/// The CNI network of a node: a bridge with the node's pod CIDR slice (host-local IPAM, its state
/// in the node's directory) and portmap for hostPort. No masquerade here: the node's own
/// nftables rule masquerades only what leaves for the nodes' network, so pods of one cluster see
/// each other's real addresses.
pub(crate) fn cni_conflist(dir: &Path, pod_cidr: IpNet) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "liqo-lab",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": pod_cidr.to_string() }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": dir.join("cni-ipam").display().to_string(),
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
    .to_string()
}

/// What a kubelet needs to know about its node.
#[derive(Debug, Clone)]
pub(crate) struct KubeletParams<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) ca_file: &'a Path,
    pub(crate) cgroup_root: &'a str,
    pub(crate) pod_cidr: IpNet,
}

/// The kubelet's configuration file.
///
/// Authentication and authorization as on a kubeadm node (client certificates of the cluster CA,
/// webhook authorization), so `kubectl logs` and `exec` go through the same checks. The cgroup root
/// is the node's own, so kubelets of one machine never share `kubepods`. Eviction thresholds are
/// low because the lab's nodes share one disk with everything else.
pub(crate) fn kubelet_yaml(p: &KubeletParams<'_>) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
cgroupRoot: "/{cgroup}"
containerRuntimeEndpoint: "unix://{dir}/containerd.sock"
failSwapOn: false
failCgroupV1: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
podCIDR: "{cidr}"
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"#,
        ca = p.ca_file.display(),
        cgroup = p.cgroup_root,
        dir = p.dir.display(),
        cidr = p.pod_cidr,
    )
}

/// kube-proxy's configuration (nftables mode). Conntrack sysctls are left alone: they are global
/// or read-only in a network namespace.
pub(crate) fn kube_proxy_yaml(
    kubeconfig: &Path,
    node: &str,
    node_ip: Ipv4Addr,
    cluster_cidr: IpNet,
) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: "{kc}"}}
mode: nftables
clusterCIDR: "{cluster_cidr}"
hostnameOverride: "{node}"
bindAddress: "{node_ip}"
healthzBindAddress: "127.0.0.1:10256"
metricsBindAddress: "127.0.0.1:10249"
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"#,
        kc = kubeconfig.display(),
    )
}

/// The node's nftables rules: masquerade what its pods send to the nodes' network (the API
/// server's address there, other nodes), whose namespace has no route back to pod CIDRs (they
/// overlap between clusters).
pub(crate) fn node_nft(pod_cidr: IpNet, nodes_network: IpNet) -> String {
    format!(
        "table ip liqo-lab-node {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {pod_cidr} ip daddr {nodes_network} masquerade\n  }}\n}}\n"
    )
}

/// The API server's egress selector: traffic to the cluster's nodes and pods (kubelet, proxy,
/// webhooks) goes through an HTTP CONNECT proxy on a unix socket, which dials from inside the
/// cluster's network.
pub(crate) fn egress_selector_yaml(socket: &Path) -> String {
    format!(
        r#"apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: "{}"
"#,
        socket.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_config_keeps_everything_in_the_node_dir() {
        let t = containerd_toml(Path::new("/lab/nodes/a-node-0"));
        assert!(t.contains(r#"address = "/lab/nodes/a-node-0/containerd.sock""#));
        assert!(t.contains(r#"conf_dir = "/lab/nodes/a-node-0/cni""#));
        assert!(t.contains("restrict_oom_score_adj = true"));
        assert!(t.contains("netns_mounts_under_state_dir = true"));
        assert!(t.contains(PAUSE_IMAGE));
    }

    #[test]
    fn cni_uses_the_node_slice() {
        let c = cni_conflist(Path::new("/n"), "10.244.3.0/24".parse().expect("cidr"));
        let v: serde_json::Value = serde_json::from_str(&c).expect("json");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.3.0/24"
        );
        assert_eq!(v["plugins"][0]["ipMasq"], false);
    }

    #[test]
    fn kubelet_and_proxy_configs_parse_as_yaml() {
        let k = kubelet_yaml(&KubeletParams {
            dir: Path::new("/n"),
            ca_file: Path::new("/ca.crt"),
            cgroup_root: "liqo-x-a-node-0",
            pod_cidr: "10.244.3.0/24".parse().expect("cidr"),
        });
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&k).expect("kubelet yaml");
        assert_eq!(v["cgroupRoot"], "/liqo-x-a-node-0");
        assert_eq!(v["authorization"]["mode"], "Webhook");
        let p = kube_proxy_yaml(
            Path::new("/kc"),
            "a-node-0",
            Ipv4Addr::new(172, 30, 1, 2),
            "10.244.0.0/16".parse().expect("cidr"),
        );
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&p).expect("proxy yaml");
        assert_eq!(v["mode"], "nftables");
        assert_eq!(v["conntrack"]["maxPerCore"], 0);
        let e = egress_selector_yaml(Path::new("/e.sock"));
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&e).expect("egress yaml");
        assert_eq!(
            v["egressSelections"][0]["connection"]["transport"]["uds"]["udsName"],
            "/e.sock"
        );
    }
}
