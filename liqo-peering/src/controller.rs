//! [`PeeringController`]: peering driven by Kubernetes state, on the consumer side.

use std::{
    collections::{HashMap, hash_map::DefaultHasher},
    future::Future,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use futures::StreamExt;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::{Action, Config as ControllerConfig},
        watcher,
    },
};
use liqo_core::{
    ClusterId, Diagnosis, PeeringAuthority, PeeringError,
    conditions::{self, Status},
    crds::{ForeignCluster, PeeringRole, foreign_cluster_condition as cond},
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    foreign::{self, CONSUMER_CONDITIONS, Side, Stage},
    names::{PEERING_FINALIZER, is_not_found, kube_err},
    quota::{Backoff, ControllerError},
    store::GrantStore,
};

struct Ctx {
    client: Client,
    me: ClusterId,
    authority: Arc<dyn PeeringAuthority>,
    store: GrantStore,
    backoff: Backoff,
    /// Per object: the spec (see [`spec_or_deletion`]) that failed and when to try it again.
    retry_at: Mutex<HashMap<String, (u64, Instant)>>,
}

impl Ctx {
    /// How long to wait before acting on `fc`: the rest of its backoff if its last attempt, for
    /// this same spec, failed.
    fn wait_for(&self, fc: &ForeignCluster) -> Option<std::time::Duration> {
        let map = self.retry_at.lock().unwrap_or_else(|p| p.into_inner());
        let (spec, at) = map.get(&fc.name_any())?;
        let now = Instant::now();
        (*spec == spec_or_deletion(fc) && *at > now).then(|| *at - now)
    }

    fn succeeded(&self, name: &str) {
        self.backoff.succeeded(name);
        self.retry_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// Peers with (and releases) providers as their `ForeignCluster`s' `spec.role` says.
///
/// An administrator (or `liqoctl peer`) declares on the consumer's cluster what it wants from a
/// peer by setting `ForeignCluster.spec.role` (with what the peering method needs to find the
/// provider, see [`PeeringAuthority::target`], e.g. `spec.peeringEndpoint` and
/// `spec.publicKeyFingerprint`); the consumer's agent runs this controller, over any peering
/// method, which makes the state so:
///
/// | `spec.role` | consumer-side peering | action |
/// |---|---|---|
/// | `Provider`, `Both` | none, incomplete, expired, or from another key than the pin | [`Consumer::request`] to the endpoint, pinned to the fingerprint |
/// | `Provider`, `Both` | usable | nothing (no request per reconcile; rotation renews) |
/// | `None`, `Consumer`, or the object is being deleted | exists | signed release on the provider, then local removal |
///
/// The grant is detected from what the consumer stored (kubeconfig Secret, `ResourceOffer`,
/// `VirtualNode` in `liqo-tenant-<provider>`, [`GrantStore::held`]), so a restarted controller
/// does not peer again.
/// While a peering exists or is being made, the `ForeignCluster` carries the finalizer
/// [`PEERING_FINALIZER`](crate::names::PEERING_FINALIZER): deleting it releases first. A release
/// the provider cannot confirm (unreachable, refused) keeps everything here and is retried, so no
/// tenant is left behind on the provider.
///
/// **Failures** become a condition on the `ForeignCluster` whose reason says what to do next, and
/// a Warning Event; the attempt is retried with capped exponential backoff (250 ms to 2 min per
/// object). Reasons: those of the method ([`PeeringAuthority::target`] and
/// [`PeeringAuthority::explain`], e.g. `MissingPeeringEndpoint`, `FingerprintMismatch`,
/// `AwaitingApproval`), else by error kind: `EndpointUnreachable`, `AuthenticationFailed`,
/// `RefusedByPolicy`, `InvalidGrant` (type `Authenticated`), `StoringGrantFailed`,
/// `PeeringFailed` (type `OfferAccepted`), and `ReleasePending` (type `OfferAccepted`, still
/// `True`: the peering is still held).
///
/// After a failure, the next attempt waits for its backoff even though the status written about
/// the failure (or any other status change) wakes the controller: only a change of the spec or
/// the start of a deletion skips the wait. A failure never turns into a tight loop.
/// The discovery controller owns `spec.discovery` and never writes `spec.role`; this controller
/// writes only the status conditions of the consumer role (field manager
/// `liqo-peering-consumer`) and its finalizer.
#[derive(Clone)]
pub struct PeeringController {
    client: Client,
    me: ClusterId,
    authority: Arc<dyn PeeringAuthority>,
    selector: Option<String>,
    concurrency: u16,
}

impl std::fmt::Debug for PeeringController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeeringController")
            .field("me", &self.me)
            .field("selector", &self.selector)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl PeeringController {
    /// A controller for consumer `me` on the cluster of `client` (the consumer's own cluster),
    /// obtaining access through `authority` (any peering method), reconciling every
    /// `ForeignCluster`, at most 4 at once.
    pub fn new(client: Client, me: ClusterId, authority: Arc<dyn PeeringAuthority>) -> Self {
        Self {
            client,
            me,
            authority,
            selector: None,
            concurrency: 4,
        }
    }

    /// Reconciles only the `ForeignCluster`s matching this label selector (e.g.
    /// `team=blue`), leaving the others to another controller.
    pub fn with_selector(mut self, selector: impl Into<String>) -> Self {
        self.selector = Some(selector.into());
        self
    }

    /// At most `n` (at least 1) peerings are requested or released at once.
    pub fn concurrency(mut self, n: u16) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Runs until `shutdown` completes, then lets reconciles in flight finish. Fails at once
    /// when `ForeignCluster`s cannot be listed (CRD missing, no permission).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), PeeringError> {
        let api: Api<ForeignCluster> = Api::all(self.client.clone());
        let mut lp = ListParams::default().limit(1);
        let mut wc = watcher::Config::default();
        if let Some(s) = &self.selector {
            lp = lp.labels(s);
            wc = wc.labels(s);
        }
        api.list(&lp).await.map_err(kube_err(
            "listing ForeignClusters (is the foreignclusters.liqo.io CRD installed?)",
        ))?;
        let ctx = Arc::new(Ctx {
            store: GrantStore::new(self.client.clone(), self.me.clone()),
            client: self.client,
            me: self.me,
            authority: self.authority,
            backoff: Backoff::default(),
            retry_at: Mutex::default(),
        });
        let stop = CancellationToken::new();
        let controller = Controller::new(api, wc)
            .trigger_backoff(liqo_core::watch_backoff())
            .with_config(ControllerConfig::default().concurrency(self.concurrency))
            .graceful_shutdown_on(stop.clone().cancelled_owned())
            .run(reconcile, error_policy, ctx)
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "peering reconcile");
                }
            });
        tokio::pin!(controller, shutdown);
        tokio::select! {
            () = &mut controller => return Ok(()),
            () = &mut shutdown => stop.cancel(),
        }
        controller.await;
        Ok(())
    }
}

/// Changes when the spec (generation) changes or the deletion starts; status and metadata
/// writes do not.
fn spec_or_deletion(fc: &ForeignCluster) -> u64 {
    let mut h = DefaultHasher::new();
    fc.metadata.uid.hash(&mut h);
    fc.metadata.generation.hash(&mut h);
    fc.metadata.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// Whether `role` asks this cluster to consume from the peer.
fn wants_provider(role: PeeringRole) -> bool {
    matches!(role, PeeringRole::Provider | PeeringRole::Both)
}

async fn reconcile(fc: Arc<ForeignCluster>, ctx: Arc<Ctx>) -> Result<Action, ControllerError> {
    let name = fc.name_any();
    let provider = fc.spec.cluster_id.clone();
    if provider == ctx.me {
        tracing::warn!(foreigncluster = %name, "a ForeignCluster names this cluster itself; ignored");
        return Ok(Action::await_change());
    }
    if let Some(wait) = ctx.wait_for(&fc) {
        // Woken by a status change while backing off: keep the backoff.
        return Ok(Action::requeue(wait));
    }
    let deleting = fc.metadata.deletion_timestamp.is_some();
    let held = ctx.store.held(&provider).await?;

    if !deleting && wants_provider(fc.spec.role) {
        let conds = fc
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        if held.usable(fc.spec.public_key_fingerprint, SystemTime::now())
            && (conditions::is_true(conds, cond::OFFER_ACCEPTED)
                || offer_accepted_now(&ctx.client, &name).await?)
        {
            add_finalizer(&ctx.client, &fc).await?;
            ctx.succeeded(&name);
            return Ok(Action::await_change());
        }
        let target = match ctx.authority.target(&fc) {
            Ok(t) => t,
            Err(d) => {
                let message = d.message.clone();
                report(&ctx, &fc, d).await;
                // Fixing the spec triggers the next attempt at once; until then, backoff.
                return Err(PeeringError::Other(message.into()).into());
            }
        };
        add_finalizer(&ctx.client, &fc).await?;
        let outcome = match ctx.authority.request(&target).await {
            Ok(grant) if grant.provider.id != provider => Err(PeeringError::Unauthenticated {
                cluster: grant.provider.id.clone(),
                reason: format!(
                    "the grant from {} is from cluster {}, not {provider} (spec.clusterId)",
                    target.endpoint, grant.provider.id
                ),
            }),
            Ok(grant) => ctx.store.store(&target, &grant).await,
            Err(e) => Err(e),
        };
        return match outcome {
            Ok(()) => {
                ctx.succeeded(&name);
                Ok(Action::await_change())
            }
            Err(e) => {
                let d = ctx
                    .authority
                    .explain(&e, &target)
                    .unwrap_or_else(|| classify(&e, &ctx.me));
                report(&ctx, &fc, d).await;
                // No peering came of it: the finalizer is not needed.
                if let Ok(after) = ctx.store.held(&provider).await
                    && !after.any()
                {
                    remove_finalizer(&ctx.client, &name).await?;
                }
                Err(e.into())
            }
        };
    }

    if held.any() {
        if let Err(e) = release(&ctx, &provider, held.secret.is_some()).await {
            let why = if deleting {
                "the ForeignCluster is being deleted".to_owned()
            } else {
                format!("spec.role is {:?}", fc.spec.role)
            };
            report(
                &ctx,
                &fc,
                Diagnosis {
                    condition: cond::OFFER_ACCEPTED,
                    reason: "ReleasePending",
                    message: format!(
                        "{why}, but the release did not complete: {e}; the peering is kept and the release retried with backoff"
                    ),
                },
            )
            .await;
            return Err(e.into());
        }
    } else if fc.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| CONSUMER_CONDITIONS.contains(&c.type_.as_str()))
    }) {
        // A failed attempt left its conditions: the peering is no longer wanted.
        foreign::clear(&ctx.client, &provider, Side::Consumer).await?;
    }
    remove_finalizer(&ctx.client, &name).await?;
    ctx.succeeded(&name);
    Ok(Action::await_change())
}

/// Whether `OfferAccepted` is `True` on the API server's copy of ForeignCluster `name`: the
/// cached copy a reconcile starts from may predate the status our own last store wrote, and a
/// usable grant must not be requested again for that.
async fn offer_accepted_now(client: &Client, name: &str) -> Result<bool, PeeringError> {
    let fc = Api::<ForeignCluster>::all(client.clone())
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading ForeignCluster {name}")))?;
    Ok(fc
        .and_then(|fc| fc.status)
        .is_some_and(|s| conditions::is_true(&s.conditions, cond::OFFER_ACCEPTED)))
}

/// Gives `provider` back: on the provider first (when a credential is stored, the method knows
/// where to go), and locally only once the provider confirmed it or no longer knows us, so a
/// provider that cannot be reached keeps everything here for the next attempt.
async fn release(ctx: &Ctx, provider: &ClusterId, credential: bool) -> Result<(), PeeringError> {
    if credential {
        match ctx.authority.release(provider).await {
            Ok(()) | Err(PeeringError::NotPeered(_)) => {}
            Err(e @ (PeeringError::Unreachable { .. } | PeeringError::Refused { .. })) => {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(%provider, error = %e, "the provider no longer recognises this peering; removing it here only");
            }
        }
    }
    ctx.store.remove(provider).await
}

fn error_policy(fc: Arc<ForeignCluster>, error: &ControllerError, ctx: Arc<Ctx>) -> Action {
    let name = fc.name_any();
    let delay = ctx.backoff.failed(name.clone());
    ctx.retry_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            name.clone(),
            (spec_or_deletion(&fc), Instant::now() + delay),
        );
    tracing::warn!(foreigncluster = %name, %error, retry_in = ?delay, "peering reconcile failed");
    Action::requeue(delay)
}

/// The condition, reason and next step for a failed request, by error kind (when the method has
/// nothing more specific to say).
fn classify(e: &PeeringError, me: &ClusterId) -> Diagnosis {
    let (condition, reason, message) = match e {
        PeeringError::Unauthenticated { reason, .. } => (
            cond::AUTHENTICATED,
            "AuthenticationFailed",
            format!(
                "the provider rejected this cluster's identity proof: {reason}; if cluster {me} was reinstalled with a new key, the provider's administrator must revoke its old peering; retrying with backoff"
            ),
        ),
        PeeringError::Refused { reason, .. } => (
            cond::AUTHENTICATED,
            "RefusedByPolicy",
            format!(
                "the provider's policy refused cluster {me}: {reason}; ask its administrator to allow it; retrying with backoff"
            ),
        ),
        PeeringError::Unreachable { endpoint, message } => (
            cond::AUTHENTICATED,
            "EndpointUnreachable",
            format!(
                "cannot reach the peering endpoint {endpoint}: {message}; check spec.peeringEndpoint and that the provider's agent serves it; retrying with backoff"
            ),
        ),
        PeeringError::Invalid { .. } => (
            cond::AUTHENTICATED,
            "InvalidGrant",
            format!("{e}; fix it and the next attempt follows; retrying with backoff"),
        ),
        PeeringError::Kube { .. } => (
            cond::OFFER_ACCEPTED,
            "StoringGrantFailed",
            format!("storing the grant in this cluster failed: {e}; retrying with backoff"),
        ),
        other => (
            cond::OFFER_ACCEPTED,
            "PeeringFailed",
            format!("{other}; retrying with backoff"),
        ),
    };
    Diagnosis {
        condition,
        reason,
        message,
    }
}

/// Writes a `False` condition (or, for `ReleasePending`, keeps `True`: the peering is still held)
/// and a Warning Event. Best effort: the reconcile's own error is what drives the retry.
async fn report(ctx: &Ctx, fc: &ForeignCluster, d: Diagnosis) {
    let Diagnosis {
        condition: type_,
        reason,
        message,
    } = d;
    let status = if reason == "ReleasePending" {
        Status::True
    } else {
        Status::False
    };
    tracing::warn!(foreigncluster = %fc.name_any(), reason, %message, "peering");
    let stage = Stage {
        type_,
        status,
        reason,
        message: message.clone(),
    };
    if let Err(e) = foreign::set_stages(
        &ctx.client,
        &fc.spec.cluster_id,
        Side::Consumer,
        &[stage],
        None,
    )
    .await
    {
        tracing::warn!(foreigncluster = %fc.name_any(), error = %e, "could not write the condition");
    }
    foreign::event(&ctx.client, fc, true, reason, message).await;
}

async fn add_finalizer(client: &Client, fc: &ForeignCluster) -> Result<(), ControllerError> {
    if fc.finalizers().iter().any(|f| f == PEERING_FINALIZER) {
        return Ok(());
    }
    let mut finalizers = fc.finalizers().to_vec();
    finalizers.push(PEERING_FINALIZER.to_owned());
    patch_finalizers(client, &fc.name_any(), fc.resource_version(), finalizers).await
}

async fn remove_finalizer(client: &Client, name: &str) -> Result<(), ControllerError> {
    let api: Api<ForeignCluster> = Api::all(client.clone());
    let Some(fc) = api
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading ForeignCluster {name}")))?
    else {
        return Ok(());
    };
    if !fc.finalizers().iter().any(|f| f == PEERING_FINALIZER) {
        return Ok(());
    }
    let finalizers: Vec<String> = fc
        .finalizers()
        .iter()
        .filter(|f| *f != PEERING_FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(client, name, fc.resource_version(), finalizers).await
}

/// Sets the finalizer list, guarded by `resource_version` (a conflict fails the reconcile, which
/// is retried on fresh state).
async fn patch_finalizers(
    client: &Client,
    name: &str,
    resource_version: Option<String>,
    finalizers: Vec<String>,
) -> Result<(), ControllerError> {
    let api: Api<ForeignCluster> = Api::all(client.clone());
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": resource_version},
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => {
            Err(kube_err(format!("updating the finalizers of ForeignCluster {name}"))(e).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_spec_and_deletion_trigger() {
        let mut fc = ForeignCluster::new(
            "rome",
            liqo_core::crds::ForeignClusterSpec {
                cluster_id: "rome".parse().unwrap(),
                cluster_name: None,
                peering_endpoint: None,
                public_key_fingerprint: None,
                discovery: liqo_core::crds::DiscoverySpec {
                    source: liqo_core::DiscoverySource::Manual,
                    auto_peer: false,
                },
                role: PeeringRole::Provider,
            },
        );
        fc.metadata.generation = Some(1);
        let first = spec_or_deletion(&fc);
        fc.status = Some(Default::default());
        fc.metadata.finalizers = Some(vec![PEERING_FINALIZER.into()]);
        fc.metadata.resource_version = Some("42".into());
        assert_eq!(
            spec_or_deletion(&fc),
            first,
            "status and metadata writes are ignored"
        );
        fc.metadata.generation = Some(2);
        let second = spec_or_deletion(&fc);
        assert_ne!(second, first);
        fc.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_ne!(spec_or_deletion(&fc), second);
    }

    #[test]
    fn roles_that_consume() {
        assert!(wants_provider(PeeringRole::Provider));
        assert!(wants_provider(PeeringRole::Both));
        assert!(!wants_provider(PeeringRole::None));
        assert!(!wants_provider(PeeringRole::Consumer));
    }
}
