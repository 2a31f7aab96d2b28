//! # liqo-net
//!
//! What every network fabric of liqo-rs shares, so a fabric provider is only its data plane
//! (the WireGuard one is `liqo-fabric-wireguard`, the no-tunnel one `liqo-fabric-routed`):
//!
//! - [`controller`]: the [`NetworkController`] that drives any
//!   [`NetworkFabric`](liqo_core::NetworkFabric) from the `ForeignCluster`s, exchanges each
//!   side's view of the other's networks (the protocol is described there), and reports links
//!   as the `NetworkReady` condition and `Tunnel` objects;
//! - [`ipam`]: overlap detection and CIDR remapping from configurable pools, stable across
//!   restarts through an [`store::AllocationStore`] (`NetworkConfig` objects, a file, memory);
//! - [`nat`]: the double NAT as one nftables table, replaced atomically;
//! - [`routes`]: links, routes and policy rules through rtnetlink;
//! - [`checker`]: link status from handshakes, the `NetworkReady` condition;
//! - [`netns`]: running a fabric inside a named network namespace from any runtime
//!   ([`Netns`], [`NetnsFabric`]).
//!
//! ## How two clusters with the same pod CIDR talk
//!
//! Cluster A knows peer B's pods by a range A allocated (B's CIDR if free on A's side, a
//! remapped one otherwise); B does the same for A. A pod of A sends to B's pod at its address in
//! A's range for B. A's gateway routes that range into the tunnel and rewrites the source from
//! A's real pod CIDR to the range B knows A by; B's gateway rewrites the destination from the
//! range A knows B by to B's real pod CIDR. B's pod sees A's pod at its address in B's range for
//! A, and replies go back through conntrack. Each gateway translates only its own pods, every
//! address in the tunnel is unique per peer, and one interface serves every peer.
//!
//! All of it acts in the network namespace of the calling thread; [`Netns`] runs it in
//! another one.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod checker;
pub mod controller;
pub mod ipam;
pub mod nat;
pub mod netns;
pub mod routes;
pub mod store;

pub use controller::{Links, NetError, NetworkController};
pub use ipam::{Allocation, Ipam, IpamConfig};
pub use netns::{Netns, NetnsError, NetnsFabric, host_client};
