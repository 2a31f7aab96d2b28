//! How a consumer reaches a provider: in-process (the admin holds both clusters) or over the
//! provider's HTTPS peering endpoint. The handshake code is the same for both.

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use liqo_core::{
    Challenge, ClusterId, ClusterIdentity, PeeringError, PeeringGrant, PeeringRequest,
    PeeringTarget,
};

use crate::{nonce::Purpose, provider::Provider};

/// The provider's three operations as a consumer sees them.
#[async_trait]
pub trait ProviderTransport: Send + Sync {
    /// Asks for a nonce for `purpose`; returns it with the provider's identity.
    async fn challenge(
        &self,
        consumer: &ClusterId,
        purpose: Purpose,
    ) -> Result<(ClusterIdentity, Challenge), PeeringError>;
    /// Sends a signed grant request.
    async fn grant(&self, request: PeeringRequest) -> Result<PeeringGrant, PeeringError>;
    /// Sends a signed release request.
    async fn release(&self, request: PeeringRequest) -> Result<(), PeeringError>;
}

#[async_trait]
impl ProviderTransport for Provider {
    async fn challenge(
        &self,
        consumer: &ClusterId,
        purpose: Purpose,
    ) -> Result<(ClusterIdentity, Challenge), PeeringError> {
        Ok((
            self.identity().identity(),
            Provider::challenge(self, consumer, purpose)?,
        ))
    }

    async fn grant(&self, request: PeeringRequest) -> Result<PeeringGrant, PeeringError> {
        Provider::grant(self, request).await
    }

    async fn release(&self, request: PeeringRequest) -> Result<(), PeeringError> {
        Provider::release(self, request).await
    }
}

/// Turns a [`PeeringTarget`] into a transport.
pub trait Connector: Send + Sync + fmt::Debug {
    /// A transport to the provider at `target`.
    fn connect(&self, target: &PeeringTarget) -> Result<Arc<dyn ProviderTransport>, PeeringError>;
}

/// Endpoint string of in-process targets.
pub const IN_PROCESS_ENDPOINT: &str = "in-process";

/// Connects to providers running in this process (the one-command path, where the admin's
/// clients reach both clusters). Targets whose endpoint is an `https://` URL go to `fallback`.
#[derive(Debug, Clone, Default)]
pub struct InProcessConnector {
    providers: Vec<Arc<Provider>>,
    fallback: Option<HttpsConnector>,
}

impl InProcessConnector {
    /// A connector for these providers.
    pub fn new(providers: impl IntoIterator<Item = Arc<Provider>>) -> Self {
        Self {
            providers: providers.into_iter().collect(),
            fallback: None,
        }
    }

    /// Sends `https://` targets over the network.
    pub fn with_https_fallback(mut self, https: HttpsConnector) -> Self {
        self.fallback = Some(https);
        self
    }
}

impl Connector for InProcessConnector {
    fn connect(&self, target: &PeeringTarget) -> Result<Arc<dyn ProviderTransport>, PeeringError> {
        if target.endpoint.starts_with("https://")
            && let Some(https) = &self.fallback
        {
            return https.connect(target);
        }
        let found = self.providers.iter().find(|p| {
            target
                .cluster_id
                .as_ref()
                .is_none_or(|id| p.identity().id() == id)
        });
        match found {
            Some(p) => Ok(p.clone() as Arc<dyn ProviderTransport>),
            None => Err(PeeringError::Unreachable {
                endpoint: target.endpoint.clone(),
                message: format!(
                    "no in-process provider for cluster {}",
                    target
                        .cluster_id
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_else(|| "(any)".into())
                ),
            }),
        }
    }
}

/// Connects to providers' HTTPS peering endpoints, pinning their identity keys (see
/// [`crate::https`]).
#[derive(Debug, Clone)]
pub struct HttpsConnector {
    /// Bound on each HTTP exchange (a grant includes CSR signing on the provider).
    pub timeout: Duration,
}

impl Default for HttpsConnector {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
        }
    }
}

impl Connector for HttpsConnector {
    fn connect(&self, target: &PeeringTarget) -> Result<Arc<dyn ProviderTransport>, PeeringError> {
        Ok(Arc::new(crate::https::HttpsTransport::new(
            target,
            self.timeout,
        )?))
    }
}
