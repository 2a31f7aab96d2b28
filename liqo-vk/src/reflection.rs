//! The generic reflection engine: one engine, parameterised by kind.
//!
//! A [`Reflect`] implementation says what one kind of object becomes on the other side
//! ([`Reflect::transform`]); [`Reflector`] does the rest and implements
//! [`ResourceReflector`](liqo_core::ResourceReflector), so it plugs into the
//! [`ConsumerAgent`](crate::ConsumerAgent) like any other reflector:
//!
//! - two kube-runtime stores, the source namespace and the targets this reflector made (selected
//!   by the `liqo.io/reflector=<name>` label), fed by watches: no polling;
//! - a keyed work queue (source names) with bounded workers and per-key backoff retries;
//! - server-side apply with field manager [`FIELD_MANAGER`](crate::names::FIELD_MANAGER), skipped
//!   when the target's `liqo.io/reflection-hash` already matches the desired object;
//! - deletion of targets whose source is gone, skipped (`liqo.io/skip-reflection=true`) or not
//!   allowed (`liqo.io/allow-reflection=true` missing under [`ReflectionPolicy::OnlyAllowed`]);
//! - restart safety: the stores are re-listed on start, so targets orphaned while the agent was
//!   away are deleted and missing ones created, never duplicated (names are deterministic);
//! - objects it would overwrite but did not make are left alone and reported (a name conflict).
//!
//! Reflecting a custom resource is a few lines:
//!
//! ```
//! # use k8s_openapi::api::core::v1::ConfigMap as Widget; // stands for a #[derive(CustomResource)] type
//! use liqo_core::{ReflectionDirection, ReflectionScope};
//! use liqo_vk::reflection::{Reflect, Reflector, TransformError, clean_metadata};
//!
//! struct Widgets;
//! impl Reflect for Widgets {
//!     type Source = Widget;
//!     type Target = Widget;
//!     fn name(&self) -> &str { "widget" }
//!     fn direction(&self) -> ReflectionDirection { ReflectionDirection::LocalToRemote }
//!     fn transform(&self, w: &Widget, _: &ReflectionScope) -> Result<Option<Widget>, TransformError> {
//!         Ok(Some(Widget { metadata: clean_metadata(&w.metadata), ..w.clone() }))
//!     }
//! }
//! let reflector = Reflector::new(Widgets); // hand it to ConsumerAgent::builder(..).reflector(..)
//! ```

use std::{collections::BTreeMap, fmt::Debug, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::{NamespaceResourceScope, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use liqo_core::{ReflectionDirection, ReflectionError, ReflectionScope, ResourceReflector, labels};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::{
    names::{self, FIELD_MANAGER},
    queue::{self, Requeue, WorkQueue},
};

/// Why an object cannot be reflected (reported, retried with backoff).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct TransformError {
    /// What is wrong with the object.
    pub reason: String,
}

impl TransformError {
    /// An error with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Which source objects are reflected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReflectionPolicy {
    /// Every object except those annotated `liqo.io/skip-reflection=true`.
    #[default]
    AllExceptSkipped,
    /// Only objects annotated `liqo.io/allow-reflection=true` (and not skipped).
    OnlyAllowed,
}

/// A namespaced Kubernetes object the engine can watch and apply.
pub trait Object:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<T> Object for T where
    T: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// What one kind of object becomes on the other side; [`Reflector`] does everything else.
#[async_trait]
pub trait Reflect: Send + Sync + 'static {
    /// The watched kind.
    type Source: Object;
    /// The kind written on the other side (often the same).
    type Target: Object;

    /// A short lower-case name, unique among the reflectors writing the same target kind (it is
    /// the `liqo.io/reflector` label value that tells this reflector's targets apart).
    fn name(&self) -> &str;

    /// `LocalToRemote` or `RemoteToLocal` (`Both` is treated as `LocalToRemote`).
    fn direction(&self) -> ReflectionDirection;

    /// Which sources are reflected.
    fn policy(&self) -> ReflectionPolicy {
        ReflectionPolicy::AllExceptSkipped
    }

    /// Narrows the source watch (label or field selectors).
    fn source_selector(&self) -> watcher::Config {
        watcher::Config::default()
    }

    /// The target's name for a source name. It must depend on the name alone, so a target can be
    /// found after its source is gone.
    fn target_name(&self, source_name: &str, scope: &ReflectionScope) -> String {
        let _ = scope;
        source_name.to_owned()
    }

    /// The desired target for `source` (`None`: this source is not reflected). The engine sets
    /// the name, namespace and its own labels and annotations afterwards.
    fn transform(
        &self,
        source: &Self::Source,
        scope: &ReflectionScope,
    ) -> Result<Option<Self::Target>, TransformError>;

    /// The desired target given the one that exists now. The default calls
    /// [`transform`](Self::transform); override it when building the target needs API calls (a
    /// token request), and return `existing` unchanged while it is still good.
    async fn desired(
        &self,
        source: &Self::Source,
        existing: Option<&Self::Target>,
        scope: &ReflectionScope,
    ) -> Result<Option<Self::Target>, TransformError> {
        let _ = existing;
        self.transform(source, scope)
    }

    /// Asks for the source to be reconciled again after a delay even without events (e.g. to
    /// renew a token before it expires).
    fn refresh_after(&self, source: &Self::Source) -> Option<Duration> {
        let _ = source;
        None
    }

    /// Names of sources to look at again when something else than the source changes (e.g. a
    /// ServiceAccount when a pod that uses it is offloaded or gone), for reflectors whose
    /// [`desired`](Self::desired) depends on other objects. Default: none.
    fn triggers(&self, scope: &ReflectionScope) -> Option<BoxStream<'static, String>> {
        let _ = scope;
        None
    }
}

/// How often an object an admission policy of the other cluster refused is tried again (its
/// admin may change the policy; an edit of the source is tried at once).
const POLICY_RECHECK: Duration = Duration::from_secs(300);

/// A write refused for good: retrying cannot help while the namespace goes away (its deletion
/// ends the reflection soon), nor against an admission policy until the object or the policy
/// changes. Not an error, so no retry storm of warnings (seen: tens of thousands of lines while
/// an offloaded namespace was deleted).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The target namespace is being deleted.
    NamespaceTerminating,
    /// An admission policy refused the object; the policy's own words.
    Policy(String),
}

pub(crate) fn final_refusal(e: &kube::Error) -> Option<Refusal> {
    let kube::Error::Api(s) = e else { return None };
    if s.code == 403 && s.message.contains("being terminated") {
        return Some(Refusal::NamespaceTerminating);
    }
    (matches!(s.code, 403 | 422) && s.message.contains("denied request"))
        .then(|| Refusal::Policy(crate::security::refusal_reason(&s.message).to_owned()))
}

/// Tunables of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Objects reconciled at once per namespace pair.
    pub workers: usize,
    /// First retry delay after a failure.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// The generic engine: turns a [`Reflect`] into a [`ResourceReflector`].
#[derive(Debug)]
pub struct Reflector<R> {
    inner: Arc<R>,
    kind: String,
    config: EngineConfig,
}

impl<R: Reflect> Reflector<R> {
    /// The engine for `kind`, with default tunables.
    pub fn new(kind: R) -> Self {
        let name = R::Source::kind(&()).into_owned();
        Self {
            inner: Arc::new(kind),
            kind: name,
            config: EngineConfig::default(),
        }
    }

    /// Overrides the tunables.
    pub fn with_config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }
}

/// Metadata safe to send to another cluster: name, labels and annotations only (no uid,
/// resourceVersion, owner references, managed fields or finalizers).
pub fn clean_metadata(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        labels: meta.labels.clone(),
        annotations: meta.annotations.as_ref().map(|a| {
            a.iter()
                .filter(|(k, _)| k.as_str() != "kubectl.kubernetes.io/last-applied-configuration")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        ..ObjectMeta::default()
    }
}

/// Whether an object's annotations let it be reflected under `policy`. Objects made by liqo-rs
/// itself are never reflected, so two clusters offloading to each other cannot ping-pong.
pub fn is_reflectable(meta: &ObjectMeta, policy: ReflectionPolicy) -> bool {
    let ann = |k: &str| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(k))
            .is_some_and(|v| v == "true")
    };
    let ours = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::MANAGED_BY))
        .is_some_and(|v| v == names::MANAGED_BY_VALUE);
    if ours || ann(labels::SKIP_REFLECTION) {
        return false;
    }
    match policy {
        ReflectionPolicy::AllExceptSkipped => true,
        ReflectionPolicy::OnlyAllowed => ann(names::ALLOW_REFLECTION),
    }
}

/// A short stable digest of a serialisable value (hex of SHA-256, 16 characters).
pub(crate) fn digest<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where each side lives for one reflector run.
struct Sides<R: Reflect> {
    reflect: Arc<R>,
    scope: ReflectionScope,
    kind: String,
    source: Store<R::Source>,
    source_ns: String,
    target: Store<R::Target>,
    target_api: Api<R::Target>,
    target_ns: String,
    /// Labels every target of this reflector carries (also its watch selector).
    target_labels: BTreeMap<String, String>,
}

impl<R: Reflect> Sides<R> {
    fn err(&self, name: &str, source: kube::Error) -> ReflectionError {
        ReflectionError::Kube {
            kind: self.kind.clone(),
            namespace: self.target_ns.clone(),
            name: name.to_owned(),
            source,
        }
    }

    fn ours(&self, meta: &ObjectMeta) -> bool {
        let l = meta.labels.as_ref();
        self.target_labels
            .iter()
            .all(|(k, v)| l.and_then(|l| l.get(k)) == Some(v))
    }

    async fn reconcile(&self, key: String) -> Result<Requeue, ReflectionError> {
        let target_name = self.reflect.target_name(&key, &self.scope);
        let source = self
            .source
            .get(&ObjectRef::new(&key).within(&self.source_ns));
        let existing = self
            .target
            .get(&ObjectRef::new(&target_name).within(&self.target_ns));
        let desired = match &source {
            Some(s)
                if s.meta().deletion_timestamp.is_none()
                    && is_reflectable(s.meta(), self.reflect.policy()) =>
            {
                self.reflect
                    .desired(s, existing.as_deref(), &self.scope)
                    .await
                    .map_err(|e| ReflectionError::Translate {
                        kind: self.kind.clone(),
                        namespace: self.source_ns.clone(),
                        name: key.clone(),
                        reason: e.reason,
                    })?
            }
            _ => None,
        };
        let Some(mut desired) = desired else {
            if let Some(t) = existing {
                self.delete(&target_name, t.uid()).await?;
            }
            return Ok(Requeue::Done);
        };
        let meta = desired.meta_mut();
        meta.name = Some(target_name.clone());
        meta.namespace = Some(self.target_ns.clone());
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .extend(self.target_labels.clone());
        let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(names::REFLECTION_SOURCE.to_owned(), key.clone());
        annotations.remove(names::REFLECTION_HASH);
        let hash = digest(&desired);
        desired
            .meta_mut()
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(names::REFLECTION_HASH.to_owned(), hash.clone());
        let refresh = source
            .as_deref()
            .and_then(|s| self.reflect.refresh_after(s));
        let requeue = refresh.map_or(Requeue::Done, Requeue::After);
        match existing {
            Some(t) if t.annotations().get(names::REFLECTION_HASH) == Some(&hash) => {
                return Ok(requeue);
            }
            Some(_) => {}
            None => {
                // Not in our (label-selected) store: never take over an object we did not make.
                match self.target_api.get_opt(&target_name).await {
                    Ok(Some(other)) if !self.ours(other.meta()) => {
                        tracing::warn!(kind = %self.kind, namespace = %self.target_ns, name = %target_name,
                            "not reflecting: an object of that name exists and was not made by liqo-rs");
                        return Ok(Requeue::Done);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(self.err(&target_name, e)),
                }
            }
        }
        match self
            .target_api
            .patch(
                &target_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await
        {
            Ok(_) => Ok(requeue),
            Err(e) => match final_refusal(&e) {
                Some(Refusal::NamespaceTerminating) => {
                    tracing::debug!(kind = %self.kind, namespace = %self.target_ns, name = %target_name,
                        "not reflecting into a namespace being deleted");
                    Ok(Requeue::Done)
                }
                Some(Refusal::Policy(reason)) => {
                    tracing::warn!(kind = %self.kind, namespace = %self.target_ns, name = %target_name,
                        %reason, "not reflected: refused by an admission policy of the other cluster");
                    Ok(Requeue::After(POLICY_RECHECK))
                }
                None => Err(self.err(&target_name, e)),
            },
        }
    }

    async fn delete(&self, name: &str, uid: Option<String>) -> Result<(), ReflectionError> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.target_api.delete(name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(e) => Err(self.err(name, e)),
        }
    }
}

impl<R: Reflect> Reflector<R> {
    /// The labels every target carries, for `scope`; also the targets' watch selector.
    fn target_labels(&self, scope: &ReflectionScope) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (
                labels::MANAGED_BY.to_owned(),
                names::MANAGED_BY_VALUE.to_owned(),
            ),
            (
                names::REFLECTOR_LABEL.to_owned(),
                self.inner.name().to_owned(),
            ),
        ]);
        if self.inner.direction() == ReflectionDirection::RemoteToLocal {
            // Several providers may reflect into the same local namespace.
            l.insert(
                labels::REMOTE_CLUSTER_ID.to_owned(),
                scope.remote_cluster.to_string(),
            );
        }
        l
    }
}

fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[async_trait]
impl<R: Reflect> ResourceReflector for Reflector<R> {
    fn kind(&self) -> &str {
        &self.kind
    }

    /// Objects reflected *into* the local namespace are removed when it stops being offloaded
    /// (those on the provider go with the twin namespace).
    async fn cleanup(&self, scope: &ReflectionScope) -> Result<(), ReflectionError> {
        if self.inner.direction() != ReflectionDirection::RemoteToLocal {
            return Ok(());
        }
        let api: Api<R::Target> = Api::namespaced(scope.local.clone(), &scope.local_namespace);
        let lp = kube::api::ListParams::default().labels(&selector(&self.target_labels(scope)));
        match api.delete_collection(&DeleteParams::default(), &lp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(source) => Err(ReflectionError::Kube {
                kind: self.kind.clone(),
                namespace: scope.local_namespace.clone(),
                name: String::new(),
                source,
            }),
        }
    }

    fn direction(&self) -> ReflectionDirection {
        self.inner.direction()
    }

    async fn reflect(
        &self,
        scope: ReflectionScope,
        shutdown: CancellationToken,
    ) -> Result<(), ReflectionError> {
        let outward = self.inner.direction() != ReflectionDirection::RemoteToLocal;
        let (src_client, src_ns, dst_client, dst_ns) = if outward {
            (
                scope.local.clone(),
                scope.local_namespace.clone(),
                scope.remote.clone(),
                scope.remote_namespace.clone(),
            )
        } else {
            (
                scope.remote.clone(),
                scope.remote_namespace.clone(),
                scope.local.clone(),
                scope.local_namespace.clone(),
            )
        };
        let target_labels = self.target_labels(&scope);
        let selector = selector(&target_labels);
        let source_api: Api<R::Source> = Api::namespaced(src_client, &src_ns);
        let target_api: Api<R::Target> = Api::namespaced(dst_client, &dst_ns);
        let (source_store, source_writer) = reflector::store();
        let (target_store, target_writer) = reflector::store();
        let queue = WorkQueue::<String>::new(self.config.retry_min, self.config.retry_max)
            .labelled(&self.kind);
        let sides = Arc::new(Sides {
            reflect: self.inner.clone(),
            scope: scope.clone(),
            kind: self.kind.clone(),
            source: source_store.clone(),
            source_ns: src_ns,
            target: target_store.clone(),
            target_api: target_api.clone(),
            target_ns: dst_ns,
            target_labels,
        });

        let source_events = queue::feed(
            source_writer,
            watcher(source_api, self.inner.source_selector()).backoff(liqo_core::watch_backoff()),
            &self.kind,
            &queue,
            |o: &R::Source| Some(o.name_any()),
            // A re-list may hide deletions: look at every target again.
            || {
                for t in target_store.state() {
                    if let Some(k) = t.annotations().get(names::REFLECTION_SOURCE) {
                        queue.add(k.clone());
                    }
                }
            },
        );
        let target_events = queue::feed(
            target_writer,
            watcher(target_api, watcher::Config::default().labels(&selector))
                .backoff(liqo_core::watch_backoff()),
            &self.kind,
            &queue,
            |o: &R::Target| o.annotations().get(names::REFLECTION_SOURCE).cloned(),
            || {
                for s in source_store.state() {
                    queue.add(s.name_any());
                }
            },
        );
        let triggers = async {
            match self.inner.triggers(&scope) {
                Some(mut keys) => {
                    while let Some(k) = keys.next().await {
                        queue.add(k);
                    }
                }
                None => std::future::pending().await,
            }
        };
        // Deciding that a target is orphaned needs both sides listed.
        let ready = async {
            source_store.wait_until_ready().await?;
            target_store.wait_until_ready().await
        };
        let workers = queue.clone().run_when_ready(
            ready,
            self.config.workers,
            shutdown.clone(),
            move |key| {
                let sides = sides.clone();
                async move { sides.reconcile(key).await }
            },
        );
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = source_events => {}
            () = target_events => {}
            () = triggers => {}
            () = workers => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.to_owned(),
            ..kube::core::Status::default()
        }))
    }

    #[test]
    fn writes_refused_for_good_are_not_errors() {
        assert_eq!(
            final_refusal(&api_error(
                403,
                "events \"x\" is forbidden: unable to create new content in namespace demo because it is being terminated"
            )),
            Some(Refusal::NamespaceTerminating)
        );
        assert_eq!(
            final_refusal(&api_error(
                403,
                "services \"web\" is forbidden: ValidatingAdmissionPolicy 'liqo-twin-service-guard' with binding 'liqo-twin-service-guard' denied request: spec.type: NodePort opens ports"
            )),
            Some(Refusal::Policy("spec.type: NodePort opens ports".into()))
        );
        // Anything else is retried with backoff.
        assert_eq!(
            final_refusal(&api_error(403, "forbidden: User cannot patch")),
            None
        );
        assert_eq!(final_refusal(&api_error(500, "etcd timeout")), None);
    }

    fn meta(ann: &[(&str, &str)], lab: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some("x".into()),
            uid: Some("u".into()),
            resource_version: Some("7".into()),
            annotations: Some(
                ann.iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            labels: Some(
                lab.iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn skip_allow_and_own_objects() {
        let all = ReflectionPolicy::AllExceptSkipped;
        let only = ReflectionPolicy::OnlyAllowed;
        assert!(is_reflectable(&meta(&[], &[]), all));
        assert!(!is_reflectable(&meta(&[], &[]), only));
        assert!(is_reflectable(
            &meta(&[(names::ALLOW_REFLECTION, "true")], &[]),
            only
        ));
        assert!(!is_reflectable(
            &meta(&[(labels::SKIP_REFLECTION, "true")], &[]),
            all
        ));
        assert!(!is_reflectable(
            &meta(
                &[
                    (labels::SKIP_REFLECTION, "true"),
                    (names::ALLOW_REFLECTION, "true")
                ],
                &[]
            ),
            only
        ));
        assert!(!is_reflectable(
            &meta(&[], &[(labels::MANAGED_BY, names::MANAGED_BY_VALUE)]),
            all
        ));
    }

    #[test]
    fn clean_metadata_drops_identity() {
        let m = clean_metadata(&meta(&[("a", "b")], &[("c", "d")]));
        assert_eq!(m.uid, None);
        assert_eq!(m.resource_version, None);
        assert_eq!(m.annotations.unwrap()["a"], "b");
        assert_eq!(m.labels.unwrap()["c"], "d");
    }

    #[test]
    fn digest_is_stable_and_sensitive() {
        let a = serde_json::json!({"a": 1});
        assert_eq!(digest(&a), digest(&a));
        assert_ne!(digest(&a), digest(&serde_json::json!({"a": 2})));
        assert_eq!(digest(&a).len(), 16);
    }
}
