//! The consumer's agent: virtual nodes, namespace offloading, pod offloading and reflection.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::{StreamExt, channel::mpsc};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, ResourceExt,
    runtime::{
        WatchStreamExt, predicates,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use liqo_core::{
    ClusterId, ResourceReflector,
    crds::{NamespaceOffloading, RemoteNamespace, VirtualNode},
    labels,
};
use tokio_util::sync::CancellationToken;

use crate::{
    VkError,
    links::{AddressTranslation, StaticTranslation},
    offloading,
    pods::PodReflector,
    reflections::Reflections,
    virtual_node, webhook,
};

/// Tunables of the consumer agent.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How often the provider is probed and the node Lease renewed.
    pub heartbeat: Duration,
    /// How long the provider may not answer before the virtual node turns NotReady.
    pub probe_timeout: Duration,
    /// How often the Node's status is rewritten even without change (its heartbeat time).
    pub node_status_every: Duration,
    /// Where the pod webhook listens (`None`: no webhook; pods then need the toleration and
    /// affinity in their manifests).
    pub webhook: Option<SocketAddr>,
    /// How the API server reaches the webhook: `None` (default) registers the bound address as
    /// a URL (the agent runs where the API server can dial it); an agent in a pod binds
    /// `0.0.0.0:<port>` and names the Service in front of it here.
    pub webhook_service: Option<webhook::WebhookService>,
    /// Concurrent reconciles of each kube-runtime controller.
    pub controller_concurrency: u16,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(5),
            node_status_every: Duration::from_secs(60),
            webhook: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            webhook_service: None,
            controller_concurrency: 8,
        }
    }
}

/// One connected provider: its client and what runs for it.
pub(crate) struct Session {
    pub(crate) cluster: ClusterId,
    pub(crate) remote: kube::Client,
    /// The consumer's tenant namespace on the provider (the credential's default namespace).
    pub(crate) tenant: String,
    pub(crate) kubeconfig_digest: String,
    pub(crate) reachable: std::sync::atomic::AtomicBool,
    pub(crate) remote_namespaces: Store<RemoteNamespace>,
    pub(crate) node_uid: RwLock<Option<String>>,
    pub(crate) cancel: CancellationToken,
}

/// Shared by the consumer's controllers.
pub(crate) struct Ctx {
    pub(crate) local: kube::Client,
    pub(crate) me: ClusterId,
    pub(crate) config: ConsumerConfig,
    pub(crate) sessions: RwLock<HashMap<ClusterId, Arc<Session>>>,
    pub(crate) reflections: Reflections,
    pub(crate) virtual_nodes: Store<Node>,
    /// Re-reconcile one VirtualNode (reachability changed, heartbeat).
    pub(crate) vn_tx: mpsc::UnboundedSender<ObjectRef<VirtualNode>>,
    /// Re-reconcile one NamespaceOffloading (its RemoteNamespace changed on a provider).
    pub(crate) nso_tx: mpsc::UnboundedSender<ObjectRef<NamespaceOffloading>>,
    /// Re-reconcile every NamespaceOffloading (a provider came or went).
    pub(crate) nso_all_tx: mpsc::UnboundedSender<()>,
    pub(crate) shutdown: CancellationToken,
}

impl Ctx {
    pub(crate) fn session(&self, id: &ClusterId) -> Option<Arc<Session>> {
        self.sessions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    pub(crate) fn all_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// Builds a [`ConsumerAgent`].
#[must_use]
pub struct ConsumerAgentBuilder {
    local: kube::Client,
    me: ClusterId,
    reflectors: Vec<Arc<dyn ResourceReflector>>,
    translation: Arc<dyn AddressTranslation>,
    config: ConsumerConfig,
    pod_reflector: Option<PodReflector>,
}

impl std::fmt::Debug for ConsumerAgentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerAgentBuilder")
            .field("me", &self.me)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ConsumerAgentBuilder {
    /// Adds a reflector, run for every offloaded namespace pair.
    pub fn reflector(mut self, r: impl ResourceReflector) -> Self {
        self.reflectors.push(Arc::new(r));
        self
    }

    /// Adds reflectors already shared.
    pub fn reflectors(mut self, rs: impl IntoIterator<Item = Arc<dyn ResourceReflector>>) -> Self {
        self.reflectors.extend(rs);
        self
    }

    /// Where address translation comes from (default: identity for every provider).
    pub fn translation(mut self, t: impl AddressTranslation) -> Self {
        self.translation = Arc::new(t);
        self
    }

    /// Overrides the tunables.
    pub fn config(mut self, config: ConsumerConfig) -> Self {
        self.config = config;
        self
    }

    /// Replaces the built-in pod reflector (e.g. to tune its workers).
    pub fn pod_reflector(mut self, p: PodReflector) -> Self {
        self.pod_reflector = Some(p);
        self
    }

    /// The agent.
    pub fn build(self) -> ConsumerAgent {
        let mut reflectors = self.reflectors;
        reflectors.push(Arc::new(
            self.pod_reflector
                .unwrap_or_else(|| PodReflector::new(self.me.clone())),
        ));
        ConsumerAgent {
            local: self.local,
            me: self.me,
            reflectors,
            translation: self.translation,
            config: self.config,
        }
    }
}

/// The consumer side of liqo-vk: one virtual node per `VirtualNode`, namespace offloading, pod
/// offloading and every reflector, until shutdown.
///
/// ```no_run
/// # async fn demo(client: kube::Client) -> Result<(), liqo_vk::VkError> {
/// let agent = liqo_vk::ConsumerAgent::builder(client, "milan".parse().unwrap()).build();
/// agent.run(async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
pub struct ConsumerAgent {
    local: kube::Client,
    me: ClusterId,
    reflectors: Vec<Arc<dyn ResourceReflector>>,
    translation: Arc<dyn AddressTranslation>,
    config: ConsumerConfig,
}

impl std::fmt::Debug for ConsumerAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerAgent")
            .field("me", &self.me)
            .field(
                "reflectors",
                &self
                    .reflectors
                    .iter()
                    .map(|r| r.kind().to_owned())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl ConsumerAgent {
    /// An agent for the consumer cluster `me`, reached with `local` (it needs to manage nodes,
    /// leases, pods, their status, the offloaded kinds and a MutatingWebhookConfiguration).
    pub fn builder(local: kube::Client, me: ClusterId) -> ConsumerAgentBuilder {
        ConsumerAgentBuilder {
            local,
            me,
            reflectors: vec![],
            translation: Arc::new(StaticTranslation::identity()),
            config: ConsumerConfig::default(),
            pod_reflector: None,
        }
    }

    /// Runs until `shutdown` resolves. On shutdown reflection stops but nothing is deleted:
    /// remote pods keep running and a restarted agent converges again.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), VkError> {
        let cancel = CancellationToken::new();
        let (vn_tx, vn_rx) = mpsc::unbounded();
        let (nso_tx, nso_rx) = mpsc::unbounded();
        let (nso_all_tx, nso_all_rx) = mpsc::unbounded();

        // Virtual nodes as the scheduler sees them: what the cluster selectors match against.
        let (virtual_nodes, nodes_w) = reflector::store();
        let node_api: Api<Node> = Api::all(self.local.clone());
        let all_tx = nso_all_tx.clone();
        let nodes = reflector::reflector(
            nodes_w,
            watcher(
                node_api,
                watcher::Config::default().labels(&format!(
                    "{}={}",
                    labels::TYPE,
                    labels::TYPE_VIRTUAL_NODE
                )),
            )
            .backoff(liqo_core::watch_backoff()),
        )
        .applied_objects()
        .predicate_filter(predicates::labels, Default::default())
        .for_each(move |_| {
            let _ = all_tx.unbounded_send(());
            futures::future::ready(())
        });
        let offloading_ctl = offloading::controller(self.local.clone());
        // The webhook's own view of the offloadings: it waits for the first listing, and a
        // kube-runtime store wakes only one waiter (the controller already is one).
        let (offloadings, offloadings_w) = reflector::store();
        let offloadings_watch = reflector::reflector(
            offloadings_w,
            watcher(
                Api::<NamespaceOffloading>::all(self.local.clone()),
                watcher::Config::default(),
            )
            .backoff(liqo_core::watch_backoff()),
        )
        .for_each(|_| futures::future::ready(()));

        let ctx = Arc::new(Ctx {
            local: self.local.clone(),
            me: self.me.clone(),
            config: self.config.clone(),
            sessions: RwLock::new(HashMap::new()),
            reflections: Reflections::new(
                self.reflectors.clone(),
                self.local.clone(),
                self.translation.clone(),
                cancel.clone(),
            ),
            virtual_nodes,
            vn_tx,
            nso_tx,
            nso_all_tx,
            shutdown: cancel.clone(),
        });

        let webhook = match self.config.webhook {
            Some(addr) => Some(
                webhook::serve(
                    self.local.clone(),
                    &self.me,
                    addr,
                    self.config.webhook_service.clone(),
                    offloadings,
                    cancel.clone(),
                )
                .await?,
            ),
            None => None,
        };

        // A changed address translation (a network link made) re-reconciles every offloading,
        // which restarts the reflections whose translator changed.
        let changes = self.translation.changes();
        let translation_tx = ctx.nso_all_tx.clone();
        let translation_changes = async move {
            let Some(mut rx) = changes else {
                return futures::future::pending().await;
            };
            while rx.changed().await.is_ok() {
                let _ = translation_tx.unbounded_send(());
            }
            // The source is gone with its network controller: nothing changes any more.
            futures::future::pending::<()>().await
        };
        let vn = virtual_node::run(ctx.clone(), vn_rx);
        let nso = offloading::run(offloading_ctl, ctx.clone(), nso_rx, nso_all_rx);
        tracing::info!(cluster = %self.me, "consumer agent started");
        tokio::select! {
            () = shutdown => {}
            () = vn => tracing::warn!("virtual node controller ended"),
            () = nso => tracing::warn!("offloading controller ended"),
            () = nodes => tracing::warn!("virtual node watch ended"),
            () = offloadings_watch => tracing::warn!("offloading watch ended"),
            () = translation_changes => {}
        }
        cancel.cancel();
        ctx.reflections.halt().await;
        for s in ctx.all_sessions() {
            s.cancel.cancel();
        }
        if let Some(w) = webhook {
            let _ = w.await;
        }
        tracing::info!(cluster = %self.me, "consumer agent stopped");
        Ok(())
    }
}

/// The local namespace's offloaded pods on `node`, deleted at once (their remote twins are gone
/// with the twin namespace); their controllers recreate them where they may run now.
pub(crate) async fn delete_pods_on_node(
    local: &kube::Client,
    namespace: &str,
    node: &str,
) -> Result<(), VkError> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{DeleteParams, ListParams};
    let api: Api<Pod> = Api::namespaced(local.clone(), namespace);
    let pods = api
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(|e| VkError::kube(format!("listing pods of {namespace} on {node}"), e))?;
    for p in pods {
        match api
            .delete(&p.name_any(), &DeleteParams::default().grace_period(0))
            .await
        {
            Ok(_) => {}
            Err(e) if crate::error::is_not_found(&e) => {}
            Err(e) => {
                return Err(VkError::kube(
                    format!("deleting pod {namespace}/{}", p.name_any()),
                    e,
                ));
            }
        }
    }
    Ok(())
}
