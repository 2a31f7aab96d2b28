//! [`CsrAuthority`]: both roles behind the `PeeringAuthority` trait, and the one-command path.

use std::sync::Arc;

use async_trait::async_trait;
use kube::Client;
use liqo_core::{
    Challenge, ClusterId, NetworkParameters, PeeringAuthority, PeeringError, PeeringGrant,
    PeeringRequest, PeeringTarget,
};

use crate::{
    consumer::Consumer,
    identity::{IdentityOptions, LocalIdentity},
    nonce::Purpose,
    policy::NetworkSource,
    provider::{Provider, ProviderConfig},
    transport::{IN_PROCESS_ENDPOINT, InProcessConnector},
};

/// The peering authority of one cluster, consumer and provider at once.
#[derive(Debug, Clone)]
pub struct CsrAuthority {
    provider: Arc<Provider>,
    consumer: Arc<Consumer>,
}

impl CsrAuthority {
    /// Both roles of one cluster (they must share its identity).
    pub fn new(provider: Arc<Provider>, consumer: Arc<Consumer>) -> Self {
        Self { provider, consumer }
    }

    /// The provider role (cordon, drain, the peering endpoint, the quota controller).
    pub fn provider(&self) -> &Arc<Provider> {
        &self.provider
    }

    /// The consumer role (stored credentials, rotation).
    pub fn consumer(&self) -> &Arc<Consumer> {
        &self.consumer
    }
}

#[async_trait]
impl PeeringAuthority for CsrAuthority {
    async fn request(&self, target: &PeeringTarget) -> Result<PeeringGrant, PeeringError> {
        self.consumer.request(target).await
    }

    async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        self.consumer.release(provider).await
    }

    async fn challenge(&self, consumer: &ClusterId) -> Result<Challenge, PeeringError> {
        self.provider.challenge(consumer, Purpose::Grant)
    }

    async fn grant(&self, request: PeeringRequest) -> Result<PeeringGrant, PeeringError> {
        self.provider.grant(request).await
    }

    async fn revoke(&self, consumer: &ClusterId) -> Result<(), PeeringError> {
        self.provider.revoke(consumer).await
    }
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
