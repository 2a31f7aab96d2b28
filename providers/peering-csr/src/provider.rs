//! The provider role: challenge, verify, admit, build the tenant, issue the credential; revoke,
//! cordon, drain.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::api::{certificates::v1::CertificateSigningRequest, core::v1::Namespace};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use liqo_core::{
    Challenge, ClusterId, Credential, KeyFingerprint, PeeringError, PeeringGrant, PeeringRequest,
    conditions::Status, crds::foreign_cluster_condition as cond, labels,
};
use liqo_peering::{
    ApiEndpoint, NetworkSource, OfferPolicy, Tenants,
    credential::{self, KubeconfigParts},
    delete_opt,
    foreign::{self, Side, Stage},
};

use crate::{
    identity::{LocalIdentity, verify_signature},
    names::{
        self, APPROVED_ANNOTATION, AWAITING_APPROVAL, KEY_FINGERPRINT_ANNOTATION, MANAGED_BY_VALUE,
        PeerLocks, kube_err,
    },
    nonce::{NonceStore, Purpose},
    policy::PeeringPolicy,
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
    tenants: Tenants,
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
            tenants: Tenants::new(client.clone(), identity.id().clone())
                .with_timeout(config.api_timeout),
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

    /// The tenants every method shares (namespace, offer, quota, RBAC).
    pub fn tenants(&self) -> &Tenants {
        &self.tenants
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
        self.tenants.find(consumer).await
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
        // 1-4. The tenant: namespace (the consumer's key pinned on it), offer, quota, RBAC.
        let built = self
            .tenants
            .apply(
                consumer,
                BTreeMap::from([(
                    KEY_FINGERPRINT_ANNOTATION.to_owned(),
                    fingerprint.to_string(),
                )]),
                &self.config.offer,
            )
            .await?;
        let (tenant, user) = (&built.namespace, &built.user);

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
            user,
            namespace: tenant,
            cert_pem: &cert.cert_pem,
            key_pem: None,
        })?;
        let network = self.config.network.parameters().await?;

        // 6. Say so on the consumer's ForeignCluster.
        self.tenants
            .ready(
                consumer,
                Some(&request.consumer.name),
                &built,
                (
                    "KeyVerified",
                    format!("signed our challenge with key {fingerprint}"),
                ),
                &request.network,
            )
            .await?;
        Ok(PeeringGrant {
            provider: self.identity.identity(),
            credential: Credential {
                kubeconfig,
                tenant_namespace: built.namespace.clone(),
                expires_at: Some(cert.not_after),
            },
            offer: built.offer,
            network,
        })
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
        let fc = foreign::find(&self.client, consumer).await?;
        let mut errors: Vec<String> = vec![];
        let mut note = |r: Result<(), PeeringError>| {
            if let Err(e) = r {
                errors.push(e.to_string());
            }
        };
        // The handshake's own first (the shared revoke may delete the ForeignCluster): the
        // approval and pinned key, certificate requests still pending.
        note(self.delete_csrs(consumer).await);
        if let Some(fc) = &fc
            && (fc.annotations().contains_key(APPROVED_ANNOTATION)
                || fc.annotations().contains_key(KEY_FINGERPRINT_ANNOTATION))
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
                    .or_else(|e| {
                        if names::is_not_found(&e) {
                            Ok(())
                        } else {
                            Err(kube_err(format!(
                                "forgetting the approval on ForeignCluster {}",
                                fc.name_any()
                            ))(e))
                        }
                    }),
            );
        }
        // Then the tenant, RBAC first (shared by every method).
        note(self.tenants.revoke(consumer).await);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PeeringError::Other(errors.join("; ").into()))
        }
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
        self.tenants.cordon(consumer, cordoned).await
    }

    /// Deletes every pod of `consumer` on this cluster (in its twin namespaces) and returns how
    /// many. Combine with [`cordon`](Self::cordon) so the consumer cannot start them again.
    pub async fn drain(&self, consumer: &ClusterId) -> Result<usize, PeeringError> {
        self.tenants.drain(consumer).await
    }
}
