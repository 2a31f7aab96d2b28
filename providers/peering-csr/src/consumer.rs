//! The consumer role: prove our identity to a provider, check its identity, and keep what it
//! granted (kubeconfig Secret, ResourceOffer, VirtualNode) in our cluster.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, Resource, ResourceExt, api::Patch};
use liqo_core::{
    ClusterId, ClusterIdentity, KeyFingerprint, PeeringError, PeeringGrant, PeeringRequest,
    PeeringTarget,
    conditions::{Condition, Status},
    crds::{
        ResourceOffer, ResourceOfferSpec, SecretKeyRef, VirtualNode, VirtualNodeSpec,
        foreign_cluster_condition as cond,
    },
    labels,
};

use crate::{
    credential::{self, ClientKey, secret_labels},
    foreign::{self, ConsumerFields, Side, Stage},
    identity::LocalIdentity,
    names::{
        self, CONSUMER_MANAGER, ENDPOINT_ANNOTATION, EXPIRES_ANNOTATION,
        KEY_FINGERPRINT_ANNOTATION, KUBECONFIG_KEY, PIN_MISMATCH, PeerLocks, SIDE_CONSUMER,
        kube_err,
    },
    nonce::Purpose,
    policy::NetworkSource,
    provider::{delete_opt, namespace_labels, wait_deleted},
    transport::{Connector, ProviderTransport},
};

/// The consumer role of the peering authority.
pub struct Consumer {
    client: Client,
    identity: Arc<LocalIdentity>,
    network: NetworkSource,
    connector: Arc<dyn Connector>,
    locks: PeerLocks,
    deletion_timeout: std::time::Duration,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("identity", &self.identity)
            .field("network", &self.network)
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A consumer acting as `identity` on the cluster of `client`, offering `network` to
    /// providers and reaching them through `connector`.
    pub fn new(
        client: Client,
        identity: Arc<LocalIdentity>,
        network: NetworkSource,
        connector: Arc<dyn Connector>,
    ) -> Self {
        Self {
            client,
            identity,
            network,
            connector,
            locks: PeerLocks::default(),
            deletion_timeout: std::time::Duration::from_secs(30),
        }
    }

    /// This consumer's identity.
    pub fn identity(&self) -> &Arc<LocalIdentity> {
        &self.identity
    }

    /// Peers with (or renews the credential from) the provider at `target`: checks the
    /// provider's identity against the pinned fingerprint (`target.expected_fingerprint`, else the
    /// one on its `ForeignCluster`), makes a fresh client key here and signs its challenge
    /// together with the key's certificate signing request, and stores the grant.
    ///
    /// The private key never leaves this cluster: the provider answers with a certificate only,
    /// and the kubeconfig stored here (and returned in the grant) is completed with our key.
    /// Every call, renewals by the [`RotationController`](crate::RotationController) included,
    /// makes a new key.
    pub async fn request(&self, target: &PeeringTarget) -> Result<PeeringGrant, PeeringError> {
        let transport = self.connector.connect(target)?;
        let me = self.identity.id();
        let (provider, challenge) = transport.challenge(me, Purpose::Grant).await?;
        self.check_provider(target, &provider).await?;
        let _guard = self.locks.lock(&provider.id).await;
        names::tenant_namespace(&provider.id)?;
        let key = ClientKey::generate(&names::consumer_user(me))?;
        let request = self
            .sign(
                &provider.id,
                challenge.nonce,
                Some(key.csr_pem().to_owned()),
            )
            .await?;
        let mut grant = match transport.grant(request).await {
            Ok(g) => g,
            Err(e) => {
                let reason = match &e {
                    PeeringError::Unauthenticated { .. } => "Unauthenticated",
                    PeeringError::Refused { .. } => "Refused",
                    PeeringError::Unreachable { .. } => "Unreachable",
                    _ => "Failed",
                };
                foreign::set_stages(
                    &self.client,
                    &provider.id,
                    Side::Consumer,
                    &[Stage {
                        type_: cond::AUTHENTICATED,
                        status: Status::False,
                        reason,
                        message: e.to_string(),
                    }],
                    None,
                )
                .await?;
                return Err(e);
            }
        };
        if grant.provider != provider {
            return Err(PeeringError::Unauthenticated {
                cluster: provider.id.clone(),
                reason: format!(
                    "the grant names provider {} with another key than the challenge",
                    grant.provider.id
                ),
            });
        }
        grant.credential.kubeconfig =
            credential::complete_kubeconfig(&grant.credential.kubeconfig, &key)?;
        self.store(target, &grant).await?;
        Ok(grant)
    }

    async fn check_provider(
        &self,
        target: &PeeringTarget,
        provider: &ClusterIdentity,
    ) -> Result<(), PeeringError> {
        let reject = |reason: String| PeeringError::Unauthenticated {
            cluster: provider.id.clone(),
            reason,
        };
        if let Some(id) = &target.cluster_id
            && id != &provider.id
        {
            return Err(reject(format!(
                "{} answered as cluster {}, not {id}",
                target.endpoint, provider.id
            )));
        }
        let actual = provider
            .fingerprint()
            .ok_or_else(|| reject("the provider presented no public key".into()))?;
        let pinned = match target.expected_fingerprint {
            Some(fp) => Some(fp),
            None => foreign::find(&self.client, &provider.id)
                .await?
                .and_then(|fc| fc.spec.public_key_fingerprint),
        };
        if let Some(pinned) = pinned
            && pinned != actual
        {
            return Err(reject(format!(
                "the provider's key {actual} is {PIN_MISMATCH} {pinned}"
            )));
        }
        Ok(())
    }

    /// A request for `provider` with `nonce` and, for a grant, our `csr`, signed over all of
    /// them ([`PeeringRequest::payload`]).
    async fn sign(
        &self,
        provider: &ClusterId,
        nonce: Vec<u8>,
        csr: Option<String>,
    ) -> Result<PeeringRequest, PeeringError> {
        let mut request = PeeringRequest {
            consumer: self.identity.identity(),
            provider: provider.clone(),
            nonce,
            signature: vec![],
            network: self.network.parameters().await?,
            csr,
        };
        request.signature = self.identity.sign(&request.payload());
        Ok(request)
    }

    /// Writes the grant into our cluster, stage by stage on the provider's `ForeignCluster`.
    async fn store(
        &self,
        target: &PeeringTarget,
        grant: &PeeringGrant,
    ) -> Result<(), PeeringError> {
        let provider = &grant.provider.id;
        let me = self.identity.id();
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
                reason: "ChallengeAccepted",
                message: format!(
                    "provider key {fingerprint} verified; it accepted our signed challenge"
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

    /// Ends the peering with `provider`: asks the provider to revoke us (signed release), then
    /// removes our Secret, ResourceOffer, VirtualNode and tenant namespace and clears our
    /// conditions. Local removal happens even when the provider cannot be reached; that error is
    /// returned afterwards.
    pub async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        let _guard = self.locks.lock(provider).await;
        let ns = names::tenant_namespace(provider)?;
        let secret_name = names::kubeconfig_secret(provider);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let secret = secrets
            .get_opt(&secret_name)
            .await
            .map_err(kube_err(format!("reading Secret {ns}/{secret_name}")))?;
        let Some(secret) = secret else {
            foreign::clear(&self.client, provider, Side::Consumer).await?;
            return Err(PeeringError::NotPeered(provider.clone()));
        };
        let remote = async {
            match target_of(provider, &secret) {
                Some(target) => self.release_remote(&target).await,
                None => Err(PeeringError::Other(
                    format!(
                        "Secret {ns}/{secret_name} does not say where {provider}'s endpoint is"
                    )
                    .into(),
                )),
            }
        };
        // Independent (the release is signed, it needs no credential), and each waits for a
        // namespace deletion: run both at once.
        let (remote, local) = tokio::join!(remote, self.remove_local(provider));
        match (remote, local) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(PeeringError::Other(format!("removed everything here, but provider {provider} did not confirm the release: {e}").into())),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    /// What this consumer holds from `provider` in its cluster.
    pub(crate) async fn held(&self, provider: &ClusterId) -> Result<Held, PeeringError> {
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

    /// Releases `provider` for the peering controller: the remote release first, and local
    /// removal only once the provider confirmed it (or no longer recognises us), so a provider
    /// that cannot be reached keeps the credential here for the next attempt (no tenant is
    /// orphaned on the provider). With nothing stored, removes leftovers and our conditions.
    pub(crate) async fn release_confirmed(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        let _guard = self.locks.lock(provider).await;
        let held = self.held(provider).await?;
        let Some(secret) = &held.secret else {
            if held.any() {
                return self.remove_local(provider).await;
            }
            return foreign::clear(&self.client, provider, Side::Consumer).await;
        };
        match target_of(provider, secret) {
            Some(target) => match self.release_remote(&target).await {
                Ok(()) => {}
                Err(e @ (PeeringError::Unreachable { .. } | PeeringError::Refused { .. })) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(%provider, error = %e, "the provider no longer recognises this peering; removing it here only");
                }
            },
            None => {
                tracing::warn!(%provider, "the stored credential does not say where the provider is; removing it here only")
            }
        }
        self.remove_local(provider).await
    }

    async fn release_remote(&self, target: &PeeringTarget) -> Result<(), PeeringError> {
        let transport: Arc<dyn ProviderTransport> = self.connector.connect(target)?;
        let (provider, challenge) = transport
            .challenge(self.identity.id(), Purpose::Release)
            .await?;
        self.check_provider(target, &provider).await?;
        let request = self.sign(&provider.id, challenge.nonce, None).await?;
        match transport.release(request).await {
            Err(PeeringError::NotPeered(_)) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn remove_local(&self, provider: &ClusterId) -> Result<(), PeeringError> {
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

    /// A client for `provider`'s API server with the stored credential; an expired credential is
    /// refused with a clear reason.
    pub async fn provider_client(&self, provider: &ClusterId) -> Result<Client, PeeringError> {
        credential::client_from_kubeconfig(provider, &self.kubeconfig(provider).await?).await
    }
}

/// What a consumer holds from one provider.
#[derive(Debug)]
pub(crate) struct Held {
    /// The kubeconfig Secret.
    pub(crate) secret: Option<Secret>,
    /// Whether the VirtualNode exists.
    pub(crate) virtual_node: bool,
    /// Whether the consumer-side ResourceOffer exists.
    pub(crate) offer: bool,
}

impl Held {
    /// Whether anything of a peering is stored.
    pub(crate) fn any(&self) -> bool {
        self.secret.is_some() || self.virtual_node || self.offer
    }

    /// Whether the stored grant is complete, unexpired and from the key `pinned` (if any).
    pub(crate) fn usable(&self, pinned: Option<KeyFingerprint>, now: SystemTime) -> bool {
        let Some(secret) = &self.secret else {
            return false;
        };
        if !self.virtual_node || !self.offer {
            return false;
        }
        if let Some(pinned) = pinned
            && secret.annotations().get(KEY_FINGERPRINT_ANNOTATION) != Some(&pinned.to_string())
        {
            return false;
        }
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(KUBECONFIG_KEY))
            .and_then(|b| std::str::from_utf8(&b.0).ok())
            .and_then(|k| credential::kubeconfig_certificate(k).ok())
            .and_then(|c| credential::certificate_validity(&c).ok())
            .is_some_and(|(_, not_after)| not_after > now)
    }
}

/// Where to renew a stored credential, from its Secret's annotations.
pub(crate) fn target_of(provider: &ClusterId, secret: &Secret) -> Option<PeeringTarget> {
    let a = secret.annotations();
    Some(PeeringTarget {
        cluster_id: Some(provider.clone()),
        endpoint: a.get(ENDPOINT_ANNOTATION)?.clone(),
        expected_fingerprint: a
            .get(KEY_FINGERPRINT_ANNOTATION)
            .and_then(|f| f.parse::<KeyFingerprint>().ok()),
    })
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}
