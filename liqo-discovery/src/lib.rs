//! # liqo-discovery
//!
//! What every discovery provider shares: the discovery record format (used by mDNS and DNS alike), the composite that merges sources, and the controller that turns discovery events into ForeignCluster objects.
//!
//! This crate is planned (see `docs/architecture.md`): it holds no public API yet. Providers
//! under `providers/` will build on it; until then they depend on `liqo-core` alone.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
