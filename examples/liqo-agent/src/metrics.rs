//! Prometheus metrics and the health endpoints, on one small HTTP server.
//!
//! Gauges are computed at scrape time from kube-runtime stores fed by watches (peers from
//! `ForeignCluster`s, tunnels from `Tunnel`s, virtual nodes and offloaded pods), plus the
//! reflection engine's queue depths; reconcile latency is a histogram fed by the engine's
//! [`liqo_vk::queue::QueueObserver`] hook.
//!
//! - `/metrics`: the Prometheus text format;
//! - `/healthz`: 200 while the process serves;
//! - `/readyz`: 200 when the controllers started and the local API server answers, else 503
//!   with the reason.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use liqo_core::{
    crds::{ForeignCluster, Tunnel},
    labels,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(String, String)>;

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    peers: Family<Labels, Gauge>,
    peer_conditions: Family<Labels, Gauge>,
    tunnel_up: Family<Labels, Gauge>,
    tunnel_bytes: Family<Labels, Gauge>,
    virtual_nodes: Family<Labels, Gauge>,
    offloaded_pods: Family<Labels, Gauge>,
    queue_depth: Family<Labels, Gauge>,
    reconcile_seconds: Family<Labels, Histogram>,
    stores: std::sync::Mutex<Option<Stores>>,
    /// One scrape at a time: a scrape clears and refills the gauges, and a concurrent one
    /// would otherwise encode them half-filled.
    scrape: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Stores {
    foreign_clusters: Store<ForeignCluster>,
    tunnels: Store<Tunnel>,
    nodes: Store<Node>,
    pods: Store<Pod>,
}

struct Observer(Arc<Metrics>);

impl liqo_vk::queue::QueueObserver for Observer {
    fn reconciled(&self, label: &str, elapsed: Duration, ok: bool) {
        self.0
            .reconcile_seconds
            .get_or_create(&vec![
                ("kind".into(), label.into()),
                ("result".into(), if ok { "ok" } else { "error" }.into()),
            ])
            .observe(elapsed.as_secs_f64());
    }
}

impl Metrics {
    /// Registers every metric and installs the reflection observer (once per process).
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("liqo");
        let peers = Family::<Labels, Gauge>::default();
        registry.register(
            "peers",
            "Known peers (one per ForeignCluster), by established role",
            peers.clone(),
        );
        let peer_conditions = Family::<Labels, Gauge>::default();
        registry.register(
            "peer_condition",
            "Conditions of each peer's ForeignCluster (1 for the current status)",
            peer_conditions.clone(),
        );
        let tunnel_up = Family::<Labels, Gauge>::default();
        registry.register(
            "tunnel_up",
            "Whether each tunnel is connected (Tunnel condition Connected)",
            tunnel_up.clone(),
        );
        let tunnel_bytes = Family::<Labels, Gauge>::default();
        registry.register(
            "tunnel_bytes",
            "Bytes through each tunnel, by direction (rx, tx)",
            tunnel_bytes.clone(),
        );
        let virtual_nodes = Family::<Labels, Gauge>::default();
        registry.register(
            "virtual_node_ready",
            "Virtual nodes and whether they are Ready",
            virtual_nodes.clone(),
        );
        let offloaded_pods = Family::<Labels, Gauge>::default();
        registry.register(
            "offloaded_pods",
            "Pods bound to each virtual node",
            offloaded_pods.clone(),
        );
        let queue_depth = Family::<Labels, Gauge>::default();
        registry.register(
            "reflection_queue_depth",
            "Keys waiting or being reconciled in the reflection queues, by kind",
            queue_depth.clone(),
        );
        let reconcile_seconds = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "reflection_reconcile_seconds",
            "Latency of one reflection reconcile, by kind and result",
            reconcile_seconds.clone(),
        );
        let metrics = Arc::new(Self {
            registry,
            peers,
            peer_conditions,
            tunnel_up,
            tunnel_bytes,
            virtual_nodes,
            offloaded_pods,
            queue_depth,
            reconcile_seconds,
            stores: std::sync::Mutex::new(None),
            scrape: std::sync::Mutex::new(()),
        });
        if !liqo_vk::queue::set_observer(Arc::new(Observer(metrics.clone()))) {
            tracing::debug!("a reflection observer is already installed");
        }
        metrics
    }

    /// Watches what the gauges are computed from until `cancel` fires.
    pub fn watch(self: &Arc<Self>, client: kube::Client, cancel: CancellationToken) {
        fn spawn<K>(api: Api<K>, config: watcher::Config, cancel: CancellationToken) -> Store<K>
        where
            K: kube::Resource<DynamicType = ()>
                + Clone
                + std::fmt::Debug
                + serde::de::DeserializeOwned
                + Send
                + Sync
                + 'static,
        {
            let (store, writer) = reflector::store();
            let stream = reflector::reflector(
                writer,
                watcher(api, config).backoff(liqo_core::watch_backoff()),
            )
            .for_each(|_| futures::future::ready(()));
            tokio::spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = stream => {}
                }
            });
            store
        }
        let virtual_nodes = format!("{}={}", labels::TYPE, labels::TYPE_VIRTUAL_NODE);
        let stores = Stores {
            foreign_clusters: spawn(
                Api::all(client.clone()),
                watcher::Config::default(),
                cancel.clone(),
            ),
            tunnels: spawn(
                Api::all(client.clone()),
                watcher::Config::default(),
                cancel.clone(),
            ),
            nodes: spawn(
                Api::all(client.clone()),
                watcher::Config::default().labels(&virtual_nodes),
                cancel.clone(),
            ),
            // Offloaded pods are the ones bound to virtual nodes; the node names are only known
            // at scrape time, so watch running pods and count per node.
            pods: spawn(
                Api::all(client),
                watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed"),
                cancel,
            ),
        };
        *self.stores.lock().unwrap_or_else(|e| e.into_inner()) = Some(stores);
    }

    /// The text exposition, computed now.
    pub fn render(&self) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh();
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    fn refresh(&self) {
        let stores = self
            .stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.queue_depth.clear();
        for (kind, depth) in liqo_vk::queue::depths() {
            self.queue_depth
                .get_or_create(&vec![("kind".into(), kind)])
                .set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
        let Some(stores) = stores else { return };
        self.peers.clear();
        self.peer_conditions.clear();
        for fc in stores.foreign_clusters.state() {
            let peer = fc.spec.cluster_id.to_string();
            let status = fc.status.clone().unwrap_or_default();
            self.peers
                .get_or_create(&vec![
                    ("peer".into(), peer.clone()),
                    (
                        "name".into(),
                        fc.spec.cluster_name.clone().unwrap_or_default(),
                    ),
                    ("role".into(), format!("{:?}", status.role)),
                    ("desired_role".into(), format!("{:?}", fc.spec.role)),
                ])
                .set(1);
            for c in &status.conditions {
                self.peer_conditions
                    .get_or_create(&vec![
                        ("peer".into(), peer.clone()),
                        ("type".into(), c.type_.clone()),
                        ("status".into(), c.status.clone()),
                    ])
                    .set(1);
            }
        }
        self.tunnel_up.clear();
        self.tunnel_bytes.clear();
        for t in stores.tunnels.state() {
            let peer = t.spec.cluster_id.to_string();
            let status = t.status.clone().unwrap_or_default();
            let up = status
                .conditions
                .iter()
                .any(|c| c.type_ == liqo_net::controller::TUNNEL_CONNECTED && c.status == "True");
            self.tunnel_up
                .get_or_create(&vec![("peer".into(), peer.clone())])
                .set(i64::from(up));
            for (dir, v) in [("rx", status.rx_bytes), ("tx", status.tx_bytes)] {
                self.tunnel_bytes
                    .get_or_create(&vec![
                        ("peer".into(), peer.clone()),
                        ("direction".into(), dir.into()),
                    ])
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
        self.virtual_nodes.clear();
        self.offloaded_pods.clear();
        for n in stores.nodes.state() {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let name = n.name_any();
            let peer = n
                .labels()
                .get(labels::REMOTE_CLUSTER_ID)
                .cloned()
                .unwrap_or_default();
            self.virtual_nodes
                .get_or_create(&vec![
                    ("node".into(), name.clone()),
                    ("peer".into(), peer.clone()),
                ])
                .set(i64::from(ready));
            let count = stores
                .pods
                .state()
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&name))
                .count();
            self.offloaded_pods
                .get_or_create(&vec![("node".into(), name), ("peer".into(), peer)])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// What `/readyz` reports on.
#[derive(Clone)]
pub struct Readiness {
    started: Arc<AtomicBool>,
    client: kube::Client,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// Not ready until [`Readiness::set_started`].
    pub fn new(client: kube::Client) -> Self {
        Self {
            started: Arc::new(AtomicBool::new(false)),
            client,
        }
    }

    /// The controllers are running.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    async fn check(&self) -> Result<(), String> {
        if !self.started.load(Ordering::SeqCst) {
            return Err("controllers not started yet".into());
        }
        match tokio::time::timeout(Duration::from_secs(3), self.client.apiserver_version()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("the local API server does not answer: {e}")),
            Err(_) => Err("the local API server does not answer within 3s".into()),
        }
    }
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until `cancel` fires; returns the
/// bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    // A few scrapers and probes at a time; more wait in the accept backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    let task = tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                () = cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (tcp, _) = tokio::select! {
                () = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a metrics connection failed");
                        continue;
                    }
                },
            };
            let (metrics, readiness) = (metrics.clone(), readiness.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (metrics, readiness) = (metrics.clone(), readiness.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                route(&req, &metrics, &readiness).await,
                            )
                        }
                    });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            });
        }
    });
    Ok((local, task))
}

async fn route<B>(
    req: &Request<B>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    };
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness.check().await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
