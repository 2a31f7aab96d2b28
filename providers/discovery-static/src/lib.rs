//! # liqo-discovery-static
//!
//! Peers declared by an administrator, all reported with source
//! [`Manual`](liqo_core::DiscoverySource::Manual), the highest precedence:
//!
//! - [`StaticDiscovery`]: a fixed list given in code;
//! - [`FileDiscovery`]: a YAML (or JSON) file, watched for changes (inotify): peers added,
//!   changed or removed in the file are reported as `Added`, `Updated` and `Expired`;
//! - [`ForeignClusterDiscovery`]: `ForeignCluster` objects made by hand (`spec.discovery.source:
//!   Manual`, no `liqo.io/managed-by` label), watched through the API server.
//!
//! Manual records carry no TTL: they last until the administrator removes them.
//!
//! The file format (each entry a [`PeerEntry`]):
//!
//! ```yaml
//! peers:
//!   - clusterId: rome
//!     clusterName: Rome                       # optional, defaults to the id
//!     peeringEndpoint: https://rome.example.org:8443
//!     keyFingerprint: sha256:<64 hex digits>  # optional
//! ```
//!
//! A bad entry is reported as an `Err` item naming the entry and the field, and skipped; the
//! other entries apply. A file that cannot be read or parsed at all is reported and the previous
//! peers are kept.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod file;
mod foreign_clusters;

use async_trait::async_trait;
use futures::StreamExt;
use liqo_core::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream, PeerAdvertisement,
};

pub use file::{FileDiscovery, MAX_FILE_BYTES, PeerEntry, parse_peers};
pub use foreign_clusters::ForeignClusterDiscovery;

/// A fixed list of peers, reported once as `Added` and never expired.
#[derive(Debug, Clone, Default)]
pub struct StaticDiscovery {
    peers: Vec<PeerAdvertisement>,
}

impl StaticDiscovery {
    /// The peers in `peers` (their `source` is set to `Manual` and `ttl` to none).
    pub fn new(peers: impl IntoIterator<Item = PeerAdvertisement>) -> Self {
        Self {
            peers: peers
                .into_iter()
                .map(|mut p| {
                    p.source = DiscoverySource::Manual;
                    p.ttl = None;
                    p
                })
                .collect(),
        }
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    fn source(&self) -> DiscoverySource {
        DiscoverySource::Manual
    }

    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let events: Vec<_> = self
            .peers
            .iter()
            .cloned()
            .map(|p| Ok(DiscoveryEvent::Added(p)))
            .collect();
        // Never ends: a fixed list does not expire.
        Ok(futures::stream::iter(events)
            .chain(futures::stream::pending())
            .boxed())
    }
}
