//! The registry of links: what the controller made for each peer (link, last status, the
//! peer's view of this cluster), read by the virtual kubelet for address translation and by
//! metrics.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use async_trait::async_trait;
use liqo_core::{
    AddressTranslator, CidrMapping, ClusterId, FabricError, LinkStatus, NetworkFabric, PeerLink,
};

use crate::checker::LinkSource;

/// How far the peer's view of this cluster got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ViewState {
    /// Not published (yet), or not readable.
    Missing,
    /// Published but unusable; the message says why.
    Invalid,
    /// Applied to the gateway.
    Applied,
}

/// The peer's view of this cluster, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewStatus {
    /// The summary.
    pub state: ViewState,
    /// The mappings applied (empty unless `Applied`).
    pub mappings: Vec<CidrMapping>,
    /// A human-readable detail.
    pub message: String,
}

impl ViewStatus {
    pub(super) fn missing(message: impl Into<String>) -> Self {
        Self {
            state: ViewState::Missing,
            mappings: vec![],
            message: message.into(),
        }
    }
}

/// One peer's network, as the [`Links`] handle reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSnapshot {
    /// The link as the fabric made it.
    pub link: PeerLink,
    /// The last status the link checker read (bytes are as fresh as the last check).
    pub status: Option<LinkStatus>,
    /// The peer's view of this cluster.
    pub view: ViewStatus,
}

#[derive(Debug, Default)]
pub(super) struct LinksInner {
    pub(super) links: BTreeMap<ClusterId, PeerLink>,
    pub(super) statuses: BTreeMap<ClusterId, LinkStatus>,
    pub(super) views: BTreeMap<ClusterId, ViewStatus>,
}

/// A cheap-clone read handle on the controller's links: address translation for the virtual
/// kubelet and per-peer status for metrics.
#[derive(Debug, Clone)]
pub struct Links {
    inner: Arc<Mutex<LinksInner>>,
    /// Bumped whenever a translator would come out different (a link made or removed, the
    /// peer's view of us applied), so holders of an older one can take a new one.
    changed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Links {
    fn default() -> Self {
        Self {
            inner: Arc::default(),
            changed: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl Links {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, LinksInner> {
        // Every update is a plain insert or remove: a panic elsewhere leaves it consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Changes whenever [`translator`](Self::translator) may answer differently for some peer.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The translator of `cluster`'s addresses, while connected.
    pub fn translator(&self, cluster: &ClusterId) -> Option<AddressTranslator> {
        self.lock().links.get(cluster).map(PeerLink::translator)
    }

    /// The state of `cluster`'s link, while connected.
    pub fn get(&self, cluster: &ClusterId) -> Option<LinkSnapshot> {
        let g = self.lock();
        Self::snapshot(&g, cluster)
    }

    /// Every connected peer.
    pub fn all(&self) -> BTreeMap<ClusterId, LinkSnapshot> {
        let g = self.lock();
        g.links
            .keys()
            .filter_map(|c| Some((c.clone(), Self::snapshot(&g, c)?)))
            .collect()
    }

    fn snapshot(g: &LinksInner, cluster: &ClusterId) -> Option<LinkSnapshot> {
        Some(LinkSnapshot {
            link: g.links.get(cluster)?.clone(),
            status: g.statuses.get(cluster).cloned(),
            view: g
                .views
                .get(cluster)
                .cloned()
                .unwrap_or_else(|| ViewStatus::missing("not watched yet")),
        })
    }
}

/// Records every status the checker reads into [`Links`], so metrics see fresh byte counters
/// even when the checker publishes nothing (it only notifies on state or handshake changes).
pub(super) struct Recording {
    pub(super) fabric: Arc<dyn NetworkFabric>,
    pub(super) links: Links,
}

#[async_trait]
impl LinkSource for Recording {
    async fn link_statuses(&self) -> Result<BTreeMap<ClusterId, LinkStatus>, FabricError> {
        let peers: Vec<ClusterId> = self.links.lock().links.keys().cloned().collect();
        let s = self.fabric.link_statuses(&peers).await?;
        self.links.lock().statuses = s.clone();
        Ok(s)
    }
}
