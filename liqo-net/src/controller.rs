//! [`NetworkController`]: drives a fabric from peering state, exchanges each side's view of the
//! other's networks, and reports links as conditions and `Tunnel` objects.
//!
//! ## What it does
//!
//! A kube-runtime controller over the local `ForeignCluster`s:
//!
//! - a peer whose `status.network` is known (peering records the peer's
//!   [`NetworkParameters`] there) and whose `status.role` is not `None` is connected
//!   ([`NetworkFabric::connect`], idempotent), with finalizer [`FINALIZER`] held while connected;
//! - when the role goes back to `None` or the `ForeignCluster` is deleted, the peer is
//!   disconnected, its `Tunnel` and published view are removed, then the finalizer;
//! - the [`LinkChecker`] reads the links every interval; changes of state or handshake update the
//!   `NetworkReady` condition of the `ForeignCluster` and the status of `Tunnel` `<peer>` in
//!   `liqo-tenant-<peer>` (interface, local public key, last handshake, bytes, `Connected`).
//!
//! ## The view exchange protocol
//!
//! Each gateway rewrites its own pods' addresses into "the range the peer knows us by" (see
//! [`crate::nat`]), so each side must learn the peer's view of its networks:
//!
//! - "my view of peer X" is a `NetworkConfig` named `<X>` with `spec.clusterId = X`,
//!   `spec.remotePodCidr` (and `remoteExternalCidr`) = X's real CIDRs and
//!   `status.remappedPodCidr` (`remappedExternalCidr`) = the ranges this cluster uses for them;
//! - the views of a pair live in **one** place: namespace `liqo-tenant-<consumer>` on the
//!   **provider**'s cluster (for a `Both` peering, the cluster with the smaller id plays
//!   provider). The provider writes its view there with its own client; the consumer writes
//!   its view through its peering credential (Secret `liqo-tenant-<provider>/liqo-kubeconfig-<provider>`,
//!   key `kubeconfig`), whose tenant Role allows `networkconfigs` and `networkconfigs/status`;
//! - each side watches the peer's view of itself, `NetworkConfig` `<my id>` in that namespace,
//!   checks it (it names this cluster, states this cluster's real CIDRs, and each remapped range
//!   has the real one's prefix length; else `NetworkReady=False`, reason `ViewInvalid`) and
//!   hands the mappings to [`NetworkFabric::set_local_mappings`]. Until it arrives the condition
//!   says `ViewMissing`.
//!
//! The shared copy is only a publication: the IPAM's own store (e.g.
//! [`NetworkConfigStore`](crate::store::NetworkConfigStore) in `liqo-system`, or a file) stays
//! separate, and nothing a peer can write is ever read back as IPAM state.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use futures::{StreamExt, channel::mpsc};
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        reflector::ObjectRef,
        watcher::{self, Event},
    },
};
use liqo_core::{
    AddressTranslator, CidrMapping, ClusterId, FabricError, LinkState, LinkStatus, NetworkFabric,
    NetworkParameters, PeerLink, TunnelInfo,
    conditions::{self, Condition, Status},
    crds::{
        ForeignCluster, NetworkConfig, NetworkConfigSpec, NetworkConfigStatus, PeeringRole, Tunnel,
        TunnelSpec, TunnelStatus, foreign_cluster_condition::NETWORK_READY,
    },
    labels, names,
};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::checker::{LinkChecker, LinkSource};

/// The finalizer held on a `ForeignCluster` while its peer is connected.
pub const FINALIZER: &str = "liqo.io/network";
/// The field manager of everything this controller writes.
pub const FIELD_MANAGER: &str = "liqo-net";
/// The Secret key holding the peering kubeconfig.
pub const KUBECONFIG_KEY: &str = "kubeconfig";
/// The condition type of a `Tunnel`.
pub const TUNNEL_CONNECTED: &str = "Connected";
/// Value of [`labels::MANAGED_BY`] on objects this controller makes.
pub const MANAGED_BY_VALUE: &str = "liqo-net";

/// The name of the peering kubeconfig Secret for `provider` (in `liqo-tenant-<provider>`).
pub fn kubeconfig_secret(provider: &ClusterId) -> String {
    format!("liqo-kubeconfig-{provider}")
}

/// Errors of the [`NetworkController`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The fabric failed.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// An API call failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done, naming the object.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The peering credential of a peer is missing or unusable.
    #[error("peering credential of cluster {cluster}: {message}")]
    Credential {
        /// The peer.
        cluster: ClusterId,
        /// What is wrong.
        message: String,
    },
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> NetError {
    let action = action.into();
    move |source| NetError::Kube { action, source }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

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
    fn missing(message: impl Into<String>) -> Self {
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
struct LinksInner {
    links: BTreeMap<ClusterId, PeerLink>,
    statuses: BTreeMap<ClusterId, LinkStatus>,
    views: BTreeMap<ClusterId, ViewStatus>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, LinksInner> {
        // Every update is a plain insert or remove: a panic elsewhere leaves it consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
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
struct Recording {
    fabric: Arc<dyn NetworkFabric>,
    links: Links,
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

/// Where the two views of a pair live, as seen from this side.
#[derive(Clone)]
struct Exchange {
    api: Api<NetworkConfig>,
    namespace: String,
    /// `local` when this cluster hosts the views, else the peer does.
    local: bool,
    /// The kubeconfig the remote client was built from (to notice a rotated credential).
    kubeconfig: Option<String>,
}

struct PeerState {
    fc_name: String,
    params: NetworkParameters,
    exchange: Option<Exchange>,
    /// The view this side published, to skip unchanged writes.
    published: Option<NetworkConfig>,
    watch: Option<JoinHandle<()>>,
}

impl Drop for PeerState {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.abort();
        }
    }
}

type PeerSlot = Arc<tokio::sync::Mutex<Option<PeerState>>>;

struct Ctx {
    client: Client,
    me: ClusterId,
    local: NetworkParameters,
    fabric: Arc<dyn NetworkFabric>,
    links: Links,
    /// One lock per peer: a peer whose API server hangs delays only its own reconciles.
    peers: Mutex<BTreeMap<ClusterId, PeerSlot>>,
    trigger: mpsc::UnboundedSender<ObjectRef<ForeignCluster>>,
    failures: Mutex<BTreeMap<String, u32>>,
    /// peer → ForeignCluster name, for triggers coming from the checker.
    names: Mutex<BTreeMap<ClusterId, String>>,
}

/// Drives a [`NetworkFabric`] from the local `ForeignCluster`s (see the [module docs](self)).
pub struct NetworkController {
    client: Client,
    me: ClusterId,
    fabric: Arc<dyn NetworkFabric>,
    links: Links,
    check_interval: Duration,
}

impl std::fmt::Debug for NetworkController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkController")
            .field("me", &self.me)
            .field("check_interval", &self.check_interval)
            .finish_non_exhaustive()
    }
}

impl NetworkController {
    /// A controller for cluster `me` (its `ForeignCluster`s are read through `client`) over
    /// `fabric`; links are checked every 5 s.
    pub fn new(client: Client, me: ClusterId, fabric: Arc<dyn NetworkFabric>) -> Self {
        Self {
            client,
            me,
            fabric,
            links: Links::default(),
            check_interval: Duration::from_secs(5),
        }
    }

    /// Checks links every `interval` instead (reading a userspace interface costs a UAPI
    /// round trip per check).
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// The read handle on the links.
    pub fn links(&self) -> Links {
        self.links.clone()
    }

    /// Runs until `shutdown` resolves. Links stay up on shutdown (remote workloads keep
    /// running); only unpeering disconnects.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) -> Result<(), NetError> {
        let local = self.fabric.local_parameters().await?;
        let (trigger, triggers) = mpsc::unbounded();
        let ctx = Arc::new(Ctx {
            client: self.client.clone(),
            me: self.me.clone(),
            local,
            fabric: self.fabric.clone(),
            links: self.links.clone(),
            peers: Mutex::new(BTreeMap::new()),
            trigger: trigger.clone(),
            failures: Mutex::default(),
            names: Mutex::default(),
        });
        let checker = LinkChecker::spawn_rechecking(
            Arc::new(Recording {
                fabric: self.fabric.clone(),
                links: self.links.clone(),
            }),
            self.check_interval,
            Some(self.links.changes()),
        );
        let mut changes = checker.subscribe();
        let names_ctx = ctx.clone();
        let forward = tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let peers: Vec<ClusterId> = changes.borrow_and_update().keys().cloned().collect();
                for p in peers {
                    let name = names_ctx
                        .names
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&p)
                        .cloned();
                    if let Some(n) = name {
                        let _ = trigger.unbounded_send(ObjectRef::new(&n));
                    }
                }
            }
        });
        let api: Api<ForeignCluster> = Api::all(self.client.clone());
        Controller::new(api, watcher::Config::default())
            .trigger_backoff(liqo_core::watch_backoff())
            .reconcile_on(triggers)
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    debug!(error = %e, "network reconcile");
                }
            })
            .await;
        forward.abort();
        drop(checker);
        // Stop the view watchers; the links themselves stay.
        ctx.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }
}

fn error_policy(fc: Arc<ForeignCluster>, e: &NetError, ctx: Arc<Ctx>) -> Action {
    let name = fc.name_any();
    let mut f = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
    let n = f.entry(name.clone()).or_insert(0);
    *n = n.saturating_add(1);
    let delay = Duration::from_millis(500)
        .saturating_mul(1 << (*n).min(10))
        .min(Duration::from_secs(300));
    warn!(foreigncluster = %name, error = %e, retry_in = ?delay, "network reconcile failed");
    Action::requeue(delay)
}

/// The peer's role decides who hosts the views: the provider, in `liqo-tenant-<consumer>`.
fn hosts_views(me: &ClusterId, peer: &ClusterId, role: PeeringRole) -> Option<bool> {
    match role {
        PeeringRole::None => None,
        // The peer provides: it hosts.
        PeeringRole::Provider => Some(false),
        PeeringRole::Consumer => Some(true),
        PeeringRole::Both => Some(me < peer),
    }
}

async fn reconcile(fc: Arc<ForeignCluster>, ctx: Arc<Ctx>) -> Result<Action, NetError> {
    let peer = fc.spec.cluster_id.clone();
    let name = fc.name_any();
    if peer == ctx.me {
        return Ok(Action::await_change());
    }
    let status = fc.status.clone().unwrap_or_default();
    let wanted = fc.metadata.deletion_timestamp.is_none() && status.role != PeeringRole::None;
    let params = status.network.clone().filter(|_| wanted);
    let host = hosts_views(&ctx.me, &peer, status.role);
    let (Some(params), Some(host)) = (params, host) else {
        teardown(&ctx, &fc, &peer).await?;
        ctx.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name);
        return Ok(Action::await_change());
    };
    ctx.names
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(peer.clone(), name.clone());
    add_finalizer(&ctx.client, &fc).await?;
    let slot = ctx
        .peers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(peer.clone())
        .or_default()
        .clone();
    let mut peers = slot.lock().await;
    let state = peers.get_or_insert_with(|| PeerState {
        fc_name: name.clone(),
        params: params.clone(),
        exchange: None,
        published: None,
        watch: None,
    });
    state.fc_name = name.clone();
    let connected = ctx.links.lock().links.contains_key(&peer);
    if !connected || state.params != params {
        match ctx.fabric.connect(&peer, &params).await {
            Ok(link) => {
                info!(%peer, mappings = ?link.remote_mappings, "network connected");
                ctx.links.lock().links.insert(peer.clone(), link);
                ctx.links.bump();
                state.params = params.clone();
            }
            Err(e) => {
                drop(peers);
                let msg = format!("connecting to {peer}'s gateway: {e}");
                set_ready(&ctx, &fc, Status::False, "ConnectFailed", &msg).await?;
                return Err(e.into());
            }
        }
    }
    // The views.
    let exchange_result = ensure_exchange(&ctx, &peer, host, state).await;
    if let Err(e) = &exchange_result {
        let msg = format!("cannot reach where views are exchanged: {e}");
        ctx.links
            .lock()
            .views
            .entry(peer.clone())
            .or_insert_with(|| ViewStatus::missing(msg.clone()));
    } else {
        publish_view(&ctx, &peer, state).await?;
    }
    drop(peers);
    write_tunnel(&ctx, &fc, &peer, &params).await?;
    let (s, reason, message) = readiness(&ctx, &peer);
    set_ready(&ctx, &fc, s, reason, &message).await?;
    exchange_result?;
    ctx.failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&name);
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// `NetworkReady` from the link and the view.
fn readiness(ctx: &Ctx, peer: &ClusterId) -> (Status, &'static str, String) {
    let g = ctx.links.lock();
    let view = g
        .views
        .get(peer)
        .cloned()
        .unwrap_or_else(|| ViewStatus::missing("not watched yet"));
    match view.state {
        ViewState::Invalid => return (Status::False, "ViewInvalid", view.message),
        ViewState::Missing => {
            return (
                Status::False,
                "ViewMissing",
                format!(
                    "waiting for {peer}'s view of this cluster: {}",
                    view.message
                ),
            );
        }
        ViewState::Applied => {}
    }
    match g.statuses.get(peer) {
        None => (
            Status::Unknown,
            "Connecting",
            "waiting for the first link check".into(),
        ),
        Some(s) => match s.state {
            LinkState::Connecting => (Status::Unknown, "Connecting", s.message.clone()),
            LinkState::Connected => (Status::True, "Connected", s.message.clone()),
            LinkState::Disconnected => (Status::False, "HandshakeStale", s.message.clone()),
        },
    }
}

async fn set_ready(
    ctx: &Ctx,
    fc: &ForeignCluster,
    status: Status,
    reason: &str,
    message: &str,
) -> Result<(), NetError> {
    let mut conds: Vec<Condition> = fc
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if !conditions::set(
        &mut conds,
        NETWORK_READY,
        status,
        reason,
        message,
        fc.metadata.generation,
    ) {
        return Ok(());
    }
    let mine: Vec<&Condition> = conds.iter().filter(|c| c.type_ == NETWORK_READY).collect();
    apply_fc_conditions(ctx, fc, &mine).await
}

/// Server-side apply of this controller's conditions only (the list is a map keyed by type,
/// so other managers' conditions are untouched; an empty list drops ours).
async fn apply_fc_conditions(
    ctx: &Ctx,
    fc: &ForeignCluster,
    conds: &[&Condition],
) -> Result<(), NetError> {
    let name = fc.name_any();
    let body = serde_json::json!({
        "apiVersion": ForeignCluster::api_version(&()),
        "kind": ForeignCluster::kind(&()),
        "metadata": {"name": name},
        "status": {"conditions": conds},
    });
    let api: Api<ForeignCluster> = Api::all(ctx.client.clone());
    match api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err(format!(
            "writing condition {NETWORK_READY} of ForeignCluster {name}"
        ))(e)),
    }
}

async fn add_finalizer(client: &Client, fc: &ForeignCluster) -> Result<(), NetError> {
    if fc.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut list = fc.finalizers().to_vec();
    list.push(FINALIZER.into());
    patch_finalizers(client, fc, list).await
}

/// Replaces the finalizer list, guarded by a test of the current list (another controller's
/// finalizer changing meanwhile makes this fail and retry, never lose theirs; unrelated
/// changes such as a status write do not conflict).
async fn patch_finalizers(
    client: &Client,
    fc: &ForeignCluster,
    list: Vec<String>,
) -> Result<(), NetError> {
    let name = fc.name_any();
    let api: Api<ForeignCluster> = Api::all(client.clone());
    let result = match &fc.metadata.finalizers {
        Some(current) => {
            let ops = serde_json::json!([
                {"op": "test", "path": "/metadata/finalizers", "value": current},
                {"op": "replace", "path": "/metadata/finalizers", "value": list},
            ]);
            let patch: json_patch::Patch =
                serde_json::from_value(ops).map_err(|e| FabricError::Other(e.into()))?;
            api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
        }
        None => {
            let patch = serde_json::json!({
                "metadata": {"finalizers": list, "resourceVersion": fc.resource_version()},
            });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err(format!(
            "updating the finalizers of ForeignCluster {name}"
        ))(e)),
    }
}

async fn teardown(ctx: &Ctx, fc: &ForeignCluster, peer: &ClusterId) -> Result<(), NetError> {
    let slot = ctx
        .peers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(peer);
    let state = match slot {
        Some(slot) => slot.lock().await.take(),
        None => None,
    };
    let had_link = ctx.links.lock().links.contains_key(peer);
    let has_finalizer = fc.finalizers().iter().any(|f| f == FINALIZER);
    if state.is_none() && !had_link && !has_finalizer {
        return Ok(());
    }
    // After a restart the in-memory state is gone; the finalizer says we may have a link.
    ctx.fabric.disconnect(peer).await?;
    {
        let mut g = ctx.links.lock();
        g.links.remove(peer);
        g.statuses.remove(peer);
        g.views.remove(peer);
    }
    ctx.links.bump();
    info!(%peer, "network disconnected");
    // My view: best effort on the peer's side (unpeering deletes its tenant namespace anyway).
    if let Some(ex) = state.as_ref().and_then(|s| s.exchange.clone()) {
        match ex.api.delete(peer.as_str(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) if !ex.local => {
                debug!(%peer, error = %e, "removing our view on the peer (its tenant namespace goes with unpeering)");
            }
            Err(e) => {
                return Err(kube_err(format!(
                    "deleting NetworkConfig {}/{peer}",
                    ex.namespace
                ))(e));
            }
        }
    }
    let tunnels: Api<Tunnel> = Api::namespaced(ctx.client.clone(), &names::tenant_namespace(peer));
    match tunnels
        .delete(peer.as_str(), &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => {
            return Err(kube_err(format!(
                "deleting Tunnel {}/{peer}",
                names::tenant_namespace(peer)
            ))(e));
        }
    }
    ctx.names
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(peer);
    if fc.metadata.deletion_timestamp.is_none() {
        apply_fc_conditions(ctx, fc, &[]).await?;
    }
    if has_finalizer {
        let list = fc
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        patch_finalizers(&ctx.client, fc, list).await?;
    }
    Ok(())
}

/// Makes sure the exchange place is known and the peer's view is watched.
async fn ensure_exchange(
    ctx: &Arc<Ctx>,
    peer: &ClusterId,
    host: bool,
    state: &mut PeerState,
) -> Result<(), NetError> {
    let exchange = if host {
        let namespace = names::tenant_namespace(peer);
        match &state.exchange {
            Some(e) if e.local => return ensure_watch(ctx, peer, state),
            _ => Exchange {
                api: Api::namespaced(ctx.client.clone(), &namespace),
                namespace,
                local: true,
                kubeconfig: None,
            },
        }
    } else {
        let secrets: Api<Secret> =
            Api::namespaced(ctx.client.clone(), &names::tenant_namespace(peer));
        let secret_name = kubeconfig_secret(peer);
        let secret = secrets
            .get_opt(&secret_name)
            .await
            .map_err(kube_err(format!(
                "reading Secret {}/{secret_name}",
                names::tenant_namespace(peer)
            )))?
            .ok_or_else(|| NetError::Credential {
                cluster: peer.clone(),
                message: format!(
                    "Secret {}/{secret_name} does not exist (yet)",
                    names::tenant_namespace(peer)
                ),
            })?;
        let kubeconfig = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KUBECONFIG_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| NetError::Credential {
                cluster: peer.clone(),
                message: format!("Secret {secret_name} has no key {KUBECONFIG_KEY}"),
            })?;
        if let Some(e) = &state.exchange
            && !e.local
            && e.kubeconfig.as_deref() == Some(kubeconfig.as_str())
        {
            return ensure_watch(ctx, peer, state);
        }
        let client = liqo_core::client_from_kubeconfig(peer, &kubeconfig)
            .await
            .map_err(|e| NetError::Credential {
                cluster: peer.clone(),
                message: e.to_string(),
            })?;
        let namespace = names::tenant_namespace(&ctx.me);
        Exchange {
            api: Api::namespaced(client, &namespace),
            namespace,
            local: false,
            kubeconfig: Some(kubeconfig),
        }
    };
    // A new place (first time, or a rotated credential): watch again, publish again.
    if let Some(w) = state.watch.take() {
        w.abort();
    }
    state.exchange = Some(exchange);
    state.published = None;
    ensure_watch(ctx, peer, state)
}

fn ensure_watch(ctx: &Arc<Ctx>, peer: &ClusterId, state: &mut PeerState) -> Result<(), NetError> {
    if state.watch.as_ref().is_some_and(|w| !w.is_finished()) {
        return Ok(());
    }
    let Some(ex) = state.exchange.clone() else {
        return Ok(());
    };
    let task = tokio::spawn(watch_view(
        ctx.clone(),
        peer.clone(),
        state.fc_name.clone(),
        ex,
    ));
    state.watch = Some(task);
    Ok(())
}

/// Watches `NetworkConfig` `<me>` (the peer's view of this cluster) and applies it.
async fn watch_view(ctx: Arc<Ctx>, peer: ClusterId, fc_name: String, ex: Exchange) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", ctx.me));
    let mut stream = watcher::watcher(ex.api.clone(), cfg)
        .backoff(liqo_core::watch_backoff())
        .boxed();
    let mut seen = false;
    let mut applied: Option<Vec<CidrMapping>> = None;
    while let Some(ev) = stream.next().await {
        let view = match ev {
            Ok(Event::Init) => {
                seen = false;
                continue;
            }
            Ok(Event::InitApply(nc) | Event::Apply(nc)) => {
                seen = true;
                check_view(&ctx.me, &ctx.local, &nc)
            }
            Ok(Event::InitDone) if seen => continue,
            Ok(Event::InitDone) => ViewStatus::missing(format!(
                "NetworkConfig {}/{} does not exist",
                ex.namespace, ctx.me
            )),
            Ok(Event::Delete(_)) => ViewStatus::missing(format!(
                "NetworkConfig {}/{} was deleted",
                ex.namespace, ctx.me
            )),
            Err(e) => {
                warn!(%peer, error = %e, namespace = %ex.namespace, "watching the peer's view of this cluster");
                ViewStatus::missing(format!(
                    "cannot watch NetworkConfigs in {} {}: {e}",
                    ex.namespace,
                    if ex.local { "here" } else { "on the peer" }
                ))
            }
        };
        let view = if view.state == ViewState::Applied && applied.as_ref() != Some(&view.mappings) {
            match ctx
                .fabric
                .set_local_mappings(&peer, view.mappings.clone())
                .await
            {
                Ok(_) => {
                    info!(%peer, mappings = ?view.mappings, "applied the peer's view of this cluster");
                    // Translators handed out from now on know how the peer reaches us.
                    if let Some(l) = ctx.links.lock().links.get_mut(&peer) {
                        l.local_mappings = view.mappings.clone();
                    }
                    ctx.links.bump();
                    applied = Some(view.mappings.clone());
                    view
                }
                Err(e) => ViewStatus {
                    state: ViewState::Invalid,
                    mappings: vec![],
                    message: format!("the gateway refused it: {e}"),
                },
            }
        } else if view.state == ViewState::Missing && applied.is_some() {
            // Keep the last applied mappings in the gateway (traffic keeps flowing), say so.
            ViewStatus {
                message: format!("{} (keeping the last one applied)", view.message),
                ..view
            }
        } else {
            view
        };
        let changed = {
            let mut g = ctx.links.lock();
            if g.links.contains_key(&peer) {
                g.views.insert(peer.clone(), view.clone()) != Some(view)
            } else {
                false
            }
        };
        if changed {
            let _ = ctx.trigger.unbounded_send(ObjectRef::new(&fc_name));
        }
    }
}

/// Checks the peer's view of this cluster.
pub fn check_view(me: &ClusterId, local: &NetworkParameters, nc: &NetworkConfig) -> ViewStatus {
    let invalid = |message: String| ViewStatus {
        state: ViewState::Invalid,
        mappings: vec![],
        message,
    };
    let name = nc.name_any();
    if &nc.spec.cluster_id != me {
        return invalid(format!(
            "NetworkConfig {name} is about cluster {}, not this one ({me})",
            nc.spec.cluster_id
        ));
    }
    if nc.spec.remote_pod_cidr != local.pod_cidr {
        return invalid(format!(
            "NetworkConfig {name} says this cluster's pod CIDR is {}, it is {}",
            nc.spec.remote_pod_cidr, local.pod_cidr
        ));
    }
    let status = nc.status.clone().unwrap_or_default();
    let Some(pod) = status.remapped_pod_cidr else {
        return ViewStatus::missing(format!("NetworkConfig {name} has no remapped pod CIDR yet"));
    };
    let pair = |what: &str, real: liqo_core::Cidr, remapped: liqo_core::Cidr| {
        if real.prefix_len() != remapped.prefix_len() {
            return Err(format!(
                "NetworkConfig {name}: {what} {real} is remapped to {remapped}, a different size \
                 (prefix /{} vs /{})",
                real.prefix_len(),
                remapped.prefix_len()
            ));
        }
        CidrMapping::new(real, remapped).map_err(|e| format!("NetworkConfig {name}: {e}"))
    };
    let mut mappings = match pair("pod CIDR", local.pod_cidr, pod) {
        Ok(m) => vec![m],
        Err(e) => return invalid(e),
    };
    match (
        local.external_cidr,
        nc.spec.remote_external_cidr,
        status.remapped_external_cidr,
    ) {
        (Some(real), Some(stated), Some(remapped)) if stated == real => {
            match pair("external CIDR", real, remapped) {
                Ok(m) => mappings.push(m),
                Err(e) => return invalid(e),
            }
        }
        (_, None, None) => {}
        (real, stated, remapped) => {
            return invalid(format!(
                "NetworkConfig {name}: external CIDR {stated:?} remapped to {remapped:?} does \
                 not match this cluster's {real:?}"
            ));
        }
    }
    ViewStatus {
        state: ViewState::Applied,
        message: mappings
            .iter()
            .map(|m| format!("{} is known as {}", m.real, m.remapped))
            .collect::<Vec<_>>()
            .join(", "),
        mappings,
    }
}

/// This cluster's view of `peer`, as published.
pub fn view_of(peer: &ClusterId, params: &NetworkParameters, link: &PeerLink) -> NetworkConfig {
    let find = |real: liqo_core::Cidr| {
        link.remote_mappings
            .iter()
            .find(|m| m.real == real)
            .map(|m| m.remapped)
    };
    let mut status = NetworkConfigStatus {
        remapped_pod_cidr: find(params.pod_cidr),
        remapped_external_cidr: params.external_cidr.and_then(find),
        conditions: vec![],
    };
    conditions::set(
        &mut status.conditions,
        crate::store::ALLOCATED,
        Status::True,
        "RangesReserved",
        "the ranges this cluster uses for the peer's networks",
        None,
    );
    let mut nc = NetworkConfig::new(
        peer.as_str(),
        NetworkConfigSpec {
            cluster_id: peer.clone(),
            remote_pod_cidr: params.pod_cidr,
            remote_external_cidr: params.external_cidr,
        },
    );
    nc.metadata.labels = Some(
        [
            (labels::REMOTE_CLUSTER_ID.to_owned(), peer.to_string()),
            (labels::MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        ]
        .into(),
    );
    nc.status = Some(status);
    nc
}

fn same_view(a: &NetworkConfig, b: &NetworkConfig) -> bool {
    let strip = |n: &NetworkConfig| {
        let s = n.status.clone().unwrap_or_default();
        (
            n.spec.clone(),
            s.remapped_pod_cidr,
            s.remapped_external_cidr,
        )
    };
    strip(a) == strip(b)
}

async fn publish_view(ctx: &Ctx, peer: &ClusterId, state: &mut PeerState) -> Result<(), NetError> {
    let Some(ex) = state.exchange.clone() else {
        return Ok(());
    };
    let Some(link) = ctx.links.lock().links.get(peer).cloned() else {
        return Ok(());
    };
    let mut nc = view_of(peer, &state.params, &link);
    if let Some(p) = &state.published
        && same_view(p, &nc)
    {
        return Ok(());
    }
    let status = nc.status.take();
    let mut body = serde_json::to_value(&nc).map_err(|e| FabricError::Other(e.into()))?;
    body["apiVersion"] = NetworkConfig::api_version(&()).into();
    body["kind"] = NetworkConfig::kind(&()).into();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let what = format!(
        "publishing this cluster's view of {peer} (NetworkConfig {}/{peer}{})",
        ex.namespace,
        if ex.local { "" } else { " on the peer" }
    );
    ex.api
        .patch(peer.as_str(), &pp, &Patch::Apply(&body))
        .await
        .map_err(kube_err(what.clone()))?;
    let status_body = serde_json::json!({
        "apiVersion": NetworkConfig::api_version(&()),
        "kind": NetworkConfig::kind(&()),
        "status": status,
    });
    ex.api
        .patch_status(peer.as_str(), &pp, &Patch::Apply(&status_body))
        .await
        .map_err(kube_err(what))?;
    nc.status = status;
    debug!(%peer, namespace = %ex.namespace, "published our view");
    state.published = Some(nc);
    Ok(())
}

fn time(t: SystemTime) -> Option<Time> {
    Timestamp::try_from(t).ok().map(Time)
}

async fn write_tunnel(
    ctx: &Ctx,
    fc: &ForeignCluster,
    peer: &ClusterId,
    params: &NetworkParameters,
) -> Result<(), NetError> {
    // A fabric without a tunnel (or a peer without a key) has no `Tunnel` to show.
    let (Some(info), Some(peer_key)) = (ctx.fabric.tunnel_info(), params.wireguard_public_key)
    else {
        return Ok(());
    };
    let namespace = names::tenant_namespace(peer);
    let api: Api<Tunnel> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut t = Tunnel::new(
        peer.as_str(),
        TunnelSpec {
            cluster_id: peer.clone(),
            backend: info.backend,
            endpoint: params.gateway_endpoint.clone(),
            peer_public_key: peer_key,
            mtu: Some(info.mtu),
            persistent_keepalive_seconds: info.persistent_keepalive,
        },
    );
    t.metadata.labels = Some(
        [
            (labels::REMOTE_CLUSTER_ID.to_owned(), peer.to_string()),
            (labels::MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        ]
        .into(),
    );
    if let Some(uid) = fc.uid() {
        t.metadata.owner_references = Some(vec![OwnerReference {
            api_version: ForeignCluster::api_version(&()).into_owned(),
            kind: ForeignCluster::kind(&()).into_owned(),
            name: fc.name_any(),
            uid,
            ..OwnerReference::default()
        }]);
    }
    let mut body = serde_json::to_value(&t).map_err(|e| FabricError::Other(e.into()))?;
    body["apiVersion"] = Tunnel::api_version(&()).into();
    body["kind"] = Tunnel::kind(&()).into();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let current = api
        .patch(peer.as_str(), &pp, &Patch::Apply(&body))
        .await
        .map_err(kube_err(format!("applying Tunnel {namespace}/{peer}")))?;
    let link = ctx.links.lock().statuses.get(peer).cloned();
    let mut status = current.status.clone().unwrap_or_default();
    let before = status.clone();
    status.interface = Some(info.interface.clone());
    status.local_public_key = Some(info.public_key);
    let (s, reason, message) = match &link {
        None => (
            Status::Unknown,
            "Connecting",
            "waiting for the first link check".to_owned(),
        ),
        Some(l) => {
            status.latest_handshake = l.latest_handshake.and_then(time);
            status.rx_bytes = l.rx_bytes;
            status.tx_bytes = l.tx_bytes;
            match l.state {
                LinkState::Connecting => (Status::Unknown, "Connecting", l.message.clone()),
                LinkState::Connected => (Status::True, "HandshakeRecent", l.message.clone()),
                LinkState::Disconnected => (Status::False, "HandshakeStale", l.message.clone()),
            }
        }
    };
    conditions::set(
        &mut status.conditions,
        TUNNEL_CONNECTED,
        s,
        reason,
        &message,
        current.metadata.generation,
    );
    if status == before {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": Tunnel::api_version(&()),
        "kind": Tunnel::kind(&()),
        "status": status,
    });
    api.patch_status(peer.as_str(), &pp, &Patch::Apply(&body))
        .await
        .map_err(kube_err(format!(
            "writing the status of Tunnel {namespace}/{peer}"
        )))?;
    Ok(())
}

/// The fields of a `TunnelStatus` from a link status (for callers that report links
/// elsewhere, e.g. `liqoctl`).
pub fn tunnel_status(info: &TunnelInfo, link: &LinkStatus) -> TunnelStatus {
    TunnelStatus {
        interface: Some(info.interface.clone()),
        local_public_key: Some(info.public_key),
        latest_handshake: link.latest_handshake.and_then(time),
        rx_bytes: link.rx_bytes,
        tx_bytes: link.tx_bytes,
        conditions: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> liqo_core::Cidr {
        s.parse().unwrap()
    }

    fn local() -> NetworkParameters {
        NetworkParameters::new(c("10.244.0.0/16"), c("10.96.0.0/12"))
    }

    fn view(me: &str, pod: &str, remapped: Option<&str>) -> NetworkConfig {
        let mut nc = NetworkConfig::new(
            me,
            NetworkConfigSpec {
                cluster_id: me.parse().unwrap(),
                remote_pod_cidr: c(pod),
                remote_external_cidr: None,
            },
        );
        nc.status = Some(NetworkConfigStatus {
            remapped_pod_cidr: remapped.map(c),
            ..NetworkConfigStatus::default()
        });
        nc
    }

    #[test]
    fn views_are_checked() {
        let me: ClusterId = "rome".parse().unwrap();
        let ok = check_view(
            &me,
            &local(),
            &view("rome", "10.244.0.0/16", Some("10.71.0.0/16")),
        );
        assert_eq!(ok.state, ViewState::Applied, "{ok:?}");
        assert_eq!(
            ok.mappings,
            vec![CidrMapping::new(c("10.244.0.0/16"), c("10.71.0.0/16")).unwrap()]
        );
        let other = check_view(
            &me,
            &local(),
            &view("milan", "10.244.0.0/16", Some("10.71.0.0/16")),
        );
        assert_eq!(other.state, ViewState::Invalid);
        assert!(other.message.contains("not this one"), "{}", other.message);
        let size = check_view(
            &me,
            &local(),
            &view("rome", "10.244.0.0/16", Some("10.71.0.0/24")),
        );
        assert_eq!(size.state, ViewState::Invalid);
        assert!(size.message.contains("different size"), "{}", size.message);
        let wrong = check_view(
            &me,
            &local(),
            &view("rome", "10.1.0.0/16", Some("10.71.0.0/16")),
        );
        assert_eq!(wrong.state, ViewState::Invalid);
        assert!(
            wrong.message.contains("pod CIDR is 10.1.0.0/16"),
            "{}",
            wrong.message
        );
        let pending = check_view(&me, &local(), &view("rome", "10.244.0.0/16", None));
        assert_eq!(pending.state, ViewState::Missing);
    }

    #[test]
    fn published_view_round_trips_through_the_check() {
        // What milan publishes about rome is what rome accepts.
        let rome: ClusterId = "rome".parse().unwrap();
        let link = PeerLink {
            cluster: rome.clone(),
            remote_mappings: vec![CidrMapping::new(c("10.244.0.0/16"), c("10.70.0.0/16")).unwrap()],
            local_mappings: vec![],
        };
        let nc = view_of(&rome, &local(), &link);
        assert_eq!(nc.name_any(), "rome");
        let v = check_view(&rome, &local(), &nc);
        assert_eq!(v.state, ViewState::Applied);
        assert_eq!(v.mappings, link.remote_mappings);
    }

    #[test]
    fn the_provider_hosts_the_views() {
        let (a, b): (ClusterId, ClusterId) = ("a".parse().unwrap(), "b".parse().unwrap());
        assert_eq!(hosts_views(&a, &b, PeeringRole::Provider), Some(false));
        assert_eq!(hosts_views(&a, &b, PeeringRole::Consumer), Some(true));
        assert_eq!(hosts_views(&a, &b, PeeringRole::None), None);
        // Both: exactly one side hosts.
        assert_ne!(
            hosts_views(&a, &b, PeeringRole::Both),
            hosts_views(&b, &a, PeeringRole::Both)
        );
    }
}
