//! # liqo-peering-kubeconfig
//!
//! A [`PeeringAuthority`](liqo_core::PeeringAuthority) of liqo-rs with **no peering endpoint**,
//! like Liqo's out-of-band flows (`liqoctl peer --remote-kubeconfig`): the provider's
//! administrator issues a tenant-limited credential, and the consumer's administrator hands it
//! to the consumer cluster.
//!
//! 1. **Provider** ([`issue_bundle`], e.g. from `liqoctl`): makes the consumer's tenant with the
//!    machinery every method shares (`liqo_peering::Tenants`: namespace `liqo-tenant-<consumer>`,
//!    `ResourceOffer`, quota, the same least-privilege Role as the CSR method, bound to user
//!    `liqo-consumer-<consumer>`), issues a client certificate for that user through its CSR API,
//!    and returns a [`PeeringBundle`]: kubeconfig (certificate and key), offer, network
//!    parameters. Write it to a file ([`PeeringBundle::to_yaml`]) and hand it over as a secret.
//! 2. **Consumer**: store it as key `bundle` of Secret `liqo-system/liqo-peering-bundle-<provider>`
//!    and set `spec.role: Provider` on the provider's `ForeignCluster`. The shared
//!    `liqo_peering::PeeringController` over [`KubeconfigAuthority`] reads it, checks it as
//!    hostile input ([`PeeringBundle::check`]: errors name the field, and show as condition
//!    `Authenticated=False`, reason `InvalidBundle` or `MissingBundle`) and stores the grant as
//!    it does for every method (Secret, `ResourceOffer`, `VirtualNode`).
//! 3. **Release**: `spec.role: None` (or deleting the `ForeignCluster`) removes everything on the
//!    consumer; the credential cannot remove its own tenant, the provider's administrator
//!    [`revoke`]s it.
//!
//! No renewal: the certificate lives as long as the administrator chose
//! ([`IssueOptions::lifetime`]); a new bundle in the Secret and a spec change (or the expiry,
//! which makes the stored grant unusable) peer again.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod authority;
mod bundle;
mod issue;

pub use authority::{
    BUNDLE_KEY, BUNDLE_NAMESPACE, KubeconfigAuthority, SECRET_SCHEME, bundle_secret_name,
};
pub use bundle::{BUNDLE_API_VERSION, BUNDLE_KIND, CheckedBundle, MAX_BUNDLE_BYTES, PeeringBundle};
pub use issue::{IssueOptions, METHOD_ANNOTATION, issue_bundle, revoke};
