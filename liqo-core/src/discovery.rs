//! Finding peers: the [`Discovery`] trait and the advertisement every source produces.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ClusterId, DiscoveryError, KeyFingerprint};

/// The version of the discovery record and peering protocol this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Where a peer was learnt from. When sources disagree, the higher [`precedence`] wins:
/// an admin's manual entry beats DNS, which beats LAN multicast.
///
/// [`precedence`]: DiscoverySource::precedence
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum DiscoverySource {
    /// Multicast DNS on the local network.
    #[serde(rename = "mDNS")]
    Mdns,
    /// DNS SRV/TXT records under a domain.
    #[serde(rename = "DNS")]
    Dns,
    /// Declared by an administrator.
    Manual,
}

impl DiscoverySource {
    /// Higher wins when two sources describe the same cluster differently.
    pub fn precedence(self) -> u8 {
        match self {
            Self::Mdns => 0,
            Self::Dns => 1,
            Self::Manual => 2,
        }
    }

    /// The name used in logs, records and the ForeignCluster status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mdns => "mDNS",
            Self::Dns => "DNS",
            Self::Manual => "Manual",
        }
    }
}

/// What a cluster announces about itself, and what a discovery source reports about a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAdvertisement {
    /// The peer's cluster id.
    pub cluster_id: ClusterId,
    /// The peer's human-readable name.
    pub cluster_name: String,
    /// The URL of the peer's peering endpoint (`https://host:port`).
    pub peering_endpoint: String,
    /// The fingerprint of the peer's public key, pinned at first peering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<KeyFingerprint>,
    /// The protocol version the peer speaks.
    pub protocol_version: u16,
    /// The source that reported it.
    pub source: DiscoverySource,
    /// How long the record stays valid without being refreshed; `None` for no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_secs")]
    pub ttl: Option<Duration>,
}

mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
    }
}

/// A change in what one discovery source sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A peer was seen for the first time.
    Added(PeerAdvertisement),
    /// A known peer's record changed or was refreshed.
    Updated(PeerAdvertisement),
    /// A peer's record expired or was withdrawn.
    Expired {
        /// The peer that went away.
        cluster_id: ClusterId,
        /// The source that no longer sees it.
        source: DiscoverySource,
    },
}

impl DiscoveryEvent {
    /// The cluster the event is about.
    pub fn cluster_id(&self) -> &ClusterId {
        match self {
            Self::Added(a) | Self::Updated(a) => &a.cluster_id,
            Self::Expired { cluster_id, .. } => cluster_id,
        }
    }
}

/// The stream of events a [`Discovery`] provider yields. An `Err` item reports a problem (a
/// malformed record, a lost socket) without ending the stream; the stream ends only when the
/// provider stops for good.
pub type DiscoveryStream = BoxStream<'static, Result<DiscoveryEvent, DiscoveryError>>;

/// A source of peers: LAN multicast, DNS, a file, an admin's list.
///
/// Implementations advertise this cluster (where the medium allows it) and report the peers they
/// see as a stream of [`DiscoveryEvent`]s. Discovered is not trusted: the runtime peers only
/// where the source's policy says so, and peering pins the key fingerprint.
///
/// A provider in a few lines, a fixed list of peers:
///
/// ```
/// use async_trait::async_trait;
/// use futures::StreamExt;
/// use liqo_core::{Discovery, DiscoveryEvent, DiscoveryError, DiscoverySource, DiscoveryStream,
///                 PeerAdvertisement};
///
/// struct FixedPeers(Vec<PeerAdvertisement>);
///
/// #[async_trait]
/// impl Discovery for FixedPeers {
///     fn source(&self) -> DiscoverySource { DiscoverySource::Manual }
///     async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
///         let events = self.0.iter().cloned().map(|p| Ok(DiscoveryEvent::Added(p)));
///         // Never ends: a fixed list does not expire.
///         Ok(futures::stream::iter(events.collect::<Vec<_>>()).chain(futures::stream::pending()).boxed())
///     }
/// }
/// ```
#[async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Which kind of source this is (decides precedence and the auto-peering policy).
    fn source(&self) -> DiscoverySource;

    /// Starts announcing this cluster. Sources that cannot announce (a static list) keep the
    /// default, which does nothing.
    async fn advertise(&self, me: &PeerAdvertisement) -> Result<(), DiscoveryError> {
        let _ = me;
        Ok(())
    }

    /// Starts watching for peers. Called once by the runtime; the stream runs until it ends or
    /// the runtime shuts down.
    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_manual_over_dns_over_mdns() {
        assert!(DiscoverySource::Manual.precedence() > DiscoverySource::Dns.precedence());
        assert!(DiscoverySource::Dns.precedence() > DiscoverySource::Mdns.precedence());
    }

    #[test]
    fn advertisement_json_shape() {
        let a = PeerAdvertisement {
            cluster_id: "rome".parse().unwrap(),
            cluster_name: "Rome".into(),
            peering_endpoint: "https://10.0.0.1:6443".into(),
            key_fingerprint: None,
            protocol_version: PROTOCOL_VERSION,
            source: DiscoverySource::Mdns,
            ttl: Some(Duration::from_secs(120)),
        };
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["source"], "mDNS");
        assert_eq!(v["ttl"], 120);
        assert_eq!(serde_json::from_value::<PeerAdvertisement>(v).unwrap(), a);
    }
}
