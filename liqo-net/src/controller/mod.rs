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
    time::Duration,
};

use futures::{StreamExt, channel::mpsc};
use kube::{
    Api, Client, ResourceExt,
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use liqo_core::{
    ClusterId, FabricError, NetworkFabric, NetworkParameters,
    crds::{ForeignCluster, NetworkConfig},
};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::checker::LinkChecker;

mod links;
mod reconcile;
mod tunnel;
mod view;

pub use links::{LinkSnapshot, Links, ViewState, ViewStatus};
pub use tunnel::tunnel_status;
pub use view::{check_view, view_of};

use links::Recording;
use view::Exchange;

/// The finalizer held on a `ForeignCluster` while its peer is connected.
pub const FINALIZER: &str = "liqo.io/network";
/// The field manager of everything this controller writes.
pub const FIELD_MANAGER: &str = "liqo-net";
/// The Secret key holding the peering kubeconfig.
pub const KUBECONFIG_KEY: &str = "kubeconfig";
/// The condition type of a `Tunnel`.
pub const TUNNEL_CONNECTED: &str = "Connected";
/// Value of [`liqo_core::labels::MANAGED_BY`] on objects this controller makes.
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
            .run(reconcile::reconcile, error_policy, ctx.clone())
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
