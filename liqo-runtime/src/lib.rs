//! # liqo-runtime
//!
//! The Kubernetes-native controllers of liqo-rs, each written against the liqo-core trait of its
//! concern, composed into one [`Agent`]: one provider per trait in, a running agent out.
//!
//! | you give the builder | it runs | over the objects |
//! |---|---|---|
//! | [`discovery`](AgentBuilder::discovery): any [`Discovery`](liqo_core::Discovery), several merged | liqo-discovery's `DiscoveryController` | `ForeignCluster.spec.discovery` |
//! | [`peering`](AgentBuilder::peering): any [`PeeringAuthority`](liqo_core::PeeringAuthority) | liqo-peering's `PeeringController` (consumer side) | `ForeignCluster.spec.role`, tenant namespaces |
//! | [`fabric`](AgentBuilder::fabric): any [`NetworkFabric`](liqo_core::NetworkFabric) | liqo-net's `NetworkController` | `NetworkConfig`, `Tunnel` |
//! | [`reflectors`](AgentBuilder::reflectors): any [`ResourceReflector`](liqo_core::ResourceReflector)s | liqo-vk's `ConsumerAgent` | `VirtualNode`, `NamespaceOffloading`, pods |
//! | [`provider`](AgentBuilder::provider) | liqo-vk's `ProviderAgent` | `ShadowPod`s in twin namespaces |
//!
//! State lives in the API server, never in the agent: a restarted agent resumes from the
//! objects, and `liqoctl` (or `kubectl`) drives it by declaring intent on them. The parts meet
//! through those objects, not through calls: discovery writes `ForeignCluster`s, peering acts on
//! their `spec.role` and leaves a `VirtualNode` and the peer's network parameters, the fabric
//! links the pod networks, and the virtual kubelet offloads.
//!
//! A peering method's own servers (the CSR method's HTTPS endpoint), metrics or anything else
//! run beside the controllers as [`component`](AgentBuilder::component)s, stopped with them.
//!
//! This crate never enables a `k8s-openapi` version feature, a TLS stack or a log subscriber:
//! the binary chooses.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod agent;
mod translation;

pub use agent::{Agent, AgentBuilder, AgentError};
pub use translation::LinkTranslation;
