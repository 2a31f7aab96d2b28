//! Linking pod networks: the [`NetworkFabric`] trait and what it reports.

use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{AddressTranslator, CidrMapping, ClusterId, FabricError, NetworkParameters};

/// An established link to one remote cluster and how its addresses are seen locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerLink {
    /// The remote cluster.
    pub cluster: ClusterId,
    /// How each remote network (pod CIDR, external CIDR) is addressed locally; identity
    /// mappings where nothing overlapped.
    pub remote_mappings: Vec<CidrMapping>,
    /// How the remote cluster addresses this cluster's own networks (what the peer remapped us
    /// to), once known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_mappings: Vec<CidrMapping>,
}

impl PeerLink {
    /// A translator for the remote cluster's addresses (remote pod IPs, endpoint addresses)
    /// and, once known, for this cluster's addresses as the remote reaches them.
    pub fn translator(&self) -> AddressTranslator {
        AddressTranslator::new(self.cluster.clone(), self.remote_mappings.clone())
            .with_local(self.local_mappings.clone())
    }
}

/// The state of a link, as a condition would summarise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkState {
    /// Configured, no handshake yet.
    Connecting,
    /// Handshakes are recent: traffic flows.
    Connected,
    /// No recent handshake.
    Disconnected,
}

/// What a fabric knows about one link right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// The summary.
    pub state: LinkState,
    /// When the last handshake completed, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_handshake: Option<SystemTime>,
    /// Bytes received through the link.
    pub rx_bytes: u64,
    /// Bytes sent through the link.
    pub tx_bytes: u64,
    /// A human-readable detail for the condition message.
    pub message: String,
}

/// Connects this cluster's pod network with remote ones.
///
/// A fabric learns the remote side's [`NetworkParameters`] from peering, allocates a remapped
/// range for every remote CIDR that clashes with a local one, brings a tunnel up, and keeps the
/// NAT that makes overlapping CIDRs work. [`connect`](Self::connect) and
/// [`disconnect`](Self::disconnect) are idempotent: calling them again converges, and
/// disconnecting removes exactly what connecting made.
///
/// A fabric in a few lines, for clusters that share a flat network (no tunnel, no NAT):
///
/// ```
/// use async_trait::async_trait;
/// use liqo_core::{CidrMapping, ClusterId, FabricError, LinkState, LinkStatus, NetworkFabric,
///                 NetworkParameters, PeerLink};
///
/// struct FlatNetwork(NetworkParameters);
///
/// #[async_trait]
/// impl NetworkFabric for FlatNetwork {
///     async fn local_parameters(&self) -> Result<NetworkParameters, FabricError> { Ok(self.0.clone()) }
///     async fn connect(&self, remote: &ClusterId, p: &NetworkParameters) -> Result<PeerLink, FabricError> {
///         if p.pod_cidr.overlaps(&self.0.pod_cidr) {
///             return Err(FabricError::InvalidConfig(format!("{remote}'s pod CIDR overlaps ours")));
///         }
///         Ok(PeerLink { cluster: remote.clone(), remote_mappings: vec![CidrMapping::identity(p.pod_cidr)], local_mappings: vec![] })
///     }
///     async fn disconnect(&self, _: &ClusterId) -> Result<(), FabricError> { Ok(()) }
///     async fn status(&self, _: &ClusterId) -> Result<LinkStatus, FabricError> {
///         Ok(LinkStatus { state: LinkState::Connected, latest_handshake: None, rx_bytes: 0, tx_bytes: 0, message: "flat network".into() })
///     }
/// }
/// ```
#[async_trait]
pub trait NetworkFabric: Send + Sync + 'static {
    /// This cluster's parameters, to hand to peers at peering time (gateway endpoint and key
    /// included once the gateway exists).
    async fn local_parameters(&self) -> Result<NetworkParameters, FabricError>;

    /// Allocates or remaps CIDRs for `remote` and brings the link up. Idempotent.
    async fn connect(
        &self,
        remote: &ClusterId,
        params: &NetworkParameters,
    ) -> Result<PeerLink, FabricError>;

    /// Tears the link down and releases its allocations. Idempotent.
    async fn disconnect(&self, remote: &ClusterId) -> Result<(), FabricError>;

    /// The link's current status (for the ForeignCluster's network condition).
    async fn status(&self, remote: &ClusterId) -> Result<LinkStatus, FabricError>;
}
