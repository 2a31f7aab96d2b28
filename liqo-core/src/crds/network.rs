//! `NetworkConfig` and `Tunnel`: the fabric's persisted allocations and its links.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Cidr, ClusterId, WireGuardKey};

/// A remote cluster's networks and the ranges this cluster remapped them to. Persisting the
/// allocation here keeps it stable across restarts of the agent.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "liqo.io",
    version = "v1alpha1",
    kind = "NetworkConfig",
    plural = "networkconfigs",
    namespaced,
    status = "NetworkConfigStatus",
    printcolumn = r#"{"name":"Cluster ID","type":"string","jsonPath":".spec.clusterId"}"#,
    printcolumn = r#"{"name":"Remote Pod CIDR","type":"string","jsonPath":".spec.remotePodCidr"}"#,
    printcolumn = r#"{"name":"Remapped Pod CIDR","type":"string","jsonPath":".status.remappedPodCidr"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigSpec {
    /// The remote cluster.
    pub cluster_id: ClusterId,
    /// Its pod CIDR, as it knows it.
    pub remote_pod_cidr: Cidr,
    /// Its external CIDR, if it uses one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_external_cidr: Option<Cidr>,
}

/// The allocation made for a [`NetworkConfig`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigStatus {
    /// The range local pods use for the remote pod CIDR (equal to it when nothing overlapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remapped_pod_cidr: Option<Cidr>,
    /// The range local pods use for the remote external CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remapped_external_cidr: Option<Cidr>,
    /// `Allocated` once ranges are reserved; `False` with a reason when a pool is exhausted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Which WireGuard implementation drives a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum WireGuardBackend {
    /// The kernel module (`Backend::Kernel`).
    Kernel,
    /// wireguard-go over the userspace API socket.
    #[default]
    WireGuardGo,
    /// boringtun over the userspace API socket.
    Boringtun,
}

/// The WireGuard link to one peer.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "liqo.io",
    version = "v1alpha1",
    kind = "Tunnel",
    plural = "tunnels",
    namespaced,
    status = "TunnelStatus",
    printcolumn = r#"{"name":"Cluster ID","type":"string","jsonPath":".spec.clusterId"}"#,
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".spec.backend"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".spec.endpoint"}"#,
    printcolumn = r#"{"name":"Connected","type":"string","jsonPath":".status.conditions[?(@.type==\"Connected\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TunnelSpec {
    /// The peer.
    pub cluster_id: ClusterId,
    /// The implementation to use.
    #[serde(default)]
    pub backend: WireGuardBackend,
    /// The peer gateway's `host:port`; empty on the side that only listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 3, max = 261),
        regex(pattern = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
    )]
    pub endpoint: Option<String>,
    /// The peer gateway's public key.
    pub peer_public_key: WireGuardKey,
    /// The interface MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1280, max = 9000))]
    pub mtu: Option<u16>,
    /// Keepalive interval in seconds (keeps NAT mappings open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub persistent_keepalive_seconds: Option<u16>,
}

/// The tunnel's observed state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    /// The local interface name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The local public key, for the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_public_key: Option<WireGuardKey>,
    /// When the last handshake completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_handshake: Option<Time>,
    /// Bytes received.
    #[serde(default)]
    pub rx_bytes: u64,
    /// Bytes sent.
    #[serde(default)]
    pub tx_bytes: u64,
    /// `Connected` while handshakes are recent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
