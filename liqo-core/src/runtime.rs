//! The composition point: one provider per trait, run together as an agent.
//!
//! [`Runtime::builder`] takes a [`Discovery`], a [`PeeringAuthority`], a [`NetworkFabric`] and any
//! number of [`ResourceReflector`]s. [`Runtime::run`] drives discovery until shutdown; a
//! [`RuntimeHandle`] (cheap to clone) peers, unpeers and starts reflection, running each step
//! through the providers in order and rolling back what it did when a later step fails.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use tokio::{
    sync::{Mutex, RwLock, broadcast},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    ClusterId, ClusterIdentity, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource,
    FabricError, NetworkFabric, PeerAdvertisement, PeerLink, PeeringAuthority, PeeringError,
    PeeringGrant, PeeringTarget, ReflectionScope, ResourceReflector,
};

/// Errors of the runtime: which step failed, with the provider's error as the source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The builder lacks providers.
    #[error("runtime is missing a provider for: {}", .0.join(", "))]
    Incomplete(Vec<&'static str>),
    /// Discovery failed to start.
    #[error("discovery failed: {0}")]
    Discovery(#[from] DiscoveryError),
    /// Peering failed.
    #[error("peering failed: {0}")]
    Peering(#[from] PeeringError),
    /// The network fabric failed; the peering was rolled back.
    #[error("network fabric failed: {0}")]
    Fabric(#[from] FabricError),
    /// The provider answered as another cluster than the one asked for; it was released.
    #[error("asked to peer with {expected} but the provider identified as {actual}")]
    IdentityMismatch {
        /// The cluster id the caller targeted.
        expected: ClusterId,
        /// The cluster id in the grant.
        actual: ClusterId,
    },
    /// The operation needs an established peering with that cluster.
    #[error("not peered with cluster {0}")]
    NotPeered(ClusterId),
    /// Reflection needs a client for the local cluster; see [`RuntimeBuilder::local_client`].
    #[error("reflection needs a local Kubernetes client (RuntimeBuilder::local_client)")]
    NoLocalClient,
    /// The credential in a grant could not be turned into a client.
    #[error("credential for cluster {cluster} is unusable: {message}")]
    Credential {
        /// The provider.
        cluster: ClusterId,
        /// Why.
        message: String,
    },
    /// Several steps of a teardown failed; every step was still attempted.
    #[error("unpeering {cluster} left errors: {}", .errors.join("; "))]
    Teardown {
        /// The cluster being unpeered.
        cluster: ClusterId,
        /// One message per failed step.
        errors: Vec<String>,
    },
}

/// What happened, for whoever watches the runtime (controllers, metrics, logs).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RuntimeEvent {
    /// A discovery source reported a new peer, or a new source reported a known one.
    PeerDiscovered(PeerAdvertisement),
    /// A peer's effective record changed.
    PeerUpdated(PeerAdvertisement),
    /// The last source reporting a peer stopped.
    PeerExpired(ClusterId),
    /// A discovery source reported a problem (the stream goes on).
    DiscoveryProblem(String),
    /// Peering and network link are up.
    Peered(PeerLink),
    /// An automatic or requested peering failed.
    PeeringFailed {
        /// The target.
        cluster: Option<ClusterId>,
        /// The error, rendered.
        error: String,
    },
    /// A peering was torn down.
    Unpeered(ClusterId),
    /// A reflector returned an error; it is restarted with backoff.
    ReflectorFailed {
        /// The kind it reflects.
        kind: String,
        /// The remote cluster.
        cluster: ClusterId,
        /// The local namespace.
        namespace: String,
        /// The error, rendered.
        error: String,
    },
}

/// Builds a [`Runtime`]; see [`Runtime::builder`].
#[must_use]
pub struct RuntimeBuilder {
    identity: ClusterIdentity,
    local_client: Option<kube::Client>,
    discovery: Option<Arc<dyn Discovery>>,
    peering: Option<Arc<dyn PeeringAuthority>>,
    fabric: Option<Arc<dyn NetworkFabric>>,
    reflectors: Vec<Arc<dyn ResourceReflector>>,
    advertisement: Option<PeerAdvertisement>,
    auto_peer: HashSet<DiscoverySource>,
    backoff: (Duration, Duration),
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("identity", &self.identity)
            .field(
                "reflectors",
                &self
                    .reflectors
                    .iter()
                    .map(|r| r.kind().to_owned())
                    .collect::<Vec<_>>(),
            )
            .field("auto_peer", &self.auto_peer)
            .finish_non_exhaustive()
    }
}

impl RuntimeBuilder {
    /// The discovery provider (use a composite from `liqo-discovery` to merge several).
    pub fn discovery(mut self, d: impl Discovery) -> Self {
        self.discovery = Some(Arc::new(d));
        self
    }

    /// The peering authority.
    pub fn peering(mut self, p: impl PeeringAuthority) -> Self {
        self.peering = Some(Arc::new(p));
        self
    }

    /// The network fabric.
    pub fn fabric(mut self, f: impl NetworkFabric) -> Self {
        self.fabric = Some(Arc::new(f));
        self
    }

    /// Adds a reflector (one per kind).
    pub fn reflector(mut self, r: impl ResourceReflector) -> Self {
        self.reflectors.push(Arc::new(r));
        self
    }

    /// The client for the local cluster, needed to reflect.
    pub fn local_client(mut self, client: kube::Client) -> Self {
        self.local_client = Some(client);
        self
    }

    /// What to announce through discovery.
    pub fn advertise(mut self, ad: PeerAdvertisement) -> Self {
        self.advertisement = Some(ad);
        self
    }

    /// Peer automatically with peers found by `source`. Off for every source by default:
    /// discovered is not trusted.
    pub fn auto_peer(mut self, source: DiscoverySource) -> Self {
        self.auto_peer.insert(source);
        self
    }

    /// Bounds of the exponential backoff used to restart failing reflectors.
    pub fn reflector_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = (min, max.max(min));
        self
    }

    /// Checks that every trait has a provider.
    pub fn build(self) -> Result<Runtime, RuntimeError> {
        let mut missing = vec![];
        if self.discovery.is_none() {
            missing.push("Discovery");
        }
        if self.peering.is_none() {
            missing.push("PeeringAuthority");
        }
        if self.fabric.is_none() {
            missing.push("NetworkFabric");
        }
        let (Some(discovery), Some(peering), Some(fabric)) =
            (self.discovery, self.peering, self.fabric)
        else {
            return Err(RuntimeError::Incomplete(missing));
        };
        let (events, _) = broadcast::channel(256);
        Ok(Runtime {
            handle: RuntimeHandle {
                inner: Arc::new(Inner {
                    identity: self.identity,
                    local_client: self.local_client,
                    discovery,
                    peering,
                    fabric,
                    reflectors: self.reflectors,
                    advertisement: self.advertisement,
                    auto_peer: self.auto_peer,
                    backoff: self.backoff,
                    events,
                    shutdown: CancellationToken::new(),
                    peers: RwLock::new(BTreeMap::new()),
                    reflections: Mutex::new(HashMap::new()),
                    ops: Mutex::new(()),
                }),
            },
        })
    }
}

/// What the runtime knows about one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    /// The record each source currently reports.
    pub advertisements: BTreeMap<DiscoverySource, PeerAdvertisement>,
    /// The link, once peered.
    pub link: Option<PeerLink>,
    grant: Option<PeeringGrant>,
}

impl PeerState {
    /// The record of the highest-precedence source.
    pub fn effective(&self) -> Option<&PeerAdvertisement> {
        self.advertisements.values().next_back()
    }

    /// Whether peering and link are established.
    pub fn is_peered(&self) -> bool {
        self.link.is_some()
    }
}

struct Reflection {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    scope: ReflectionScope,
}

struct Inner {
    identity: ClusterIdentity,
    local_client: Option<kube::Client>,
    discovery: Arc<dyn Discovery>,
    peering: Arc<dyn PeeringAuthority>,
    fabric: Arc<dyn NetworkFabric>,
    reflectors: Vec<Arc<dyn ResourceReflector>>,
    advertisement: Option<PeerAdvertisement>,
    auto_peer: HashSet<DiscoverySource>,
    backoff: (Duration, Duration),
    events: broadcast::Sender<RuntimeEvent>,
    shutdown: CancellationToken,
    peers: RwLock<BTreeMap<ClusterId, PeerState>>,
    reflections: Mutex<HashMap<(ClusterId, String), Reflection>>,
    /// Serialises peer and unpeer so two callers never request the same grant twice.
    ops: Mutex<()>,
}

/// A composed agent: discovery, peering, fabric and reflectors.
pub struct Runtime {
    handle: RuntimeHandle,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("identity", &self.handle.inner.identity)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Starts building a runtime for the cluster `identity`.
    pub fn builder(identity: ClusterIdentity) -> RuntimeBuilder {
        RuntimeBuilder {
            identity,
            local_client: None,
            discovery: None,
            peering: None,
            fabric: None,
            reflectors: vec![],
            advertisement: None,
            auto_peer: HashSet::new(),
            backoff: (Duration::from_millis(200), Duration::from_secs(30)),
        }
    }

    /// A handle to drive the runtime from elsewhere (controllers, a CLI, tests).
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Advertises this cluster, watches discovery and keeps the peer table until `shutdown`
    /// resolves. On shutdown reflection stops; peerings and links stay, so remote workloads
    /// keep running while the agent is away.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RuntimeError> {
        let inner = &self.handle.inner;
        if let Some(ad) = &inner.advertisement {
            inner.discovery.advertise(ad).await?;
        }
        let mut stream = inner.discovery.watch().await?;
        info!(cluster = %inner.identity.id, "runtime started");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                item = stream.next() => match item {
                    Some(Ok(event)) => self.handle.on_discovery(event).await,
                    Some(Err(e)) => {
                        warn!(error = %e, "discovery reported a problem");
                        let _ = inner.events.send(RuntimeEvent::DiscoveryProblem(e.to_string()));
                    }
                    None => {
                        debug!("discovery stream ended; waiting for shutdown");
                        shutdown.as_mut().await;
                        break;
                    }
                },
            }
        }
        inner.shutdown.cancel();
        let reflections: Vec<Reflection> = inner
            .reflections
            .lock()
            .await
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in reflections {
            r.cancel.cancel();
            for t in r.tasks {
                let _ = t.await;
            }
        }
        info!(cluster = %inner.identity.id, "runtime stopped");
        Ok(())
    }
}

/// Drives a [`Runtime`]: query peers, peer, unpeer, reflect. Cheap to clone.
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

impl RuntimeHandle {
    /// This cluster's identity.
    pub fn identity(&self) -> &ClusterIdentity {
        &self.inner.identity
    }

    /// Subscribes to [`RuntimeEvent`]s from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RuntimeEvent> {
        self.inner.events.subscribe()
    }

    /// A snapshot of every known peer.
    pub async fn peers(&self) -> BTreeMap<ClusterId, PeerState> {
        self.inner.peers.read().await.clone()
    }

    /// The reflectors this runtime runs, by kind.
    pub fn reflector_kinds(&self) -> Vec<String> {
        self.inner
            .reflectors
            .iter()
            .map(|r| r.kind().to_owned())
            .collect()
    }

    fn emit(&self, e: RuntimeEvent) {
        // No subscriber is fine: events are informational.
        let _ = self.inner.events.send(e);
    }

    async fn on_discovery(&self, event: DiscoveryEvent) {
        let mut peers = self.inner.peers.write().await;
        match event {
            DiscoveryEvent::Added(ad) | DiscoveryEvent::Updated(ad) => {
                if ad.cluster_id == self.inner.identity.id {
                    return; // our own announcement, echoed back by the medium
                }
                let state = peers.entry(ad.cluster_id.clone()).or_default();
                let before = state.effective().cloned();
                let is_new_source = !state.advertisements.contains_key(&ad.source);
                state.advertisements.insert(ad.source, ad.clone());
                let after = state.effective().cloned();
                let peered = state.is_peered();
                drop(peers);
                match (before, after) {
                    (None, Some(a)) => self.emit(RuntimeEvent::PeerDiscovered(a)),
                    (Some(b), Some(a)) if b != a || is_new_source => {
                        self.emit(RuntimeEvent::PeerUpdated(a))
                    }
                    _ => {}
                }
                if is_new_source && !peered && self.inner.auto_peer.contains(&ad.source) {
                    self.spawn_auto_peer(ad);
                }
            }
            DiscoveryEvent::Expired { cluster_id, source } => {
                let Some(state) = peers.get_mut(&cluster_id) else {
                    return;
                };
                state.advertisements.remove(&source);
                if state.advertisements.is_empty() {
                    // A peered cluster stays: expiry of a record is not an unpeer.
                    if !state.is_peered() {
                        peers.remove(&cluster_id);
                    }
                    drop(peers);
                    self.emit(RuntimeEvent::PeerExpired(cluster_id));
                } else if let Some(a) = state.effective().cloned() {
                    drop(peers);
                    self.emit(RuntimeEvent::PeerUpdated(a));
                }
            }
        }
    }

    fn spawn_auto_peer(&self, ad: PeerAdvertisement) {
        let this = self.clone();
        let target = PeeringTarget {
            cluster_id: Some(ad.cluster_id.clone()),
            endpoint: ad.peering_endpoint.clone(),
            expected_fingerprint: ad.key_fingerprint,
        };
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                r = this.peer(target) => if let Err(e) = r {
                    warn!(cluster = %ad.cluster_id, error = %e, "automatic peering failed");
                }
            }
        });
    }

    /// Peers with `target`: asks for a grant, checks the provider is who was asked for, then
    /// links the networks. If the fabric fails, the grant is released so nothing is left
    /// half-made. Peering again with a peered cluster returns the existing link.
    pub async fn peer(&self, target: PeeringTarget) -> Result<PeerLink, RuntimeError> {
        let _op = self.inner.ops.lock().await;
        if let Some(id) = &target.cluster_id
            && let Some(link) = self
                .inner
                .peers
                .read()
                .await
                .get(id)
                .and_then(|s| s.link.clone())
        {
            return Ok(link);
        }
        let result = self.peer_inner(&target).await;
        if let Err(e) = &result {
            self.emit(RuntimeEvent::PeeringFailed {
                cluster: target.cluster_id.clone(),
                error: e.to_string(),
            });
        }
        result
    }

    async fn peer_inner(&self, target: &PeeringTarget) -> Result<PeerLink, RuntimeError> {
        let grant = self.inner.peering.request(target).await?;
        let provider = grant.provider.id.clone();
        if let Some(expected) = &target.cluster_id
            && *expected != provider
        {
            self.release_quietly(&provider).await;
            return Err(RuntimeError::IdentityMismatch {
                expected: expected.clone(),
                actual: provider,
            });
        }
        let link = match self.inner.fabric.connect(&provider, &grant.network).await {
            Ok(link) => link,
            Err(e) => {
                self.release_quietly(&provider).await;
                return Err(e.into());
            }
        };
        let mut peers = self.inner.peers.write().await;
        let state = peers.entry(provider.clone()).or_default();
        state.link = Some(link.clone());
        state.grant = Some(grant);
        drop(peers);
        info!(cluster = %provider, "peered");
        self.emit(RuntimeEvent::Peered(link.clone()));
        Ok(link)
    }

    async fn release_quietly(&self, provider: &ClusterId) {
        if let Err(e) = self.inner.peering.release(provider).await {
            warn!(cluster = %provider, error = %e, "rolling back the peering failed");
        }
    }

    /// Tears a peering down: stops every reflection with the cluster (running each reflector's
    /// cleanup), disconnects the fabric and releases the credential. Every step is attempted even
    /// if an earlier one fails; the errors are reported together.
    pub async fn unpeer(&self, cluster: &ClusterId) -> Result<(), RuntimeError> {
        let _op = self.inner.ops.lock().await;
        if !self
            .inner
            .peers
            .read()
            .await
            .get(cluster)
            .is_some_and(PeerState::is_peered)
        {
            return Err(RuntimeError::NotPeered(cluster.clone()));
        }
        let mut errors = vec![];
        let namespaces: Vec<String> = self
            .inner
            .reflections
            .lock()
            .await
            .keys()
            .filter(|(c, _)| c == cluster)
            .map(|(_, ns)| ns.clone())
            .collect();
        for ns in namespaces {
            if let Err(e) = self.stop_reflecting(cluster, &ns).await {
                errors.push(format!("stopping reflection of {ns}: {e}"));
            }
        }
        if let Err(e) = self.inner.fabric.disconnect(cluster).await {
            errors.push(format!("network: {e}"));
        }
        if let Err(e) = self.inner.peering.release(cluster).await {
            errors.push(format!("peering: {e}"));
        }
        let mut peers = self.inner.peers.write().await;
        if let Some(state) = peers.get_mut(cluster) {
            state.link = None;
            state.grant = None;
            if state.advertisements.is_empty() {
                peers.remove(cluster);
            }
        }
        drop(peers);
        self.emit(RuntimeEvent::Unpeered(cluster.clone()));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Teardown {
                cluster: cluster.clone(),
                errors,
            })
        }
    }

    /// Starts every reflector between `local_namespace` and `remote_namespace` on the peered
    /// `cluster`. Each reflector runs in its own task and is restarted with exponential backoff
    /// when it fails. Calling it again for the same namespace does nothing.
    pub async fn reflect(
        &self,
        cluster: &ClusterId,
        local_namespace: &str,
        remote_namespace: &str,
    ) -> Result<(), RuntimeError> {
        let local = self
            .inner
            .local_client
            .clone()
            .ok_or(RuntimeError::NoLocalClient)?;
        let (grant, link) = {
            let peers = self.inner.peers.read().await;
            let state = peers
                .get(cluster)
                .ok_or_else(|| RuntimeError::NotPeered(cluster.clone()))?;
            match (&state.grant, &state.link) {
                (Some(g), Some(l)) => (g.clone(), l.clone()),
                _ => return Err(RuntimeError::NotPeered(cluster.clone())),
            }
        };
        let mut reflections = self.inner.reflections.lock().await;
        let key = (cluster.clone(), local_namespace.to_owned());
        if reflections.contains_key(&key) {
            return Ok(());
        }
        let remote = client_from_kubeconfig(cluster, &grant.credential.kubeconfig).await?;
        let scope = ReflectionScope {
            remote_cluster: cluster.clone(),
            local,
            remote,
            local_namespace: local_namespace.to_owned(),
            remote_namespace: remote_namespace.to_owned(),
            translator: link.translator(),
        };
        let cancel = self.inner.shutdown.child_token();
        let tasks = self
            .inner
            .reflectors
            .iter()
            .map(|r| self.spawn_reflector(r.clone(), scope.clone(), cancel.clone()))
            .collect();
        reflections.insert(
            key,
            Reflection {
                cancel,
                tasks,
                scope,
            },
        );
        Ok(())
    }

    fn spawn_reflector(
        &self,
        reflector: Arc<dyn ResourceReflector>,
        scope: ReflectionScope,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        let this = self.clone();
        let (min, max) = self.inner.backoff;
        tokio::spawn(async move {
            let mut delay = min;
            loop {
                let result = reflector.reflect(scope.clone(), cancel.clone()).await;
                if cancel.is_cancelled() {
                    return;
                }
                match result {
                    Ok(()) => delay = min,
                    Err(e) => {
                        warn!(kind = reflector.kind(), cluster = %scope.remote_cluster, namespace = %scope.local_namespace, error = %e, "reflector failed; restarting");
                        this.emit(RuntimeEvent::ReflectorFailed {
                            kind: reflector.kind().to_owned(),
                            cluster: scope.remote_cluster.clone(),
                            namespace: scope.local_namespace.clone(),
                            error: e.to_string(),
                        });
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(max);
            }
        })
    }

    /// Stops reflecting `local_namespace` to `cluster` and runs each reflector's cleanup.
    pub async fn stop_reflecting(
        &self,
        cluster: &ClusterId,
        local_namespace: &str,
    ) -> Result<(), RuntimeError> {
        let Some(r) = self
            .inner
            .reflections
            .lock()
            .await
            .remove(&(cluster.clone(), local_namespace.to_owned()))
        else {
            return Ok(());
        };
        r.cancel.cancel();
        for t in r.tasks {
            let _ = t.await;
        }
        let mut errors = vec![];
        for reflector in &self.inner.reflectors {
            if let Err(e) = reflector.cleanup(&r.scope).await {
                errors.push(format!("{}: {e}", reflector.kind()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Teardown {
                cluster: cluster.clone(),
                errors,
            })
        }
    }

    /// The namespaces currently reflected to `cluster`.
    pub async fn reflected_namespaces(&self, cluster: &ClusterId) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .reflections
            .lock()
            .await
            .keys()
            .filter(|(c, _)| c == cluster)
            .map(|(_, ns)| ns.clone())
            .collect();
        v.sort();
        v
    }
}

/// Builds a client from a kubeconfig held in memory (a peering credential).
pub async fn client_from_kubeconfig(
    cluster: &ClusterId,
    kubeconfig: &str,
) -> Result<kube::Client, RuntimeError> {
    let err = |message: String| RuntimeError::Credential {
        cluster: cluster.clone(),
        message,
    };
    let kc = kube::config::Kubeconfig::from_yaml(kubeconfig)
        .map_err(|e| err(format!("not a kubeconfig: {e}")))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| err(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}
