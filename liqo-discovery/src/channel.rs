//! [`ChannelDiscovery`]: a discovery source driven from code.
//!
//! Useful to feed peers found by a mechanism of your own (a CMDB, a cloud API, a relay from a
//! process in another network namespace) into a [`CompositeDiscovery`](crate::CompositeDiscovery),
//! and to test consumers: the [`ChannelHandle`] adds, updates and expires peers, reports
//! problems, and can make the source fail to start or end its streams, to exercise restarts.
//!
//! Like a real provider it keeps the current set of peers, so a stream started after a restart
//! first reports every peer currently present.
//!
//! ```
//! # async fn demo() {
//! use futures::StreamExt;
//! use liqo_core::{Discovery, DiscoveryEvent, DiscoverySource};
//! use liqo_discovery::channel::ChannelDiscovery;
//!
//! let (source, handle) = ChannelDiscovery::new(DiscoverySource::Dns);
//! let mut events = source.watch().await.unwrap();
//! # let ad = liqo_core::PeerAdvertisement { cluster_id: "rome".parse().unwrap(),
//! #   cluster_name: "Rome".into(), peering_endpoint: "https://10.0.0.1:443".into(),
//! #   key_fingerprint: None, protocol_version: 1, source: DiscoverySource::Dns, ttl: None };
//! handle.upsert(ad);
//! assert!(matches!(events.next().await, Some(Ok(DiscoveryEvent::Added(_)))));
//! # }
//! ```

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use async_trait::async_trait;
use futures::StreamExt;
use liqo_core::{
    ClusterId, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream,
    PeerAdvertisement,
};
use tokio::sync::broadcast;

use crate::composite::owned_error;
use tokio_util::sync::CancellationToken;

/// A discovery source driven by a [`ChannelHandle`].
#[derive(Debug, Clone)]
pub struct ChannelDiscovery {
    source: DiscoverySource,
    inner: Arc<Inner>,
}

/// Drives a [`ChannelDiscovery`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ChannelHandle {
    source: DiscoverySource,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    items: broadcast::Sender<Item>,
}

#[derive(Debug, Default)]
struct State {
    peers: BTreeMap<ClusterId, PeerAdvertisement>,
    fail_next: usize,
    watches: usize,
    advertised: Vec<PeerAdvertisement>,
    generation: CancellationToken,
}

#[derive(Debug, Clone)]
enum Item {
    Event(DiscoveryEvent),
    Error(Arc<DiscoveryError>),
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ChannelDiscovery {
    /// A source of kind `source` and the handle that drives it.
    pub fn new(source: DiscoverySource) -> (Self, ChannelHandle) {
        let (items, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            items,
        });
        (
            Self {
                source,
                inner: inner.clone(),
            },
            ChannelHandle { source, inner },
        )
    }
}

impl ChannelHandle {
    /// Reports `ad` (its `source` is set to this source's kind): `Added` if new, else `Updated`.
    pub fn upsert(&self, mut ad: PeerAdvertisement) {
        ad.source = self.source;
        let mut state = lock(&self.inner.state);
        let event = if state
            .peers
            .insert(ad.cluster_id.clone(), ad.clone())
            .is_some()
        {
            DiscoveryEvent::Updated(ad)
        } else {
            DiscoveryEvent::Added(ad)
        };
        let _ = self.inner.items.send(Item::Event(event));
    }

    /// Reports that `cluster` expired (nothing if it was not present).
    pub fn expire(&self, cluster: &ClusterId) {
        let mut state = lock(&self.inner.state);
        if state.peers.remove(cluster).is_some() {
            let _ = self.inner.items.send(Item::Event(DiscoveryEvent::Expired {
                cluster_id: cluster.clone(),
                source: self.source,
            }));
        }
    }

    /// Reports a malformed record (an `Err` item; the stream goes on).
    pub fn problem(&self, message: impl Into<String>) {
        self.error(DiscoveryError::MalformedRecord {
            origin: "channel".into(),
            reason: message.into(),
        });
    }

    /// Reports `error` as an `Err` item (the stream goes on). Every stream receives a copy: the
    /// same variant for `MalformedRecord` and `Unavailable`, otherwise an `Other` whose source
    /// chain leads to `error`.
    pub fn error(&self, error: DiscoveryError) {
        let _ = self.inner.items.send(Item::Error(Arc::new(error)));
    }

    /// Makes the next `n` calls of `watch()` fail.
    pub fn fail_next_watches(&self, n: usize) {
        lock(&self.inner.state).fail_next = n;
    }

    /// Ends every stream handed out so far (as a crashed provider would).
    pub fn end_streams(&self) {
        let mut state = lock(&self.inner.state);
        state.generation.cancel();
        state.generation = CancellationToken::new();
    }

    /// How many times `watch()` was called, failures included.
    pub fn watch_calls(&self) -> usize {
        lock(&self.inner.state).watches
    }

    /// What was advertised through this source.
    pub fn advertised(&self) -> Vec<PeerAdvertisement> {
        lock(&self.inner.state).advertised.clone()
    }
}

#[async_trait]
impl Discovery for ChannelDiscovery {
    fn source(&self) -> DiscoverySource {
        self.source
    }

    async fn advertise(&self, me: &PeerAdvertisement) -> Result<(), DiscoveryError> {
        lock(&self.inner.state).advertised.push(me.clone());
        Ok(())
    }

    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let (rx, snapshot, end) = {
            let mut state = lock(&self.inner.state);
            state.watches += 1;
            if state.fail_next > 0 {
                state.fail_next -= 1;
                return Err(DiscoveryError::Unavailable {
                    source_name: format!("channel ({})", self.source.as_str()),
                    message: "told to fail".into(),
                });
            }
            let snapshot: Vec<Result<DiscoveryEvent, DiscoveryError>> = state
                .peers
                .values()
                .cloned()
                .map(|a| Ok(DiscoveryEvent::Added(a)))
                .collect();
            (
                self.inner.items.subscribe(),
                snapshot,
                state.generation.clone(),
            )
        };
        let live = futures::stream::unfold((rx, end), |(mut rx, end)| async move {
            loop {
                let item = tokio::select! {
                    () = end.cancelled() => return None,
                    item = rx.recv() => item,
                };
                match item {
                    Ok(Item::Event(e)) => return Some((Ok(e), (rx, end))),
                    Ok(Item::Error(e)) => return Some((Err(owned_error(&e)), (rx, end))),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(futures::stream::iter(snapshot).chain(live).boxed())
    }
}
