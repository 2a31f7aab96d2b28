//! The consumer side every peering method shares: storing a [`PeeringGrant`] in the consumer's
//! cluster, telling what is held, and removing it.
//!
//! In namespace `liqo-tenant-<provider>`: the Secret `liqo-kubeconfig-<provider>` (key
//! `kubeconfig`, annotated with where the grant came from, the provider's key fingerprint and
//! when the credential expires), a `ResourceOffer` and a `VirtualNode` named after the provider,
//! whose `kubeconfigSecretRef` points at the Secret (liqo-vk makes the Node from it). Conditions
//! `Authenticated` and `OfferAccepted` on the provider's `ForeignCluster`.

use std::{collections::BTreeMap, time::SystemTime};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, Resource, ResourceExt, api::Patch};
use liqo_core::{
    ClusterId, KeyFingerprint, PeeringError, PeeringGrant, PeeringTarget,
    conditions::{Condition, Status},
    crds::{
        ResourceOffer, ResourceOfferSpec, SecretKeyRef, VirtualNode, VirtualNodeSpec,
        foreign_cluster_condition as cond,
    },
    labels,
};

use crate::{
    credential::secret_labels,
    foreign::{self, ConsumerFields, Side, Stage},
    names::{
        self, CONSUMER_MANAGER, ENDPOINT_ANNOTATION, EXPIRES_ANNOTATION,
        KEY_FINGERPRINT_ANNOTATION, KUBECONFIG_KEY, SIDE_CONSUMER, kube_err,
    },
    tenant::{delete_opt, namespace_labels, wait_deleted},
};

/// Where a consumer cluster keeps what providers granted it.
#[derive(Clone)]
pub struct GrantStore {
    client: Client,
    me: ClusterId,
    deletion_timeout: std::time::Duration,
}

impl std::fmt::Debug for GrantStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantStore")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl GrantStore {
    /// The grants of consumer `me`, kept in the cluster of `client`.
    pub fn new(client: Client, me: ClusterId) -> Self {
        Self {
            client,
            me,
            deletion_timeout: std::time::Duration::from_secs(30),
        }
    }

    /// The consumer's cluster id.
    pub fn consumer_id(&self) -> &ClusterId {
        &self.me
    }

    /// The client on the consumer's cluster.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Writes `grant`, obtained from `target`, into the consumer's cluster (server-side apply
    /// as `liqo-peering-consumer`: storing again renews in place), stage by stage on the
    /// provider's `ForeignCluster` (made if missing).
    pub async fn store(
        &self,
        target: &PeeringTarget,
        grant: &PeeringGrant,
    ) -> Result<(), PeeringError> {
        let provider = &grant.provider.id;
        let me = &self.me;
        let fingerprint = grant
            .provider
            .fingerprint()
            .map(|f| f.to_string())
            .unwrap_or_default();
        let ns = names::tenant_namespace(provider)?;
        let ssa = names::apply(CONSUMER_MANAGER);
        foreign::ensure(
            &self.client,
            provider,
            Some(&grant.provider.name),
            Side::Consumer,
        )
        .await?;
        foreign::set_stages(
            &self.client,
            provider,
            Side::Consumer,
            &[Stage {
                type_: cond::AUTHENTICATED,
                status: Status::True,
                reason: "GrantReceived",
                message: format!(
                    "provider {provider} (key {}) granted access through {}",
                    if fingerprint.is_empty() {
                        "not given"
                    } else {
                        fingerprint.as_str()
                    },
                    target.endpoint
                ),
            }],
            None,
        )
        .await?;

        let namespace = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": namespace_labels(provider, false)},
        });
        Api::<Namespace>::all(self.client.clone())
            .patch(&ns, &ssa, &Patch::Apply(&namespace))
            .await
            .map_err(kube_err(format!("applying namespace {ns}")))?;

        let offers: Api<ResourceOffer> = Api::namespaced(self.client.clone(), &ns);
        let ro = serde_json::json!({
            "apiVersion": ResourceOffer::api_version(&()), "kind": ResourceOffer::kind(&()),
            "metadata": {"name": provider.as_str(), "labels": names::peer_labels(provider, SIDE_CONSUMER)},
            "spec": ResourceOfferSpec {
                provider_cluster_id: provider.clone(),
                consumer_cluster_id: me.clone(),
                resources: grant.offer.clone(),
                cordoned: false,
            },
        });
        let ro: ResourceOffer = offers
            .patch(provider.as_str(), &ssa, &Patch::Apply(&ro))
            .await
            .map_err(kube_err(format!("applying ResourceOffer {ns}/{provider}")))?;
        let owner: Vec<_> = ro.controller_owner_ref(&()).into_iter().collect();

        let secret_name = names::kubeconfig_secret(provider);
        let expires = grant.credential.expires_at.map(rfc3339).unwrap_or_default();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(secret_labels(provider)),
                annotations: Some(BTreeMap::from([
                    (ENDPOINT_ANNOTATION.to_owned(), target.endpoint.clone()),
                    (KEY_FINGERPRINT_ANNOTATION.to_owned(), fingerprint.clone()),
                    (EXPIRES_ANNOTATION.to_owned(), expires.clone()),
                ])),
                owner_references: Some(owner.clone()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                KUBECONFIG_KEY.to_owned(),
                ByteString(grant.credential.kubeconfig.clone().into_bytes()),
            )])),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        let mut secret =
            serde_json::to_value(&secret).map_err(|e| PeeringError::Other(Box::new(e)))?;
        secret["apiVersion"] = "v1".into();
        secret["kind"] = "Secret".into();
        Api::<Secret>::namespaced(self.client.clone(), &ns)
            .patch(&secret_name, &ssa, &Patch::Apply(&secret))
            .await
            .map_err(kube_err(format!("applying Secret {ns}/{secret_name}")))?;

        let vn = serde_json::json!({
            "apiVersion": VirtualNode::api_version(&()), "kind": VirtualNode::kind(&()),
            "metadata": {"name": provider.as_str(), "labels": names::peer_labels(provider, SIDE_CONSUMER), "ownerReferences": owner},
            "spec": VirtualNodeSpec {
                cluster_id: provider.clone(),
                resources: grant.offer.clone(),
                kubeconfig_secret_ref: SecretKeyRef { name: secret_name.clone(), key: KUBECONFIG_KEY.into() },
                labels: BTreeMap::new(),
                taints: vec![],
            },
        });
        Api::<VirtualNode>::namespaced(self.client.clone(), &ns)
            .patch(provider.as_str(), &ssa, &Patch::Apply(&vn))
            .await
            .map_err(kube_err(format!("applying VirtualNode {ns}/{provider}")))?;

        let mut accepted: Vec<Condition> = ro.status.map(|s| s.conditions).unwrap_or_default();
        let message = format!(
            "virtual node {provider} made for cpu={} memory={} pods={}",
            grant.offer.cpu.0, grant.offer.memory.0, grant.offer.pods
        );
        liqo_core::conditions::set(
            &mut accepted,
            "Accepted",
            Status::True,
            "VirtualNodeCreated",
            &message,
            ro.metadata.generation,
        );
        let status = serde_json::json!({
            "apiVersion": ResourceOffer::api_version(&()), "kind": ResourceOffer::kind(&()),
            "status": {"conditions": accepted, "virtualNodeName": provider.as_str()},
        });
        offers
            .patch_status(provider.as_str(), &ssa, &Patch::Apply(&status))
            .await
            .map_err(kube_err(format!(
                "writing the status of ResourceOffer {ns}/{provider}"
            )))?;

        let fields = ConsumerFields {
            remote_namespace: Some(grant.credential.tenant_namespace.clone()),
            network: Some(grant.network.clone()),
        };
        let fc = foreign::set_stages(
            &self.client,
            provider,
            Side::Consumer,
            &[Stage {
                type_: cond::OFFER_ACCEPTED,
                status: Status::True,
                reason: "OfferStored",
                message: format!(
                    "{message}; credential in Secret {ns}/{secret_name}, expires {expires}"
                ),
            }],
            Some(&fields),
        )
        .await?;
        if let Some(fc) = fc {
            foreign::event(
                &self.client,
                &fc,
                false,
                "Peered",
                format!("credential and offer of {provider} stored in {ns}"),
            )
            .await;
        }
        tracing::info!(%provider, namespace = %ns, "peered as consumer");
        Ok(())
    }

    /// What this consumer holds from `provider` in its cluster.
    pub async fn held(&self, provider: &ClusterId) -> Result<Held, PeeringError> {
        let ns = names::tenant_namespace(provider)?;
        let secret_name = names::kubeconfig_secret(provider);
        let secret = Api::<Secret>::namespaced(self.client.clone(), &ns)
            .get_opt(&secret_name)
            .await
            .map_err(kube_err(format!("reading Secret {ns}/{secret_name}")))?;
        let virtual_node = Api::<VirtualNode>::namespaced(self.client.clone(), &ns)
            .get_opt(provider.as_str())
            .await
            .map_err(kube_err(format!("reading VirtualNode {ns}/{provider}")))?
            .is_some();
        let offer = Api::<ResourceOffer>::namespaced(self.client.clone(), &ns)
            .get_opt(provider.as_str())
            .await
            .map_err(kube_err(format!("reading ResourceOffer {ns}/{provider}")))?
            .is_some();
        Ok(Held {
            secret,
            virtual_node,
            offer,
        })
    }

    /// Removes everything stored for `provider` here (the Secret, `ResourceOffer`,
    /// `VirtualNode` and the tenant namespace, or only this role's part of it when this cluster
    /// also provides to that one) and clears the consumer conditions on its `ForeignCluster`.
    /// Nothing on the provider is touched: giving access back there is the authority's
    /// [`release`](liqo_core::PeeringAuthority::release). Errors are collected: everything that
    /// can be removed is.
    pub async fn remove(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        let ns = names::tenant_namespace(provider)?;
        let mut errors = vec![];
        let mut note = |r: Result<(), PeeringError>| {
            if let Err(e) = r {
                errors.push(e.to_string());
            }
        };
        note(
            delete_opt(
                Api::<VirtualNode>::namespaced(self.client.clone(), &ns),
                provider.as_str(),
            )
            .await,
        );
        note(
            delete_opt(
                Api::<Secret>::namespaced(self.client.clone(), &ns),
                &names::kubeconfig_secret(provider),
            )
            .await,
        );
        note(
            delete_opt(
                Api::<ResourceOffer>::namespaced(self.client.clone(), &ns),
                provider.as_str(),
            )
            .await,
        );
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        match ns_api.get_opt(&ns).await {
            // Shared with the provider role (that cluster also consumes from us): keep it, drop
            // only what the consumer role owns.
            Ok(Some(n)) if n.labels().contains_key(labels::TENANT_NAMESPACE) => {
                let empty = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                note(
                    ns_api
                        .patch(&ns, &names::apply(CONSUMER_MANAGER), &Patch::Apply(&empty))
                        .await
                        .map(drop)
                        .map_err(kube_err(format!("releasing namespace {ns}"))),
                );
            }
            Ok(Some(n)) => {
                note(delete_opt(ns_api.clone(), &ns).await);
                note(wait_deleted(&ns_api, &n, self.deletion_timeout).await);
            }
            Ok(None) => {}
            Err(e) => note(Err(kube_err(format!("reading namespace {ns}"))(e))),
        }
        if let Some(fc) = foreign::find(&self.client, provider).await? {
            foreign::event(
                &self.client,
                &fc,
                false,
                "Unpeered",
                format!("released the peering with {provider}"),
            )
            .await;
        }
        note(foreign::clear(&self.client, provider, Side::Consumer).await);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PeeringError::Other(errors.join("; ").into()))
        }
    }

    /// The stored kubeconfig for `provider`.
    pub async fn kubeconfig(&self, provider: &ClusterId) -> Result<String, PeeringError> {
        let ns = names::tenant_namespace(provider)?;
        let name = names::kubeconfig_secret(provider);
        let secret = Api::<Secret>::namespaced(self.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(kube_err(format!("reading Secret {ns}/{name}")))?
            .ok_or_else(|| PeeringError::NotPeered(provider.clone()))?;
        secret
            .data
            .and_then(|d| d.get(KUBECONFIG_KEY).cloned())
            .and_then(|b| String::from_utf8(b.0).ok())
            .ok_or_else(|| {
                PeeringError::Other(format!("Secret {ns}/{name} has no {KUBECONFIG_KEY}").into())
            })
    }
}

/// What a consumer holds from one provider.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// The kubeconfig Secret.
    pub secret: Option<Secret>,
    /// Whether the VirtualNode exists.
    pub virtual_node: bool,
    /// Whether the consumer-side ResourceOffer exists.
    pub offer: bool,
}

impl Held {
    /// Whether anything of a peering is stored.
    pub fn any(&self) -> bool {
        self.secret.is_some() || self.virtual_node || self.offer
    }

    /// Whether the stored grant is complete (Secret with a kubeconfig, offer, virtual node),
    /// unexpired at `now` (the Secret's `liqo.io/credential-expires-at`, when the credential
    /// expires) and from the key `pinned` (if any).
    pub fn usable(&self, pinned: Option<KeyFingerprint>, now: SystemTime) -> bool {
        let Some(secret) = &self.secret else {
            return false;
        };
        if !self.virtual_node || !self.offer {
            return false;
        }
        if secret
            .data
            .as_ref()
            .and_then(|d| d.get(KUBECONFIG_KEY))
            .is_none_or(|b| b.0.is_empty())
        {
            return false;
        }
        let a = secret.annotations();
        if let Some(pinned) = pinned
            && a.get(KEY_FINGERPRINT_ANNOTATION) != Some(&pinned.to_string())
        {
            return false;
        }
        match a.get(EXPIRES_ANNOTATION).filter(|s| !s.is_empty()) {
            None => true,
            Some(at) => at
                .parse::<k8s_openapi::jiff::Timestamp>()
                .ok()
                .and_then(|t| u64::try_from(t.as_second()).ok())
                .is_some_and(|secs| {
                    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs) > now
                }),
        }
    }
}

/// Where a stored grant came from (and where to renew or release it), from its Secret's
/// annotations.
pub fn target_of(provider: &ClusterId, secret: &Secret) -> Option<PeeringTarget> {
    let a = secret.annotations();
    Some(PeeringTarget {
        cluster_id: Some(provider.clone()),
        endpoint: a.get(ENDPOINT_ANNOTATION)?.clone(),
        expected_fingerprint: a
            .get(KEY_FINGERPRINT_ANNOTATION)
            .and_then(|f| f.parse::<KeyFingerprint>().ok()),
    })
}

/// `t` as RFC 3339, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(annotations: &[(&str, &str)], kubeconfig: &str) -> Held {
        Held {
            secret: Some(Secret {
                metadata: ObjectMeta {
                    annotations: Some(
                        annotations
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                    ),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    KUBECONFIG_KEY.to_owned(),
                    ByteString(kubeconfig.as_bytes().to_vec()),
                )])),
                ..Secret::default()
            }),
            virtual_node: true,
            offer: true,
        }
    }

    #[test]
    fn usable_needs_everything_unexpired_and_pinned() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let later = rfc3339(now + std::time::Duration::from_secs(60));
        let earlier = rfc3339(now - std::time::Duration::from_secs(60));
        assert!(held(&[(EXPIRES_ANNOTATION, &later)], "kc").usable(None, now));
        assert!(
            held(&[(EXPIRES_ANNOTATION, "")], "kc").usable(None, now),
            "no expiry"
        );
        assert!(!held(&[(EXPIRES_ANNOTATION, &earlier)], "kc").usable(None, now));
        assert!(!held(&[(EXPIRES_ANNOTATION, "garbage")], "kc").usable(None, now));
        assert!(!held(&[], "").usable(None, now), "empty kubeconfig");
        let mut partial = held(&[], "kc");
        partial.virtual_node = false;
        assert!(partial.any() && !partial.usable(None, now));
        assert!(!Held::default().any());
    }
}
