//! The error type of the lab.

use std::path::PathBuf;

/// Everything that can go wrong while starting, driving or stopping a lab.
///
/// Each variant names what failed and where: the cluster (or the lab's shared etcd), the
/// component, and for process failures the path of the component's log with its last lines.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// The [`LabSpec`](crate::LabSpec) or one of its clusters is not usable.
    #[error("invalid lab spec: {0}")]
    InvalidSpec(String),

    /// The etcd / Kubernetes / kwok binaries could not be found or built.
    #[error("lab binaries: {0}")]
    Binaries(String),

    /// A file-system operation failed.
    #[error("{action} {}: {source}", .path.display())]
    Io {
        /// What was being done, e.g. "writing".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// No port of the lab's range could be reserved.
    #[error(
        "no free TCP port on 127.0.0.1 in {first}..={last} (reservations in {})",
        .dir.display()
    )]
    NoFreePort {
        /// First port of the range.
        first: u16,
        /// Last port of the range.
        last: u16,
        /// The directory holding the reservation files.
        dir: PathBuf,
    },

    /// Generating a key, certificate or certificate request failed.
    #[error("generating {what} for {owner}: {source}")]
    Pki {
        /// Which cluster (or user) the material was for.
        owner: String,
        /// What was generated, e.g. "the apiserver serving certificate".
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },

    /// A component process could not be spawned.
    #[error(
        "starting {component} of {owner} ({}) failed: {source}; log: {}",
        .binary.display(),
        .log.display()
    )]
    Spawn {
        /// `cluster "name"` or `the lab` (for etcd).
        owner: String,
        /// The component, e.g. `kube-apiserver`.
        component: String,
        /// The binary that was run.
        binary: PathBuf,
        /// The component's log file.
        log: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A component process exited while the lab waited for it (or another component) to be ready.
    #[error("{0}")]
    Exited(Box<ComponentFailure>),

    /// A component did not become ready in time.
    #[error("{0}")]
    Timeout(Box<ComponentFailure>),

    /// A Kubernetes API call failed.
    #[error("Kubernetes API of {owner} failed while {action}: {source}")]
    Kube {
        /// `cluster "name"`.
        owner: String,
        /// What the lab was doing, e.g. "creating node lab-a-worker-0".
        action: String,
        /// The underlying error.
        #[source]
        source: kube::Error,
    },

    /// A manifest (YAML file or one of its documents) could not be read or applied.
    #[error("manifest {what}: {message}")]
    Manifest {
        /// The file and document, or the object (`Kind name`).
        what: String,
        /// What went wrong.
        message: String,
    },

    /// A kubeconfig could not be loaded or turned into a client configuration.
    #[error("kubeconfig {}: {source}", .path.display())]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: kube::config::KubeconfigError,
    },

    /// A kubeconfig could not be rendered.
    #[error("rendering the kubeconfig {}: {source}", .path.display())]
    RenderKubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_yaml_ng::Error,
    },

    /// The lab's state file (`lab.json`) is unreadable or inconsistent.
    #[error("lab state {}: {message}", .path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A lab is already running in the requested root directory.
    #[error("a lab is already up in {}: {detail}", .root.display())]
    AlreadyUp {
        /// The root (state) directory.
        root: PathBuf,
        /// Which processes are still alive.
        detail: String,
    },

    /// A component was asked to start while it is running.
    #[error("{component} of {owner} is already running (pid {pid})")]
    AlreadyRunning {
        /// `cluster "name"`.
        owner: String,
        /// The component.
        component: String,
        /// Its process id.
        pid: u32,
    },

    /// Stopping a component failed.
    #[error("stopping {component} of {owner} (pid {pid}): {source}")]
    Stop {
        /// `cluster "name"` or `the lab` (for etcd).
        owner: String,
        /// The component.
        component: String,
        /// Its process id.
        pid: u32,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A function that needs a Tokio runtime was called outside of one.
    #[error("{0} must be called inside a Tokio runtime")]
    NoRuntime(&'static str),

    /// A network command of the data plane (`ip ...`) failed.
    #[error("data plane: `{command}` failed: {message}")]
    NetCommand {
        /// The command line that was run.
        command: String,
        /// Its standard error, or why it could not run.
        message: String,
    },

    /// The data plane could not start, run or stop (see [`DataPlane`](crate::DataPlane)).
    #[error("data plane: {0}")]
    DataPlane(String),

    /// A command run in a pod (see [`exec_in_pod`](crate::exec_in_pod)) failed or never printed
    /// what was expected.
    #[error("`{script}` in pod {pod}: {message}")]
    Exec {
        /// The pod.
        pod: String,
        /// The shell script.
        script: String,
        /// What went wrong.
        message: String,
    },

    /// A real node (kubelet, containerd, kube-proxy in a network namespace of its own) could not be
    /// set up, started or removed; the message names the node and the step.
    #[error("real node: {0}")]
    Nodes(String),

    /// No network namespace exists for the pod: it is not labelled
    /// [`NETNS_LABEL`](crate::NETNS_LABEL)`=true`, not bound to a lab worker node, has no IP yet,
    /// or the data plane does not serve its cluster.
    #[error(
        "no network namespace for pod {namespace}/{pod} in cluster {cluster:?} (is the data plane \
         running, and is the pod labelled lab.liqo.io/netns=true, Running on a lab worker node \
         and given an IPv4 address?)"
    )]
    NoPodNetwork {
        /// The cluster.
        cluster: String,
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        pod: String,
    },

    /// An HTTP request made from inside a pod's network namespace failed.
    #[error("HTTP GET {url} from network namespace {netns}: {message}")]
    Http {
        /// The network namespace the request was made from.
        netns: String,
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },

    /// An OCI image could not be built (see [`write_oci_archive`](crate::write_oci_archive)):
    /// its spec is not usable or its layer could not be written.
    #[error("OCI image {image}: {message}")]
    Image {
        /// The image reference name.
        image: String,
        /// What is wrong.
        message: String,
    },

    /// A host file to be copied into an OCI image could not be read.
    #[error("OCI image {image}: reading {} for {entry}: {source}", .host_path.display())]
    ImageSource {
        /// The image reference name.
        image: String,
        /// The path of the entry inside the image.
        entry: String,
        /// The host file.
        host_path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The busybox the lab's images are made of is missing or not a static binary (see
    /// [`busybox_image`](crate::busybox_image)).
    #[error(
        "busybox {}: {message}; the lab's images need a static busybox: install the Debian \
         package busybox-static",
        .path.display()
    )]
    Busybox {
        /// The busybox binary looked at.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// The process-wide shared lab (see [`shared`](crate::shared)) failed to start earlier.
    #[error("the shared lab failed to start: {0}")]
    Shared(String),
}

/// Where and why a component failed: the details of [`LabError::Exited`] and
/// [`LabError::Timeout`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ComponentFailure {
    /// `cluster "name"` or `the lab` (for etcd).
    pub owner: String,
    /// The component, e.g. `kube-apiserver`.
    pub component: String,
    /// What the lab was doing, e.g. `waiting for /readyz`.
    pub phase: String,
    /// What went wrong, e.g. `exited (exit status: 1)` or `timed out after 240s (last check: ...)`.
    pub reason: String,
    /// The component's log file.
    pub log: PathBuf,
    /// The last lines of the log.
    pub tail: String,
}

impl std::fmt::Display for ComponentFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} {} while {}; log {}, last lines:\n{}",
            self.component,
            self.owner,
            self.reason,
            self.phase,
            self.log.display(),
            self.tail
        )
    }
}

impl LabError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the lab.
pub type Result<T, E = LabError> = std::result::Result<T, E>;
