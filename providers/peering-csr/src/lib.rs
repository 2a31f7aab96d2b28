//! # liqo-peering-csr
//!
//! The [`PeeringAuthority`](liqo_core::PeeringAuthority) of liqo-rs: decentralised, one-step,
//! least-privilege peering between Kubernetes clusters, with credentials issued by the
//! provider's own API server through the CSR API.
//!
//! ## Identity
//! Each cluster has a stable [`ClusterId`](liqo_core::ClusterId) and an Ed25519 key pair, made at
//! first start and kept in the Secret `liqo-system/liqo-identity` ([`LocalIdentity::load_or_create`];
//! the id defaults to the `kube-system` namespace's UID). The public key's fingerprint is what
//! discovery advertises and peers pin.
//!
//! ## Handshake
//! 1. The consumer asks for a challenge; the provider answers with its identity and a 32-byte
//!    nonce, single use, bound to that consumer id and to a purpose (grant or release), valid for
//!    a minute.
//! 2. The consumer checks the provider's identity (id as targeted, key as pinned), makes a fresh
//!    client key pair and a certificate signing request for it (subject `CN=liqo-consumer-<consumer>`,
//!    nothing else; [`ClientKey`]), signs
//!    [`PeeringRequest::signed_payload`](liqo_core::PeeringRequest::signed_payload) (consumer id,
//!    provider id, SHA-256 of the CSR, nonce) and sends the request with the CSR. The private key
//!    never leaves the consumer.
//! 3. The provider burns the nonce, checks addressee, signature and the key pinned for the consumer
//!    (by discovery on its `ForeignCluster`, or by an earlier grant on its tenant namespace), then
//!    its [`PeeringPolicy`]: accept all, an allow list, or manual approval.
//! 4. It makes the tenant: namespace `liqo-tenant-<consumer>` (labelled
//!    `liqo.io/tenant-namespace=<consumer>`), a `ResourceOffer` named after the provider, the
//!    quota, a Role and RoleBinding for user `liqo-consumer-<consumer>`, and a client certificate
//!    for that user: it checks the consumer's CSR ([`credential::check_csr`]: exactly that CN, no
//!    organization, no alternative names, an ECDSA P-256/P-384 or RSA ≥ 2048 key, a valid
//!    self-signature) before making anything and submits it as a `CertificateSigningRequest`
//!    (signer `kubernetes.io/kube-apiserver-client`, approved by the provider's policy, deleted
//!    once signed). It answers with a kubeconfig holding the certificate but no key (default
//!    namespace: the tenant), the offer and its network parameters. A request without a CSR is
//!    refused (this provider never makes consumers' keys).
//! 5. The consumer checks that the certificate is for its key, adds the key to the kubeconfig
//!    ([`credential::complete_kubeconfig`]) and stores, in namespace `liqo-tenant-<provider>` of its own cluster, the Secret
//!    `liqo-kubeconfig-<provider>` (key `kubeconfig`), a `ResourceOffer` and a `VirtualNode` named
//!    after the provider, whose `kubeconfigSecretRef` points at the Secret (liqo-vk makes the Node).
//!
//! Both ends write one condition per stage on the peer's `ForeignCluster` (see [`foreign`]).
//!
//! ## Three ways in
//! * **One command** ([`peer`], [`unpeer`], [`AdminPeering`]): the admin holds both kubeconfigs;
//!   the handshake runs in process, through the same code.
//! * **Peer to peer** ([`PeeringServer`], [`HttpsConnector`]): the provider serves HTTPS with a
//!   certificate made from its identity key; a consumer that knows only the endpoint (and, from
//!   discovery, the fingerprint) pins that key instead of trusting a CA.
//! * **Declarative** (`liqo_peering::PeeringController` over [`CsrAuthority`], on the
//!   consumer): set `spec.role` to `Provider` or `Both` on the provider's `ForeignCluster` (with
//!   `spec.peeringEndpoint` and `spec.publicKeyFingerprint`, e.g. from the provider's published
//!   [`ClusterInfo`](liqo_core::ClusterInfo)) and the consumer's agent peers over HTTPS; set it to
//!   `None` or delete the object and it releases (finalizer [`names::PEERING_FINALIZER`]).
//!   Failures show as conditions whose reason says what to do next, with Events.
//!
//! ## What is this crate's and what is shared
//! This crate is the *method*: identities, the challenge-response handshake (nonces,
//! signatures, pinning, the peering policy), the HTTPS endpoint and connector, and credential
//! rotation. Storing grants on the consumer, the tenant (namespace, offer, quota, RBAC),
//! ForeignCluster conditions, the CSR-API credential issuance and the peering controller are in
//! `liqo-peering`, shared with every other method (re-exported here).
//!
//! ## Least privilege
//! In its tenant namespace the consumer may manage `remotenamespaces.liqo.io` (its requests for
//! twin namespaces), read `resourceoffers.liqo.io`, and publish its view of the network link as
//! `networkconfigs.liqo.io` (get, list, watch, create, patch, update; `status`: get, patch,
//! update; no delete); nothing else, nowhere else ([`tenant_rules`]).
//! Pods and the rest are granted per twin namespace by liqo-vk's `liqo-offloading` ClusterRole.
//!
//! ## Governance
//! The offer ([`OfferPolicy`]: absolute, or a share of the free allocatable) is enforced by the
//! provider's API server across all of the consumer's namespaces ([`quota`], [`QuotaController`]).
//! [`Provider::cordon`] (no new pods), [`Provider::drain`] (delete the consumer's pods),
//! [`Provider::revoke`].
//!
//! **Revocation.** Kubernetes cannot revoke a client certificate. Revoking deletes the consumer's
//! RoleBinding and Role first, so its certificate still authenticates but is authorized for
//! nothing (403), then its namespaces, offer, any CSR, and the pinned key. Certificates are short
//! lived ([`ProviderConfig::credential_lifetime`], 24 h by default) and renewed by the consumer's
//! [`RotationController`] at two thirds of their lifetime, in place.
//!
//! ## Bidirectional peering
//! A cluster that is both consumer and provider of the same peer uses one namespace
//! `liqo-tenant-<peer>` for both roles; each role writes with its own field manager
//! (`liqo-peering-consumer`, `liqo-peering-provider`), and removing one role keeps the namespace
//! while the other still uses it.
//!
//! ## Permissions of the agent
//! Provider role: namespaces, roles and rolebindings (creating the tenant Role needs the rights it
//! grants, or `escalate`/`bind`), certificatesigningrequests (create, delete) and their
//! `approval` subresource with `approve` on signer `kubernetes.io/kube-apiserver-client`,
//! subjectaccessreviews (create), resourcequotas, limitranges, pods (list, delete: drain), nodes
//! (list: share-of-free offers), validatingadmissionpolicies and bindings (the quota guard),
//! `resourceoffers`, `foreignclusters` (and `/status`), events, and every right the tenant Role
//! grants (`remotenamespaces`, `resourceoffers`, `networkconfigs` and `networkconfigs/status`) or
//! `escalate` on roles. Consumer role: namespaces, secrets, `resourceoffers` (and `/status`),
//! `virtualnodes`, `foreignclusters` (and `/status`), events. The [`PeeringController`]
//! additionally needs `foreignclusters`: get, list, watch, patch (its finalizer); and
//! get on `secrets`, `resourceoffers` and `virtualnodes` in tenant namespaces.
//!
//! ## Kubernetes objects, all labelled `liqo.io/managed-by=liqo-peering`
//! Per cluster: the identity Secret. Per peering, on the provider: the tenant namespace and, in
//! it, `ResourceOffer/<provider>`, `ResourceQuota/liqo-offer`, `LimitRange/liqo-offer-defaults`,
//! `Role/liqo-consumer`, `RoleBinding/liqo-consumer`; the same quota and LimitRange in each twin
//! namespace; a transient CSR `liqo-<consumer>-<random>`. On the consumer: the namespace, the
//! Secret, `ResourceOffer/<provider>`, `VirtualNode/<provider>`. A `ForeignCluster` on either side
//! when discovery did not make one. Events on the `ForeignCluster`s.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod authority;
mod consumer;
pub mod https;
mod identity;
pub mod names;
mod nonce;
mod policy;
mod provider;
pub mod rotation;
mod transport;

/// What every peering method shares, re-exported from `liqo-peering` so existing paths keep
/// working: the peering controller (over any `PeeringAuthority`), grant storage, tenant,
/// quota, conditions and credentials.
pub use liqo_peering::{
    ApiEndpoint, ClientKey, ControllerError, CredentialError, FreeResources, GrantStore,
    NetworkSource, OfferPolicy, PeeringController, QUOTA_GUARD, QuotaController, Tenants,
    client_from_kubeconfig, credential, foreign, free_allocatable, install_quota_guard, quantity,
    quota, tenant_rules, twin_selector,
};

pub use authority::{AdminPeering, CsrAuthority, peer, peering_controller, unpeer};
pub use consumer::Consumer;
pub use https::{HttpsTransport, PeeringServer, ServerError};
pub use identity::{
    IDENTITY_NAMESPACE, IDENTITY_SECRET, IdentityError, IdentityOptions, LocalIdentity,
    verify_signature,
};
pub use nonce::Purpose;
pub use policy::PeeringPolicy;
pub use provider::{Provider, ProviderConfig};
pub use rotation::RotationController;
pub use transport::{
    Connector, HttpsConnector, IN_PROCESS_ENDPOINT, InProcessConnector, ProviderTransport,
};
