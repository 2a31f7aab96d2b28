//! # liqo-net
//!
//! What every network fabric backend shares: IPAM with CIDR remapping, NAT rules, routes, the gateway lifecycle and the link checker.
//!
//! This crate is planned (see `docs/architecture.md`): it holds no public API yet. Providers
//! under `providers/` will build on it; until then they depend on `liqo-core` alone.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
