//! Running async work inside a named network namespace.
//!
//! A gateway lives in its own network namespace (its pod's), while the agent that drives it may
//! live in another one (the host's, where the API servers are). A network namespace belongs to a
//! *thread*, and everything a thread creates is born in the thread's namespace: sockets (rtnetlink,
//! the UDP socket of an in-process WireGuard device), child processes (`nft`, `wireguard-go`) and
//! child threads (the boringtun workers, tokio's blocking pool). So [`Netns`] keeps one dedicated
//! OS thread that enters the namespace (`setns(2)`, safe through `nix`) and then drives a
//! current-thread tokio runtime; [`Netns::run`] spawns a future onto it and returns its result to
//! any runtime. Every task of that runtime, and every blocking thread it starts, lives in the
//! namespace.
//!
//! [`Netns::current`] runs futures on the caller's runtime instead, in the caller's namespace, so
//! code written against [`Netns`] works the same with and without a dedicated namespace.
//!
//! [`NetnsFabric`] puts a whole fabric behind a [`Netns`]: every call of the
//! [`NetworkFabric`] trait runs on the
//! namespace's thread, so it can be handed to peering (`NetworkSource::Fabric`) and to the
//! [`NetworkController`](crate::controller::NetworkController) from the host's runtime.
//!
//! The same rule bites API clients: a `kube::Client` opens its connections (DNS, TCP, TLS)
//! in whatever task polls a request, so one used inside a gateway's namespace connects from
//! there, where the API server is usually unreachable. [`host_client`] pins a client's
//! requests to the host's runtime, so it works from anywhere.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use async_trait::async_trait;
use http::{Request, Response};
use liqo_core::{
    CidrMapping, ClusterId, FabricError, LinkStatus, NetworkFabric, NetworkParameters, PeerLink,
    TunnelInfo,
};
use nix::sched::{CloneFlags, setns};
use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};

/// Where named network namespaces live (`ip netns add <name>` mounts them here).
pub const NETNS_DIR: &str = "/var/run/netns";

/// Errors of [`Netns`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// The namespace could not be entered.
    #[error("network namespace {path}: {message}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// What went wrong and, where known, what to do.
        message: String,
    },
    /// The namespace's thread is gone (its runtime stopped) or the task panicked.
    #[error("network namespace {path}: {message}")]
    Task {
        /// The namespace file, or `current` for the caller's namespace.
        path: String,
        /// What happened to the task.
        message: String,
    },
    /// An API client was to be pinned from a thread in another network namespace than the
    /// process's: its connections would be made there.
    #[error(
        "a Kubernetes client must be made in the process's network namespace ({process}), not in \
         {thread}: make it before entering a gateway's namespace and pass it in"
    )]
    ForeignNamespace {
        /// The process's namespace (its main thread's), as `net:[inode]`.
        process: String,
        /// The calling thread's.
        thread: String,
    },
}

impl From<NetnsError> for FabricError {
    fn from(e: NetnsError) -> Self {
        FabricError::Backend {
            backend: "netns".into(),
            message: e.to_string(),
        }
    }
}

struct Thread {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Thread {
    fn drop(&mut self) {
        // Ends `block_on` on the namespace's thread, which then drops its runtime (and every
        // task still on it). Not joined: a drop may happen on a runtime thread.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct Inner {
    handle: Handle,
    thread: Option<Thread>,
}

/// A place to run async work: a network namespace's dedicated thread, or the caller's runtime.
/// Cheap to clone; the thread stops when the last clone is dropped.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netns").field("path", &self.path()).finish()
    }
}

impl Netns {
    /// Runs futures on the current tokio runtime, in the caller's namespace. Fails outside a
    /// runtime.
    pub fn current() -> Result<Self, NetnsError> {
        let handle = Handle::try_current().map_err(|e| NetnsError::Task {
            path: "current".into(),
            message: format!("not inside a tokio runtime: {e}"),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                handle,
                thread: None,
            }),
        })
    }

    /// `None`: [`current`](Self::current); `Some(path)`: [`enter`](Self::enter).
    pub fn new(path: Option<&Path>) -> Result<Self, NetnsError> {
        match path {
            None => Self::current(),
            Some(p) => Self::enter(p),
        }
    }

    /// The namespace `ip netns` knows as `name` (`/var/run/netns/<name>`).
    pub fn named(name: &str) -> Result<Self, NetnsError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(NetnsError::Enter {
                path: PathBuf::from(name),
                message: "a namespace name is one path component (as in `ip netns add <name>`)"
                    .into(),
            });
        }
        Self::enter(Path::new(NETNS_DIR).join(name))
    }

    /// Starts a thread inside the network namespace at `path` (a file such as
    /// `/var/run/netns/<name>` or `/proc/<pid>/ns/net`) running a current-thread runtime.
    pub fn enter(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let err = |message: String| NetnsError::Enter {
            path: path.clone(),
            message,
        };
        let file = std::fs::File::open(&path).map_err(|e| {
            err(match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "does not exist (create it with `ip netns add`, or give an existing \
                     /proc/<pid>/ns/net)"
                        .to_owned()
                }
                _ => format!("cannot open it: {e}"),
            })
        })?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Handle, String>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let name = format!(
            "netns-{}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    let why = match e {
                        nix::errno::Errno::EINVAL => "is not a network namespace".to_owned(),
                        nix::errno::Errno::EPERM => {
                            "entering it needs CAP_SYS_ADMIN (run as root)".to_owned()
                        }
                        e => format!("setns failed: {e}"),
                    };
                    let _ = ready_tx.send(Err(why));
                    return;
                }
                drop(file);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("starting a runtime: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(rt.handle().clone()));
                // Drives every task spawned through the handle until the last clone is dropped.
                let _ = rt.block_on(stop_rx);
            })
            .map_err(|e| err(format!("spawning its thread: {e}")))?;
        let handle = ready_rx
            .recv()
            .map_err(|_| err("its thread ended before starting".into()))?
            .map_err(err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                handle,
                thread: Some(Thread {
                    path,
                    stop: Some(stop_tx),
                }),
            }),
        })
    }

    /// The namespace file, or `None` for the caller's namespace.
    pub fn path(&self) -> Option<&Path> {
        self.inner.thread.as_ref().map(|t| t.path.as_path())
    }

    fn label(&self) -> String {
        self.path()
            .map_or_else(|| "current".to_owned(), |p| p.display().to_string())
    }

    /// Runs `fut` in the namespace and returns its output. The future and everything it spawns
    /// (tasks, blocking threads, processes, sockets) live in the namespace. Dropping the
    /// returned future does not cancel `fut`.
    pub async fn run<F, T>(&self, fut: F) -> Result<T, NetnsError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        // Keep the thread alive until the task ends, even if every other clone goes.
        let keep = self.clone();
        let task = self.inner.handle.spawn(async move {
            let out = fut.await;
            drop(keep);
            out
        });
        task.await.map_err(|e| NetnsError::Task {
            path: self.label(),
            message: if e.is_panic() {
                "the task panicked".into()
            } else {
                "the namespace's runtime stopped".into()
            },
        })
    }
}

/// The network namespace of the calling thread and of the process (its main thread), as
/// `net:[inode]`.
fn namespaces() -> std::io::Result<(String, String)> {
    let read = |p: &str| std::fs::read_link(p).map(|l| l.to_string_lossy().into_owned());
    Ok((
        read("/proc/thread-self/ns/net")?,
        read("/proc/self/ns/net")?,
    ))
}

/// `client`, changed so that every request it sends (DNS, connect, TLS and the connection's
/// own tasks) runs on the tokio runtime current here, whichever thread, runtime or network
/// namespace later sends it. Refuses outside a runtime and on a thread that is not in the
/// process's network namespace (a [`Netns`] thread), where the connections would be made in
/// the wrong place.
pub fn host_client(client: kube::Client) -> Result<kube::Client, NetnsError> {
    let handle = Handle::try_current().map_err(|e| NetnsError::Task {
        path: "current".into(),
        message: format!("not inside a tokio runtime: {e}"),
    })?;
    let (thread, process) = namespaces().map_err(|e| NetnsError::Task {
        path: "current".into(),
        message: format!("reading /proc/thread-self/ns/net: {e}"),
    })?;
    if thread != process {
        return Err(NetnsError::ForeignNamespace { process, thread });
    }
    let namespace = client.default_namespace().to_owned();
    let valid_until = *client.valid_until();
    Ok(kube::Client::new(OnRuntime { client, handle }, namespace).with_valid_until(valid_until))
}

/// Sends each request from a task of one runtime (see [`host_client`]).
#[derive(Clone)]
struct OnRuntime {
    client: kube::Client,
    handle: Handle,
}

/// Aborts the request's task if its caller gives up on it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Body = kube::client::Body;

impl tower::Service<Request<Body>> for OnRuntime {
    type Response = Response<Body>;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The inner client buffers; readiness is awaited inside the spawned task.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let client = self.client.clone();
        let mut task = AbortOnDrop(self.handle.spawn(async move { client.send(req).await }));
        Box::pin(async move {
            match (&mut task.0).await {
                // Boxed as is: kube unboxes its own error type, so callers see the same errors.
                Ok(res) => res.map_err(Into::into),
                Err(e) => Err(format!("the runtime sending API requests stopped: {e}").into()),
            }
        })
    }
}

/// A fabric living in a network namespace: each call runs there (see the
/// [module docs](self)). Cheap to clone.
pub struct NetnsFabric<F: NetworkFabric> {
    netns: Netns,
    fabric: Arc<F>,
}

impl<F: NetworkFabric> Clone for NetnsFabric<F> {
    fn clone(&self) -> Self {
        Self {
            netns: self.netns.clone(),
            fabric: self.fabric.clone(),
        }
    }
}

impl<F: NetworkFabric> fmt::Debug for NetnsFabric<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetnsFabric")
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

impl<F: NetworkFabric> NetnsFabric<F> {
    /// Builds the fabric inside `netns` with `make` (so its gateway, sockets and processes are
    /// created there) and wraps it.
    pub async fn start<M, Fut>(netns: Netns, make: M) -> Result<Self, FabricError>
    where
        M: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<F, FabricError>> + Send + 'static,
    {
        let fabric = netns.run(async move { make().await }).await??;
        Ok(Self {
            netns,
            fabric: Arc::new(fabric),
        })
    }

    /// Wraps a fabric that was already made inside `netns`.
    pub fn new(netns: Netns, fabric: Arc<F>) -> Self {
        Self { netns, fabric }
    }

    /// The namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The fabric itself. Calling it directly acts in the caller's thread: only for calls that
    /// create nothing (reading cached state).
    pub fn inner(&self) -> &Arc<F> {
        &self.fabric
    }

    async fn call<T, Fut>(&self, f: impl FnOnce(Arc<F>) -> Fut) -> Result<T, FabricError>
    where
        Fut: Future<Output = Result<T, FabricError>> + Send + 'static,
        T: Send + 'static,
    {
        self.netns.run(f(self.fabric.clone())).await?
    }
}

#[async_trait]
impl<F: NetworkFabric> NetworkFabric for NetnsFabric<F> {
    async fn local_parameters(&self) -> Result<NetworkParameters, FabricError> {
        self.call(|f| async move { f.local_parameters().await })
            .await
    }

    async fn connect(
        &self,
        remote: &ClusterId,
        params: &NetworkParameters,
    ) -> Result<PeerLink, FabricError> {
        let (remote, params) = (remote.clone(), params.clone());
        self.call(|f| async move { f.connect(&remote, &params).await })
            .await
    }

    async fn disconnect(&self, remote: &ClusterId) -> Result<(), FabricError> {
        let remote = remote.clone();
        self.call(|f| async move { f.disconnect(&remote).await })
            .await
    }

    async fn status(&self, remote: &ClusterId) -> Result<LinkStatus, FabricError> {
        let remote = remote.clone();
        self.call(|f| async move { f.status(&remote).await }).await
    }

    async fn link_statuses(
        &self,
        peers: &[ClusterId],
    ) -> Result<BTreeMap<ClusterId, LinkStatus>, FabricError> {
        let peers = peers.to_vec();
        self.call(|f| async move { f.link_statuses(&peers).await })
            .await
    }

    async fn set_local_mappings(
        &self,
        cluster: &ClusterId,
        mappings: Vec<CidrMapping>,
    ) -> Result<Option<PeerLink>, FabricError> {
        let cluster = cluster.clone();
        self.call(|f| async move { f.set_local_mappings(&cluster, mappings).await })
            .await
    }

    fn tunnel_info(&self) -> Option<TunnelInfo> {
        self.fabric.tunnel_info()
    }

    async fn shutdown(&self) -> Result<(), FabricError> {
        self.call(|f| async move { f.shutdown().await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_namespace_is_a_clear_error() {
        let e = Netns::named("liqo-no-such-netns").unwrap_err().to_string();
        assert!(
            e.contains("/var/run/netns/liqo-no-such-netns") && e.contains("does not exist"),
            "{e}"
        );
        let e = Netns::named("a/b").unwrap_err().to_string();
        assert!(e.contains("one path component"), "{e}");
        // A file that is not a namespace.
        let e = Netns::enter("/proc/self/status").unwrap_err().to_string();
        assert!(e.contains("not a network namespace"), "{e}");
    }

    fn netns_inode_of_thread() -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    #[tokio::test]
    async fn runs_in_the_namespace_it_entered() {
        let here = netns_inode_of_thread();
        let current = Netns::current().unwrap();
        assert_eq!(
            current
                .run(async { netns_inode_of_thread() })
                .await
                .unwrap(),
            here
        );
        assert!(current.path().is_none());
        // Entering our own namespace through its file: a real thread and a real setns.
        let same = Netns::enter("/proc/self/ns/net").unwrap();
        let (ino, blocking) = same
            .run(async {
                let blocking = tokio::task::spawn_blocking(netns_inode_of_thread)
                    .await
                    .unwrap();
                (netns_inode_of_thread(), blocking)
            })
            .await
            .unwrap();
        assert_eq!((ino, blocking), (here, here));
        let e = same
            .run(async { panic!("boom") })
            .await
            .map(|_: ()| ())
            .unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
        // Still usable after a task panicked.
        assert_eq!(same.run(async { 7 }).await.unwrap(), 7);
    }
}
