//! Names, labels and annotations of the objects every peering method makes, in one place.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use kube::api::PatchParams;
use liqo_core::{ClusterId, PeeringError, labels};

/// Value of `liqo.io/managed-by` on every object this crate makes.
pub const MANAGED_BY_VALUE: &str = "liqo-peering";
/// Field manager of the provider role (server-side apply).
pub const PROVIDER_MANAGER: &str = "liqo-peering-provider";
/// Field manager of the consumer role (server-side apply). Distinct from the provider's so that a
/// cluster that is both never removes the other role's fields when it applies its own.
pub const CONSUMER_MANAGER: &str = "liqo-peering-consumer";
/// Which side of a peering an object belongs to: `provider` or `consumer`.
pub const PEERING_SIDE: &str = "liqo.io/peering-side";
/// [`PEERING_SIDE`] value on provider-side objects.
pub const SIDE_PROVIDER: &str = "provider";
/// [`PEERING_SIDE`] value on consumer-side objects.
pub const SIDE_CONSUMER: &str = "consumer";
/// Annotation recording the key fingerprint a peer proved, on the provider's tenant namespace and
/// on a pending `ForeignCluster`.
pub const KEY_FINGERPRINT_ANNOTATION: &str = "liqo.io/key-fingerprint";
/// Annotation on the consumer's kubeconfig Secret: where the grant came from
/// ([`PeeringTarget::endpoint`](liqo_core::PeeringTarget::endpoint)), so a release or renewal
/// knows where to go.
pub const ENDPOINT_ANNOTATION: &str = "liqo.io/peering-endpoint";
/// Annotation on the consumer's kubeconfig Secret: when the credential expires (RFC 3339).
pub const EXPIRES_ANNOTATION: &str = "liqo.io/credential-expires-at";
/// Key of the kubeconfig in the consumer's Secret.
pub const KUBECONFIG_KEY: &str = "kubeconfig";
/// Name of the ResourceQuota enforcing an offer in each of a consumer's namespaces.
pub const QUOTA_NAME: &str = "liqo-offer";
/// Name of the LimitRange that gives request-less containers zero requests under the quota.
pub const LIMIT_RANGE_NAME: &str = "liqo-offer-defaults";
/// Name of the consumer's Role and RoleBinding in its tenant namespace.
pub const TENANT_ROLE: &str = "liqo-consumer";
/// `liqo.io/managed-by` value of twin namespaces (made by liqo-vk's provider-side controller).
pub const TWIN_NAMESPACE_MANAGER: &str = "liqo-vk";

/// Finalizer the [`PeeringController`](crate::PeeringController) keeps on a `ForeignCluster` while
/// a consumer-side peering with that cluster exists (or is being made), so deleting the
/// `ForeignCluster` releases the peering first.
pub const PEERING_FINALIZER: &str = "liqo.io/peering";

/// Longest cluster id whose `liqo-tenant-<id>` name fits a namespace name (63 characters).
pub const MAX_TENANT_ID_LEN: usize = 63 - "liqo-tenant-".len();

/// The tenant namespace for `peer`: on a provider it holds what `peer` may use as a consumer, on
/// a consumer what it received from `peer` as a provider (one namespace when both).
pub fn tenant_namespace(peer: &ClusterId) -> Result<String, PeeringError> {
    if peer.as_str().len() > MAX_TENANT_ID_LEN {
        return Err(PeeringError::Refused {
            cluster: peer.clone(),
            reason: format!(
                "cluster id is {} characters; tenant namespaces need ids of at most {MAX_TENANT_ID_LEN}",
                peer.as_str().len()
            ),
        });
    }
    Ok(liqo_core::names::tenant_namespace(peer))
}

/// The consumer's kubeconfig Secret for `provider`.
pub fn kubeconfig_secret(provider: &ClusterId) -> String {
    format!("liqo-kubeconfig-{provider}")
}

/// The Kubernetes user name of `consumer`'s credential on a provider (the convention of
/// [`liqo_core::names::consumer_user`], which liqo-vk binds its offloading role to).
pub fn consumer_user(consumer: &ClusterId) -> String {
    liqo_core::names::consumer_user(consumer)
}

/// The labels of an object this crate makes for `peer` on `side`.
pub fn peer_labels(peer: &ClusterId, side: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (labels::REMOTE_CLUSTER_ID.to_owned(), peer.to_string()),
        (PEERING_SIDE.to_owned(), side.to_owned()),
    ])
}

/// Server-side apply as `manager`, taking over fields from other managers (we own these objects).
pub fn apply(manager: &str) -> PatchParams {
    PatchParams::apply(manager).force()
}

/// A Kubernetes error, saying what was being done.
pub fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> PeeringError {
    let action = action.into();
    move |source| PeeringError::Kube { action, source }
}

/// Whether a Kubernetes error is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// One async lock per cluster id, so grants, revocations and releases for one peer never
/// interleave within a process.
#[derive(Debug, Default)]
pub struct PeerLocks(Mutex<HashMap<ClusterId, Arc<tokio::sync::Mutex<()>>>>);

impl PeerLocks {
    /// Waits for `peer`'s lock.
    pub async fn lock(&self, peer: &ClusterId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            // Forget locks nobody holds or waits for, so the map stays as small as the peer set.
            map.retain(|_, l| Arc::strong_count(l) > 1);
            map.entry(peer.clone()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_limits() {
        let id: ClusterId = "rome".parse().unwrap();
        assert_eq!(tenant_namespace(&id).unwrap(), "liqo-tenant-rome");
        assert_eq!(kubeconfig_secret(&id), "liqo-kubeconfig-rome");
        assert_eq!(consumer_user(&id), "liqo-consumer-rome");
        let long: ClusterId = "x".repeat(MAX_TENANT_ID_LEN + 1).parse().unwrap();
        let err = tenant_namespace(&long).unwrap_err();
        assert!(err.to_string().contains("at most 51"), "{err}");
        let ok: ClusterId = "x".repeat(MAX_TENANT_ID_LEN).parse().unwrap();
        assert_eq!(tenant_namespace(&ok).unwrap().len(), 63);
    }
}
