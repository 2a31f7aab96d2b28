//! Enforcing an offer on the provider across all of a consumer's namespaces.
//!
//! Kubernetes has no cross-namespace quota, and a consumer's pods live in several namespaces (one
//! twin namespace per offloaded namespace). The mechanism: every namespace of the consumer (its
//! tenant namespace and each twin namespace, labelled `liqo.io/remote-cluster-id=<consumer>` and
//! `liqo.io/managed-by=liqo-vk`) gets a ResourceQuota `liqo-offer` whose hard limits are
//!
//! ```text
//! hard(ns) = offer − Σ used(other namespaces of the consumer)      (never below 0)
//! ```
//!
//! for `pods`, `requests.cpu`, `requests.memory` (and `requests.ephemeral-storage` when offered),
//! recomputed by [`QuotaController`] whenever a quota's `status.used`, a twin namespace or the
//! offer changes. A cordoned offer sets `pods: 0` everywhere: no new pods, running ones stay
//! (a quota below usage blocks creations, never evicts). A LimitRange `liqo-offer-defaults` gives
//! containers without requests zero requests, so such pods are counted (as pods) instead of
//! refused for lacking requests.
//!
//! **New twin namespaces.** Between the moment liqo-vk makes a twin namespace and the moment the
//! controller has put a quota in it, the consumer could create pods unchecked. A
//! ValidatingAdmissionPolicy, [`QUOTA_GUARD`], closes that gap inside the API server: pod creations
//! in twin namespaces are denied while the namespace has no `liqo-offer` quota (its binding's
//! `paramRef` names the quota, `parameterNotFoundAction: Deny`). The controller installs it when it
//! starts; it is per cluster, not per consumer, and stays when consumers come and go.
//!
//! The API server enforces each quota atomically and updates `status.used` at admission, so
//! within one namespace the offer is exact. **Race window:** pods admitted at the same moment in
//! two namespaces of one consumer, before the controller recomputed the others' limits (a watch
//! round trip, milliseconds), can together exceed the offer by at most the headroom that was
//! left; the excess is never evicted, only further creations are refused until usage falls back
//! under the offer. The consumer's scheduler sees the same offer as the virtual node's capacity,
//! so in practice it never sends that much. The alternative, a validating webhook summing usage,
//! has the same race (its cache lags too) and blocks the consumer whenever the agent is down.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{LimitRange, Namespace, ResourceQuota},
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller,
        controller::{Action, Config as ControllerConfig},
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use liqo_core::{ClusterId, PeeringError, crds::ResourceOffer, labels};

use crate::{
    names::{
        self, LIMIT_RANGE_NAME, MANAGED_BY_VALUE, PEERING_SIDE, PROVIDER_MANAGER, QUOTA_NAME,
        SIDE_PROVIDER, TWIN_NAMESPACE_MANAGER, kube_err,
    },
    quantity::Milli,
    tenant::{delete_opt, twin_selector},
};

/// The quota keys an offer sets, with the offer's value for each.
fn offer_limits(
    offer: &liqo_core::ResourceOffer,
) -> Result<BTreeMap<&'static str, Milli>, PeeringError> {
    let parse = |q: &Quantity| Milli::of(q).map_err(|e| PeeringError::Other(Box::new(e)));
    let mut m = BTreeMap::from([
        ("pods", Milli(i128::from(offer.pods) * 1000)),
        ("requests.cpu", parse(&offer.cpu)?),
        ("requests.memory", parse(&offer.memory)?),
    ]);
    if let Some(s) = &offer.ephemeral_storage {
        m.insert("requests.ephemeral-storage", parse(s)?);
    }
    Ok(m)
}

/// The hard limits of each namespace given the offer and each namespace's usage.
pub(crate) fn split_offer(
    offer: &BTreeMap<&'static str, Milli>,
    cordoned: bool,
    targets: &[String],
    used: &BTreeMap<String, BTreeMap<String, Milli>>,
) -> BTreeMap<String, BTreeMap<String, Quantity>> {
    targets
        .iter()
        .map(|ns| {
            let hard = offer
                .iter()
                .map(|(key, total)| {
                    let elsewhere: Milli = used
                        .iter()
                        .filter(|(other, _)| *other != ns)
                        .map(|(_, u)| u.get(*key).copied().unwrap_or_default())
                        .sum();
                    let value = if cordoned && *key == "pods" {
                        Milli::ZERO
                    } else {
                        total.saturating_sub(elsewhere)
                    };
                    ((*key).to_owned(), value.to_quantity())
                })
                .collect();
            (ns.clone(), hard)
        })
        .collect()
}

/// Recomputes and applies the quota (and LimitRange) of every namespace of the offer's consumer.
/// Used by the grant, by cordon and by [`QuotaController`]: one mechanism everywhere.
pub async fn enforce(client: &Client, ro: &ResourceOffer) -> Result<(), PeeringError> {
    if ro.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let consumer = &ro.spec.consumer_cluster_id;
    let tenant = ro.namespace().unwrap_or_default();
    let offer = offer_limits(&ro.spec.resources)?;
    let twins = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&twin_selector(consumer)))
        .await
        .map_err(kube_err(format!(
            "listing the twin namespaces of {consumer}"
        )))?;
    // Quotas go to live namespaces; usage counts in every namespace that has one (a twin being
    // deleted still holds its pods until they are gone).
    let mut targets = vec![tenant.clone()];
    targets.extend(
        twins
            .items
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .map(|n| n.name_any()),
    );
    let quotas = Api::<ResourceQuota>::all(client.clone())
        .list(&ListParams::default().labels(&quota_selector(consumer)))
        .await
        .map_err(kube_err(format!("listing the quotas of {consumer}")))?;
    let mut used: BTreeMap<String, BTreeMap<String, Milli>> = BTreeMap::new();
    for q in quotas.items.iter().filter(|q| q.name_any() == QUOTA_NAME) {
        let entry = used.entry(q.namespace().unwrap_or_default()).or_default();
        for (k, v) in q
            .status
            .as_ref()
            .and_then(|s| s.used.as_ref())
            .into_iter()
            .flatten()
        {
            entry.insert(k.clone(), Milli::of(v).unwrap_or_default());
        }
    }
    let owner = ro.controller_owner_ref(&());
    for (ns, hard) in split_offer(&offer, ro.spec.cordoned, &targets, &used) {
        // Owner references cannot cross namespaces: only the tenant's quota is owned by the offer.
        let owner = if ns == tenant { owner.clone() } else { None };
        apply_namespace_quota(
            client,
            &ns,
            consumer,
            hard,
            owner,
            ro.spec.resources.ephemeral_storage.is_some(),
        )
        .await?;
    }
    Ok(())
}

fn quota_selector(consumer: &ClusterId) -> String {
    format!(
        "{}={MANAGED_BY_VALUE},{}={consumer}",
        labels::MANAGED_BY,
        labels::REMOTE_CLUSTER_ID
    )
}

async fn apply_namespace_quota(
    client: &Client,
    ns: &str,
    consumer: &ClusterId,
    hard: BTreeMap<String, Quantity>,
    owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    ephemeral: bool,
) -> Result<(), PeeringError> {
    let labels = names::peer_labels(consumer, SIDE_PROVIDER);
    let owners: Vec<_> = owner.into_iter().collect();
    let quota = serde_json::json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": QUOTA_NAME, "labels": labels, "ownerReferences": owners},
        "spec": {"hard": hard},
    });
    Api::<ResourceQuota>::namespaced(client.clone(), ns)
        .patch(
            QUOTA_NAME,
            &names::apply(PROVIDER_MANAGER),
            &Patch::Apply(&quota),
        )
        .await
        .map_err(kube_err(format!(
            "applying ResourceQuota {ns}/{QUOTA_NAME}"
        )))?;
    let mut defaults = BTreeMap::from([("cpu", "0"), ("memory", "0")]);
    if ephemeral {
        defaults.insert("ephemeral-storage", "0");
    }
    let limits = serde_json::json!({
        "apiVersion": "v1", "kind": "LimitRange",
        "metadata": {"name": LIMIT_RANGE_NAME, "labels": labels, "ownerReferences": owners},
        "spec": {"limits": [{"type": "Container", "defaultRequest": defaults}]},
    });
    Api::<LimitRange>::namespaced(client.clone(), ns)
        .patch(
            LIMIT_RANGE_NAME,
            &names::apply(PROVIDER_MANAGER),
            &Patch::Apply(&limits),
        )
        .await
        .map_err(kube_err(format!(
            "applying LimitRange {ns}/{LIMIT_RANGE_NAME}"
        )))?;
    Ok(())
}

/// Deletes the quota and LimitRange of one namespace.
pub async fn remove_namespace_quota(client: &Client, ns: &str) -> Result<(), PeeringError> {
    delete_opt(
        Api::<ResourceQuota>::namespaced(client.clone(), ns),
        QUOTA_NAME,
    )
    .await?;
    delete_opt(
        Api::<LimitRange>::namespaced(client.clone(), ns),
        LIMIT_RANGE_NAME,
    )
    .await
}

/// Deletes the provider-side offer `provider` in `tenant`, clearing its finalizer (the caller did
/// the cleanup the finalizer stands for).
pub async fn release_offer(
    client: &Client,
    tenant: &str,
    provider: &ClusterId,
) -> Result<(), PeeringError> {
    let api: Api<ResourceOffer> = Api::namespaced(client.clone(), tenant);
    delete_opt(api.clone(), provider.as_str()).await?;
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    match api
        .patch(
            provider.as_str(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if names::is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err(format!(
            "clearing the finalizer of ResourceOffer {tenant}/{provider}"
        ))(e)),
    }
}

/// Name of the ValidatingAdmissionPolicy (and its binding) that refuses pods in twin namespaces
/// without an offer quota.
pub const QUOTA_GUARD: &str = "liqo-offer-quota-guard";

/// Installs (idempotently) the admission policy that denies pod creation in a consumer's twin
/// namespace until its `liqo-offer` quota exists.
pub async fn install_quota_guard(client: &Client) -> Result<(), PeeringError> {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let labels = BTreeMap::from([(labels::MANAGED_BY, MANAGED_BY_VALUE)]);
    let policy = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": QUOTA_GUARD, "labels": labels},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": "v1", "kind": "ResourceQuota"},
            "matchConstraints": {
                "resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                "namespaceSelector": {"matchExpressions": [
                    {"key": labels::REMOTE_CLUSTER_ID, "operator": "Exists"},
                    {"key": labels::MANAGED_BY, "operator": "In", "values": [TWIN_NAMESPACE_MANAGER]},
                ]},
            },
            "validations": [{
                "expression": format!("has(params.metadata.labels) && params.metadata.labels['{}'] == '{MANAGED_BY_VALUE}'", labels::MANAGED_BY),
                "message": format!("this twin namespace's {QUOTA_NAME} quota is not liqo's; pods are refused until liqo enforces the offer here"),
            }],
        },
    });
    let binding = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": QUOTA_GUARD, "labels": labels},
        "spec": {
            "policyName": QUOTA_GUARD,
            "paramRef": {"name": QUOTA_NAME, "parameterNotFoundAction": "Deny"},
            "validationActions": ["Deny"],
        },
    });
    let ssa = names::apply(PROVIDER_MANAGER);
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .patch(QUOTA_GUARD, &ssa, &Patch::Apply(&policy))
        .await
        .map_err(kube_err(format!(
            "applying ValidatingAdmissionPolicy {QUOTA_GUARD}"
        )))?;
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .patch(QUOTA_GUARD, &ssa, &Patch::Apply(&binding))
        .await
        .map_err(kube_err(format!(
            "applying ValidatingAdmissionPolicyBinding {QUOTA_GUARD}"
        )))?;
    Ok(())
}

/// Capped exponential backoff per key, for controllers' error policies.
#[derive(Debug, Default)]
pub struct Backoff(Mutex<HashMap<String, u32>>);

impl Backoff {
    /// `key` failed once more: how long to wait before its next attempt (250 ms doubling, at
    /// most 2 min).
    pub fn failed(&self, key: String) -> Duration {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_insert(0);
        *n = (*n + 1).min(10);
        (Duration::from_millis(250) * 2u32.pow(*n - 1)).min(Duration::from_secs(120))
    }

    /// `key` succeeded: its next failure starts over.
    pub fn succeeded(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Errors of the controllers.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A step failed.
    #[error(transparent)]
    Peering(#[from] PeeringError),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

struct Ctx {
    client: Client,
    backoff: Backoff,
}

/// Keeps every consumer's quotas in line with its offer (see the module docs), and cleans up a
/// consumer's twin namespaces when its offer is deleted (finalizer `liqo.io/cleanup`).
///
/// Watches the provider-side `ResourceOffer`s of this provider, the quotas it made and the
/// consumers' twin namespaces; reconciles at most `concurrency` consumers at once. Failed
/// reconciles are retried with capped exponential backoff (250 ms to 2 min).
///
/// The finalizer means that deleting a tenant namespace by hand waits for this controller to
/// clean up; [`Tenants::revoke`](crate::Tenants::revoke) does the cleanup itself and clears the
/// finalizer, so revoking works whether or not the controller runs.
#[derive(Clone)]
pub struct QuotaController {
    client: Client,
    provider: ClusterId,
    concurrency: u16,
}

impl std::fmt::Debug for QuotaController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaController")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl QuotaController {
    /// A controller for the offers of `provider` on the cluster of `client`.
    pub fn new(client: Client, provider: ClusterId) -> Self {
        Self {
            client,
            provider,
            concurrency: 4,
        }
    }

    /// Installs the [`QUOTA_GUARD`] policy, then runs until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ) -> Result<(), PeeringError> {
        install_quota_guard(&self.client).await?;
        let me = self.provider.clone();
        let offers: Api<ResourceOffer> = Api::all(self.client.clone());
        let selector = format!(
            "{PEERING_SIDE}={SIDE_PROVIDER},{}={me}",
            labels::ORIGIN_CLUSTER_ID
        );
        let to_offer = {
            let me = me.clone();
            move |labels: &BTreeMap<String, String>| {
                let consumer: ClusterId = labels.get(labels::REMOTE_CLUSTER_ID)?.parse().ok()?;
                let tenant = names::tenant_namespace(&consumer).ok()?;
                Some(ObjectRef::<ResourceOffer>::new(me.as_str()).within(&tenant))
            }
        };
        let by_quota = to_offer.clone();
        let ctx = Arc::new(Ctx {
            client: self.client.clone(),
            backoff: Backoff::default(),
        });
        Controller::new(offers, watcher::Config::default().labels(&selector))
            .trigger_backoff(liqo_core::watch_backoff())
            .watches(
                Api::<ResourceQuota>::all(self.client.clone()),
                watcher::Config::default()
                    .labels(&format!("{}={MANAGED_BY_VALUE}", labels::MANAGED_BY)),
                move |q: ResourceQuota| by_quota(q.labels()),
            )
            .watches(
                Api::<Namespace>::all(self.client.clone()),
                watcher::Config::default().labels(&format!(
                    "{}={TWIN_NAMESPACE_MANAGER},{}",
                    labels::MANAGED_BY,
                    labels::REMOTE_CLUSTER_ID
                )),
                move |ns: Namespace| to_offer(ns.labels()),
            )
            .with_config(ControllerConfig::default().concurrency(self.concurrency))
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, ctx)
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "quota reconcile");
                }
            })
            .await;
        Ok(())
    }
}

async fn reconcile(ro: Arc<ResourceOffer>, ctx: Arc<Ctx>) -> Result<Action, ControllerError> {
    let ns = ro.namespace().unwrap_or_default();
    let api: Api<ResourceOffer> = Api::namespaced(ctx.client.clone(), &ns);
    let key = format!("{ns}/{}", ro.name_any());
    let client = ctx.client.clone();
    let result = finalizer(&api, labels::FINALIZER, ro, |event| async move {
        match event {
            FinalizerEvent::Apply(ro) => {
                enforce(&client, &ro).await.map(|()| Action::await_change())
            }
            FinalizerEvent::Cleanup(ro) => {
                let consumer = &ro.spec.consumer_cluster_id;
                let twins = Api::<Namespace>::all(client.clone())
                    .list(&ListParams::default().labels(&twin_selector(consumer)))
                    .await
                    .map_err(kube_err(format!(
                        "listing the twin namespaces of {consumer}"
                    )))?;
                for twin in twins.items {
                    delete_opt(Api::<Namespace>::all(client.clone()), &twin.name_any()).await?;
                }
                Ok(Action::await_change())
            }
        }
    })
    .await;
    match result {
        Ok(action) => {
            ctx.backoff.succeeded(&key);
            Ok(action)
        }
        Err(
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e),
        ) => Err(e.into()),
        Err(e) => Err(ControllerError::Finalizer(e.to_string())),
    }
}

fn error_policy(ro: Arc<ResourceOffer>, error: &ControllerError, ctx: Arc<Ctx>) -> Action {
    let key = format!("{}/{}", ro.namespace().unwrap_or_default(), ro.name_any());
    let delay = ctx.backoff.failed(key.clone());
    tracing::warn!(offer = %key, %error, retry_in = ?delay, "enforcing the offer failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(entries: &[(&str, i128, i128)]) -> BTreeMap<String, BTreeMap<String, Milli>> {
        entries
            .iter()
            .map(|(ns, pods, cpu)| {
                (
                    (*ns).to_owned(),
                    BTreeMap::from([
                        ("pods".to_owned(), Milli(pods * 1000)),
                        ("requests.cpu".to_owned(), Milli(*cpu)),
                    ]),
                )
            })
            .collect()
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn each_namespace_gets_the_offer_minus_the_others_usage() {
        let offer = offer_limits(&liqo_core::ResourceOffer::new("2", "1Gi", 3)).unwrap();
        let split = split_offer(
            &offer,
            false,
            &names(&["t", "a", "b"]),
            &used(&[("a", 2, 1500), ("b", 0, 0), ("gone", 0, 250)]),
        );
        assert_eq!(split["a"]["pods"].0, "3");
        assert_eq!(split["b"]["pods"].0, "1");
        assert_eq!(split["b"]["requests.cpu"].0, "250m");
        assert!(!split.contains_key("gone"));
        assert_eq!(split["t"]["requests.memory"].0, "1073741824");
        // Over-used elsewhere: zero, never negative.
        let split = split_offer(&offer, false, &names(&["a", "b"]), &used(&[("a", 5, 3000)]));
        assert_eq!(split["b"]["pods"].0, "0");
        assert_eq!(split["b"]["requests.cpu"].0, "0");
        let split = split_offer(&offer, true, &names(&["a"]), &used(&[("a", 1, 0)]));
        assert_eq!(split["a"]["pods"].0, "0");
        assert_eq!(split["a"]["requests.cpu"].0, "2");
    }

    #[test]
    fn backoff_grows_and_resets() {
        let b = Backoff::default();
        assert_eq!(b.failed("x".into()), Duration::from_millis(250));
        assert_eq!(b.failed("x".into()), Duration::from_millis(500));
        b.succeeded("x");
        assert_eq!(b.failed("x".into()), Duration::from_millis(250));
        for _ in 0..20 {
            b.failed("y".into());
        }
        assert_eq!(b.failed("y".into()), Duration::from_secs(120));
    }
}
