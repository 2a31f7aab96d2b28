//! The discovery controller: discovery events in, `ForeignCluster` objects out.
//!
//! [`DiscoveryController`] consumes the views of a [`CompositeDiscovery`] and keeps one
//! `ForeignCluster` (FC) per discovered cluster, using a kube-runtime `Controller` over FCs whose
//! reconciles are also triggered by discovery changes.
//!
//! ## What it writes
//! - **Creation.** A cluster reported by discovery with no FC (matched by `spec.clusterId`) gets
//!   one, named after its cluster id and labelled `liqo.io/managed-by=liqo-discovery` and
//!   `liqo.io/remote-cluster-id=<id>`. The first record's key fingerprint becomes the FC's pinned
//!   `spec.publicKeyFingerprint` (trust on first use, for an unpeered cluster).
//!   `spec.discovery.autoPeer` comes from the [`AutoPeerPolicy`], off for every source by default:
//!   discovered is not trusted.
//! - **Spec.** On FCs it created, the controller keeps `clusterName`, `peeringEndpoint` and
//!   `discovery` in line with the effective trusted record (server-side apply, field manager
//!   `liqo-discovery`). The pinned fingerprint is never changed. `Manual` is sticky: an FC whose
//!   source is `Manual` takes spec changes only from a `Manual` record. FCs it did not create
//!   (made by hand) get status only.
//! - **Status** (server-side apply on the status subresource, so conditions of other modules
//!   are untouched): `Discovered` (a trusted record is reported), `KeyMismatch` (see below),
//!   `lastSeen` (moved at most once per [`ControllerConfig::last_seen_granularity`]) and
//!   `discoverySources`; `observedGeneration` on both conditions.
//!
//! ## Key pinning
//! A record is *trusted* when its fingerprint equals the FC's pinned one (any record is trusted
//! while nothing is pinned; a `Manual` record without a fingerprint is trusted). Other records —
//! another key, or no key from mDNS/DNS for a pinned cluster — and claims a provider refused as
//! [`ClaimConflict`](crate::claims::ClaimConflict)s set `KeyMismatch=True` with the source and
//! both fingerprints in the message, emit a `Warning` event, and change nothing else: they never
//! replace the pinned endpoint or key, never refresh `lastSeen` and never keep `Discovered` true.
//!
//! ## Expiry
//! When no source reports a cluster any more, its FC is deleted, unless:
//! - its source is `Manual` (declared by an administrator; only they remove it), or
//! - it is peered or meant to be: `status.role` or `spec.role` is not `None`, or
//! - the controller did not create it (no `liqo.io/managed-by=liqo-discovery` label), or
//! - a record with a mismatching key is still reported (deleting the FC would drop the pin and
//!   let that record be pinned next).
//!
//! An FC deleted by hand while its cluster is still reported is made again at the next change of
//! the cluster's records (for DNS, its next re-query), pinned afresh.
//!
//! An FC whose cluster was never reported since the controller started (a restart) is deleted
//! only after [`ControllerConfig::orphan_grace`], giving the sources time to report it again.
//! Deletion uses the FC's uid and resourceVersion as preconditions, so an FC changed meanwhile
//! (say an administrator set `spec.role`) is reconsidered instead of deleted. There is no
//! finalizer: the controller holds no state outside the FC that would need cleaning up.
//!
//! ## Permissions
//! `foreignclusters.liqo.io`: get, list, watch, create, patch, delete;
//! `foreignclusters.liqo.io/status`: patch; `events.events.k8s.io`: create, patch.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use futures::{SinkExt, StreamExt, channel::mpsc};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use liqo_core::{
    ClusterId, DiscoverySource, KeyFingerprint,
    conditions::{self, Status},
    crds::{ForeignCluster, PeeringRole, foreign_cluster_condition as cond},
    labels,
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::composite::{CompositeDiscovery, PeerView, ViewEvent};

/// The field manager and `liqo.io/managed-by` value of this controller.
pub const MANAGER: &str = "liqo-discovery";

/// Which sources may trigger peering on their own (`spec.discovery.autoPeer`). None by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoPeerPolicy(BTreeSet<DiscoverySource>);

impl AutoPeerPolicy {
    /// No source auto-peers (the default).
    pub fn none() -> Self {
        Self::default()
    }

    /// Also auto-peer with clusters found by `source`.
    #[must_use]
    pub fn allow(mut self, source: DiscoverySource) -> Self {
        self.0.insert(source);
        self
    }

    /// Whether clusters found by `source` are auto-peered.
    pub fn allows(&self, source: DiscoverySource) -> bool {
        self.0.contains(&source)
    }
}

/// Tuning of a [`DiscoveryController`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ControllerConfig {
    /// Auto-peering per source.
    pub auto_peer: AutoPeerPolicy,
    /// This cluster's id: never turned into an FC.
    pub local_cluster: Option<ClusterId>,
    /// How long after start an FC never reported since is kept before it is deleted.
    pub orphan_grace: Duration,
    /// `status.lastSeen` moves only when it is older than this (limits writes on refreshes;
    /// at least one second, the API's precision).
    pub last_seen_granularity: Duration,
    /// Whether to publish Kubernetes events.
    pub events: bool,
    /// Delay before retrying a failed reconcile.
    pub retry_after: Duration,
}

impl Default for ControllerConfig {
    /// No auto-peering, orphan grace 5 min, lastSeen granularity 30 s, events on, retry 5 s.
    fn default() -> Self {
        Self {
            auto_peer: AutoPeerPolicy::none(),
            local_cluster: None,
            orphan_grace: Duration::from_secs(300),
            last_seen_granularity: Duration::from_secs(30),
            events: true,
            retry_after: Duration::from_secs(5),
        }
    }
}

impl ControllerConfig {
    /// Sets the auto-peering policy.
    #[must_use]
    pub fn auto_peer(mut self, policy: AutoPeerPolicy) -> Self {
        self.auto_peer = policy;
        self
    }

    /// Sets this cluster's id.
    #[must_use]
    pub fn local_cluster(mut self, id: ClusterId) -> Self {
        self.local_cluster = Some(id);
        self
    }

    /// Sets the orphan grace.
    #[must_use]
    pub fn orphan_grace(mut self, d: Duration) -> Self {
        self.orphan_grace = d;
        self
    }

    /// Sets the lastSeen granularity.
    #[must_use]
    pub fn last_seen_granularity(mut self, d: Duration) -> Self {
        self.last_seen_granularity = d;
        self
    }

    /// Turns Kubernetes events on or off.
    #[must_use]
    pub fn events(mut self, on: bool) -> Self {
        self.events = on;
        self
    }
}

/// Errors of the discovery controller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// A Kubernetes API call failed.
    #[error("kubernetes API error while {action}: {source}")]
    Kube {
        /// What the controller was doing.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ControllerError {
    let action = action.into();
    move |source| ControllerError::Kube { action, source }
}

/// Turns discovery views into `ForeignCluster` objects; see the [module documentation](self).
pub struct DiscoveryController {
    client: Client,
    discovery: CompositeDiscovery,
    config: ControllerConfig,
}

impl std::fmt::Debug for DiscoveryController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryController")
            .field("discovery", &self.discovery)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct Ctx {
    api: Api<ForeignCluster>,
    discovery: CompositeDiscovery,
    config: ControllerConfig,
    /// What discovery said last per cluster: `Some(None)` means it expired while we watched.
    table: Mutex<HashMap<ClusterId, Option<PeerView>>>,
    /// The last KeyMismatch message a warning event was published for, per FC.
    warned: Mutex<HashMap<String, String>>,
    recorder: Option<Recorder>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DiscoveryController {
    /// A controller writing FCs through `client` from what `discovery` reports.
    pub fn new(client: Client, discovery: CompositeDiscovery) -> Self {
        Self {
            client,
            discovery,
            config: ControllerConfig::default(),
        }
    }

    /// Replaces the tuning.
    #[must_use]
    pub fn with_config(mut self, config: ControllerConfig) -> Self {
        self.config = config;
        self
    }

    /// Runs until `shutdown` resolves (then finishes the reconciles in flight) or the FC watch
    /// cannot be started.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ) -> Result<(), ControllerError> {
        let api: Api<ForeignCluster> = Api::all(self.client.clone());
        // Fail early, with a clear error, when the CRD is missing or access is denied.
        api.list(&kube::api::ListParams::default().limit(1))
            .await
            .map_err(kube_err("listing ForeignClusters"))?;
        let recorder = self.config.events.then(|| {
            Recorder::new(
                self.client.clone(),
                Reporter {
                    controller: MANAGER.into(),
                    instance: None,
                },
            )
        });
        let ctx = Arc::new(Ctx {
            api: api.clone(),
            discovery: self.discovery.clone(),
            config: self.config,
            table: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashMap::new()),
            recorder,
            started: Instant::now(),
        });
        let controller = Controller::new(api, watcher::Config::default().any_semantic())
            .trigger_backoff(liqo_core::watch_backoff());
        let store = controller.store();
        let (trigger_tx, trigger_rx) = mpsc::channel(1024);
        let ingest = tokio::spawn(ingest(ctx.clone(), store, trigger_tx));
        info!("discovery controller started");
        controller
            .reconcile_on(trigger_rx)
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, ctx)
            .for_each(|r| async move {
                match r {
                    Ok((obj, _)) => debug!(fc = %obj.name, "reconciled"),
                    Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                        debug!(fc = %obj.name, "ForeignCluster gone before its reconcile")
                    }
                    Err(e) => warn!(error = %e, "reconcile failed"),
                }
            })
            .await;
        ingest.abort();
        info!("discovery controller stopped");
        Ok(())
    }
}

/// Feeds discovery views into the table, creates missing FCs and triggers reconciles.
async fn ingest(
    ctx: Arc<Ctx>,
    store: Store<ForeignCluster>,
    mut trigger: mpsc::Sender<ObjectRef<ForeignCluster>>,
) {
    // The controller's cache may not be filled yet (and kube-runtime's readiness future wakes a
    // single waiter, the controller): where the cache has no FC for a cluster, the API server is
    // asked before creating one.
    let mut views = ctx.discovery.watch_views();
    while let Some(event) = views.next().await {
        let (id, view) = match event {
            ViewEvent::Changed { cluster_id, view } => (cluster_id, view),
            ViewEvent::Problem(p) => {
                warn!(source = p.source.as_str(), error = %p.error, "discovery problem");
                continue;
            }
        };
        if ctx.config.local_cluster.as_ref() == Some(&id) {
            continue;
        }
        lock(&ctx.table).insert(id.clone(), view.clone());
        debug!(cluster = %id, present = view.is_some(), "discovery view changed");
        let cached = store
            .find(|fc| fc.spec.cluster_id == id)
            .map(|fc| fc.name_any());
        let name = match (cached, &view) {
            (Some(name), _) => name,
            (None, Some(view)) => match find_or_create(&ctx, view).await {
                Ok(name) => name,
                Err(e) => {
                    warn!(cluster = %id, error = %e, "creating the ForeignCluster failed");
                    continue;
                }
            },
            (None, None) => continue,
        };
        if trigger.send(ObjectRef::new(&name)).await.is_err() {
            return;
        }
    }
}

/// The name of the FC of `view`'s cluster, created if there is none. An existing FC (whatever
/// its name) is left alone.
async fn find_or_create(ctx: &Ctx, view: &PeerView) -> Result<String, ControllerError> {
    let id = &view.cluster_id;
    let all = ctx
        .api
        .list(&kube::api::ListParams::default())
        .await
        .map_err(kube_err("listing ForeignClusters"))?;
    if let Some(fc) = all.items.iter().find(|fc| fc.spec.cluster_id == *id) {
        return Ok(fc.name_any());
    }
    create(ctx, view).await
}

/// Creates the FC of a newly discovered cluster. An existing FC of that name is left alone.
async fn create(ctx: &Ctx, view: &PeerView) -> Result<String, ControllerError> {
    let record = view.effective();
    let ad = &record.advertisement;
    let name = ad.cluster_id.to_string();
    let mut spec = json!({
        "clusterId": ad.cluster_id,
        "clusterName": ad.cluster_name,
        "peeringEndpoint": ad.peering_endpoint,
        "discovery": {
            "source": record.source,
            "autoPeer": ctx.config.auto_peer.allows(record.source),
        },
    });
    if let Some(fp) = ad.key_fingerprint {
        spec["publicKeyFingerprint"] = json!(fp);
    }
    let object = json!({
        "apiVersion": "liqo.io/v1alpha1",
        "kind": "ForeignCluster",
        "metadata": {
            "name": name,
            "labels": {
                labels::MANAGED_BY: MANAGER,
                labels::REMOTE_CLUSTER_ID: name,
            },
        },
        "spec": spec,
    });
    // Server-side apply owns exactly the fields sent (a create, or an update, would also own
    // `spec.role` once the API server defaults it, and `spec.role` belongs to whoever decides to
    // peer). Not forced: should someone else have made an FC of that name since the list above,
    // their fields conflict and theirs stay.
    match ctx
        .api
        .patch(&name, &PatchParams::apply(MANAGER), &Patch::Apply(object))
        .await
    {
        Ok(created) => {
            info!(cluster = %ad.cluster_id, source = record.source.as_str(), endpoint = %ad.peering_endpoint, "ForeignCluster created");
            publish(
                ctx,
                &created,
                EventType::Normal,
                "Discovered",
                format!(
                    "cluster {} found by {} at {}",
                    ad.cluster_id,
                    record.source.as_str(),
                    ad.peering_endpoint
                ),
            )
            .await;
            Ok(name)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(name),
        Err(e) => Err(kube_err(format!("creating ForeignCluster {name}"))(e)),
    }
}

async fn publish(ctx: &Ctx, fc: &ForeignCluster, type_: EventType, reason: &str, note: String) {
    let Some(recorder) = &ctx.recorder else {
        return;
    };
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Discover".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &fc.object_ref(&())).await {
        debug!(error = %e, "publishing an event failed");
    }
}

/// Whether a record with `fingerprint` from `source` may speak for a cluster pinned to `pin`.
pub fn key_matches(
    pin: Option<KeyFingerprint>,
    fingerprint: Option<KeyFingerprint>,
    source: DiscoverySource,
) -> bool {
    match (pin, fingerprint) {
        (None, _) => true,
        (Some(p), Some(f)) => p == f,
        (Some(_), None) => source == DiscoverySource::Manual,
    }
}

/// A record judged against the pin.
struct Judged<'a> {
    source: DiscoverySource,
    ad: &'a liqo_core::PeerAdvertisement,
    last_seen: Option<SystemTime>,
}

fn fmt_fp(fp: Option<KeyFingerprint>) -> String {
    fp.map_or_else(|| "no key".to_owned(), |f| f.to_string())
}

fn is_peered(fc: &ForeignCluster) -> bool {
    fc.spec.role != PeeringRole::None
        || fc
            .status
            .as_ref()
            .is_some_and(|s| s.role != PeeringRole::None)
}

fn to_time(t: SystemTime) -> Option<Time> {
    Timestamp::try_from(t).ok().map(Time)
}

async fn reconcile(fc: Arc<ForeignCluster>, ctx: Arc<Ctx>) -> Result<Action, ControllerError> {
    let id = fc.spec.cluster_id.clone();
    let name = fc.name_any();
    if ctx.config.local_cluster.as_ref() == Some(&id) || fc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let known = lock(&ctx.table).get(&id).cloned();
    let view = known.clone().flatten();
    let pin = fc.spec.public_key_fingerprint;
    let ours = fc.labels().get(labels::MANAGED_BY).map(String::as_str) == Some(MANAGER);

    let mut trusted: Vec<Judged<'_>> = vec![];
    let mut mismatched: Vec<Judged<'_>> = vec![];
    if let Some(v) = &view {
        for r in &v.records {
            let j = Judged {
                source: r.source,
                ad: &r.advertisement,
                last_seen: Some(r.last_seen),
            };
            if key_matches(pin, r.advertisement.key_fingerprint, r.source) {
                trusted.push(j);
            } else {
                mismatched.push(j);
            }
        }
        for c in &v.conflicts {
            let j = Judged {
                source: c.source_kind,
                ad: &c.advertisement,
                last_seen: None,
            };
            if pin.is_some() && key_matches(pin, c.fingerprint, c.source_kind) {
                // The refused claim is the one holding the pinned key: trust it, not the owner.
                trusted.push(j);
            } else {
                mismatched.push(j);
            }
        }
        trusted.sort_by_key(|j| std::cmp::Reverse(j.source.precedence()));
    }

    // Spec: only on FCs we created, never the pin, Manual is sticky.
    if ours && let Some(best) = trusted.first() {
        let current = fc.spec.discovery.source;
        let source = if current == DiscoverySource::Manual {
            DiscoverySource::Manual
        } else {
            best.source
        };
        if current != DiscoverySource::Manual || best.source == DiscoverySource::Manual {
            let auto_peer = ctx.config.auto_peer.allows(source);
            let fingerprint = pin.or(best.ad.key_fingerprint);
            let differs = fc.spec.cluster_name.as_deref() != Some(best.ad.cluster_name.as_str())
                || fc.spec.peering_endpoint.as_deref() != Some(best.ad.peering_endpoint.as_str())
                || fc.spec.discovery.source != source
                || fc.spec.discovery.auto_peer != auto_peer
                || fc.spec.public_key_fingerprint != fingerprint;
            if differs {
                let mut spec = json!({
                    "clusterId": id,
                    "clusterName": best.ad.cluster_name,
                    "peeringEndpoint": best.ad.peering_endpoint,
                    "discovery": {"source": source, "autoPeer": auto_peer},
                });
                if let Some(fp) = fingerprint {
                    spec["publicKeyFingerprint"] = json!(fp);
                }
                let patch = json!({
                    "apiVersion": "liqo.io/v1alpha1",
                    "kind": "ForeignCluster",
                    "metadata": {"name": name, "labels": {
                        labels::MANAGED_BY: MANAGER,
                        labels::REMOTE_CLUSTER_ID: id,
                    }},
                    "spec": spec,
                });
                ctx.api
                    .patch(
                        &name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(patch),
                    )
                    .await
                    .map_err(kube_err(format!(
                        "updating the spec of ForeignCluster {name}"
                    )))?;
                info!(cluster = %id, source = source.as_str(), endpoint = %best.ad.peering_endpoint, "ForeignCluster spec updated");
            }
        }
    }

    // Status.
    let status = fc.status.clone().unwrap_or_default();
    let generation = fc.metadata.generation;
    let mut conds: Vec<Condition> = status
        .conditions
        .iter()
        .filter(|c| c.type_ == cond::DISCOVERED || c.type_ == cond::KEY_MISMATCH)
        .cloned()
        .collect();
    let mut sources: Vec<DiscoverySource> = vec![];
    for j in &trusted {
        if !sources.contains(&j.source) {
            sources.push(j.source);
        }
    }
    let discovered_changed = if trusted.is_empty() {
        let (reason, message) = if mismatched.is_empty() {
            (
                "NotReported",
                "no discovery source reports the cluster".to_owned(),
            )
        } else {
            (
                "OnlyMismatchedKeys",
                "only records with a key other than the pinned one report the cluster".to_owned(),
            )
        };
        conditions::set(
            &mut conds,
            cond::DISCOVERED,
            Status::False,
            reason,
            &message,
            generation,
        )
    } else {
        let list: Vec<&str> = sources.iter().map(|s| s.as_str()).collect();
        conditions::set(
            &mut conds,
            cond::DISCOVERED,
            Status::True,
            "Reported",
            &format!("reported by {}", list.join(", ")),
            generation,
        )
    };
    let mismatch_message = mismatched
        .iter()
        .map(|j| {
            format!(
                "{} announces cluster {} with {} at {} but the pinned key is {}",
                j.source.as_str(),
                id,
                fmt_fp(j.ad.key_fingerprint),
                j.ad.peering_endpoint,
                fmt_fp(pin),
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mismatch_changed = if mismatched.is_empty() {
        conditions::set(
            &mut conds,
            cond::KEY_MISMATCH,
            Status::False,
            "KeysMatch",
            "every record carries the pinned key",
            generation,
        )
    } else {
        conditions::set(
            &mut conds,
            cond::KEY_MISMATCH,
            Status::True,
            "FingerprintMismatch",
            &format!("{mismatch_message}; those records are ignored"),
            generation,
        )
    };
    let seen = trusted.iter().filter_map(|j| j.last_seen).max();
    let old_seen: Option<SystemTime> = status.last_seen.as_ref().map(|t| SystemTime::from(t.0));
    // The API keeps whole seconds: a step under a second would be written again and again.
    let granularity = ctx.config.last_seen_granularity.max(Duration::from_secs(1));
    let last_seen = match (seen, old_seen) {
        (Some(new), Some(old)) if new.duration_since(old).is_ok_and(|d| d >= granularity) => {
            Some(new)
        }
        (Some(new), None) => Some(new),
        (_, old) => old,
    };
    let seen_changed = last_seen != old_seen;
    let sources_changed = status.discovery_sources != sources;
    if discovered_changed || mismatch_changed || seen_changed || sources_changed {
        let mut st = json!({ "conditions": conds });
        if let Some(t) = last_seen.and_then(to_time) {
            st["lastSeen"] = json!(t);
        }
        if !sources.is_empty() {
            st["discoverySources"] = json!(sources);
        }
        let patch: Value = json!({
            "apiVersion": "liqo.io/v1alpha1",
            "kind": "ForeignCluster",
            "status": st,
        });
        ctx.api
            .patch_status(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
            .map_err(kube_err(format!(
                "updating the status of ForeignCluster {name}"
            )))?;
        debug!(cluster = %id, "ForeignCluster status updated");
    }
    if !mismatched.is_empty() {
        let first_time = lock(&ctx.warned).insert(name.clone(), mismatch_message.clone())
            != Some(mismatch_message.clone());
        if first_time {
            warn!(cluster = %id, "{mismatch_message}");
            publish(
                &ctx,
                &fc,
                EventType::Warning,
                "KeyMismatch",
                mismatch_message,
            )
            .await;
        }
    } else {
        lock(&ctx.warned).remove(&name);
    }

    // Expiry.
    if !trusted.is_empty() || !mismatched.is_empty() {
        return Ok(Action::await_change());
    }
    let deletable = ours && fc.spec.discovery.source != DiscoverySource::Manual && !is_peered(&fc);
    if !deletable {
        return Ok(Action::await_change());
    }
    if known.is_none() {
        // Never reported since we started: give the sources time to report it again.
        let waited = ctx.started.elapsed();
        if waited < ctx.config.orphan_grace {
            return Ok(Action::requeue(ctx.config.orphan_grace - waited));
        }
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: fc.metadata.uid.clone(),
            resource_version: fc.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    match ctx.api.delete(&name, &dp).await {
        Ok(_) => {
            info!(cluster = %id, "discovery expired; ForeignCluster deleted");
            publish(
                &ctx,
                &fc,
                EventType::Normal,
                "Expired",
                format!("no discovery source reports cluster {id} any more"),
            )
            .await;
            let mut table = lock(&ctx.table);
            if matches!(table.get(&id), Some(None)) {
                table.remove(&id);
            }
        }
        // Gone already, or changed since we read it: the watch brings the new state.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => return Err(kube_err(format!("deleting ForeignCluster {name}"))(e)),
    }
    Ok(Action::await_change())
}

fn error_policy(fc: Arc<ForeignCluster>, error: &ControllerError, ctx: Arc<Ctx>) -> Action {
    warn!(fc = %fc.name_any(), %error, "reconcile failed; retrying");
    Action::requeue(ctx.config.retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use liqo_core::PublicKey;

    #[test]
    fn key_matching_rules() {
        let a = PublicKey::from_bytes(vec![1]).fingerprint();
        let b = PublicKey::from_bytes(vec![2]).fingerprint();
        use DiscoverySource::*;
        assert!(key_matches(None, Some(a), Mdns));
        assert!(key_matches(None, None, Dns));
        assert!(key_matches(Some(a), Some(a), Mdns));
        assert!(!key_matches(Some(a), Some(b), Manual));
        assert!(!key_matches(Some(a), None, Mdns));
        assert!(!key_matches(Some(a), None, Dns));
        assert!(key_matches(Some(a), None, Manual));
    }

    #[test]
    fn auto_peer_is_off_by_default() {
        let p = AutoPeerPolicy::default();
        assert!(!p.allows(DiscoverySource::Manual));
        let p = p.allow(DiscoverySource::Dns);
        assert!(p.allows(DiscoverySource::Dns) && !p.allows(DiscoverySource::Mdns));
        assert_eq!(
            ControllerConfig::default().auto_peer,
            AutoPeerPolicy::none()
        );
    }
}
