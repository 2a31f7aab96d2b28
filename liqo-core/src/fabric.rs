//! Linking pod networks: the [`NetworkFabric`] trait and what it reports.

use std::{collections::BTreeMap, time::SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    AddressTranslator, CidrMapping, ClusterId, FabricError, NetworkParameters, WireGuardKey,
    crds::WireGuardBackend,
};

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

/// What a `Tunnel` object says about the local side of a tunnelling fabric (see
/// [`NetworkFabric::tunnel_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    /// The tunnel interface.
    pub interface: String,
    /// Which implementation drives it.
    pub backend: WireGuardBackend,
    /// The gateway's public key.
    pub public_key: WireGuardKey,
    /// The interface MTU.
    pub mtu: u16,
    /// Keepalive towards peers, in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// Connects this cluster's pod network with remote ones.
///
/// A fabric learns the remote side's [`NetworkParameters`] from peering and makes the remote
/// pods reachable: a tunnelling fabric (WireGuard) allocates a remapped range for every remote
/// CIDR that clashes with a local one, brings a tunnel up and keeps the NAT that makes
/// overlapping CIDRs work; a fabric for networks already routed to each other only checks that
/// nothing overlaps. [`connect`](Self::connect) and
/// [`disconnect`](Self::disconnect) are idempotent: calling them again converges, and
/// disconnecting removes exactly what connecting made.
///
/// The four required methods are all a fabric must do. The provided ones are what a network
/// controller (liqo-net's `NetworkController`) asks beyond them, with answers right for a fabric
/// that does no NAT and runs no tunnel: override them where the fabric has more to say
/// (a tunnelling fabric reports [`tunnel_info`](Self::tunnel_info) and reads all its links at
/// once in [`link_statuses`](Self::link_statuses); a NAT-ing one applies
/// [`set_local_mappings`](Self::set_local_mappings); one that made interfaces removes them in
/// [`shutdown`](Self::shutdown)).
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

    /// The status of the links to `peers` (the clusters the caller connected), read together;
    /// a link the fabric does not know is left out. Called periodically by the link checker.
    ///
    /// By default, [`status`](Self::status) of each peer in turn.
    async fn link_statuses(
        &self,
        peers: &[ClusterId],
    ) -> Result<BTreeMap<ClusterId, LinkStatus>, FabricError> {
        let mut out = BTreeMap::new();
        for p in peers {
            out.insert(p.clone(), self.status(p).await?);
        }
        Ok(out)
    }

    /// Records how `cluster` addresses this cluster's networks (the peer's own
    /// [`PeerLink::remote_mappings`] for us, learned from the view it publishes) and applies it
    /// if connected; returns the updated link when connected. Each mapping is about one of this
    /// cluster's pod or external CIDRs.
    ///
    /// By default (a fabric that does no NAT) identity mappings are accepted and nothing
    /// changes; a peer that remapped this cluster's networks is refused, since traffic could
    /// not reach it.
    async fn set_local_mappings(
        &self,
        cluster: &ClusterId,
        mappings: Vec<CidrMapping>,
    ) -> Result<Option<PeerLink>, FabricError> {
        match mappings.iter().find(|m| m.real != m.remapped) {
            None => Ok(None),
            Some(m) => Err(FabricError::InvalidConfig(format!(
                "cluster {cluster} addresses this cluster's {} as {}, but this fabric does no \
                 address translation",
                m.real, m.remapped
            ))),
        }
    }

    /// The local side of the tunnel, for the `Tunnel` objects a network controller writes;
    /// `None` (the default) for a fabric without a tunnel, which gets no `Tunnel` objects.
    fn tunnel_info(&self) -> Option<TunnelInfo> {
        None
    }

    /// Removes whatever the fabric made on this host (interfaces, routes, NAT, daemons);
    /// afterwards operations may fail. Idempotent. By default there is nothing to remove.
    async fn shutdown(&self) -> Result<(), FabricError> {
        Ok(())
    }
}
