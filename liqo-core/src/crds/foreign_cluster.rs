//! `ForeignCluster`: one per peer, the local record of a remote cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ClusterId, DiscoverySource, KeyFingerprint, NetworkParameters};

/// The foreign cluster's role towards this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum PeeringRole {
    /// Known, not peered.
    #[default]
    None,
    /// It provides resources to this cluster (this cluster consumes).
    Provider,
    /// It consumes this cluster's resources.
    Consumer,
    /// Both at once.
    Both,
}

/// How the peer was found and whether finding it is enough to peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiscoverySpec {
    /// The source that reported it (the highest-precedence one when several did).
    pub source: DiscoverySource,
    /// Peer automatically once discovered. Off by default: discovered is not trusted.
    #[serde(default)]
    pub auto_peer: bool,
}

/// The desired state of a peer.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "liqo.io",
    version = "v1alpha1",
    kind = "ForeignCluster",
    plural = "foreignclusters",
    shortname = "fc",
    status = "ForeignClusterStatus",
    printcolumn = r#"{"name":"Cluster ID","type":"string","jsonPath":".spec.clusterId"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".status.role"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.discovery.source"}"#,
    printcolumn = r#"{"name":"Authenticated","type":"string","jsonPath":".status.conditions[?(@.type==\"Authenticated\")].status"}"#,
    printcolumn = r#"{"name":"Network","type":"string","jsonPath":".status.conditions[?(@.type==\"NetworkReady\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ForeignClusterSpec {
    /// The peer's cluster id. Immutable: a different id is a different peer.
    #[x_kube(validation = Rule::new("self == oldSelf").message("clusterId is immutable"))]
    pub cluster_id: ClusterId,
    /// The peer's human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub cluster_name: Option<String>,
    /// The peer's peering endpoint, an `https://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() == 'https'").message("peeringEndpoint must be an https:// URL"))]
    pub peering_endpoint: Option<String>,
    /// The pinned fingerprint of the peer's public key. A record with another key for the same
    /// cluster id never replaces this one; it is flagged in the `KeyMismatch` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_fingerprint: Option<KeyFingerprint>,
    /// How the peer was found.
    pub discovery: DiscoverySpec,
    /// The role this cluster wants towards the peer: `Provider` to consume its resources,
    /// `Consumer` to offer ours, `Both`, or `None` to stay unpeered.
    #[serde(default)]
    pub role: PeeringRole,
}

/// The namespaces that hold a peering's objects.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantNamespaces {
    /// The namespace in this cluster that holds the peer's objects (credentials, offers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    /// The namespace the peer gave this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// The observed state of a peer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForeignClusterStatus {
    /// The established role (what is actually peered).
    #[serde(default)]
    pub role: PeeringRole,
    /// One condition per module; see [`condition`] for the types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// When a discovery source last reported the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Every source currently reporting the peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub discovery_sources: Vec<DiscoverySource>,
    /// The tenant namespaces of this peering.
    #[serde(default)]
    pub tenant_namespaces: TenantNamespaces,
    /// The peer's network parameters, as exchanged at peering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkParameters>,
}

/// Condition types of a [`ForeignCluster`], one per module.
pub mod condition {
    /// A discovery source currently reports the peer.
    pub const DISCOVERED: &str = "Discovered";
    /// A record announced the peer's id with a key other than the pinned one.
    pub const KEY_MISMATCH: &str = "KeyMismatch";
    /// The peer proved its identity (or this cluster proved its own to the peer).
    pub const AUTHENTICATED: &str = "Authenticated";
    /// The provider's offer was received and accepted.
    pub const OFFER_ACCEPTED: &str = "OfferAccepted";
    /// Provider side: the consumer proved possession of its key (signed our nonce).
    pub const CONSUMER_AUTHENTICATED: &str = "ConsumerAuthenticated";
    /// Provider side: the consumer's tenant namespace, credential, RBAC and quota are in place
    /// (`False` with reason `AwaitingApproval` while an administrator has to approve it).
    pub const TENANT_READY: &str = "TenantReady";
    /// The network link is up.
    pub const NETWORK_READY: &str = "NetworkReady";
    /// The virtual node for the peer is Ready.
    pub const VIRTUAL_NODE_READY: &str = "VirtualNodeReady";
}
