//! [`CompositeDiscovery`]: several discovery sources merged into one.
//!
//! The composite runs every source's [`watch`](Discovery::watch) stream in its own task and keeps
//! one table of what each source reports, keyed by cluster id:
//!
//! - **Dedupe and precedence.** Each cluster has one record per provider; the *effective* record
//!   is the one of the highest-precedence source (Manual > DNS > mDNS, then the provider added
//!   first). Consumers of [`Discovery::watch`] see only the effective record: when it moves from
//!   one source to another they get `Updated(new)` followed by `Expired { source: old }`, so a
//!   consumer that keeps one record per source always holds exactly the effective one.
//! - **Isolation.** A source whose `watch()` fails or whose stream ends is restarted with capped
//!   exponential backoff; the others go on. Its records are kept until their TTL (or
//!   [`CompositeConfig::stale_grace`] when they have none) runs out, and refreshed if the restarted
//!   stream reports them again.
//! - **Fan-out.** `watch()` and [`watch_views`](CompositeDiscovery::watch_views) may be called any
//!   number of times (the runtime and the ForeignCluster controller both do); the sources are
//!   watched once, and each new subscriber first receives the current table.
//! - **Bounds.** A source may report at most [`CompositeConfig::max_peers_per_source`] clusters;
//!   more are refused with a problem report, so a noisy LAN cannot grow the table without bound.
//!
//! Problems (malformed records, lost sockets, [`ClaimConflict`]s) are passed on to every
//! subscriber as `Err` items; a claim conflict is also kept in the cluster's [`PeerView`] for the
//! record's TTL so that the controller can flag it.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use futures::{StreamExt, future::join_all, stream::BoxStream};
use liqo_core::{
    ClusterId, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream,
    PeerAdvertisement,
};
use tokio::{
    sync::{broadcast, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::claims::ClaimConflict;

/// Tuning of a [`CompositeDiscovery`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CompositeConfig {
    /// First delay before restarting a failed source; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest delay between restarts of a failed source.
    pub max_backoff: Duration,
    /// How long records of a failed source are kept when they carry no TTL.
    pub stale_grace: Duration,
    /// How long a [`ClaimConflict`] stays in a view when its record carries no TTL.
    pub conflict_hold: Duration,
    /// Most clusters one source may report.
    pub max_peers_per_source: usize,
    /// Cluster ids to ignore (this cluster's own, echoed back by the medium). The id advertised
    /// through [`Discovery::advertise`] is added automatically.
    pub ignore: HashSet<ClusterId>,
}

impl Default for CompositeConfig {
    /// Backoff 200 ms to 30 s, stale grace 5 min, conflict hold 2 min, 1024 peers per source.
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            stale_grace: Duration::from_secs(300),
            conflict_hold: Duration::from_secs(120),
            max_peers_per_source: 1024,
            ignore: HashSet::new(),
        }
    }
}

/// One source's current record of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    /// The source kind.
    pub source: DiscoverySource,
    /// The provider's position in the composite (several providers may share a kind).
    pub provider: usize,
    /// The record.
    pub advertisement: PeerAdvertisement,
    /// When the provider last reported it.
    pub last_seen: SystemTime,
    /// Whether the provider has failed since and the record is kept only until its TTL runs out.
    pub stale: bool,
}

/// Everything the composite knows about one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// The cluster.
    pub cluster_id: ClusterId,
    /// Every source's record, highest precedence first; never empty.
    pub records: Vec<SourceRecord>,
    /// Claims of this cluster id that a provider refused because another instance with another
    /// key owns the id (see [`crate::claims`]).
    pub conflicts: Vec<ClaimConflict>,
}

impl PeerView {
    /// The effective record: the highest-precedence source's.
    pub fn effective(&self) -> &SourceRecord {
        &self.records[0]
    }

    /// The most recent time any source reported the cluster.
    pub fn last_seen(&self) -> SystemTime {
        self.records
            .iter()
            .map(|r| r.last_seen)
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// A problem reported by one of the sources.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The source kind.
    pub source: DiscoverySource,
    /// The provider's position in the composite.
    pub provider: usize,
    /// The error.
    pub error: Arc<DiscoveryError>,
}

/// What [`CompositeDiscovery::watch_views`] yields.
#[derive(Debug, Clone)]
pub enum ViewEvent {
    /// What is known about a cluster changed; `None` when no source reports it any more.
    Changed {
        /// The cluster.
        cluster_id: ClusterId,
        /// The new view.
        view: Option<PeerView>,
    },
    /// A source reported a problem.
    Problem(Problem),
}

/// Several discovery sources merged into one; see the [module documentation](self).
///
/// Cheap to clone: clones share the sources and the table. The sources stop when the last clone
/// is dropped or [`shutdown`](Self::shutdown) is called.
#[derive(Clone)]
pub struct CompositeDiscovery {
    handle: Arc<Handle>,
}

impl fmt::Debug for CompositeDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompositeDiscovery")
            .field(
                "sources",
                &self
                    .core()
                    .sources
                    .iter()
                    .map(|s| s.source())
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.core().config)
            .finish_non_exhaustive()
    }
}

struct Handle {
    core: Arc<Core>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.core.cancel.cancel();
    }
}

struct Core {
    sources: Vec<Arc<dyn Discovery>>,
    config: CompositeConfig,
    state: Mutex<State>,
    notices: broadcast::Sender<Notice>,
    cancel: CancellationToken,
    started: AtomicBool,
}

#[derive(Debug, Clone)]
enum Notice {
    Changed(ClusterId),
    Problem(Problem),
}

#[derive(Default)]
struct State {
    peers: BTreeMap<ClusterId, Entry>,
    counts: HashMap<usize, usize>,
    ignore: HashSet<ClusterId>,
}

/// Slot order: highest precedence first, then the provider added first.
type SlotKey = (std::cmp::Reverse<u8>, usize);

#[derive(Default)]
struct Entry {
    records: BTreeMap<SlotKey, Slot>,
    /// (provider, instance) -> conflict and when it lapses.
    conflicts: BTreeMap<(usize, String), (ClaimConflict, Instant)>,
}

struct Slot {
    ad: PeerAdvertisement,
    last_seen: SystemTime,
    stale_until: Option<Instant>,
}

impl Entry {
    fn view(&self, cluster_id: &ClusterId) -> Option<PeerView> {
        if self.records.is_empty() {
            return None;
        }
        Some(PeerView {
            cluster_id: cluster_id.clone(),
            records: self
                .records
                .iter()
                .map(|((_, provider), s)| SourceRecord {
                    source: s.ad.source,
                    provider: *provider,
                    advertisement: s.ad.clone(),
                    last_seen: s.last_seen,
                    stale: s.stale_until.is_some(),
                })
                .collect(),
            conflicts: self.conflicts.values().map(|(c, _)| c.clone()).collect(),
        })
    }

    fn next_deadline(&self) -> Option<Instant> {
        let stale = self.records.values().filter_map(|s| s.stale_until);
        let conflicts = self.conflicts.values().map(|(_, until)| *until);
        stale.chain(conflicts).min()
    }
}

/// Builds a [`CompositeDiscovery`].
#[must_use]
pub struct CompositeBuilder {
    sources: Vec<Arc<dyn Discovery>>,
    config: CompositeConfig,
}

impl fmt::Debug for CompositeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompositeBuilder")
            .field("sources", &self.sources.len())
            .field("config", &self.config)
            .finish()
    }
}

impl CompositeBuilder {
    /// Adds a source.
    pub fn source(mut self, source: impl Discovery) -> Self {
        self.sources.push(Arc::new(source));
        self
    }

    /// Adds a shared source.
    pub fn shared_source(mut self, source: Arc<dyn Discovery>) -> Self {
        self.sources.push(source);
        self
    }

    /// Replaces the tuning.
    pub fn config(mut self, config: CompositeConfig) -> Self {
        self.config = config;
        self
    }

    /// Ignores records about `cluster` (this cluster's own id).
    pub fn ignore(mut self, cluster: ClusterId) -> Self {
        self.config.ignore.insert(cluster);
        self
    }

    /// Bounds of the restart backoff of a failed source.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config.min_backoff = min;
        self.config.max_backoff = max.max(min);
        self
    }

    /// Builds the composite. Sources start on the first `watch`, `watch_views` or `start`.
    pub fn build(self) -> CompositeDiscovery {
        let (notices, _) = broadcast::channel(1024);
        let state = State {
            ignore: self.config.ignore.clone(),
            ..State::default()
        };
        CompositeDiscovery {
            handle: Arc::new(Handle {
                core: Arc::new(Core {
                    sources: self.sources,
                    config: self.config,
                    state: Mutex::new(state),
                    notices,
                    cancel: CancellationToken::new(),
                    started: AtomicBool::new(false),
                }),
            }),
        }
    }
}

impl CompositeDiscovery {
    /// Starts building a composite.
    pub fn builder() -> CompositeBuilder {
        CompositeBuilder {
            sources: vec![],
            config: CompositeConfig::default(),
        }
    }

    /// A composite of `sources` with the default tuning.
    pub fn new(sources: impl IntoIterator<Item = Arc<dyn Discovery>>) -> Self {
        let mut b = Self::builder();
        b.sources.extend(sources);
        b.build()
    }

    fn core(&self) -> &Arc<Core> {
        &self.handle.core
    }

    /// Starts watching the sources (idempotent; `watch` and `watch_views` call it). Needs a Tokio
    /// runtime.
    pub fn start(&self) {
        let core = self.core();
        if core.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let (tx, rx) = mpsc::channel(256);
        for (index, source) in core.sources.iter().enumerate() {
            tokio::spawn(run_source(
                index,
                source.clone(),
                tx.clone(),
                core.config.clone(),
                core.cancel.clone(),
            ));
        }
        tokio::spawn(drive(core.clone(), rx));
    }

    /// Stops every source; streams handed out end.
    pub fn shutdown(&self) {
        self.core().cancel.cancel();
    }

    /// A snapshot of every cluster currently reported.
    pub fn peers(&self) -> Vec<PeerView> {
        let state = lock(&self.core().state);
        state
            .peers
            .iter()
            .filter_map(|(id, e)| e.view(id))
            .collect()
    }

    /// What is known about `cluster` now.
    pub fn peer(&self, cluster: &ClusterId) -> Option<PeerView> {
        let state = lock(&self.core().state);
        state.peers.get(cluster).and_then(|e| e.view(cluster))
    }

    /// A stream of complete views: first one `Changed` per known cluster, then one per change,
    /// plus the sources' problems. Ends on [`shutdown`](Self::shutdown).
    pub fn watch_views(&self) -> BoxStream<'static, ViewEvent> {
        self.start();
        let core = self.core().clone();
        let (rx, snapshot) = {
            let state = lock(&core.state);
            let rx = core.notices.subscribe();
            let snapshot: Vec<ViewEvent> = state
                .peers
                .iter()
                .filter_map(|(id, e)| {
                    e.view(id).map(|v| ViewEvent::Changed {
                        cluster_id: id.clone(),
                        view: Some(v),
                    })
                })
                .collect();
            (rx, snapshot)
        };
        let reported: HashSet<ClusterId> = snapshot
            .iter()
            .filter_map(|e| match e {
                ViewEvent::Changed { cluster_id, .. } => Some(cluster_id.clone()),
                ViewEvent::Problem(_) => None,
            })
            .collect();
        let sub = ViewSubscriber {
            core,
            rx,
            pending: snapshot.into(),
            reported,
        };
        futures::stream::unfold(sub, |mut sub| async move {
            let item = sub.next().await?;
            Some((item, sub))
        })
        .boxed()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the table half-updated in a way that matters
    // more than stopping discovery would: keep going with what is there.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct ViewSubscriber {
    core: Arc<Core>,
    rx: broadcast::Receiver<Notice>,
    pending: VecDeque<ViewEvent>,
    /// Clusters this subscriber was last told exist.
    reported: HashSet<ClusterId>,
}

impl ViewSubscriber {
    fn changed(&mut self, id: ClusterId) -> ViewEvent {
        let view = lock(&self.core.state)
            .peers
            .get(&id)
            .and_then(|e| e.view(&id));
        if view.is_some() {
            self.reported.insert(id.clone());
        } else {
            self.reported.remove(&id);
        }
        ViewEvent::Changed {
            cluster_id: id,
            view,
        }
    }

    async fn next(&mut self) -> Option<ViewEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            let notice = tokio::select! {
                () = self.core.cancel.cancelled() => return None,
                n = self.rx.recv() => n,
            };
            match notice {
                Ok(Notice::Changed(id)) => return Some(self.changed(id)),
                Ok(Notice::Problem(p)) => return Some(ViewEvent::Problem(p)),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Level-triggered: resend every cluster this subscriber knows or should know.
                    debug!(missed = n, "discovery subscriber lagged; resynchronising");
                    let mut ids: HashSet<ClusterId> = self.reported.clone();
                    ids.extend(lock(&self.core.state).peers.keys().cloned());
                    for id in ids {
                        let e = self.changed(id);
                        self.pending.push_back(e);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Turns complete views into the `Added`/`Updated`/`Expired` events of the [`Discovery`] trait,
/// one record per cluster: the effective one.
#[derive(Default)]
struct EventDiffer {
    known: HashMap<ClusterId, (PeerAdvertisement, SystemTime)>,
}

impl EventDiffer {
    fn apply(&mut self, id: ClusterId, view: Option<PeerView>) -> Vec<DiscoveryEvent> {
        let new = view.map(|v| {
            let e = v.effective();
            (e.advertisement.clone(), e.last_seen)
        });
        match (self.known.remove(&id), new) {
            (None, None) => vec![],
            (None, Some((ad, seen))) => {
                self.known.insert(id, (ad.clone(), seen));
                vec![DiscoveryEvent::Added(ad)]
            }
            (Some((old, _)), None) => vec![DiscoveryEvent::Expired {
                cluster_id: id,
                source: old.source,
            }],
            (Some((old, old_seen)), Some((ad, seen))) => {
                self.known.insert(id.clone(), (ad.clone(), seen));
                let mut out = vec![];
                if old != ad || seen > old_seen {
                    out.push(DiscoveryEvent::Updated(ad.clone()));
                }
                if old.source != ad.source {
                    out.push(DiscoveryEvent::Expired {
                        cluster_id: id,
                        source: old.source,
                    });
                }
                out
            }
        }
    }
}

/// Wraps a shared error so each subscriber gets an owned [`DiscoveryError`] pointing at it.
#[derive(Debug)]
struct Shared(Arc<DiscoveryError>);

impl fmt::Display for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.0.as_ref() {
            DiscoveryError::Other(inner) => Some(inner.as_ref()),
            other => Some(other),
        }
    }
}

/// An owned copy of a shared discovery error (same variant where it can be rebuilt).
pub(crate) fn owned_error(e: &Arc<DiscoveryError>) -> DiscoveryError {
    match e.as_ref() {
        DiscoveryError::MalformedRecord { origin, reason } => DiscoveryError::MalformedRecord {
            origin: origin.clone(),
            reason: reason.clone(),
        },
        DiscoveryError::Unavailable {
            source_name,
            message,
        } => DiscoveryError::Unavailable {
            source_name: source_name.clone(),
            message: message.clone(),
        },
        _ => DiscoveryError::Other(Box::new(Shared(e.clone()))),
    }
}

#[async_trait]
impl Discovery for CompositeDiscovery {
    /// The highest-precedence kind among the sources (mDNS when there are none).
    fn source(&self) -> DiscoverySource {
        self.core()
            .sources
            .iter()
            .map(|s| s.source())
            .max_by_key(|s| s.precedence())
            .unwrap_or(DiscoverySource::Mdns)
    }

    /// Advertises through every source at once. Succeeds when at least one source did (or there
    /// are none); the failures of the others are logged and reported to subscribers as problems.
    /// When every source fails, returns the first error.
    async fn advertise(&self, me: &PeerAdvertisement) -> Result<(), DiscoveryError> {
        let core = self.core();
        lock(&core.state).ignore.insert(me.cluster_id.clone());
        let results = join_all(core.sources.iter().map(|s| s.advertise(me))).await;
        let total = results.len();
        let mut first_error = None;
        let mut failed = 0;
        for (provider, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                failed += 1;
                let source = core.sources[provider].source();
                warn!(source = source.as_str(), provider, error = %e, "advertising failed");
                let e = Arc::new(e);
                let _ = core.notices.send(Notice::Problem(Problem {
                    source,
                    provider,
                    error: e.clone(),
                }));
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) if failed == total => Err(owned_error(&e)),
            _ => Ok(()),
        }
    }

    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let views = self.watch_views();
        let stream = views
            .scan(EventDiffer::default(), |differ, event| {
                let items: Vec<Result<DiscoveryEvent, DiscoveryError>> = match event {
                    ViewEvent::Changed { cluster_id, view } => {
                        differ.apply(cluster_id, view).into_iter().map(Ok).collect()
                    }
                    ViewEvent::Problem(p) => vec![Err(owned_error(&p.error))],
                };
                futures::future::ready(Some(futures::stream::iter(items)))
            })
            .flatten()
            .boxed();
        Ok(stream)
    }
}

enum Input {
    Item(usize, Result<DiscoveryEvent, DiscoveryError>),
    Down(usize),
}

/// Watches one source forever, restarting it with backoff when `watch()` fails or the stream
/// ends.
async fn run_source(
    index: usize,
    source: Arc<dyn Discovery>,
    tx: mpsc::Sender<Input>,
    config: CompositeConfig,
    cancel: CancellationToken,
) {
    let kind = source.source();
    let mut delay = config.min_backoff;
    loop {
        let started = tokio::select! {
            () = cancel.cancelled() => return,
            r = source.watch() => r,
        };
        match started {
            Ok(mut stream) => loop {
                let item = tokio::select! {
                    () = cancel.cancelled() => return,
                    item = stream.next() => item,
                };
                match item {
                    Some(item) => {
                        if item.is_ok() {
                            delay = config.min_backoff;
                        }
                        if tx.send(Input::Item(index, item)).await.is_err() {
                            return;
                        }
                    }
                    None => {
                        warn!(
                            source = kind.as_str(),
                            provider = index,
                            "discovery stream ended; restarting"
                        );
                        break;
                    }
                }
            },
            Err(e) => {
                warn!(source = kind.as_str(), provider = index, error = %e, "discovery source failed to start; restarting");
                if tx.send(Input::Item(index, Err(e))).await.is_err() {
                    return;
                }
            }
        }
        if tx.send(Input::Down(index)).await.is_err() {
            return;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(config.max_backoff);
    }
}

/// The single writer of the table.
async fn drive(core: Arc<Core>, mut rx: mpsc::Receiver<Input>) {
    loop {
        let deadline = {
            let state = lock(&core.state);
            state.peers.values().filter_map(Entry::next_deadline).min()
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = core.cancel.cancelled() => return,
            input = rx.recv() => match input {
                Some(Input::Item(i, Ok(event))) => on_event(&core, i, event),
                Some(Input::Item(i, Err(error))) => on_problem(&core, i, error),
                Some(Input::Down(i)) => on_down(&core, i),
                None => return,
            },
            () = sleep => sweep(&core),
        }
    }
}

fn on_event(core: &Core, provider: usize, event: DiscoveryEvent) {
    let kind = core.sources[provider].source();
    let key = (std::cmp::Reverse(kind.precedence()), provider);
    let mut state = lock(&core.state);
    let id = event.cluster_id().clone();
    if state.ignore.contains(&id) {
        return;
    }
    match event {
        DiscoveryEvent::Added(mut ad) | DiscoveryEvent::Updated(mut ad) => {
            ad.source = kind;
            let entry = state.peers.entry(id.clone()).or_default();
            let is_new = !entry.records.contains_key(&key);
            if is_new {
                let count = state.counts.get(&provider).copied().unwrap_or(0);
                if count >= core.config.max_peers_per_source {
                    let entry_empty = state.peers.get(&id).is_some_and(|e| e.records.is_empty());
                    if entry_empty {
                        state.peers.remove(&id);
                    }
                    drop(state);
                    let error = Arc::new(DiscoveryError::Unavailable {
                        source_name: kind.as_str().to_owned(),
                        message: format!(
                            "reports more than {} clusters; ignoring {id}",
                            core.config.max_peers_per_source
                        ),
                    });
                    warn!(%error, "discovery source over its limit");
                    let _ = core.notices.send(Notice::Problem(Problem {
                        source: kind,
                        provider,
                        error,
                    }));
                    return;
                }
                *state.counts.entry(provider).or_default() += 1;
            }
            let entry = state.peers.entry(id.clone()).or_default();
            entry.records.insert(
                key,
                Slot {
                    ad,
                    last_seen: SystemTime::now(),
                    stale_until: None,
                },
            );
            let _ = core.notices.send(Notice::Changed(id));
        }
        DiscoveryEvent::Expired { .. } => {
            let Some(entry) = state.peers.get_mut(&id) else {
                return;
            };
            if entry.records.remove(&key).is_none() {
                return;
            }
            entry.conflicts.retain(|(p, _), _| *p != provider);
            if entry.records.is_empty() {
                state.peers.remove(&id);
            }
            if let Some(c) = state.counts.get_mut(&provider) {
                *c = c.saturating_sub(1);
            }
            let _ = core.notices.send(Notice::Changed(id));
        }
    }
}

fn on_problem(core: &Core, provider: usize, error: DiscoveryError) {
    let kind = core.sources[provider].source();
    let mut changed = None;
    if let Some(conflict) = ClaimConflict::find(&error) {
        let mut state = lock(&core.state);
        if let Some(entry) = state.peers.get_mut(&conflict.cluster_id) {
            let hold = conflict
                .advertisement
                .ttl
                .unwrap_or(core.config.conflict_hold);
            entry.conflicts.insert(
                (provider, conflict.instance.clone()),
                (conflict.clone(), Instant::now() + hold),
            );
            changed = Some(conflict.cluster_id.clone());
        }
    }
    debug!(source = kind.as_str(), provider, %error, "discovery problem");
    let _ = core.notices.send(Notice::Problem(Problem {
        source: kind,
        provider,
        error: Arc::new(error),
    }));
    if let Some(id) = changed {
        let _ = core.notices.send(Notice::Changed(id));
    }
}

fn on_down(core: &Core, provider: usize) {
    let now = Instant::now();
    let mut state = lock(&core.state);
    let mut kept = 0;
    for entry in state.peers.values_mut() {
        for ((_, p), slot) in entry.records.iter_mut() {
            if *p == provider && slot.stale_until.is_none() {
                slot.stale_until = Some(now + slot.ad.ttl.unwrap_or(core.config.stale_grace));
                kept += 1;
            }
        }
    }
    if kept > 0 {
        info!(
            provider,
            kept, "keeping the records of a failed discovery source until their TTL"
        );
    }
}

fn sweep(core: &Core) {
    let now = Instant::now();
    let mut state = lock(&core.state);
    let mut changed = vec![];
    let mut removed_per_provider: HashMap<usize, usize> = HashMap::new();
    state.peers.retain(|id, entry| {
        let before = (entry.records.len(), entry.conflicts.len());
        entry.records.retain(|(_, p), slot| {
            let keep = slot.stale_until.is_none_or(|t| t > now);
            if !keep {
                *removed_per_provider.entry(*p).or_default() += 1;
            }
            keep
        });
        entry.conflicts.retain(|_, (_, until)| *until > now);
        if (entry.records.len(), entry.conflicts.len()) != before {
            changed.push(id.clone());
        }
        !entry.records.is_empty()
    });
    for (p, n) in removed_per_provider {
        if let Some(c) = state.counts.get_mut(&p) {
            *c = c.saturating_sub(n);
        }
    }
    for id in changed {
        let _ = core.notices.send(Notice::Changed(id));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use liqo_core::{PROTOCOL_VERSION, PublicKey};
    use tokio::time::timeout;

    use super::*;
    use crate::channel::{ChannelDiscovery, ChannelHandle};

    fn ad(id: &str, ep: &str) -> PeerAdvertisement {
        PeerAdvertisement {
            cluster_id: id.parse().unwrap(),
            cluster_name: id.into(),
            peering_endpoint: ep.into(),
            key_fingerprint: Some(PublicKey::from_bytes(id.as_bytes().to_vec()).fingerprint()),
            protocol_version: PROTOCOL_VERSION,
            source: DiscoverySource::Mdns,
            ttl: None,
        }
    }

    fn describe(e: &Result<DiscoveryEvent, DiscoveryError>) -> String {
        match e {
            Ok(DiscoveryEvent::Added(a)) => {
                format!(
                    "added {} {} {}",
                    a.cluster_id,
                    a.source.as_str(),
                    a.peering_endpoint
                )
            }
            Ok(DiscoveryEvent::Updated(a)) => {
                format!(
                    "updated {} {} {}",
                    a.cluster_id,
                    a.source.as_str(),
                    a.peering_endpoint
                )
            }
            Ok(DiscoveryEvent::Expired { cluster_id, source }) => {
                format!("expired {cluster_id} {}", source.as_str())
            }
            Err(e) => format!("error {e}"),
        }
    }

    async fn next(s: &mut DiscoveryStream) -> String {
        let item = timeout(Duration::from_secs(600), s.next())
            .await
            .expect("an event within the timeout")
            .expect("the stream goes on");
        describe(&item)
    }

    async fn quiet(s: &mut DiscoveryStream) {
        if let Ok(Some(e)) = timeout(Duration::from_secs(1), s.next()).await {
            panic!("unexpected event: {}", describe(&e));
        }
    }

    fn sources() -> (CompositeDiscovery, [ChannelHandle; 3]) {
        let (m, mh) = ChannelDiscovery::new(DiscoverySource::Mdns);
        let (d, dh) = ChannelDiscovery::new(DiscoverySource::Dns);
        let (s, sh) = ChannelDiscovery::new(DiscoverySource::Manual);
        let c = CompositeDiscovery::builder()
            .source(m)
            .source(d)
            .source(s)
            .backoff(Duration::from_millis(100), Duration::from_secs(1))
            .build();
        (c, [mh, dh, sh])
    }

    #[tokio::test(start_paused = true)]
    async fn precedence_manual_over_dns_over_mdns() {
        let (c, [mdns, dns, manual]) = sources();
        assert_eq!(c.source(), DiscoverySource::Manual);
        let mut s = c.watch().await.unwrap();
        mdns.upsert(ad("rome", "https://m:1"));
        assert_eq!(next(&mut s).await, "added rome mDNS https://m:1");
        dns.upsert(ad("rome", "https://d:1"));
        assert_eq!(next(&mut s).await, "updated rome DNS https://d:1");
        assert_eq!(next(&mut s).await, "expired rome mDNS");
        manual.upsert(ad("rome", "https://s:1"));
        assert_eq!(next(&mut s).await, "updated rome Manual https://s:1");
        assert_eq!(next(&mut s).await, "expired rome DNS");
        // A lower source changing its record does not change the effective one.
        mdns.upsert(ad("rome", "https://m:2"));
        dns.upsert(ad("rome", "https://d:2"));
        quiet(&mut s).await;
        let view = c.peer(&"rome".parse().unwrap()).unwrap();
        let order: Vec<_> = view.records.iter().map(|r| r.source).collect();
        assert_eq!(
            order,
            [
                DiscoverySource::Manual,
                DiscoverySource::Dns,
                DiscoverySource::Mdns
            ]
        );
        manual.expire(&"rome".parse().unwrap());
        assert_eq!(next(&mut s).await, "updated rome DNS https://d:2");
        assert_eq!(next(&mut s).await, "expired rome Manual");
        dns.expire(&"rome".parse().unwrap());
        assert_eq!(next(&mut s).await, "updated rome mDNS https://m:2");
        assert_eq!(next(&mut s).await, "expired rome DNS");
        mdns.expire(&"rome".parse().unwrap());
        assert_eq!(next(&mut s).await, "expired rome mDNS");
        assert!(c.peers().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_source_does_not_stop_the_others() {
        let (c, [mdns, dns, _]) = sources();
        mdns.fail_next_watches(5);
        let mut s = c.watch().await.unwrap();
        dns.upsert(ad("milan", "https://d:1"));
        // The failures of mDNS show up as errors, interleaved with DNS's events.
        let mut seen = vec![];
        while !seen.iter().any(|e: &String| e.starts_with("added milan")) {
            seen.push(next(&mut s).await);
        }
        mdns.upsert(ad("rome", "https://m:1"));
        loop {
            let e = next(&mut s).await;
            if e.starts_with("error") {
                assert!(e.contains("told to fail"), "{e}");
                continue;
            }
            assert_eq!(e, "added rome mDNS https://m:1");
            break;
        }
        assert_eq!(mdns.watch_calls(), 6, "five failures, then a working watch");

        // The stream of mDNS ends: its records stay, the source is restarted and reports again.
        mdns.end_streams();
        assert!(
            c.peer(&"rome".parse().unwrap()).is_some(),
            "kept while restarting"
        );
        // The restarted stream reports it again: a refresh.
        assert_eq!(next(&mut s).await, "updated rome mDNS https://m:1");
        assert_eq!(mdns.watch_calls(), 7);
        assert!(!c.peer(&"rome".parse().unwrap()).unwrap().records[0].stale);
        mdns.upsert(ad("rome", "https://m:2"));
        assert_eq!(next(&mut s).await, "updated rome mDNS https://m:2");
        // DNS went on all along.
        dns.upsert(ad("milan", "https://d:2"));
        assert_eq!(next(&mut s).await, "updated milan DNS https://d:2");
    }

    #[tokio::test(start_paused = true)]
    async fn records_of_a_dead_source_expire_after_their_ttl() {
        let (c, [mdns, dns, _]) = sources();
        let mut s = c.watch().await.unwrap();
        let mut rome = ad("rome", "https://m:1");
        rome.ttl = Some(Duration::from_secs(120));
        mdns.upsert(rome);
        dns.upsert(ad("milan", "https://d:1"));
        assert_eq!(next(&mut s).await, "added rome mDNS https://m:1");
        assert_eq!(next(&mut s).await, "added milan DNS https://d:1");
        mdns.fail_next_watches(usize::MAX);
        mdns.end_streams();
        let started = Instant::now();
        loop {
            let e = next(&mut s).await;
            if e.starts_with("error") {
                continue;
            }
            assert_eq!(e, "expired rome mDNS");
            break;
        }
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(120) && waited < Duration::from_secs(125),
            "expired after {waited:?}"
        );
        assert_eq!(c.peers().len(), 1, "the DNS peer stays");
    }

    #[tokio::test(start_paused = true)]
    async fn late_subscribers_get_the_current_table_and_own_id_is_ignored() {
        let (c, [mdns, dns, _]) = sources();
        let me = ad("me", "https://me:1");
        c.advertise(&me).await.unwrap();
        assert_eq!(mdns.advertised(), std::slice::from_ref(&me));
        let mut first = c.watch().await.unwrap();
        mdns.upsert(me.clone());
        dns.upsert(ad("rome", "https://d:1"));
        assert_eq!(next(&mut first).await, "added rome DNS https://d:1");
        let mut second = c.watch().await.unwrap();
        assert_eq!(next(&mut second).await, "added rome DNS https://d:1");
        quiet(&mut second).await;
        dns.problem("bad TXT");
        assert!(next(&mut first).await.contains("bad TXT"));
        assert!(next(&mut second).await.contains("bad TXT"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_is_bounded() {
        let (m, mh) = ChannelDiscovery::new(DiscoverySource::Mdns);
        let config = CompositeConfig {
            max_peers_per_source: 2,
            ..CompositeConfig::default()
        };
        let c = CompositeDiscovery::builder()
            .source(m)
            .config(config)
            .build();
        let mut s = c.watch().await.unwrap();
        for id in ["a", "b", "c"] {
            mh.upsert(ad(id, "https://x:1"));
        }
        assert!(next(&mut s).await.starts_with("added a"));
        assert!(next(&mut s).await.starts_with("added b"));
        assert!(next(&mut s).await.contains("more than 2 clusters"));
        mh.expire(&"a".parse().unwrap());
        assert_eq!(next(&mut s).await, "expired a mDNS");
        mh.upsert(ad("d", "https://x:1"));
        assert!(next(&mut s).await.starts_with("added d"));
    }

    #[tokio::test(start_paused = true)]
    async fn claim_conflicts_show_in_views_for_their_hold() {
        let (m, mh) = ChannelDiscovery::new(DiscoverySource::Mdns);
        let c = CompositeDiscovery::builder().source(m).build();
        let mut views = c.watch_views();
        mh.upsert(ad("rome", "https://m:1"));
        let ViewEvent::Changed { view: Some(v), .. } = views.next().await.unwrap() else {
            panic!("expected a view")
        };
        assert!(v.conflicts.is_empty());
        // A provider reports a conflict through its stream; the composite keeps it in the view.
        let mut table = crate::claims::InstanceTable::new(DiscoverySource::Mdns);
        table.upsert("a", ad("rome", "https://m:1"), false);
        let mut other = ad("rome", "https://evil:1");
        other.key_fingerprint = Some(PublicKey::from_bytes(vec![9]).fingerprint());
        let err = table.upsert("b", other, false).pop().unwrap().unwrap_err();
        let started = Instant::now();
        mh.error(err);
        let mut got_view = false;
        let mut got_problem = false;
        while !(got_view && got_problem) {
            match views.next().await.unwrap() {
                ViewEvent::Changed { view: Some(v), .. } => {
                    assert_eq!(v.conflicts.len(), 1);
                    assert_eq!(v.conflicts[0].instance, "b");
                    got_view = true;
                }
                ViewEvent::Problem(p) => {
                    assert!(ClaimConflict::find(&p.error).is_some());
                    got_problem = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // After the hold, the conflict lapses.
        let ViewEvent::Changed { view: Some(v), .. } = views.next().await.unwrap() else {
            panic!("expected a view")
        };
        assert!(v.conflicts.is_empty());
        let held = started.elapsed();
        assert!(
            held >= Duration::from_secs(120) && held < Duration::from_secs(121),
            "{held:?}"
        );
    }
}
