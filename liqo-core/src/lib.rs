//! # liqo-core
//!
//! The heart of liqo-rs, a library-first SDK for dynamic, transparent multi-cluster Kubernetes.
//!
//! This crate holds what every part of the system agrees on:
//!
//! - four small async traits, one per concern, that providers implement:
//!   [`Discovery`] (find peers), [`PeeringAuthority`] (prove identities and grant least-privilege
//!   credentials), [`NetworkFabric`] (link pod networks, remap overlapping CIDRs) and
//!   [`ResourceReflector`] (mirror one kind of object between a local and a remote namespace);
//! - the shared domain types: [`ClusterId`], [`ClusterIdentity`], [`PeerAdvertisement`],
//!   [`ResourceOffer`], [`NetworkParameters`], [`Cidr`], [`CidrMapping`];
//! - the custom resources in [`crds`] (`ForeignCluster`, `NamespaceOffloading`, `ResourceOffer`,
//!   `VirtualNode`, `NetworkConfig`, `Tunnel`) with schema validation the API server enforces;
//! - [`info`]: the [`ClusterInfo`] (id, name, peering endpoint, key fingerprint) a cluster
//!   publishes about itself in ConfigMap `liqo-system/liqo-cluster-info`.
//!
//! The Kubernetes-native controllers that run these traits live in the crate of each concern
//! (liqo-discovery, liqo-peering, liqo-net, liqo-vk); the `liqo-runtime` crate composes them, one
//! provider per trait, into an agent.
//!
//! This crate never enables a `k8s-openapi` version feature: the final binary chooses the
//! Kubernetes version.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod backoff;
pub mod conditions;
pub mod crds;
mod discovery;
mod error;
mod fabric;
mod identity;
pub mod info;
pub mod kubeconfig;
mod network;
mod offer;
mod peering;
mod reflector;
#[cfg(feature = "testing")]
pub mod testing;

pub use backoff::{WATCH_BACKOFF_MAX, WATCH_BACKOFF_MIN, watch_backoff};
pub use discovery::{
    Discovery, DiscoveryEvent, DiscoverySource, DiscoveryStream, PROTOCOL_VERSION,
    PeerAdvertisement,
};
pub use error::{BoxError, DiscoveryError, FabricError, ParseError, PeeringError, ReflectionError};
pub use fabric::{LinkState, LinkStatus, NetworkFabric, PeerLink, TunnelInfo};
pub use identity::{ClusterId, ClusterIdentity, KeyFingerprint, PublicKey};
pub use info::ClusterInfo;
pub use kubeconfig::{CredentialError, client_from_kubeconfig};
pub use network::{AddressTranslator, Cidr, CidrMapping, NetworkParameters, WireGuardKey};
pub use offer::ResourceOffer;
pub use peering::{
    Challenge, Credential, Diagnosis, PeeringAuthority, PeeringGrant, PeeringRequest, PeeringTarget,
};
pub use reflector::{ReflectionDirection, ReflectionScope, ResourceReflector};

/// The domain under which every label, annotation, finalizer and API group of liqo-rs lives.
pub const DOMAIN: &str = "liqo.io";

/// Naming conventions both sides of a peering rely on.
pub mod names {
    use crate::ClusterId;

    /// The user name a consumer's credential authenticates as on a provider's API server:
    /// `liqo-consumer-<consumer id>`. The peering authority issues the credential for it; the
    /// provider's agent binds the offloading role to it in each twin namespace.
    ///
    /// ```
    /// let id: liqo_core::ClusterId = "milan".parse().unwrap();
    /// assert_eq!(liqo_core::names::consumer_user(&id), "liqo-consumer-milan");
    /// ```
    pub fn consumer_user(consumer: &ClusterId) -> String {
        format!("liqo-consumer-{consumer}")
    }

    /// The tenant namespace that holds a peer's objects: `liqo-tenant-<peer id>`.
    pub fn tenant_namespace(peer: &ClusterId) -> String {
        format!("liqo-tenant-{peer}")
    }
}

/// Well-known labels and annotations, all under [`DOMAIN`].
pub mod labels {
    /// Marks an object as managed by liqo-rs (value: the managing component).
    pub const MANAGED_BY: &str = "liqo.io/managed-by";
    /// The id of the remote cluster an object belongs to or came from.
    pub const REMOTE_CLUSTER_ID: &str = "liqo.io/remote-cluster-id";
    /// The id of the cluster that created an object (set on reflected objects).
    pub const ORIGIN_CLUSTER_ID: &str = "liqo.io/origin-cluster-id";
    /// `virtual-node` on nodes that stand for a remote cluster.
    pub const TYPE: &str = "liqo.io/type";
    /// Value of [`TYPE`] on virtual nodes.
    pub const TYPE_VIRTUAL_NODE: &str = "virtual-node";
    /// Tenant namespaces carry this label with the consumer's cluster id.
    pub const TENANT_NAMESPACE: &str = "liqo.io/tenant-namespace";
    /// Annotation that stops reflection of one object (value `true`).
    pub const SKIP_REFLECTION: &str = "liqo.io/skip-reflection";
    /// Finalizer that liqo-rs controllers put on objects they must clean up after.
    pub const FINALIZER: &str = "liqo.io/cleanup";
}
