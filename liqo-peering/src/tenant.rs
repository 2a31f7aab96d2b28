//! The provider side every peering method shares: the consumer's tenant (namespace, offer,
//! quota, Role and RoleBinding for the consumer's user), its readiness on the `ForeignCluster`,
//! and its revocation, cordon and drain.
//!
//! How the consumer proves who it is and how its credential reaches it differ per method (a
//! signed handshake over HTTPS, a bundle an administrator hands over); what it may do once
//! there, and what revoking removes, do not.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        core::v1::{Namespace, Pod, Secret},
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::wait::{await_condition, conditions},
};
use liqo_core::{
    ClusterId, NetworkParameters, PeeringError,
    conditions::Status,
    crds::{ResourceOffer, ResourceOfferSpec, foreign_cluster_condition as cond},
    labels,
};

use crate::{
    foreign::{self, Side, Stage},
    names::{
        self, MANAGED_BY_VALUE, PROVIDER_MANAGER, SIDE_PROVIDER, TENANT_ROLE,
        TWIN_NAMESPACE_MANAGER, kube_err,
    },
    offer::OfferPolicy,
    quota,
};

/// A consumer's tenant as [`Tenants::apply`] left it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// The tenant namespace, `liqo-tenant-<consumer>`.
    pub namespace: String,
    /// The Kubernetes user the Role is bound to, `liqo-consumer-<consumer>`.
    pub user: String,
    /// What the consumer is offered (the provider-side `ResourceOffer`'s resources).
    pub offer: liqo_core::ResourceOffer,
}

/// The tenants of one provider cluster: what every peering method makes for a consumer there.
///
/// Everything is made with server-side apply under field manager `liqo-peering-provider`; every
/// object carries `liqo.io/managed-by=liqo-peering` and `liqo.io/remote-cluster-id=<consumer>`.
/// The caller serialises calls for one consumer (e.g. with a [`PeerLocks`](crate::names::PeerLocks)).
#[derive(Clone)]
pub struct Tenants {
    client: Client,
    me: ClusterId,
    timeout: Duration,
}

impl std::fmt::Debug for Tenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenants")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Tenants {
    /// The tenants of provider `me` on the cluster of `client` (an admin-level client: it creates
    /// namespaces and RBAC), waiting at most 30 s for the API server (RBAC propagation,
    /// deletions).
    pub fn new(client: Client, me: ClusterId) -> Self {
        Self {
            client,
            me,
            timeout: Duration::from_secs(30),
        }
    }

    /// Bounds each wait for the API server.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The provider's cluster id.
    pub fn provider_id(&self) -> &ClusterId {
        &self.me
    }

    /// The client on the provider's cluster.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `consumer`'s tenant namespace, if it exists as a tenant (a namespace of the consumer role
    /// only, where this cluster consumes from that one, is not a tenant).
    pub async fn find(&self, consumer: &ClusterId) -> Result<Option<Namespace>, PeeringError> {
        let name = names::tenant_namespace(consumer)?;
        let ns = Api::<Namespace>::all(self.client.clone())
            .get_opt(&name)
            .await
            .map_err(kube_err(format!("reading namespace {name}")))?;
        Ok(ns.filter(|ns| ns.labels().contains_key(labels::TENANT_NAMESPACE)))
    }

    /// Makes (or renews) `consumer`'s tenant: the namespace (with `annotations`, e.g. the key the
    /// consumer proved), the `ResourceOffer` named after this provider (kept as is when it
    /// exists: an administrator may have edited it; else from `offer`), its quota, and the Role
    /// ([`tenant_rules`]) and RoleBinding for user `liqo-consumer-<consumer>`; then waits until
    /// the API server's authorizer lets that user in, so a credential for it works at once.
    /// Issuing the credential is the caller's (the method's).
    pub async fn apply(
        &self,
        consumer: &ClusterId,
        annotations: BTreeMap<String, String>,
        offer: &OfferPolicy,
    ) -> Result<Tenant, PeeringError> {
        let me = &self.me;
        let tenant = names::tenant_namespace(consumer)?;
        let ssa = names::apply(PROVIDER_MANAGER);

        // 1. The tenant namespace.
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        let ns = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {
                "name": tenant,
                "labels": namespace_labels(consumer, true),
                "annotations": annotations,
            },
        });
        let ns: Namespace = ns_api
            .patch(&tenant, &ssa, &Patch::Apply(&ns))
            .await
            .map_err(kube_err(format!("applying tenant namespace {tenant}")))?;
        if ns.metadata.deletion_timestamp.is_some() {
            return Err(PeeringError::Refused {
                cluster: consumer.clone(),
                reason: format!("tenant namespace {tenant} is still being deleted; retry shortly"),
            });
        }

        // 2. The offer: kept as is when it exists (an administrator may have edited it).
        let offers: Api<ResourceOffer> = Api::namespaced(self.client.clone(), &tenant);
        let current = offers
            .get_opt(me.as_str())
            .await
            .map_err(kube_err(format!("reading ResourceOffer {tenant}/{me}")))?;
        let (resources, cordoned) = match &current {
            Some(ro) => (ro.spec.resources.clone(), ro.spec.cordoned),
            None => (offer.offer(&self.client).await?, false),
        };
        let mut ro_labels = names::peer_labels(consumer, SIDE_PROVIDER);
        ro_labels.insert(labels::ORIGIN_CLUSTER_ID.to_owned(), me.to_string());
        let ro = serde_json::json!({
            "apiVersion": ResourceOffer::api_version(&()), "kind": ResourceOffer::kind(&()),
            "metadata": {"name": me.as_str(), "labels": ro_labels},
            "spec": ResourceOfferSpec {
                provider_cluster_id: me.clone(),
                consumer_cluster_id: consumer.clone(),
                resources: resources.clone(),
                cordoned,
            },
        });
        let ro: ResourceOffer = offers
            .patch(me.as_str(), &ssa, &Patch::Apply(&ro))
            .await
            .map_err(kube_err(format!("applying ResourceOffer {tenant}/{me}")))?;

        // 3. The quota, before any access exists.
        quota::enforce(&self.client, &ro).await?;

        // 4. RBAC: only what offloading needs, only in the tenant namespace.
        let user = names::consumer_user(consumer);
        let role = Role {
            metadata: ObjectMeta {
                name: Some(TENANT_ROLE.into()),
                namespace: Some(tenant.clone()),
                labels: Some(names::peer_labels(consumer, SIDE_PROVIDER)),
                ..ObjectMeta::default()
            },
            rules: Some(tenant_rules()),
        };
        Api::<Role>::namespaced(self.client.clone(), &tenant)
            .patch(TENANT_ROLE, &ssa, &Patch::Apply(&with_type(&role)?))
            .await
            .map_err(kube_err(format!("applying Role {tenant}/{TENANT_ROLE}")))?;
        let binding = RoleBinding {
            metadata: ObjectMeta {
                name: Some(TENANT_ROLE.into()),
                namespace: Some(tenant.clone()),
                labels: Some(names::peer_labels(consumer, SIDE_PROVIDER)),
                ..ObjectMeta::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: TENANT_ROLE.into(),
            },
            subjects: Some(vec![Subject {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "User".into(),
                name: user.clone(),
                namespace: None,
            }]),
        };
        Api::<RoleBinding>::namespaced(self.client.clone(), &tenant)
            .patch(TENANT_ROLE, &ssa, &Patch::Apply(&with_type(&binding)?))
            .await
            .map_err(kube_err(format!(
                "applying RoleBinding {tenant}/{TENANT_ROLE}"
            )))?;
        self.wait_authorized(&user, &tenant).await?;
        Ok(Tenant {
            namespace: tenant,
            user,
            offer: resources,
        })
    }

    /// Says on `consumer`'s `ForeignCluster` (made if missing, named `name` when given) that it
    /// authenticated (`how`: e.g. which key it proved) and that its tenant is ready with a
    /// credential, records the consumer's `network` for the network controller, and emits the
    /// `CredentialIssued` Event.
    pub async fn ready(
        &self,
        consumer: &ClusterId,
        name: Option<&str>,
        tenant: &Tenant,
        authenticated: (&'static str, String),
        network: &NetworkParameters,
    ) -> Result<(), PeeringError> {
        let fc = foreign::ensure(&self.client, consumer, name, Side::Provider).await?;
        let Tenant {
            namespace,
            user,
            offer,
        } = tenant;
        foreign::set_stages(
            &self.client,
            consumer,
            Side::Provider,
            &[
                Stage {
                    type_: cond::CONSUMER_AUTHENTICATED,
                    status: Status::True,
                    reason: authenticated.0,
                    message: authenticated.1,
                },
                Stage {
                    type_: cond::TENANT_READY,
                    status: Status::True,
                    reason: "CredentialIssued",
                    message: format!(
                        "tenant namespace {namespace}; user {user}; offer cpu={} memory={} pods={}",
                        offer.cpu.0, offer.memory.0, offer.pods
                    ),
                },
            ],
            // The consumer's network, for the network controller (`status.network`).
            Some(&foreign::ConsumerFields {
                remote_namespace: None,
                network: Some(network.clone()),
            }),
        )
        .await?;
        foreign::event(
            &self.client,
            &fc,
            false,
            "CredentialIssued",
            format!("issued a credential for user {user} in {namespace}"),
        )
        .await;
        tracing::info!(%consumer, tenant = %namespace, "granted");
        Ok(())
    }

    /// Waits until the API server's authorizer lets `user` use its tenant namespace, so the
    /// credential works the moment the grant is returned (RBAC reaches the authorizer through an
    /// informer, a few milliseconds after the write).
    async fn wait_authorized(&self, user: &str, namespace: &str) -> Result<(), PeeringError> {
        let reviews: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.to_owned()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    group: Some(liqo_core::crds::GROUP.to_owned()),
                    resource: Some("remotenamespaces".to_owned()),
                    verb: Some("create".to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut delay = Duration::from_millis(5);
        loop {
            let answer = reviews
                .create(&PostParams::default(), &review)
                .await
                .map_err(kube_err(format!("reviewing the access of {user}")))?;
            if answer.status.is_some_and(|s| s.allowed) {
                return Ok(());
            }
            if tokio::time::Instant::now() + delay > deadline {
                return Err(PeeringError::Other(
                    format!(
                        "the RoleBinding for {user} in {namespace} did not take effect within {:?}",
                        self.timeout
                    )
                    .into(),
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Revokes `consumer`: deletes its RoleBinding and Role first (a client certificate cannot be
    /// revoked in Kubernetes; without RBAC it authenticates but is authorized for nothing), then
    /// its twin namespaces, the offer and the tenant namespace (or, when this cluster also
    /// consumes from that peer, only the provider's part of it), and clears its `ForeignCluster`.
    /// Waits (bounded) until the namespaces are gone. Method-specific leftovers (pending
    /// certificate requests, pinned keys) are the caller's. Errors are collected: everything that
    /// can be removed is.
    pub async fn revoke(&self, consumer: &ClusterId) -> Result<(), PeeringError> {
        let tenant = names::tenant_namespace(consumer)?;
        let mut errors: Vec<String> = vec![];
        let mut note = |r: Result<(), PeeringError>| {
            if let Err(e) = r {
                errors.push(e.to_string());
            }
        };
        let fc = foreign::find(&self.client, consumer).await?;
        note(
            delete_opt(
                Api::<RoleBinding>::namespaced(self.client.clone(), &tenant),
                TENANT_ROLE,
            )
            .await,
        );
        note(
            delete_opt(
                Api::<Role>::namespaced(self.client.clone(), &tenant),
                TENANT_ROLE,
            )
            .await,
        );
        let mut gone: Vec<Namespace> = vec![];
        match self.twin_namespaces(consumer).await {
            Ok(twins) => {
                for ns in twins {
                    note(
                        delete_opt(Api::<Namespace>::all(self.client.clone()), &ns.name_any())
                            .await,
                    );
                    gone.push(ns);
                }
            }
            Err(e) => note(Err(e)),
        }
        note(quota::release_offer(&self.client, &tenant, &self.me).await);
        // The namespace is shared with the consumer role when this cluster also consumes from
        // that peer: then only the provider's objects go.
        let consumes_too = Api::<Secret>::namespaced(self.client.clone(), &tenant)
            .get_opt(&names::kubeconfig_secret(consumer))
            .await
            .map_err(kube_err(format!("reading Secrets in {tenant}")))?
            .is_some();
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        if consumes_too {
            note(quota::remove_namespace_quota(&self.client, &tenant).await);
            // Applying nothing as the provider drops the labels and annotations only it owns.
            let empty = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": tenant}});
            note(
                ns_api
                    .patch(
                        &tenant,
                        &names::apply(PROVIDER_MANAGER),
                        &Patch::Apply(&empty),
                    )
                    .await
                    .map(drop)
                    .map_err(kube_err(format!("releasing namespace {tenant}"))),
            );
        } else if let Some(ns) = ns_api
            .get_opt(&tenant)
            .await
            .map_err(kube_err(format!("reading namespace {tenant}")))?
        {
            note(delete_opt(ns_api.clone(), &tenant).await);
            gone.push(ns);
        }
        if let Some(fc) = &fc {
            foreign::event(
                &self.client,
                fc,
                false,
                "ConsumerRevoked",
                format!("revoked the credential and removed the tenant of {consumer}"),
            )
            .await;
        }
        note(foreign::clear(&self.client, consumer, Side::Provider).await);
        for ns in gone {
            note(wait_deleted(&ns_api, &ns, self.timeout).await);
        }
        if errors.is_empty() {
            tracing::info!(%consumer, "revoked");
            Ok(())
        } else {
            Err(PeeringError::Other(
                format!("revoking {consumer}: {}", errors.join("; ")).into(),
            ))
        }
    }

    /// `consumer`'s twin namespaces on this cluster (made by liqo-vk).
    pub async fn twin_namespaces(
        &self,
        consumer: &ClusterId,
    ) -> Result<Vec<Namespace>, PeeringError> {
        Ok(Api::<Namespace>::all(self.client.clone())
            .list(&ListParams::default().labels(&twin_selector(consumer)))
            .await
            .map_err(kube_err(format!(
                "listing the twin namespaces of {consumer}"
            )))?
            .items)
    }

    /// Cordons (`true`) or uncordons `consumer`: a cordoned consumer can create no new pods here
    /// (its quotas allow zero pods); running pods stay.
    pub async fn cordon(&self, consumer: &ClusterId, cordoned: bool) -> Result<(), PeeringError> {
        let tenant = names::tenant_namespace(consumer)?;
        let me = &self.me;
        let offers: Api<ResourceOffer> = Api::namespaced(self.client.clone(), &tenant);
        let patch = serde_json::json!({"spec": {"cordoned": cordoned}});
        let ro = offers
            .patch(me.as_str(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| {
                if names::is_not_found(&e) {
                    PeeringError::NotPeered(consumer.clone())
                } else {
                    kube_err(format!("cordoning {consumer}"))(e)
                }
            })?;
        quota::enforce(&self.client, &ro).await
    }

    /// Deletes every pod of `consumer` on this cluster (in its twin namespaces) and returns how
    /// many. Combine with [`cordon`](Self::cordon) so the consumer cannot start them again.
    pub async fn drain(&self, consumer: &ClusterId) -> Result<usize, PeeringError> {
        let mut count = 0;
        for ns in self.twin_namespaces(consumer).await? {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns.name_any());
            let list = pods
                .list(&ListParams::default())
                .await
                .map_err(kube_err(format!("listing pods in {}", ns.name_any())))?;
            for pod in list.items {
                delete_opt(pods.clone(), &pod.name_any()).await?;
                count += 1;
            }
        }
        Ok(count)
    }
}

/// The rules of the consumer's Role in its tenant namespace: request twin namespaces, read its
/// offer, and publish its view of the network link (`networkconfigs`, and their `status`: the
/// network view exchange of liqo-net). Nothing else (no delete of network configs, nothing in
/// any other namespace); pods and the rest are granted per twin namespace by liqo-vk.
pub fn tenant_rules() -> Vec<PolicyRule> {
    let group = liqo_core::crds::GROUP.to_owned();
    vec![
        PolicyRule {
            api_groups: Some(vec![group.clone()]),
            resources: Some(vec!["remotenamespaces".into()]),
            verbs: [
                "create", "get", "list", "watch", "update", "patch", "delete",
            ]
            .map(String::from)
            .to_vec(),
            ..PolicyRule::default()
        },
        PolicyRule {
            api_groups: Some(vec![group.clone()]),
            resources: Some(vec!["resourceoffers".into()]),
            verbs: ["get", "list", "watch"].map(String::from).to_vec(),
            ..PolicyRule::default()
        },
        PolicyRule {
            api_groups: Some(vec![group.clone()]),
            resources: Some(vec!["networkconfigs".into()]),
            verbs: ["get", "list", "watch", "create", "patch", "update"]
                .map(String::from)
                .to_vec(),
            ..PolicyRule::default()
        },
        PolicyRule {
            api_groups: Some(vec![group]),
            resources: Some(vec!["networkconfigs/status".into()]),
            verbs: ["get", "patch", "update"].map(String::from).to_vec(),
            ..PolicyRule::default()
        },
    ]
}

/// Labels of a tenant namespace. `provider` adds `liqo.io/tenant-namespace`, which marks the
/// provider role; both roles agree on the others, so they co-own them.
pub fn namespace_labels(peer: &ClusterId, provider: bool) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (labels::MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (labels::REMOTE_CLUSTER_ID.to_owned(), peer.to_string()),
    ]);
    if provider {
        l.insert(labels::TENANT_NAMESPACE.to_owned(), peer.to_string());
    }
    l
}

/// The label selector of `consumer`'s twin namespaces (made by liqo-vk).
pub fn twin_selector(consumer: &ClusterId) -> String {
    format!(
        "{}={consumer},{}={TWIN_NAMESPACE_MANAGER}",
        labels::REMOTE_CLUSTER_ID,
        labels::MANAGED_BY
    )
}

fn with_type<K: Resource<DynamicType = ()> + serde::Serialize>(
    obj: &K,
) -> Result<serde_json::Value, PeeringError> {
    let mut v = serde_json::to_value(obj).map_err(|e| PeeringError::Other(Box::new(e)))?;
    v["apiVersion"] = K::api_version(&()).into();
    v["kind"] = K::kind(&()).into();
    Ok(v)
}

/// Deletes `name` (in the background), treating "already gone" as done.
pub async fn delete_opt<K>(api: Api<K>, name: &str) -> Result<(), PeeringError>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(e) if names::is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err(format!(
            "deleting {} {name}",
            std::any::type_name::<K>()
                .rsplit("::")
                .next()
                .unwrap_or("object")
        ))(e)),
    }
}

/// Waits (at most `timeout`) until `obj` (that very object, by UID) is gone.
pub async fn wait_deleted<K>(api: &Api<K>, obj: &K, timeout: Duration) -> Result<(), PeeringError>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let name = obj.name_any();
    let uid = obj.uid().unwrap_or_default();
    match tokio::time::timeout(
        timeout,
        await_condition(api.clone(), &name, conditions::is_deleted(&uid)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(PeeringError::Other(
            format!("watching the deletion of {name}: {e}").into(),
        )),
        Err(_) => Err(PeeringError::Other(
            format!("{name} still exists {timeout:?} after its deletion").into(),
        )),
    }
}
