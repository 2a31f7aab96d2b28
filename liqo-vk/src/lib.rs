//! # liqo-vk
//!
//! The virtual kubelet: virtual nodes for providers, pod offloading, and the generic reflection engine that reflector providers are built on.
//!
//! This crate is planned (see `docs/architecture.md`): it holds no public API yet. Providers
//! under `providers/` will build on it; until then they depend on `liqo-core` alone.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
