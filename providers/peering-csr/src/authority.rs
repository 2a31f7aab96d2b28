//! [`CsrAuthority`]: the consumer role behind the `PeeringAuthority` trait, and the one-command
//! path.

use std::sync::Arc;

use async_trait::async_trait;
use kube::Client;
use liqo_core::{
    ClusterId, Diagnosis, NetworkParameters, PeeringAuthority, PeeringError, PeeringGrant,
    PeeringTarget, crds::foreign_cluster_condition as cond,
};
use liqo_peering::NetworkSource;

use crate::{
    consumer::Consumer,
    identity::{IdentityOptions, LocalIdentity},
    names::{AWAITING_APPROVAL, PIN_MISMATCH},
    provider::{Provider, ProviderConfig},
    transport::{IN_PROCESS_ENDPOINT, InProcessConnector},
};

/// The CSR peering method as a [`PeeringAuthority`]: the consumer role's signed handshake, for
/// the shared peering controller (`liqo_peering::PeeringController`), which stores the grants.
///
/// The provider role is not behind the trait (no generic caller drives it): it is the
/// [`Provider`] behind a [`PeeringServer`](crate::PeeringServer) or the in-process connector.
#[derive(Debug, Clone)]
pub struct CsrAuthority {
    consumer: Arc<Consumer>,
}

impl CsrAuthority {
    /// The consumer role of this cluster: what the peering controller needs.
    pub fn new(consumer: Arc<Consumer>) -> Self {
        Self { consumer }
    }

    /// The consumer role (stored credentials, rotation).
    pub fn consumer(&self) -> &Arc<Consumer> {
        &self.consumer
    }
}

#[async_trait]
impl PeeringAuthority for CsrAuthority {
    async fn request(&self, target: &PeeringTarget) -> Result<PeeringGrant, PeeringError> {
        self.consumer.obtain(target).await
    }

    async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        self.consumer.release_remote_only(provider).await
    }

    fn explain(&self, e: &PeeringError, target: &PeeringTarget) -> Option<Diagnosis> {
        let me = self.consumer.identity().id();
        let pin = target
            .expected_fingerprint
            .map(|f| f.to_string())
            .unwrap_or_else(|| "(none)".into());
        let mismatch = |detail: &str| Diagnosis {
            condition: cond::AUTHENTICATED,
            reason: "FingerprintMismatch",
            message: format!(
                "the provider at {} does not hold the key pinned in spec.publicKeyFingerprint ({pin}): {detail}; check that spec.peeringEndpoint is the provider's and that the pin is its current key (its ConfigMap liqo-system/liqo-cluster-info); no credential was requested",
                target.endpoint
            ),
        };
        Some(match e {
            PeeringError::Unreachable { message, .. } if message.contains(PIN_MISMATCH) => {
                mismatch(message)
            }
            PeeringError::Unauthenticated { reason, .. } if reason.contains(PIN_MISMATCH) => {
                mismatch(reason)
            }
            PeeringError::Unauthenticated { reason, .. }
                if reason.contains("answered as cluster") =>
            {
                Diagnosis {
                    condition: cond::AUTHENTICATED,
                    reason: "ClusterIdMismatch",
                    message: format!(
                        "{reason}; spec.peeringEndpoint serves another cluster than spec.clusterId: fix one of them"
                    ),
                }
            }
            PeeringError::Refused { reason, .. } if reason.contains(AWAITING_APPROVAL) => {
                Diagnosis {
                    condition: cond::AUTHENTICATED,
                    reason: "AwaitingApproval",
                    message: format!(
                        "the provider requires manual approval ({reason}); ask its administrator to approve cluster {me}; retrying with backoff"
                    ),
                }
            }
            _ => return None,
        })
    }
}

/// The shared peering controller (`liqo_peering::PeeringController`) over this method, acting as
/// `consumer` on the cluster of `client` (the consumer's own).
pub fn peering_controller(
    client: Client,
    consumer: Arc<Consumer>,
) -> liqo_peering::PeeringController {
    let me = consumer.identity().id().clone();
    liqo_peering::PeeringController::new(client, me, Arc::new(CsrAuthority::new(consumer)))
}

fn identity_err(e: crate::identity::IdentityError) -> PeeringError {
    PeeringError::Other(Box::new(e))
}

/// The two sides of a one-command peering, with the identities of both clusters loaded (made at
/// first use) from their identity Secrets.
#[derive(Debug)]
pub struct AdminPeering {
    /// The consumer role on the consumer cluster.
    pub consumer: Arc<Consumer>,
    /// The provider role on the provider cluster.
    pub provider: Arc<Provider>,
}

impl AdminPeering {
    /// Loads both identities and wires the consumer straight to the provider, in process.
    pub async fn new(
        consumer_client: &Client,
        provider_client: &Client,
        provider_config: ProviderConfig,
        consumer_network: NetworkParameters,
    ) -> Result<Self, PeeringError> {
        let options = IdentityOptions::default();
        let (consumer_id, provider_id) = tokio::try_join!(
            LocalIdentity::load_or_create(consumer_client, &options),
            LocalIdentity::load_or_create(provider_client, &options),
        )
        .map_err(identity_err)?;
        if consumer_id.id() == provider_id.id() {
            return Err(PeeringError::Refused {
                cluster: consumer_id.id().clone(),
                reason: "both kubeconfigs point at the same cluster".into(),
            });
        }
        let provider = Arc::new(Provider::new(
            provider_client.clone(),
            Arc::new(provider_id),
            provider_config,
        ));
        let consumer = Arc::new(Consumer::new(
            consumer_client.clone(),
            Arc::new(consumer_id),
            NetworkSource::Static(consumer_network),
            Arc::new(InProcessConnector::new([provider.clone()])),
        ));
        Ok(Self { consumer, provider })
    }

    /// The target naming the provider, pinned to its key.
    pub fn target(&self) -> PeeringTarget {
        PeeringTarget {
            cluster_id: Some(self.provider.identity().id().clone()),
            endpoint: IN_PROCESS_ENDPOINT.into(),
            expected_fingerprint: Some(self.provider.identity().fingerprint()),
        }
    }

    /// Runs the whole handshake (the same challenge, signature and checks as over HTTPS) and
    /// stores the grant on the consumer.
    pub async fn peer(&self) -> Result<PeeringGrant, PeeringError> {
        self.consumer.request(&self.target()).await
    }

    /// Removes the peering on both sides.
    pub async fn unpeer(&self) -> Result<(), PeeringError> {
        self.consumer.release(self.provider.identity().id()).await
    }
}

/// One command, like `liqoctl peer`: with admin clients of both clusters, makes `consumer_client`'s
/// cluster consume from `provider_client`'s. Identities are loaded from (or made into) each
/// cluster's `liqo-system/liqo-identity` Secret.
pub async fn peer(
    consumer_client: &Client,
    provider_client: &Client,
    provider_config: ProviderConfig,
    consumer_network: NetworkParameters,
) -> Result<PeeringGrant, PeeringError> {
    AdminPeering::new(
        consumer_client,
        provider_client,
        provider_config,
        consumer_network,
    )
    .await?
    .peer()
    .await
}

/// One command, like `liqoctl unpeer`: removes everything [`peer`] made, on both sides.
pub async fn unpeer(
    consumer_client: &Client,
    provider_client: &Client,
    provider_config: ProviderConfig,
    consumer_network: NetworkParameters,
) -> Result<(), PeeringError> {
    AdminPeering::new(
        consumer_client,
        provider_client,
        provider_config,
        consumer_network,
    )
    .await?
    .unpeer()
    .await
}
