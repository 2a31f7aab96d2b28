//! # liqo-vk
//!
//! The virtual kubelet of liqo-rs: remote clusters as virtual nodes, namespaces and pods
//! offloaded to them transparently, and the generic reflection engine reflector providers are
//! built on.
//!
//! - [`ConsumerAgent`] runs on the consumer: one `Node` (plus Lease heartbeat) per
//!   `VirtualNode`, the `NamespaceOffloading` controller (twin namespaces on the selected
//!   providers), a mutating pod webhook (pods of offloaded namespaces tolerate and target virtual
//!   nodes with no change to their manifests), the [`PodReflector`] (pods bound to a virtual
//!   node run remotely, as `ShadowPod`s the provider keeps alive) and every registered reflector.
//! - [`ProviderAgent`] runs on the provider: the `RemoteNamespace` controller that creates twin
//!   namespaces and binds the consumer's least-privilege role in them, and the
//!   [`shadow::ShadowPod`] controller that keeps offloaded pods running.
//! - [`reflection`]: one engine parameterised by kind ([`reflection::Reflect`] +
//!   [`reflection::Reflector`]), with skip/allow annotations, bounded workers, watches and
//!   retries with backoff; it implements [`liqo_core::ResourceReflector`].
//!
//! Address translation comes from the fabric through [`AddressTranslation`] (from each peer's
//! link, which liqo-net's network controller keeps).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod consumer;
mod error;
mod events;
mod links;
pub mod names;
mod offloading;
pub mod pods;
mod provider;
pub mod queue;
pub mod reflection;
mod reflections;
pub mod security;
pub mod selector;
pub mod shadow;
mod virtual_node;
pub mod webhook;

pub use consumer::{ConsumerAgent, ConsumerAgentBuilder, ConsumerConfig};
pub use error::VkError;
pub use links::{AddressTranslation, StaticTranslation, identity_translator};
pub use pods::PodReflector;
pub use provider::{
    AGGREGATE_TO_OFFLOADING, ProviderAgent, offloading_cluster_role, offloading_core_cluster_role,
};
pub use virtual_node::{desired_node, desired_node_status};
