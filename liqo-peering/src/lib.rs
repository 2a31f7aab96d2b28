//! # liqo-peering
//!
//! What every peering method of liqo-rs shares, the way `liqo-net` is what every network fabric
//! shares. A method (a [`PeeringAuthority`](liqo_core::PeeringAuthority), e.g. `liqo-peering-csr`
//! or `liqo-peering-kubeconfig`) only obtains and gives back access; this crate does the rest:
//!
//! * **Consumer side**: [`PeeringController`] peers with (and releases) providers as their
//!   `ForeignCluster`s' `spec.role` says, over any `Arc<dyn PeeringAuthority>`, and stores every
//!   grant the same way ([`GrantStore`]): in namespace `liqo-tenant-<provider>`, the Secret
//!   `liqo-kubeconfig-<provider>`, a `ResourceOffer` and a `VirtualNode` (liqo-vk makes the Node).
//! * **Provider side**: [`Tenants`] builds a consumer's tenant: namespace
//!   `liqo-tenant-<consumer>`, the `ResourceOffer` ([`OfferPolicy`]), the quota enforced across
//!   all the consumer's namespaces ([`quota`], [`QuotaController`]), a Role ([`tenant_rules`])
//!   and RoleBinding for user `liqo-consumer-<consumer>`; it revokes, cordons and drains.
//!   [`credential`] issues client certificates for that user through the CSR API.
//! * **Both**: one condition per stage on the peer's `ForeignCluster`, with Events ([`foreign`]);
//!   names and labels ([`names`]).
//!
//! A consumer agent with any method:
//!
//! ```no_run
//! use std::sync::Arc;
//! use liqo_core::{ClusterId, PeeringAuthority};
//! use liqo_peering::PeeringController;
//!
//! async fn consume(client: kube::Client, me: ClusterId, method: Arc<dyn PeeringAuthority>) {
//!     let controller = PeeringController::new(client, me, method);
//!     controller.run(std::future::pending()).await.expect("ForeignClusters can be listed");
//! }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod controller;
pub mod credential;
pub mod foreign;
pub mod names;
mod offer;
pub mod quantity;
pub mod quota;
mod store;
mod tenant;

pub use controller::PeeringController;
pub use credential::{ApiEndpoint, ClientKey, CredentialError, client_from_kubeconfig};
pub use offer::{FreeResources, NetworkSource, OfferPolicy, free_allocatable};
pub use quota::{Backoff, ControllerError, QUOTA_GUARD, QuotaController, install_quota_guard};
pub use store::{GrantStore, Held, rfc3339, target_of};
pub use tenant::{
    Tenant, Tenants, delete_opt, namespace_labels, tenant_rules, twin_selector, wait_deleted,
};
