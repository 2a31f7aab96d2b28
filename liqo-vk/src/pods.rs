//! Pod offloading: a pod bound to a virtual node runs in the twin namespace on the provider.
//!
//! Each local pod becomes a [`ShadowPod`] of the same name in the twin namespace; the provider's
//! agent runs the pod from it and keeps it alive when the consumer is gone (split brain, agent
//! down), which a bare remote pod would not survive if evicted or deleted (see
//! [`shadow`](crate::shadow) for why not a ReplicaSet of one). Status flows back from the remote
//! pod (phase, conditions, container statuses, pod IP translated by the fabric); a recreated
//! remote pod shows as one more restart. Labels, annotations and images flow out through the
//! ShadowPod. Deleting the local pod deletes the ShadowPod and the remote pod with the local
//! grace period; once the remote pod is gone the local one is removed, as a kubelet does.
//!
//! [`PodReflector`] is a [`ResourceReflector`] (direction `Both`) started per namespace pair like
//! every other reflector, on the same keyed work queue as the generic engine.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use k8s_openapi::{
    api::core::v1::{
        Pod, PodCondition, PodSpec, PodStatus, PodTemplateSpec, SecretVolumeSource, Volume,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions, PropagationPolicy},
    runtime::{
        WatchStreamExt,
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use liqo_core::{
    ClusterId, ReflectionDirection, ReflectionError, ReflectionScope, ResourceReflector, labels,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    names::{self, FIELD_MANAGER},
    queue::{self, Requeue, WorkQueue},
    reflection::{self, EngineConfig, Refusal, digest},
    shadow::{self, ShadowPod, ShadowPodSpec},
};

/// Condition on a local pod: `False` while its provider refuses to run it (reason
/// [`REASON_REFUSED`]) or would refuse it now (reason `PodSecurityLevelChanged`); absent when
/// all is well.
pub const OFFLOADING_ADMITTED: &str = "OffloadingAdmitted";

/// Reason (condition, event, and the pod's own `status.reason`) of a pod its provider refused.
pub const REASON_REFUSED: &str = "OffloadingRefused";

/// How often a refused pod is offered again (the provider's admin may change its level).
const REFUSED_RECHECK: Duration = Duration::from_secs(120);

/// The `liqo.io/reflector` value of ShadowPods and remote pods.
pub const POD_REFLECTOR: &str = "pod";

/// The Secret, in the twin namespace, holding the token of a local ServiceAccount for offloaded
/// pods (written by the ServiceAccount-token reflector): `liqo-sa-<service account>`.
pub fn service_account_secret(service_account: &str) -> String {
    format!("liqo-sa-{service_account}")
}

/// Offloads the pods bound to the provider's virtual node; see the module docs.
#[derive(Debug, Clone)]
pub struct PodReflector {
    local_cluster: ClusterId,
    config: EngineConfig,
}

impl PodReflector {
    /// A pod reflector for the consumer `local_cluster`.
    pub fn new(local_cluster: ClusterId) -> Self {
        Self {
            local_cluster,
            config: EngineConfig {
                workers: 16,
                ..EngineConfig::default()
            },
        }
    }

    /// Overrides the tunables (workers per namespace pair, retry bounds).
    pub fn with_config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }
}

struct Sides {
    scope: ReflectionScope,
    local_cluster: ClusterId,
    local: Store<Pod>,
    local_api: Api<Pod>,
    shadows: Store<ShadowPod>,
    shadow_api: Api<ShadowPod>,
    remote_pods: Store<Pod>,
    remote_pod_api: Api<Pod>,
    /// Events on local pods.
    recorder: Recorder,
}

fn kube_err(
    scope: &ReflectionScope,
    kind: &str,
    name: &str,
    source: kube::Error,
) -> ReflectionError {
    ReflectionError::Kube {
        kind: kind.to_owned(),
        namespace: scope.local_namespace.clone(),
        name: name.to_owned(),
        source,
    }
}

fn ignore_gone(r: Result<(), kube::Error>) -> Result<(), kube::Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        other => other,
    }
}

fn uid_precondition(uid: Option<String>) -> Option<Preconditions> {
    Some(Preconditions {
        uid,
        resource_version: None,
    })
}

/// The remote pod's spec: what the provider can run. Node placement, the virtual-node toleration
/// and the service-account token (replaced by the reflected one) are the consumer's business.
pub fn remote_pod_spec(local: &PodSpec) -> PodSpec {
    let mut spec = local.clone();
    spec.node_name = None;
    spec.node_selector = None;
    spec.affinity = None;
    spec.priority = None;
    spec.priority_class_name = None;
    spec.scheduler_name = None;
    spec.tolerations = spec.tolerations.map(|ts| {
        ts.into_iter()
            .filter(|t| {
                t.key.as_deref() != Some(names::VIRTUAL_NODE_TAINT_KEY)
                    && !t
                        .key
                        .as_deref()
                        .is_some_and(|k| k.starts_with("node.kubernetes.io/"))
            })
            .collect()
    });
    let service_account = spec
        .service_account_name
        .take()
        .unwrap_or_else(|| "default".to_owned());
    spec.service_account = None;
    spec.automount_service_account_token = Some(false);
    if let Some(volumes) = spec.volumes.as_mut() {
        for v in volumes.iter_mut() {
            let is_token = v.projected.as_ref().is_some_and(|p| {
                p.sources
                    .iter()
                    .flatten()
                    .any(|s| s.service_account_token.is_some())
            });
            if is_token {
                *v = Volume {
                    name: v.name.clone(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(service_account_secret(&service_account)),
                        optional: Some(true),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                };
            }
        }
    }
    spec
}

/// The local pod's annotations that belong on the remote pod: not the bookkeeping liqo-vk keeps
/// on the local pod about its remote twin.
fn forwarded_annotations(pod: &Pod) -> BTreeMap<String, String> {
    pod.annotations()
        .iter()
        // Bookkeeping of this side only (the deletion cost ranks pods of the local ReplicaSet).
        .filter(|(k, _)| {
            ![
                names::REMOTE_POD_UID,
                names::RESTART_OFFSET,
                names::POD_DELETION_COST,
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Sides {
    fn target_labels(&self, uid: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                labels::MANAGED_BY.to_owned(),
                names::MANAGED_BY_VALUE.to_owned(),
            ),
            (names::REFLECTOR_LABEL.to_owned(), POD_REFLECTOR.to_owned()),
            (
                labels::ORIGIN_CLUSTER_ID.to_owned(),
                self.local_cluster.to_string(),
            ),
            (names::ORIGIN_POD_UID.to_owned(), uid.to_owned()),
        ])
    }

    fn desired_shadow(&self, pod: &Pod, uid: &str) -> ShadowPod {
        let name = pod.name_any();
        let own = self.target_labels(uid);
        let mut pod_labels = pod.labels().clone();
        pod_labels.extend(own.clone());
        let mut pod_annotations = forwarded_annotations(pod);
        pod_annotations.insert(names::ORIGIN_POD.to_owned(), name.clone());
        let mut shadow = ShadowPod {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.scope.remote_namespace.clone()),
                labels: Some(own),
                annotations: Some(BTreeMap::from([(names::ORIGIN_POD.to_owned(), name)])),
                ..ObjectMeta::default()
            },
            spec: ShadowPodSpec {
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        annotations: Some(pod_annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: pod.spec.as_ref().map(remote_pod_spec),
                },
            },
            status: None,
        };
        let hash = digest(&shadow);
        shadow
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(names::REFLECTION_HASH.to_owned(), hash);
        shadow
    }

    /// The remote pod runs under the local pod's name.
    fn remote_pods_of(&self, key: &str) -> Vec<Arc<Pod>> {
        self.remote_pods
            .get(&ObjectRef::new(key).within(&self.scope.remote_namespace))
            .into_iter()
            .collect()
    }

    async fn delete_remote(&self, key: &str, grace: Option<i64>) -> Result<(), ReflectionError> {
        if let Some(rs) = self
            .shadows
            .get(&ObjectRef::new(key).within(&self.scope.remote_namespace))
        {
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                preconditions: uid_precondition(rs.uid()),
                ..DeleteParams::default()
            };
            ignore_gone(self.shadow_api.delete(key, &dp).await.map(|_| ()))
                .map_err(|e| kube_err(&self.scope, "ShadowPod", key, e))?;
        }
        for p in self.remote_pods_of(key) {
            let pgrace = p.metadata.deletion_grace_period_seconds;
            // Deleting again only helps to shorten the grace period.
            if p.metadata.deletion_timestamp.is_some()
                && !matches!((grace, pgrace), (Some(g), Some(c)) if g < c)
            {
                continue;
            }
            let dp = DeleteParams {
                grace_period_seconds: grace.map(|g| g.max(0) as u32),
                preconditions: uid_precondition(p.uid()),
                ..DeleteParams::default()
            };
            let name = p.name_any();
            ignore_gone(self.remote_pod_api.delete(&name, &dp).await.map(|_| ()))
                .map_err(|e| kube_err(&self.scope, "Pod", &name, e))?;
        }
        Ok(())
    }

    async fn reconcile(&self, key: String) -> Result<Requeue, ReflectionError> {
        let local = self
            .local
            .get(&ObjectRef::new(&key).within(&self.scope.local_namespace));
        let Some(local) = local else {
            // The local pod is gone: nothing of it may remain on the provider.
            self.delete_remote(&key, None).await?;
            return Ok(Requeue::Done);
        };
        let uid = local.uid().unwrap_or_default();
        if local.metadata.deletion_timestamp.is_some() {
            let grace = local.metadata.deletion_grace_period_seconds;
            self.delete_remote(&key, grace).await?;
            let rs_left = self
                .shadows
                .get(&ObjectRef::new(&key).within(&self.scope.remote_namespace))
                .is_some();
            if !rs_left && self.remote_pods_of(&key).is_empty() {
                // What a kubelet does once containers stopped: remove the pod for good.
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: uid_precondition(Some(uid)),
                    ..DeleteParams::default()
                };
                ignore_gone(self.local_api.delete(&key, &dp).await.map(|_| ()))
                    .map_err(|e| kube_err(&self.scope, "Pod", &key, e))?;
            }
            return Ok(Requeue::Done);
        }
        if matches!(
            local.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            return Ok(Requeue::Done);
        }

        // Scale-down removes remote pods first (cloud bursting shrinks back home), unless the
        // user ranked the pod already.
        if !local.annotations().contains_key(names::POD_DELETION_COST) {
            let patch = json!({"metadata": {"annotations": {
                names::POD_DELETION_COST: names::OFFLOADED_POD_DELETION_COST
            }}});
            self.local_api
                .patch(&key, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| kube_err(&self.scope, "Pod", &key, e))?;
        }

        // The ShadowPod, (re)made for this very pod (a pod recreated under the same name, as a
        // StatefulSet does, gets a fresh one).
        let rs = self
            .shadows
            .get(&ObjectRef::new(&key).within(&self.scope.remote_namespace));
        if let Some(rs) = &rs
            && rs.labels().get(names::ORIGIN_POD_UID) != Some(&uid)
        {
            self.delete_remote(&key, None).await?;
            return Ok(Requeue::After(Duration::from_millis(200)));
        }
        let desired = self.desired_shadow(&local, &uid);
        let want_hash = desired.annotations().get(names::REFLECTION_HASH);
        // What the provider says of the ShadowPod it has (a refusal of a spec we replace below
        // no longer holds).
        let mut refused = rs
            .as_deref()
            .and_then(shadow::refusal)
            .map(|(reason, message)| {
                let reason = if reason == shadow::REASON_LEVEL_CHANGED {
                    reason
                } else {
                    REASON_REFUSED
                };
                (reason, self.refused_by_provider(message))
            });
        if rs
            .as_ref()
            .map(|r| r.annotations().get(names::REFLECTION_HASH))
            != Some(want_hash)
        {
            refused = None;
            match self
                .shadow_api
                .patch(
                    &key,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&desired),
                )
                .await
            {
                Ok(_) => {}
                // The provider's admission policy: no retry helps until the spec or the
                // provider's level changes. A twin namespace being deleted takes the pod along.
                Err(e) => match reflection::final_refusal(&e) {
                    Some(Refusal::Policy(reason)) => {
                        refused = Some((REASON_REFUSED, self.refused_by_provider(&reason)));
                    }
                    Some(Refusal::NamespaceTerminating) => return Ok(Requeue::Done),
                    None => return Err(kube_err(&self.scope, "ShadowPod", &key, e)),
                },
            }
        }
        let admission = refused.map(|(reason, message)| PodCondition {
            type_: OFFLOADING_ADMITTED.to_owned(),
            status: "False".to_owned(),
            reason: Some(reason.to_owned()),
            message: Some(message),
            ..PodCondition::default()
        });

        // The remote pod: newest live one (an old one may still be terminating).
        let mut remote: Vec<Arc<Pod>> = self
            .remote_pods_of(&key)
            .into_iter()
            .filter(|p| p.labels().get(names::ORIGIN_POD_UID) == Some(&uid))
            .collect();
        remote.sort_by_key(|p| {
            (
                p.metadata.deletion_timestamp.is_none(),
                p.metadata.creation_timestamp.clone(),
            )
        });
        let Some(remote) = remote.pop() else {
            self.report_refusal(&local, admission.as_ref()).await?;
            // A refusal stands until the spec (an event) or the provider's level changes.
            return Ok(if admission.is_some() {
                Requeue::After(REFUSED_RECHECK)
            } else {
                Requeue::Done
            });
        };
        self.update_local_status(&local, &remote, admission).await?;
        Ok(Requeue::Done)
    }

    fn refused_by_provider(&self, why: &str) -> String {
        format!(
            "provider {} refused the pod: {why}",
            self.scope.remote_cluster
        )
    }

    /// Shows a refusal on a local pod that has no remote pod: condition
    /// [`OFFLOADING_ADMITTED`], the pod's reason (what `kubectl get pods` prints) and an event;
    /// or takes them away once the refusal is over.
    async fn report_refusal(
        &self,
        local: &Pod,
        admission: Option<&PodCondition>,
    ) -> Result<(), ReflectionError> {
        let name = local.name_any();
        let current = local
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == OFFLOADING_ADMITTED));
        let patch = match (admission, current) {
            (Some(want), Some(have))
                if want.reason == have.reason && want.message == have.message =>
            {
                return Ok(());
            }
            (Some(want), _) => {
                let message = want.message.clone().unwrap_or_default();
                tracing::warn!(pod = %name, namespace = %self.scope.local_namespace, %message, "offloading refused");
                crate::events::warn(
                    &self.recorder,
                    &local.object_ref(&()),
                    REASON_REFUSED,
                    "Offload",
                    &message,
                )
                .await;
                let mut cond = want.clone();
                cond.last_transition_time = Some(Time(Timestamp::now()));
                json!({"status": {"reason": REASON_REFUSED, "message": message, "conditions": [cond]}})
            }
            (None, Some(_)) => json!({"status": {"reason": null, "message": null,
                "conditions": [{"type": OFFLOADING_ADMITTED, "$patch": "delete"}]}}),
            (None, None) => return Ok(()),
        };
        self.local_api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .map_err(|e| kube_err(&self.scope, "Pod", &name, e))?;
        Ok(())
    }

    async fn update_local_status(
        &self,
        local: &Pod,
        remote: &Pod,
        admission: Option<PodCondition>,
    ) -> Result<(), ReflectionError> {
        let name = local.name_any();
        let remote_uid = remote.uid().unwrap_or_default();
        let ann = local.annotations();
        let mut offset: i32 = ann
            .get(names::RESTART_OFFSET)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match ann.get(names::REMOTE_POD_UID) {
            Some(seen) if *seen == remote_uid => {}
            seen => {
                if seen.is_some() {
                    // The provider recreated the pod: one restart more than last reported.
                    let shown = local
                        .status
                        .iter()
                        .flat_map(|s| s.container_statuses.iter().flatten())
                        .map(|c| c.restart_count)
                        .max()
                        .unwrap_or(offset);
                    offset = shown + 1;
                    tracing::debug!(pod = %name, %remote_uid, restarts = offset, "the provider recreated the remote pod");
                }
                let patch = json!({"metadata": {"annotations": {
                    names::REMOTE_POD_UID: remote_uid,
                    names::RESTART_OFFSET: offset.to_string(),
                }}});
                self.local_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|e| kube_err(&self.scope, "Pod", &name, e))?;
            }
        }
        let Some(rs) = remote.status.as_ref() else {
            return Ok(());
        };
        let translate = |ip: &str| -> Option<String> {
            let parsed = ip.parse().ok()?;
            match self.scope.translator.to_local_view(parsed) {
                Ok(ip) => Some(ip.to_string()),
                Err(e) => {
                    tracing::warn!(pod = %name, error = %e, "remote pod IP has no local translation");
                    None
                }
            }
        };
        let with_offset = |cs: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
            cs.clone().map(|v| {
                v.into_iter()
                    .map(|mut c| {
                        c.restart_count += offset;
                        c
                    })
                    .collect::<Vec<_>>()
            })
        };
        let pod_ip = rs.pod_ip.as_deref().and_then(translate);
        let pod_ips = rs.pod_ips.as_ref().map(|ips| {
            ips.iter()
                .filter_map(|i| translate(&i.ip))
                .map(|ip| json!({"ip": ip}))
                .collect::<Vec<_>>()
        });
        let mut conditions = rs.conditions.clone();
        if let Some(mut a) = admission {
            // Keep the time it was first shown, so an unchanged report is no change.
            a.last_transition_time = local
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .find(|c| c.type_ == OFFLOADING_ADMITTED && c.reason == a.reason)
                .map_or_else(
                    || Some(Time(Timestamp::now())),
                    |c| c.last_transition_time.clone(),
                );
            conditions.get_or_insert_with(Vec::new).push(a);
        }
        let desired = json!({
            "phase": rs.phase,
            "conditions": conditions,
            "containerStatuses": with_offset(&rs.container_statuses),
            "initContainerStatuses": with_offset(&rs.init_container_statuses),
            "podIP": pod_ip,
            "podIPs": pod_ips,
            "startTime": rs.start_time,
            "message": rs.message,
            "reason": rs.reason,
        });
        let current = local.status.clone().unwrap_or_default();
        let current = json!({
            "phase": current.phase,
            "conditions": current.conditions,
            "containerStatuses": current.container_statuses,
            "initContainerStatuses": current.init_container_statuses,
            "podIP": current.pod_ip,
            "podIPs": current.pod_ips.map(|v| v.into_iter().map(|i| json!({"ip": i.ip})).collect::<Vec<_>>()),
            "startTime": current.start_time,
            "message": current.message,
            "reason": current.reason,
        });
        if desired == current {
            return Ok(());
        }
        let status: PodStatus = serde_json::from_value(desired.clone()).unwrap_or_default();
        let patch = json!({ "status": status });
        self.local_api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_err(&self.scope, "Pod", &name, e))?;
        Ok(())
    }
}

fn strip<K: Resource>(o: &mut K) {
    // Managed fields are a large share of each object and we never read them.
    o.meta_mut().managed_fields = None;
}

#[async_trait]
impl ResourceReflector for PodReflector {
    fn kind(&self) -> &str {
        "Pod"
    }

    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::Both
    }

    async fn reflect(
        &self,
        scope: ReflectionScope,
        shutdown: CancellationToken,
    ) -> Result<(), ReflectionError> {
        let node = names::node_name(&scope.remote_cluster);
        let local_api: Api<Pod> = Api::namespaced(scope.local.clone(), &scope.local_namespace);
        let shadow_api: Api<ShadowPod> =
            Api::namespaced(scope.remote.clone(), &scope.remote_namespace);
        let remote_pod_api: Api<Pod> =
            Api::namespaced(scope.remote.clone(), &scope.remote_namespace);
        let selector = format!(
            "{}={},{}={POD_REFLECTOR}",
            labels::MANAGED_BY,
            names::MANAGED_BY_VALUE,
            names::REFLECTOR_LABEL
        );
        let (local, local_w) = reflector::store();
        let (shadows, shadow_w) = reflector::store();
        let (remote_pods, rp_w) = reflector::store();
        let queue =
            WorkQueue::<String>::new(self.config.retry_min, self.config.retry_max).labelled("Pod");
        let sides = Arc::new(Sides {
            scope: scope.clone(),
            local_cluster: self.local_cluster.clone(),
            local: local.clone(),
            local_api: local_api.clone(),
            shadows: shadows.clone(),
            shadow_api: shadow_api.clone(),
            remote_pods: remote_pods.clone(),
            remote_pod_api: remote_pod_api.clone(),
            recorder: Recorder::new(
                scope.local.clone(),
                Reporter::from(format!("liqo-vk-{}", self.local_cluster)),
            ),
        });

        // After any re-list, look at every pod and ShadowPod again.
        let everything = || {
            for p in local.state() {
                queue.add(p.name_any());
            }
            for rs in shadows.state() {
                queue.add(rs.name_any());
            }
        };
        let local_events = queue::feed(
            local_w,
            watcher(
                local_api,
                watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            )
            .backoff(liqo_core::watch_backoff())
            .modify(strip),
            "local pods",
            &queue,
            |p: &Pod| Some(p.name_any()),
            everything,
        );
        let shadow_events = queue::feed(
            shadow_w,
            watcher(shadow_api, watcher::Config::default().labels(&selector))
                .backoff(liqo_core::watch_backoff())
                .modify(strip),
            "ShadowPods",
            &queue,
            |r: &ShadowPod| Some(r.name_any()),
            everything,
        );
        let pod_events = queue::feed(
            rp_w,
            watcher(remote_pod_api, watcher::Config::default().labels(&selector))
                .backoff(liqo_core::watch_backoff())
                .modify(strip),
            "remote pods",
            &queue,
            |p: &Pod| p.annotations().get(names::ORIGIN_POD).cloned(),
            everything,
        );
        let ready = async {
            local.wait_until_ready().await?;
            shadows.wait_until_ready().await?;
            remote_pods.wait_until_ready().await
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
            () = local_events => {}
            () = shadow_events => {}
            () = pod_events => {}
            () = workers => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        Container, ProjectedVolumeSource, ServiceAccountTokenProjection, Toleration,
        VolumeProjection,
    };

    use super::*;

    #[test]
    fn remote_spec_drops_placement_and_swaps_the_token() {
        let local = PodSpec {
            node_name: Some("liqo-rome".into()),
            node_selector: Some(BTreeMap::from([("a".into(), "b".into())])),
            service_account_name: Some("builder".into()),
            tolerations: Some(vec![
                Toleration {
                    key: Some(names::VIRTUAL_NODE_TAINT_KEY.into()),
                    ..Toleration::default()
                },
                Toleration {
                    key: Some("team".into()),
                    ..Toleration::default()
                },
            ]),
            containers: vec![Container {
                name: "c".into(),
                image: Some("nginx".into()),
                ..Container::default()
            }],
            volumes: Some(vec![Volume {
                name: "kube-api-access-x".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            path: "token".into(),
                            ..ServiceAccountTokenProjection::default()
                        }),
                        ..VolumeProjection::default()
                    }]),
                    ..ProjectedVolumeSource::default()
                }),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        };
        let r = remote_pod_spec(&local);
        assert_eq!(r.node_name, None);
        assert_eq!(r.node_selector, None);
        assert_eq!(r.service_account_name, None);
        assert_eq!(r.automount_service_account_token, Some(false));
        let tol: Vec<_> = r
            .tolerations
            .unwrap()
            .into_iter()
            .filter_map(|t| t.key)
            .collect();
        assert_eq!(tol, vec!["team".to_owned()]);
        let v = &r.volumes.unwrap()[0];
        assert_eq!(v.name, "kube-api-access-x");
        assert_eq!(
            v.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("liqo-sa-builder")
        );
        assert_eq!(r.containers[0].image.as_deref(), Some("nginx"));
    }
}
