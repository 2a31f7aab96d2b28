//! # liqo-fabric-wireguard
//!
//! The WireGuard [`NetworkFabric`](liqo_core::NetworkFabric) of liqo-rs, built from what
//! liqo-net shares (IPAM, NAT, routes, the link checker, the allocation stores) and generic over
//! the WireGuard implementation, so a backend crate is only the code that makes an interface
//! exist:
//!
//! - [`backend`]: the [`WireGuardBackend`] trait (`liqo-wireguard-kernel`,
//!   `liqo-wireguard-userspace`) and key helpers;
//! - [`gateway`]: one WireGuard interface, a peer per remote cluster, its routes, rules and NAT,
//!   converged by `apply`;
//! - [`WireGuardFabric`]: the fabric over a gateway, an IPAM and a store.
//!
//! Run it in a gateway's network namespace with [`liqo_net::NetnsFabric`] and drive it with
//! [`liqo_net::NetworkController`]. How two clusters with the same pod CIDR talk through it is
//! described in [`liqo_net`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod cluster;
mod fabric;
pub mod gateway;

pub use backend::{WireGuardBackend, generate_private_key, parse_private_key, public_key_of};
pub use fabric::{FabricConfig, WireGuardFabric, resolve_endpoint};
pub use gateway::{Gateway, GatewayConfig, GatewayPeer};
pub use wireguard_control;
