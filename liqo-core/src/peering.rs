//! Peering: proving identities and granting least-privilege access, the [`PeeringAuthority`].

use std::{fmt, time::SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    /// A PEM PKCS#10 certificate signing request (`-----BEGIN CERTIFICATE REQUEST-----`) made by
    /// the consumer for the client credential it asks for: the private key stays with the
    /// consumer and the provider returns only the signed certificate. Bound into the signature
    /// (see [`PeeringRequest::signed_payload`]). `None` for requests that need no credential
    /// (a release) and for consumers that predate it; whether a provider then refuses the grant
    /// or makes the key itself is up to the authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// Domain tag of requests without a certificate signing request.
const PAYLOAD_V1: &str = "liqo-peering-v1";
/// Domain tag of requests carrying a certificate signing request.
const PAYLOAD_V2: &str = "liqo-peering-v2";

impl PeeringRequest {
    /// The exact bytes the consumer signs.
    ///
    /// Without a CSR: the domain tag `liqo-peering-v1`, both cluster ids and the nonce, each
    /// line-terminated, the nonce last (unchanged since v1, so such requests verify as before).
    /// With a CSR: the domain tag `liqo-peering-v2`, both cluster ids, the lowercase hex SHA-256
    /// of the CSR's bytes, then the nonce. The distinct tags make a signature over one form
    /// useless for the other: stripping or swapping the CSR breaks the signature.
    pub fn signed_payload(
        consumer: &ClusterId,
        provider: &ClusterId,
        nonce: &[u8],
        csr: Option<&str>,
    ) -> Vec<u8> {
        let mut out = match csr {
            None => format!("{PAYLOAD_V1}\n{consumer}\n{provider}\n"),
            Some(csr) => {
                let digest: String = Sha256::digest(csr.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("{PAYLOAD_V2}\n{consumer}\n{provider}\n{digest}\n")
            }
        }
        .into_bytes();
        out.extend_from_slice(nonce);
        out
    }

    /// [`signed_payload`](Self::signed_payload) of this request's own fields: what its
    /// signature must verify against.
    pub fn payload(&self) -> Vec<u8> {
        Self::signed_payload(
            &self.consumer.id,
            &self.provider,
            &self.nonce,
            self.csr.as_deref(),
        )
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
        let p1 = PeeringRequest::signed_payload(&a, &b, b"n1", None);
        assert_ne!(p1, PeeringRequest::signed_payload(&b, &a, b"n1", None));
        assert_ne!(p1, PeeringRequest::signed_payload(&a, &b, b"n2", None));
        assert_eq!(p1, b"liqo-peering-v1\na\nb\nn1");
    }

    #[test]
    fn payload_binds_the_csr() {
        let a: ClusterId = "a".parse().unwrap();
        let b: ClusterId = "b".parse().unwrap();
        let with = PeeringRequest::signed_payload(&a, &b, b"n1", Some("csr-1"));
        assert!(
            with.starts_with(b"liqo-peering-v2\na\nb\n"),
            "versioned tag"
        );
        assert!(with.ends_with(b"\nn1"));
        assert_ne!(
            with,
            PeeringRequest::signed_payload(&a, &b, b"n1", Some("csr-2"))
        );
        assert_ne!(with, PeeringRequest::signed_payload(&a, &b, b"n1", None));
        // sha256("csr-1"), lowercase hex, on its own line.
        let digest: String = Sha256::digest(b"csr-1")
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        assert_eq!(digest.len(), 64);
        assert!(
            with.windows(digest.len() + 2)
                .any(|w| w == format!("\n{digest}\n").as_bytes())
        );
    }

    #[test]
    fn csr_is_optional_on_the_wire() {
        let a: ClusterId = "a".parse().unwrap();
        let mut req = PeeringRequest {
            consumer: ClusterIdentity {
                id: a.clone(),
                name: "a".into(),
                public_key: None,
            },
            provider: "b".parse().unwrap(),
            nonce: vec![1],
            signature: vec![2],
            network: NetworkParameters::new(
                "10.0.0.0/16".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ),
            csr: None,
        };
        let json = serde_json::to_value(&req).unwrap();
        assert!(json.get("csr").is_none(), "absent, not null: {json}");
        let back: PeeringRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, req);
        req.csr = Some("-----BEGIN CERTIFICATE REQUEST-----".into());
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["csr"], "-----BEGIN CERTIFICATE REQUEST-----");
        assert_eq!(
            req.payload(),
            PeeringRequest::signed_payload(&a, &req.provider, &[1], req.csr.as_deref())
        );
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
