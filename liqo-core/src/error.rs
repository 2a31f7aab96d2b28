//! Typed errors, one per concern, so a caller can tell a refused peering from a broken tunnel.

use crate::ClusterId;

/// A boxed error a provider may wrap when its cause has no variant of its own.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A value that could not be parsed: says what was wrong and which input it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct ParseError {
    /// What was being parsed, e.g. "cluster id" or "CIDR".
    pub what: &'static str,
    /// The rejected input (truncated to 100 characters).
    pub input: String,
    /// Why it was rejected.
    pub reason: String,
}

impl ParseError {
    pub(crate) fn new(what: &'static str, input: &str, reason: impl Into<String>) -> Self {
        let input = if input.chars().count() > 100 {
            let mut s: String = input.chars().take(100).collect();
            s.push('…');
            s
        } else {
            input.to_owned()
        };
        Self {
            what,
            input,
            reason: reason.into(),
        }
    }
}

/// Errors of a [`Discovery`](crate::Discovery) provider.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// A record received from the network was malformed; it was ignored.
    #[error("malformed discovery record from {origin}: {reason}")]
    MalformedRecord {
        /// Where the record came from (an address, a DNS name, a file path).
        origin: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The provider could not start or lost its transport (socket, resolver, file).
    #[error("discovery source {source_name} is unavailable: {message}")]
    Unavailable {
        /// The provider's name.
        source_name: String,
        /// What failed.
        message: String,
    },
    /// Any other provider-specific failure.
    #[error(transparent)]
    Other(#[from] BoxError),
}

/// Errors of a [`PeeringAuthority`](crate::PeeringAuthority) provider.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeeringError {
    /// The peer could not prove its identity (bad signature, unknown or replayed nonce, wrong id).
    #[error("authentication of cluster {cluster} failed: {reason}")]
    Unauthenticated {
        /// The cluster that claimed the identity.
        cluster: ClusterId,
        /// Why the proof was rejected.
        reason: String,
    },
    /// The provider's policy refused the request (not listed, awaiting manual approval, cordoned).
    #[error("peering with cluster {cluster} was refused: {reason}")]
    Refused {
        /// The cluster that asked.
        cluster: ClusterId,
        /// The policy's reason.
        reason: String,
    },
    /// There is no peering with that cluster.
    #[error("no peering with cluster {0}")]
    NotPeered(ClusterId),
    /// The provider could not be reached.
    #[error("peering endpoint {endpoint} is unreachable: {message}")]
    Unreachable {
        /// The endpoint that was tried.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// Input the authority was handed is malformed or inconsistent (a peering bundle, a field
    /// of a peer's answer): `what` names the input and field, `reason` what is wrong with it.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The input and field, e.g. `peering bundle liqo-system/b: field credential.kubeconfig`.
        what: String,
        /// What is wrong and, where known, how to fix it.
        reason: String,
    },
    /// A Kubernetes API call failed while granting or revoking.
    #[error("kubernetes API error while {action}: {source}")]
    Kube {
        /// What the authority was doing.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Any other provider-specific failure.
    #[error(transparent)]
    Other(#[from] BoxError),
}

/// Errors of a [`NetworkFabric`](crate::NetworkFabric) provider.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FabricError {
    /// No free CIDR is left in the remapping pools.
    #[error("address pool exhausted: no free /{prefix_len} left for cluster {cluster} in {pools}")]
    PoolExhausted {
        /// The cluster that needed a range.
        cluster: ClusterId,
        /// The prefix length that was asked for.
        prefix_len: u8,
        /// The pools that were searched, comma separated.
        pools: String,
    },
    /// The configuration is invalid (bad key, CIDR clashing with a reserved range, ...).
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// The data plane backend is missing or failed (e.g. no kernel WireGuard module).
    #[error("{backend} backend: {message}")]
    Backend {
        /// Which backend, e.g. "wireguard-kernel".
        backend: String,
        /// What failed and, where known, what to do.
        message: String,
    },
    /// There is no link with that cluster.
    #[error("no link with cluster {0}")]
    NotConnected(ClusterId),
    /// An address has no translation for that cluster.
    #[error("address {address} is outside every CIDR mapped for cluster {cluster}")]
    Untranslatable {
        /// The cluster whose mappings were searched.
        cluster: ClusterId,
        /// The address.
        address: std::net::IpAddr,
    },
    /// Any other provider-specific failure.
    #[error(transparent)]
    Other(#[from] BoxError),
}

/// Errors of a [`ResourceReflector`](crate::ResourceReflector).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReflectionError {
    /// A Kubernetes API call failed.
    #[error("reflecting {kind} {namespace}/{name}: {source}")]
    Kube {
        /// The kind being reflected.
        kind: String,
        /// The namespace of the object.
        namespace: String,
        /// The object's name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// An object could not be translated for the other side (e.g. an address without mapping).
    #[error("cannot reflect {kind} {namespace}/{name}: {reason}")]
    Translate {
        /// The kind being reflected.
        kind: String,
        /// The namespace of the object.
        namespace: String,
        /// The object's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A watch stream failed for good.
    #[error("watch of {kind} failed: {message}")]
    Watch {
        /// The kind being watched.
        kind: String,
        /// What failed.
        message: String,
    },
    /// Any other failure.
    #[error(transparent)]
    Other(#[from] BoxError),
}
