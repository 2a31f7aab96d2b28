//! The provider role: challenge, verify, admit, build the tenant, issue the credential; revoke,
//! cordon, drain.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        certificates::v1::CertificateSigningRequest,
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
    Challenge, ClusterId, Credential, KeyFingerprint, PeeringError, PeeringGrant, PeeringRequest,
    conditions::Status,
    crds::{ResourceOffer, ResourceOfferSpec, foreign_cluster_condition as cond},
    labels,
};

use crate::{
    credential::{self, ApiEndpoint, KubeconfigParts},
    foreign::{self, Side, Stage},
    identity::{LocalIdentity, verify_signature},
    names::{
        self, APPROVED_ANNOTATION, AWAITING_APPROVAL, KEY_FINGERPRINT_ANNOTATION, MANAGED_BY_VALUE,
        PROVIDER_MANAGER, PeerLocks, SIDE_PROVIDER, TENANT_ROLE, TWIN_NAMESPACE_MANAGER, kube_err,
    },
    nonce::{NonceStore, Purpose},
    policy::{NetworkSource, OfferPolicy, PeeringPolicy},
    quota,
};

/// How a provider grants.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The API server URL and CA that go into issued kubeconfigs (reachable by consumers).
    pub api_endpoint: ApiEndpoint,
    /// Which consumers are accepted.
    pub policy: PeeringPolicy,
    /// What a new consumer is offered.
    pub offer: OfferPolicy,
    /// The network parameters handed to consumers.
    pub network: NetworkSource,
    /// Lifetime of issued client certificates (`spec.expirationSeconds`; at least 600 s, the CSR
    /// API's minimum). Consumers renew at two thirds of it. Default 24 h.
    pub credential_lifetime: Duration,
    /// How long a challenge nonce stays valid. Default 60 s.
    pub challenge_ttl: Duration,
    /// At most this many challenges outstanding at once. Default 1024.
    pub max_outstanding_challenges: usize,
    /// Under [`PeeringPolicy::Manual`], at most this many pending requests. Default 64.
    pub max_pending_approvals: usize,
    /// Bound on each wait for the API server (CSR signing, RBAC propagation, deletions).
    /// Default 30 s.
    pub api_timeout: Duration,
}

impl ProviderConfig {
    /// A configuration accepting every consumer that proves its key, with the given offer.
    pub fn new(api_endpoint: ApiEndpoint, offer: OfferPolicy, network: NetworkSource) -> Self {
        Self {
            api_endpoint,
            policy: PeeringPolicy::AcceptAll,
            offer,
            network,
            credential_lifetime: Duration::from_secs(24 * 3600),
            challenge_ttl: Duration::from_secs(60),
            max_outstanding_challenges: 1024,
            max_pending_approvals: 64,
            api_timeout: Duration::from_secs(30),
        }
    }

    /// Sets the peering policy.
    pub fn with_policy(mut self, policy: PeeringPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the credential lifetime.
    pub fn with_credential_lifetime(mut self, lifetime: Duration) -> Self {
        self.credential_lifetime = lifetime;
        self
    }
}

/// The provider role of the peering authority.
///
/// Everything is made with server-side apply under field manager `liqo-peering-provider`; every
/// object carries `liqo.io/managed-by=liqo-peering` and `liqo.io/remote-cluster-id=<consumer>`.
pub struct Provider {
    client: Client,
    identity: Arc<LocalIdentity>,
    config: ProviderConfig,
    nonces: NonceStore,
    locks: PeerLocks,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("identity", &self.identity)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// A provider acting as `identity` on the cluster of `client` (an admin-level client: it
    /// creates namespaces, RBAC and approves CSRs).
    pub fn new(client: Client, identity: Arc<LocalIdentity>, config: ProviderConfig) -> Self {
        let nonces = NonceStore::new(config.challenge_ttl, config.max_outstanding_challenges);
        Self {
            client,
            identity,
            config,
            nonces,
            locks: PeerLocks::default(),
        }
    }

    /// This provider's identity.
    pub fn identity(&self) -> &Arc<LocalIdentity> {
        &self.identity
    }

    /// The configuration.
    pub fn config(&self) -> &ProviderConfig {
        &self.config
    }

    /// The client on the provider's cluster.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Issues a single-use nonce for `consumer` to sign for `purpose`.
    pub fn challenge(
        &self,
        consumer: &ClusterId,
        purpose: Purpose,
    ) -> Result<Challenge, PeeringError> {
        self.nonces
            .issue(consumer, purpose)
            .map_err(|e| PeeringError::Refused {
                cluster: consumer.clone(),
                reason: e.to_string(),
            })
    }

    /// Verifies a signed request: addressed to us, a live nonce issued to this consumer for
    /// `purpose`, a valid signature, and the key pinned for the consumer if any. Returns the
    /// key's fingerprint.
    async fn authenticate(
        &self,
        request: &PeeringRequest,
        purpose: Purpose,
    ) -> Result<KeyFingerprint, PeeringError> {
        let consumer = &request.consumer.id;
        let reject = |reason: String| PeeringError::Unauthenticated {
            cluster: consumer.clone(),
            reason,
        };
        // The nonce is burnt first: a failed attempt cannot be retried with it.
        self.nonces
            .consume(&request.nonce, consumer, purpose)
            .map_err(|e| reject(e.to_string()))?;
        if &request.provider != self.identity.id() {
            return Err(reject(format!(
                "the request is addressed to cluster {}, this is cluster {}",
                request.provider,
                self.identity.id()
            )));
        }
        let key = request
            .consumer
            .public_key
            .as_ref()
            .ok_or_else(|| reject("the request carries no public key".into()))?;
        if !verify_signature(key, &request.payload(), &request.signature) {
            return Err(reject(
                "the signature does not verify with the presented key (forged or corrupted)".into(),
            ));
        }
        let fingerprint = key.fingerprint();
        for (pinned, origin) in self.pinned_keys(consumer).await? {
            if pinned != fingerprint {
                return Err(reject(format!(
                    "key {fingerprint} is not the key pinned for cluster {consumer} ({pinned}, from {origin})"
                )));
            }
        }
        Ok(fingerprint)
    }

    /// The fingerprints pinned for `consumer`: by discovery on its `ForeignCluster`, and by an
    /// earlier grant on its tenant namespace.
    async fn pinned_keys(
        &self,
        consumer: &ClusterId,
    ) -> Result<Vec<(KeyFingerprint, &'static str)>, PeeringError> {
        let mut pins = vec![];
        if let Some(fc) = foreign::find(&self.client, consumer).await?
            && let Some(fp) = fc.spec.public_key_fingerprint
        {
            pins.push((fp, "its ForeignCluster"));
        }
        if let Some(ns) = self.tenant(consumer).await?
            && let Some(fp) = ns
                .annotations()
                .get(KEY_FINGERPRINT_ANNOTATION)
                .and_then(|s| s.parse().ok())
        {
            pins.push((fp, "its tenant namespace"));
        }
        Ok(pins)
    }

    async fn tenant(&self, consumer: &ClusterId) -> Result<Option<Namespace>, PeeringError> {
        let name = names::tenant_namespace(consumer)?;
        let ns = Api::<Namespace>::all(self.client.clone())
            .get_opt(&name)
            .await
            .map_err(kube_err(format!("reading namespace {name}")))?;
        // A namespace of the consumer role only (we consume from that cluster) is not a tenant.
        Ok(ns.filter(|ns| ns.labels().contains_key(labels::TENANT_NAMESPACE)))
    }

    /// Verifies `request`, applies the policy and, if accepted, makes (or renews) the consumer's
    /// tenant: namespace, offer, quota, RBAC and a fresh credential. A refusal creates nothing
    /// (except, under [`PeeringPolicy::Manual`], the pending `ForeignCluster` an administrator
    /// approves); a failure while building a new tenant removes what was made.
    ///
    /// The credential is a certificate for the consumer's own key: the request must carry the
    /// consumer's certificate signing request ([`PeeringRequest::csr`], bound into its
    /// signature), whose subject must be exactly `CN=liqo-consumer-<consumer>` (see
    /// [`credential::check_csr`]). The grant's kubeconfig holds that certificate and no private
    /// key. A request without a CSR (a consumer predating it, which expected the provider to
    /// make its key) is refused: this provider never makes or sends consumers' private keys.
    pub async fn grant(&self, request: PeeringRequest) -> Result<PeeringGrant, PeeringError> {
        let fingerprint = self.authenticate(&request, Purpose::Grant).await?;
        let consumer = request.consumer.id.clone();
        // Before anything is made: a bad request leaves nothing behind.
        let csr = self.checked_csr(&request)?;
        let _guard = self.locks.lock(&consumer).await;
        let existing = self.tenant(&consumer).await?;
        self.admit(&request, &fingerprint, existing.is_some())
            .await?;
        match self.build(&request, &fingerprint, csr).await {
            Ok(grant) => Ok(grant),
            Err(e) => {
                if existing.is_none() {
                    tracing::warn!(%consumer, error = %e, "granting failed; removing what was made");
                    if let Err(cleanup) = self.revoke_locked(&consumer).await {
                        tracing::warn!(%consumer, error = %cleanup, "rollback incomplete");
                    }
                }
                Err(e)
            }
        }
    }

    /// The request's certificate signing request, refused when absent or not for the consumer's
    /// user.
    fn checked_csr<'r>(&self, request: &'r PeeringRequest) -> Result<&'r str, PeeringError> {
        let consumer = &request.consumer.id;
        let csr = request
            .csr
            .as_deref()
            .ok_or_else(|| PeeringError::Refused {
                cluster: consumer.clone(),
                reason: "the request carries no certificate signing request (csr): this provider \
                     issues credentials only for keys the consumer made itself; upgrade the \
                     consumer"
                    .into(),
            })?;
        credential::check_csr(csr, &names::consumer_user(consumer)).map_err(|e| {
            PeeringError::Refused {
                cluster: consumer.clone(),
                reason: e.to_string(),
            }
        })?;
        Ok(csr)
    }

    async fn admit(
        &self,
        request: &PeeringRequest,
        fingerprint: &KeyFingerprint,
        renewal: bool,
    ) -> Result<(), PeeringError> {
        let consumer = &request.consumer.id;
        match &self.config.policy {
            PeeringPolicy::AcceptAll => Ok(()),
            PeeringPolicy::AllowList(ids) if ids.contains(consumer) => Ok(()),
            PeeringPolicy::AllowList(_) => Err(PeeringError::Refused {
                cluster: consumer.clone(),
                reason: "the cluster is not in this provider's allow list".into(),
            }),
            // An approved consumer renewing (its pinned key was checked) needs no new approval.
            PeeringPolicy::Manual if renewal => Ok(()),
            PeeringPolicy::Manual => self.admit_manually(request, fingerprint).await,
        }
    }

    async fn admit_manually(
        &self,
        request: &PeeringRequest,
        fingerprint: &KeyFingerprint,
    ) -> Result<(), PeeringError> {
        let consumer = &request.consumer.id;
        let api: Api<liqo_core::crds::ForeignCluster> = Api::all(self.client.clone());
        let existing = foreign::find(&self.client, consumer).await?;
        if let Some(fc) = &existing {
            let approved = fc
                .annotations()
                .get(APPROVED_ANNOTATION)
                .map(String::as_str)
                == Some("true");
            let for_key = fc.annotations().get(KEY_FINGERPRINT_ANNOTATION);
            if approved && for_key == Some(&fingerprint.to_string()) {
                return Ok(());
            }
            if approved {
                return Err(PeeringError::Refused {
                    cluster: consumer.clone(),
                    reason: format!(
                        "the approval on ForeignCluster {} is for key {}, not {fingerprint}",
                        fc.name_any(),
                        for_key.map(String::as_str).unwrap_or("(none recorded)")
                    ),
                });
            }
        } else {
            let pending = api
                .list(
                    &ListParams::default()
                        .labels(&format!("{}={MANAGED_BY_VALUE}", labels::MANAGED_BY)),
                )
                .await
                .map_err(kube_err("listing ForeignClusters"))?
                .items
                .iter()
                .filter(|fc| !fc.annotations().contains_key(APPROVED_ANNOTATION))
                .filter(|fc| fc.annotations().contains_key(KEY_FINGERPRINT_ANNOTATION))
                .count();
            if pending >= self.config.max_pending_approvals {
                return Err(PeeringError::Refused {
                    cluster: consumer.clone(),
                    reason: format!("{pending} requests already await approval; retry later"),
                });
            }
        }
        let fc = foreign::ensure(
            &self.client,
            consumer,
            Some(&request.consumer.name),
            Side::Provider,
        )
        .await?;
        let patch = serde_json::json!({"metadata": {"annotations": {KEY_FINGERPRINT_ANNOTATION: fingerprint.to_string()}}});
        api.patch(
            &fc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(kube_err(format!(
            "recording the pending request on ForeignCluster {}",
            fc.name_any()
        )))?;
        let reason = format!(
            "{AWAITING_APPROVAL}: annotate foreignclusters.liqo.io/{} with {APPROVED_ANNOTATION}=true",
            fc.name_any()
        );
        foreign::set_stages(
            &self.client,
            consumer,
            Side::Provider,
            &[
                Stage {
                    type_: cond::CONSUMER_AUTHENTICATED,
                    status: Status::True,
                    reason: "KeyVerified",
                    message: format!("signed our challenge with key {fingerprint}"),
                },
                Stage {
                    type_: cond::TENANT_READY,
                    status: Status::False,
                    reason: "AwaitingApproval",
                    message: reason.clone(),
                },
            ],
            None,
        )
        .await?;
        foreign::event(
            &self.client,
            &fc,
            false,
            "PeeringAwaitingApproval",
            reason.clone(),
        )
        .await;
        Err(PeeringError::Refused {
            cluster: consumer.clone(),
            reason,
        })
    }

    async fn build(
        &self,
        request: &PeeringRequest,
        fingerprint: &KeyFingerprint,
        csr: &str,
    ) -> Result<PeeringGrant, PeeringError> {
        let consumer = &request.consumer.id;
        let me = self.identity.id();
        let tenant = names::tenant_namespace(consumer)?;
        let ssa = names::apply(PROVIDER_MANAGER);

        // 1. The tenant namespace, with the consumer's key pinned on it.
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        let ns = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {
                "name": tenant,
                "labels": namespace_labels(consumer, true),
                "annotations": {KEY_FINGERPRINT_ANNOTATION: fingerprint.to_string()},
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
            None => (self.config.offer.offer(&self.client).await?, false),
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

        // 5. The credential: a certificate for the consumer's key, the kubeconfig without a key.
        let cert = credential::issue(
            &self.client,
            consumer,
            csr,
            self.config.credential_lifetime,
            self.config.api_timeout,
        )
        .await?;
        let kubeconfig = credential::render_kubeconfig(&KubeconfigParts {
            provider: me,
            endpoint: &self.config.api_endpoint,
            user: &user,
            namespace: &tenant,
            cert_pem: &cert.cert_pem,
            key_pem: None,
        })?;
        let network = self.config.network.parameters().await?;

        // 6. Say so on the consumer's ForeignCluster.
        let fc = foreign::ensure(
            &self.client,
            consumer,
            Some(&request.consumer.name),
            Side::Provider,
        )
        .await?;
        foreign::set_stages(
            &self.client,
            consumer,
            Side::Provider,
            &[
                Stage {
                    type_: cond::CONSUMER_AUTHENTICATED,
                    status: Status::True,
                    reason: "KeyVerified",
                    message: format!("signed our challenge with key {fingerprint}"),
                },
                Stage {
                    type_: cond::TENANT_READY,
                    status: Status::True,
                    reason: "CredentialIssued",
                    message: format!(
                        "tenant namespace {tenant}; user {user}; offer cpu={} memory={} pods={}",
                        resources.cpu.0, resources.memory.0, resources.pods
                    ),
                },
            ],
            // The consumer's network, for the network controller (`status.network`).
            Some(&foreign::ConsumerFields {
                remote_namespace: None,
                network: Some(request.network.clone()),
            }),
        )
        .await?;
        foreign::event(
            &self.client,
            &fc,
            false,
            "CredentialIssued",
            format!("issued a credential for user {user} in {tenant}"),
        )
        .await;
        tracing::info!(%consumer, %tenant, "granted");
        Ok(PeeringGrant {
            provider: self.identity.identity(),
            credential: Credential {
                kubeconfig,
                tenant_namespace: tenant,
                expires_at: Some(cert.not_after),
            },
            offer: resources,
            network,
        })
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
        let deadline = tokio::time::Instant::now() + self.config.api_timeout;
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
                        self.config.api_timeout
                    )
                    .into(),
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Handles a consumer's own request to end its peering (signed like a grant request, with a
    /// nonce issued for [`Purpose::Release`]).
    pub async fn release(&self, request: PeeringRequest) -> Result<(), PeeringError> {
        self.authenticate(&request, Purpose::Release).await?;
        self.revoke(&request.consumer.id).await
    }

    /// Revokes `consumer`: deletes its RoleBinding and Role first (a client certificate cannot be
    /// revoked in Kubernetes; without RBAC it authenticates but is authorized for nothing), then
    /// its twin namespaces, any CSR left, the offer and the tenant namespace, forgets its key and
    /// clears its `ForeignCluster`. Waits (bounded) until the namespaces are gone.
    pub async fn revoke(&self, consumer: &ClusterId) -> Result<(), PeeringError> {
        let _guard = self.locks.lock(consumer).await;
        self.revoke_locked(consumer).await
    }

    async fn revoke_locked(&self, consumer: &ClusterId) -> Result<(), PeeringError> {
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
        note(self.delete_csrs(consumer).await);
        note(quota::release_offer(&self.client, &tenant, self.identity.id()).await);
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
            // Applying nothing as the provider drops the labels and annotation only it owns.
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
            if fc.annotations().contains_key(APPROVED_ANNOTATION)
                || fc.annotations().contains_key(KEY_FINGERPRINT_ANNOTATION)
            {
                let patch = serde_json::json!({"metadata": {"annotations": {APPROVED_ANNOTATION: null, KEY_FINGERPRINT_ANNOTATION: null}}});
                note(
                    Api::<liqo_core::crds::ForeignCluster>::all(self.client.clone())
                        .patch(
                            &fc.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await
                        .map(drop)
                        .map_err(kube_err(format!(
                            "forgetting the approval on ForeignCluster {}",
                            fc.name_any()
                        ))),
                );
            }
        }
        note(foreign::clear(&self.client, consumer, Side::Provider).await);
        for ns in gone {
            note(wait_deleted(&ns_api, &ns, self.config.api_timeout).await);
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

    async fn twin_namespaces(&self, consumer: &ClusterId) -> Result<Vec<Namespace>, PeeringError> {
        Ok(Api::<Namespace>::all(self.client.clone())
            .list(&ListParams::default().labels(&twin_selector(consumer)))
            .await
            .map_err(kube_err(format!(
                "listing the twin namespaces of {consumer}"
            )))?
            .items)
    }

    async fn delete_csrs(&self, consumer: &ClusterId) -> Result<(), PeeringError> {
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let selector = format!(
            "{}={MANAGED_BY_VALUE},{}={consumer}",
            labels::MANAGED_BY,
            labels::REMOTE_CLUSTER_ID
        );
        for csr in api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_err("listing CSRs"))?
            .items
        {
            delete_opt(api.clone(), &csr.name_any()).await?;
        }
        Ok(())
    }

    /// Cordons (`true`) or uncordons `consumer`: a cordoned consumer can create no new pods here
    /// (its quotas allow zero pods); running pods stay.
    pub async fn cordon(&self, consumer: &ClusterId, cordoned: bool) -> Result<(), PeeringError> {
        let tenant = names::tenant_namespace(consumer)?;
        let me = self.identity.id();
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
pub(crate) fn namespace_labels(peer: &ClusterId, provider: bool) -> BTreeMap<String, String> {
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

pub(crate) async fn delete_opt<K>(api: Api<K>, name: &str) -> Result<(), PeeringError>
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

pub(crate) async fn wait_deleted<K>(
    api: &Api<K>,
    obj: &K,
    timeout: Duration,
) -> Result<(), PeeringError>
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
