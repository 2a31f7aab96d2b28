//! Peering: proving identities and granting least-privilege access, the [`PeeringAuthority`].

use std::{fmt, time::SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    ClusterId, ClusterIdentity, KeyFingerprint, NetworkParameters, PeeringError, ResourceOffer,
    crds::{ForeignCluster, foreign_cluster_condition as cond},
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

/// What went wrong with a peering, for the condition the peering controller writes on the
/// provider's `ForeignCluster`: which condition, a machine-readable reason, and a message that
/// says what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// The condition type: [`AUTHENTICATED`](crate::crds::foreign_cluster_condition::AUTHENTICATED)
    /// (reaching and trusting the provider, being admitted) or
    /// [`OFFER_ACCEPTED`](crate::crds::foreign_cluster_condition::OFFER_ACCEPTED) (storing what
    /// it granted).
    pub condition: &'static str,
    /// CamelCase reason, e.g. `MissingPeeringEndpoint`.
    pub reason: &'static str,
    /// What was wrong, where, and the next step.
    pub message: String,
}

/// Obtains and gives back a consumer's access to providers: one peering *method*.
///
/// The peering controller (crate `liqo-peering`) drives any implementation from the provider's
/// `ForeignCluster` on the consumer's cluster: it asks for the [`target`](Self::target), calls
/// [`request`](Self::request) and **stores the grant itself** (kubeconfig Secret,
/// `ResourceOffer`, `VirtualNode`), the same way for every method; on release it calls
/// [`release`](Self::release) and removes what it stored once the provider confirmed.
///
/// # Why this shape
/// * **Consumer side only.** What a provider does differs entirely between methods (a signed
///   challenge over an HTTPS endpoint, an administrator issuing a bundle offline) and nothing
///   generic calls into it: it is driven by the peer's requests or by the administrator. What
///   providers share is not a call but the tenant they build (namespace, quota, RBAC,
///   conditions), which the `liqo-peering` crate offers as a library. So the provider side is
///   each method's own API, not a trait method a method without an endpoint would have to stub.
/// * **`request` returns, the caller stores.** Storing a grant, telling what is held and removing
///   it locally are the same for every method, so they live once, in the controller's crate;
///   an authority only talks to its provider.
/// * **`target` and `explain`** let a method read its own locator from the `ForeignCluster`
///   (an HTTPS endpoint, a bundle Secret) and turn its own errors into conditions that say what
///   to fix, without the controller knowing the method.
///
/// A method in a few lines, one that reads nothing and grants nothing (a useful default for a
/// cluster that only provides):
///
/// ```
/// use async_trait::async_trait;
/// use liqo_core::{ClusterId, PeeringAuthority, PeeringError, PeeringGrant, PeeringTarget};
///
/// struct ProvideOnly;
///
/// #[async_trait]
/// impl PeeringAuthority for ProvideOnly {
///     async fn request(&self, t: &PeeringTarget) -> Result<PeeringGrant, PeeringError> {
///         Err(PeeringError::Unreachable { endpoint: t.endpoint.clone(), message: "this cluster consumes nothing".into() })
///     }
///     async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError> {
///         Err(PeeringError::NotPeered(provider.clone()))
///     }
/// }
/// ```
#[async_trait]
pub trait PeeringAuthority: Send + Sync + 'static {
    /// What to ask for, as the provider's `ForeignCluster` on this (the consumer's) cluster says.
    ///
    /// The default reads `spec.peeringEndpoint` (required), `spec.clusterId` and the pin
    /// `spec.publicKeyFingerprint`; a method that locates its provider otherwise overrides it. An
    /// error says which field to fix.
    fn target(&self, fc: &ForeignCluster) -> Result<PeeringTarget, Diagnosis> {
        let Some(endpoint) = fc.spec.peering_endpoint.clone().filter(|e| !e.is_empty()) else {
            return Err(Diagnosis {
                condition: cond::AUTHENTICATED,
                reason: "MissingPeeringEndpoint",
                message: format!(
                    "spec.role is {:?} but spec.peeringEndpoint is empty: set it to the provider's peering endpoint (published in its ConfigMap liqo-system/liqo-cluster-info)",
                    fc.spec.role
                ),
            });
        };
        Ok(PeeringTarget {
            cluster_id: Some(fc.spec.cluster_id.clone()),
            endpoint,
            expected_fingerprint: fc.spec.public_key_fingerprint,
        })
    }

    /// Asks the provider at `target` for access and returns what it granted, **without storing
    /// it**: the caller does (the controller stores every method's grants the same way). Asking
    /// again while peered renews.
    async fn request(&self, target: &PeeringTarget) -> Result<PeeringGrant, PeeringError>;

    /// Gives back access to `provider` on the provider's side, where the method can (it may
    /// read what was stored locally to find the provider). Leaves the local copy alone: the
    /// caller removes it once this returned `Ok` or [`PeeringError::NotPeered`] (the provider no
    /// longer knows us). [`PeeringError::Unreachable`] and [`PeeringError::Refused`] mean "not
    /// confirmed": the caller keeps everything and retries, so no tenant is orphaned.
    async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError>;

    /// A method-specific reading of `error` from [`request`](Self::request) for `target`, or
    /// `None` for the generic one (by error kind).
    fn explain(&self, error: &PeeringError, target: &PeeringTarget) -> Option<Diagnosis> {
        let _ = (error, target);
        None
    }
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
