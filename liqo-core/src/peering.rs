//! Peering: proving identities and granting least-privilege access, the [`PeeringAuthority`].

use std::{fmt, time::SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    ClusterId, ClusterIdentity, KeyFingerprint, NetworkParameters, PeeringError, ResourceOffer,
};

/// The provider a consumer wants to peer with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeeringTarget {
    /// The provider's cluster id, when known (from discovery or the admin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<ClusterId>,
    /// The provider's peering endpoint URL, or another locator the authority understands (for
    /// example a kubeconfig path when the admin holds both clusters' credentials).
    pub endpoint: String,
    /// The fingerprint the provider's key must have; a mismatch aborts the peering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_fingerprint: Option<KeyFingerprint>,
}

/// A nonce a provider issues; the consumer signs it to prove it holds its private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Challenge {
    /// Random bytes, single use.
    pub nonce: Vec<u8>,
    /// After this instant the provider rejects the nonce.
    pub expires_at: SystemTime,
}

/// A consumer's signed request for access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeeringRequest {
    /// Who asks (its public key must be set).
    pub consumer: ClusterIdentity,
    /// Whom it asks: binds the signature to one provider so it cannot be replayed elsewhere.
    pub provider: ClusterId,
    /// The nonce from the provider's [`Challenge`].
    pub nonce: Vec<u8>,
    /// The consumer's signature over [`PeeringRequest::signed_payload`].
    pub signature: Vec<u8>,
    /// The consumer's network, so the provider can prepare its side of the fabric.
    pub network: NetworkParameters,
}

impl PeeringRequest {
    /// The exact bytes the consumer signs: a domain tag, both cluster ids and the nonce.
    pub fn signed_payload(consumer: &ClusterId, provider: &ClusterId, nonce: &[u8]) -> Vec<u8> {
        let mut out = format!("liqo-peering-v1\n{consumer}\n{provider}\n").into_bytes();
        out.extend_from_slice(nonce);
        out
    }
}

/// What a consumer holds after peering: access limited to its tenant namespace on the provider.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    /// A kubeconfig for the provider's API server (secret: never logged).
    pub kubeconfig: String,
    /// The provider-side namespace the credential is bound to.
    pub tenant_namespace: String,
    /// When the credential stops working, if it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<SystemTime>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("kubeconfig", &"<redacted>")
            .field("tenant_namespace", &self.tenant_namespace)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The provider's answer to an accepted request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeeringGrant {
    /// The provider's identity (with its key, to pin).
    pub provider: ClusterIdentity,
    /// Access for the consumer.
    pub credential: Credential,
    /// The resources offered.
    pub offer: ResourceOffer,
    /// The provider's network parameters.
    pub network: NetworkParameters,
}

/// Establishes trust between clusters, on both sides of a peering.
///
/// As a **consumer**, [`request`](Self::request) obtains a [`PeeringGrant`] from a provider
/// (proving identity through the provider's [`challenge`](Self::challenge)) and
/// [`release`](Self::release) gives it back. As a **provider**, [`challenge`](Self::challenge)
/// issues a nonce, [`grant`](Self::grant) verifies a signed request and creates the tenant
/// namespace, credential and quota, and [`revoke`](Self::revoke) removes them all. A cluster
/// that is both consumer and provider uses one authority for both roles.
///
/// A provider in a few lines, one that refuses everybody (a useful default for a cluster that
/// only consumes):
///
/// ```
/// use async_trait::async_trait;
/// use liqo_core::{Challenge, ClusterId, PeeringAuthority, PeeringError, PeeringGrant,
///                 PeeringRequest, PeeringTarget};
///
/// struct ConsumeOnly;
///
/// #[async_trait]
/// impl PeeringAuthority for ConsumeOnly {
///     async fn request(&self, t: &PeeringTarget) -> Result<PeeringGrant, PeeringError> {
///         Err(PeeringError::Unreachable { endpoint: t.endpoint.clone(), message: "not implemented here".into() })
///     }
///     async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError> {
///         Err(PeeringError::NotPeered(provider.clone()))
///     }
///     async fn challenge(&self, consumer: &ClusterId) -> Result<Challenge, PeeringError> {
///         Err(PeeringError::Refused { cluster: consumer.clone(), reason: "this cluster provides nothing".into() })
///     }
///     async fn grant(&self, req: PeeringRequest) -> Result<PeeringGrant, PeeringError> {
///         Err(PeeringError::Refused { cluster: req.consumer.id, reason: "this cluster provides nothing".into() })
///     }
///     async fn revoke(&self, consumer: &ClusterId) -> Result<(), PeeringError> {
///         Err(PeeringError::NotPeered(consumer.clone()))
///     }
/// }
/// ```
#[async_trait]
pub trait PeeringAuthority: Send + Sync + 'static {
    /// Consumer side: asks the provider at `target` for access and returns what it granted.
    async fn request(&self, target: &PeeringTarget) -> Result<PeeringGrant, PeeringError>;

    /// Consumer side: gives back access to `provider` and forgets the credential.
    async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError>;

    /// Provider side: issues a fresh single-use nonce for `consumer` to sign.
    async fn challenge(&self, consumer: &ClusterId) -> Result<Challenge, PeeringError>;

    /// Provider side: verifies the signed request against the policy and, if accepted, creates
    /// the tenant namespace, credential, RBAC and quota. Nothing is left behind on refusal.
    async fn grant(&self, request: PeeringRequest) -> Result<PeeringGrant, PeeringError>;

    /// Provider side: revokes `consumer`'s credential and removes everything made for it.
    async fn revoke(&self, consumer: &ClusterId) -> Result<(), PeeringError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_binds_both_ids_and_nonce() {
        let a: ClusterId = "a".parse().unwrap();
        let b: ClusterId = "b".parse().unwrap();
        let p1 = PeeringRequest::signed_payload(&a, &b, b"n1");
        assert_ne!(p1, PeeringRequest::signed_payload(&b, &a, b"n1"));
        assert_ne!(p1, PeeringRequest::signed_payload(&a, &b, b"n2"));
        assert!(p1.starts_with(b"liqo-peering-v1\n"));
    }

    #[test]
    fn credential_debug_hides_kubeconfig() {
        let c = Credential {
            kubeconfig: "secret-token".into(),
            tenant_namespace: "liqo-tenant-a".into(),
            expires_at: None,
        };
        let s = format!("{c:?}");
        assert!(!s.contains("secret-token") && s.contains("redacted"));
    }
}
