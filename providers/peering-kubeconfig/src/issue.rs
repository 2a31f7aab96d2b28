//! The provider side: the administrator issues a bundle (and revokes it), with the tenant
//! machinery every method shares.

use std::{collections::BTreeMap, time::Duration};

use kube::Client;
use liqo_core::{ClusterId, ClusterIdentity, NetworkParameters, PeeringError};
use liqo_peering::{
    ApiEndpoint, ClientKey, NetworkSource, OfferPolicy, Tenants,
    credential::{self, KubeconfigParts},
};

use crate::bundle::{BUNDLE_API_VERSION, BUNDLE_KIND, PeeringBundle};

/// Annotation on the tenant namespace: which method made it.
pub const METHOD_ANNOTATION: &str = "liqo.io/peering-method";

/// What the provider's administrator decides when issuing a bundle.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// The API server URL and CA the consumer uses (reachable from the consumer).
    pub api_endpoint: ApiEndpoint,
    /// What the consumer is offered (kept when its tenant already has an offer).
    pub offer: OfferPolicy,
    /// The provider's network parameters handed to the consumer.
    pub network: NetworkSource,
    /// The consumer's network (recorded on its `ForeignCluster` for the network controller).
    pub consumer_network: NetworkParameters,
    /// Lifetime of the client certificate (at least 600 s, the CSR API's minimum). Default 30 days:
    /// there is no endpoint to renew through, the administrator issues a new bundle.
    pub lifetime: Duration,
    /// Bound on each wait for the API server. Default 30 s.
    pub timeout: Duration,
}

impl IssueOptions {
    /// Options with a 30-day certificate.
    pub fn new(
        api_endpoint: ApiEndpoint,
        offer: OfferPolicy,
        network: NetworkSource,
        consumer_network: NetworkParameters,
    ) -> Self {
        Self {
            api_endpoint,
            offer,
            network,
            consumer_network,
            lifetime: Duration::from_secs(30 * 24 * 3600),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Issues a bundle for `consumer` (named `consumer_name` on its `ForeignCluster`, when given) on
/// the provider cluster of `client` (an administrator's), as `provider` (its identity, with the
/// public key when it has one, so consumers can pin it).
///
/// Makes the tenant exactly as every method does (namespace, offer, quota, Role and RoleBinding
/// for user `liqo-consumer-<consumer>`, [`Tenants::apply`]), then a client key and a certificate
/// for that user through the provider's CSR API, and returns the bundle, whose kubeconfig holds
/// both: it is a secret, hand it over like a kubeconfig. Issuing again renews the certificate
/// and keeps the tenant. Writes `ConsumerAuthenticated` and `TenantReady` on the consumer's
/// `ForeignCluster` here.
pub async fn issue_bundle(
    client: &Client,
    provider: &ClusterIdentity,
    consumer: &ClusterId,
    consumer_name: Option<&str>,
    options: &IssueOptions,
) -> Result<PeeringBundle, PeeringError> {
    let tenants = Tenants::new(client.clone(), provider.id.clone()).with_timeout(options.timeout);
    let tenant = tenants
        .apply(
            consumer,
            BTreeMap::from([(METHOD_ANNOTATION.to_owned(), "kubeconfig".to_owned())]),
            &options.offer,
        )
        .await?;
    let key = ClientKey::generate(&tenant.user).map_err(|e| PeeringError::Other(Box::new(e)))?;
    let cert = credential::issue(
        client,
        consumer,
        key.csr_pem(),
        options.lifetime,
        options.timeout,
    )
    .await?;
    let kubeconfig = credential::render_kubeconfig(&KubeconfigParts {
        provider: &provider.id,
        endpoint: &options.api_endpoint,
        user: &tenant.user,
        namespace: &tenant.namespace,
        cert_pem: &cert.cert_pem,
        key_pem: None,
    })?;
    let kubeconfig = credential::complete_kubeconfig(&kubeconfig, &key)
        .map_err(|e| PeeringError::Other(Box::new(e)))?;
    let network = options.network.parameters().await?;
    tenants
        .ready(
            consumer,
            consumer_name,
            &tenant,
            (
                "BundleIssued",
                format!(
                    "the administrator issued a peering bundle (certificate valid until {})",
                    liqo_peering::rfc3339(cert.not_after)
                ),
            ),
            &options.consumer_network,
        )
        .await?;
    Ok(PeeringBundle {
        api_version: BUNDLE_API_VERSION.to_owned(),
        kind: BUNDLE_KIND.to_owned(),
        consumer: consumer.clone(),
        provider: provider.clone(),
        tenant_namespace: tenant.namespace,
        kubeconfig,
        offer: tenant.offer,
        network,
    })
}

/// Revokes what [`issue_bundle`] made for `consumer` on the provider cluster of `client`
/// ([`Tenants::revoke`]: RBAC first, so the issued certificate authenticates but may do nothing,
/// then twin namespaces, offer, tenant namespace, `ForeignCluster` conditions).
pub async fn revoke(
    client: &Client,
    provider: &ClusterId,
    consumer: &ClusterId,
) -> Result<(), PeeringError> {
    Tenants::new(client.clone(), provider.clone())
        .revoke(consumer)
        .await
}
