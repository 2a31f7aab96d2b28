//! The consumer role: prove our identity to a provider, check its identity, and keep what it
//! granted (kubeconfig Secret, ResourceOffer, VirtualNode) in our cluster, through the
//! [`GrantStore`] every peering method shares.

use std::sync::Arc;

use kube::Client;
use liqo_core::{
    ClusterId, ClusterIdentity, PeeringError, PeeringGrant, PeeringRequest, PeeringTarget,
    conditions::Status, crds::foreign_cluster_condition as cond,
};
use liqo_peering::{
    GrantStore, NetworkSource,
    credential::{self, ClientKey},
    foreign::{self, Side, Stage},
    target_of,
};

use crate::{
    identity::LocalIdentity,
    names::{self, PIN_MISMATCH, PeerLocks},
    nonce::Purpose,
    transport::{Connector, ProviderTransport},
};

/// The consumer role of the peering authority.
pub struct Consumer {
    client: Client,
    identity: Arc<LocalIdentity>,
    network: NetworkSource,
    connector: Arc<dyn Connector>,
    locks: PeerLocks,
    store: GrantStore,
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
            store: GrantStore::new(client.clone(), identity.id().clone()),
            client,
            identity,
            network,
            connector,
            locks: PeerLocks::default(),
        }
    }

    /// This consumer's identity.
    pub fn identity(&self) -> &Arc<LocalIdentity> {
        &self.identity
    }

    /// Where this consumer keeps its grants.
    pub fn store(&self) -> &GrantStore {
        &self.store
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
        let _guard = self.locks.lock(&self.locked_id(target)).await;
        let grant = self.obtain(target).await?;
        self.store.store(target, &grant).await?;
        Ok(grant)
    }

    /// The id to serialise a request for `target` on.
    fn locked_id(&self, target: &PeeringTarget) -> ClusterId {
        target
            .cluster_id
            .clone()
            .unwrap_or_else(|| self.identity.id().clone())
    }

    /// The handshake of [`request`](Self::request) without storing the grant (the
    /// [`PeeringAuthority`](liqo_core::PeeringAuthority) side: the peering controller stores it).
    pub async fn obtain(&self, target: &PeeringTarget) -> Result<PeeringGrant, PeeringError> {
        let transport = self.connector.connect(target)?;
        let me = self.identity.id();
        let (provider, challenge) = transport.challenge(me, Purpose::Grant).await?;
        self.check_provider(target, &provider).await?;
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

    /// Ends the peering with `provider`: asks the provider to revoke us (signed release), then
    /// removes our Secret, ResourceOffer, VirtualNode and tenant namespace and clears our
    /// conditions. Local removal happens even when the provider cannot be reached; that error is
    /// returned afterwards.
    pub async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        let _guard = self.locks.lock(provider).await;
        let ns = names::tenant_namespace(provider)?;
        let secret_name = names::kubeconfig_secret(provider);
        let Some(secret) = self.store.held(provider).await?.secret else {
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
        let (remote, local) = tokio::join!(remote, self.store.remove(provider));
        match (remote, local) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(PeeringError::Other(format!("removed everything here, but provider {provider} did not confirm the release: {e}").into())),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    /// The provider's side of a release, for the peering controller: a signed release at the
    /// endpoint the stored credential came from. Nothing here is removed (the controller does
    /// that once this confirmed). [`PeeringError::NotPeered`] when nothing is stored or it does
    /// not say where the provider is.
    pub async fn release_remote_only(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        let _guard = self.locks.lock(provider).await;
        let held = self.store.held(provider).await?;
        let Some(target) = held.secret.as_ref().and_then(|s| target_of(provider, s)) else {
            tracing::warn!(%provider, "no stored credential says where the provider is; nothing to release there");
            return Err(PeeringError::NotPeered(provider.clone()));
        };
        self.release_remote(&target).await
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

    /// The stored kubeconfig for `provider`.
    pub async fn kubeconfig(&self, provider: &ClusterId) -> Result<String, PeeringError> {
        self.store.kubeconfig(provider).await
    }

    /// A client for `provider`'s API server with the stored credential; an expired credential is
    /// refused with a clear reason.
    pub async fn provider_client(&self, provider: &ClusterId) -> Result<Client, PeeringError> {
        credential::client_from_kubeconfig(provider, &self.kubeconfig(provider).await?).await
    }
}
