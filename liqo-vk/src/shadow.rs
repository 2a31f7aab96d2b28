//! `ShadowPod`: how an offloaded pod is kept alive on the provider.
//!
//! The consumer writes a `ShadowPod` (the pod's template) in the twin namespace; the provider's
//! agent runs the pod from it, recreates it whenever it disappears (evicted, deleted, node lost:
//! also while the consumer is cut off), and keeps its labels, annotations and images in step.
//!
//! Why not a ReplicaSet of one, as the original design had it: every ReplicaSet then costs the
//! provider's kube-controller-manager a pod creation and two or three status updates through its
//! client rate limit (20 requests/s by default), which made offloading a thousand pods several
//! times slower than running them locally. This controller runs in our own agent, with bounded
//! concurrency and no client-side rate limit, and writes nothing but the pod.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Pod, PodTemplateSpec},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, CustomResource, CustomResourceExt, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{
        Controller, WatchStreamExt, conditions,
        controller::Action,
        events::Recorder,
        reflector::{self, ObjectRef, Store},
        wait::await_condition,
        watcher,
    },
};
use liqo_core::{
    conditions::{self as conds, Condition, Status},
    labels,
};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    VkError,
    error::KubeContext,
    names::{self, FIELD_MANAGER},
    reflection::digest,
};

fn any_object(_: &mut SchemaGenerator) -> Schema {
    // The API server validates the pod itself when the provider creates it; repeating the whole
    // PodSpec schema here would only make the CRD huge.
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "A pod template: metadata (labels, annotations) and spec."
    })
}

/// A pod the provider keeps running for a consumer; see the module docs.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "liqo.io",
    version = "v1alpha1",
    kind = "ShadowPod",
    plural = "shadowpods",
    namespaced,
    status = "ShadowPodStatus",
    printcolumn = r#"{"name":"Origin","type":"string","jsonPath":".metadata.annotations.liqo\\.io/origin-pod"}"#,
    printcolumn = r#"{"name":"Admitted","type":"string","jsonPath":".status.conditions[?(@.type==\"Admitted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ShadowPodSpec {
    /// The pod to run.
    #[schemars(schema_with = "any_object")]
    pub template: PodTemplateSpec,
}

/// What the provider says about a ShadowPod. Written only when something is wrong, so a
/// thousand healthy ShadowPods cost no status writes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowPodStatus {
    /// [`ADMITTED`] `False` while the provider refuses to run the pod (or would refuse it now).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Condition type on a ShadowPod: `False` when the provider's pod security level forbids its
/// pod; absent when all is well.
pub const ADMITTED: &str = "Admitted";

/// [`ADMITTED`] reason: the pod cannot be created under the namespace's pod security level.
pub const REASON_POD_SECURITY: &str = "PodSecurity";

/// [`ADMITTED`] reason: the pod runs, but the provider's level changed and forbids it now.
pub const REASON_LEVEL_CHANGED: &str = "PodSecurityLevelChanged";

/// The refusal a ShadowPod's status reports, if any: `(reason, message)`.
pub fn refusal(sp: &ShadowPod) -> Option<(&str, &str)> {
    let c = conds::find(&sp.status.as_ref()?.conditions, ADMITTED)?;
    (c.status == "False").then_some((c.reason.as_str(), c.message.as_str()))
}

/// Sets (`Some`) or clears (`None`) the refusal on a ShadowPod's status, writing only on change.
pub(crate) async fn set_refusal(
    client: &kube::Client,
    sp: &ShadowPod,
    refusal: Option<(&str, &str)>,
) -> Result<(), VkError> {
    if self::refusal(sp) == refusal {
        return Ok(());
    }
    let mut list = sp.status.clone().unwrap_or_default().conditions;
    match refusal {
        Some((reason, message)) => {
            conds::set(&mut list, ADMITTED, Status::False, reason, message, None);
        }
        None => list.retain(|c| c.type_ != ADMITTED),
    }
    let ns = sp.namespace().unwrap_or_default();
    Api::<ShadowPod>::namespaced(client.clone(), &ns)
        .patch_status(
            &sp.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"conditions": list}})),
        )
        .await
        .ctx(|| format!("updating the status of ShadowPod {ns}/{}", sp.name_any()))?;
    Ok(())
}

/// The ShadowPod CRD.
pub fn shadow_pod_crd() -> CustomResourceDefinition {
    ShadowPod::crd()
}

/// Applies the ShadowPod CRD and waits until it is served.
pub(crate) async fn install_crd(client: &kube::Client) -> Result<(), VkError> {
    let crd = shadow_pod_crd();
    let name = crd.name_any();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .ctx(|| format!("applying CRD {name}"))?;
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(api, &name, conditions::is_crd_established()),
    )
    .await
    .map_err(|_| VkError::Invalid {
        object: format!("CRD {name}"),
        message: "not established after 60s".to_owned(),
    })?
    .map_err(|e| VkError::Invalid {
        object: format!("CRD {name}"),
        message: e.to_string(),
    })?;
    Ok(())
}

/// The pod a ShadowPod stands for: its template, named after it and owned by it.
pub fn pod_for(sp: &ShadowPod) -> Pod {
    let template = &sp.spec.template;
    let meta = template.metadata.clone().unwrap_or_default();
    let mut annotations = meta.annotations.unwrap_or_default();
    annotations.insert(names::REFLECTION_HASH.to_owned(), digest(template));
    // Whatever the template says, the pod stays in view of the controller's pod watch (which
    // selects this label): one it cannot see it would try to create again and again.
    let mut pod_labels = meta.labels.unwrap_or_default();
    pod_labels.insert(
        labels::MANAGED_BY.to_owned(),
        names::MANAGED_BY_VALUE.to_owned(),
    );
    Pod {
        metadata: ObjectMeta {
            name: Some(sp.name_any()),
            namespace: sp.namespace(),
            labels: Some(pod_labels),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: ShadowPod::api_version(&()).into_owned(),
                kind: ShadowPod::kind(&()).into_owned(),
                name: sp.name_any(),
                uid: sp.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

struct Ctx {
    client: kube::Client,
    pods: Store<Pod>,
    recorder: Recorder,
}

/// Runs the ShadowPod controller until `shutdown` resolves.
pub(crate) async fn run(
    client: kube::Client,
    concurrency: u16,
    recorder: Recorder,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let selector = format!("{}={}", labels::MANAGED_BY, names::MANAGED_BY_VALUE);
    let pod_api: Api<Pod> = Api::all(client.clone());
    // Our own view of the pods, to compare without a GET per reconcile.
    let (pods, writer) = reflector::store();
    let pod_watch = reflector::reflector(
        writer,
        watcher(
            pod_api.clone(),
            watcher::Config::default().labels(&selector),
        )
        .backoff(liqo_core::watch_backoff())
        .modify(|p: &mut Pod| p.managed_fields_mut().clear()),
    )
    .for_each(|_| futures::future::ready(()));
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        pods,
        recorder,
    });
    let controller = Controller::new(Api::<ShadowPod>::all(client), watcher::Config::default())
        .trigger_backoff(liqo_core::watch_backoff())
        .owns(pod_api, watcher::Config::default().labels(&selector))
        .with_config(kube::runtime::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "shadow pod reconcile");
            }
            futures::future::ready(())
        });
    tokio::select! {
        () = controller => {}
        () = pod_watch => {}
    }
}

fn error_policy(sp: Arc<ShadowPod>, e: &VkError, _: Arc<Ctx>) -> Action {
    tracing::warn!(shadow_pod = %sp.name_any(), error = %e, "shadow pod reconcile failed");
    Action::requeue(Duration::from_millis(500))
}

/// How often an up-to-date ShadowPod is checked again without an event.
const RESYNC: Duration = Duration::from_secs(20);

/// How often a ShadowPod whose pod is terminating is checked for the pod being gone.
const TERMINATING_RECHECK: Duration = Duration::from_secs(1);

async fn reconcile(sp: Arc<ShadowPod>, ctx: Arc<Ctx>) -> Result<Action, VkError> {
    if sp.metadata.deletion_timestamp.is_some() {
        // Its pod goes with it (owner reference) or was deleted by the consumer with its grace.
        return Ok(Action::await_change());
    }
    let ns = sp.namespace().unwrap_or_default();
    let name = sp.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let desired = pod_for(&sp);
    let want = desired.annotations().get(names::REFLECTION_HASH).cloned();
    let existing = ctx.pods.get(&ObjectRef::new(&name).within(&ns));
    match existing {
        Some(p)
            if p.owner_references()
                .iter()
                .all(|o| Some(&o.uid) != sp.uid().as_ref()) =>
        {
            tracing::warn!(namespace = %ns, pod = %name, "a pod of that name exists and is not this ShadowPod's");
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        // Being deleted (by someone else, or evicted): recreated once gone. The deletion event
        // that triggers us may arrive before the pod store has seen it, so that trigger can
        // still find the pod here, terminating; look again shortly rather than wait for an
        // event that has already come (a store lookup, no API call).
        Some(p) if p.metadata.deletion_timestamp.is_some() => {
            tracing::debug!(namespace = %ns, pod = %name, "pod terminating; recreated once gone");
            Ok(Action::requeue(TERMINATING_RECHECK))
        }
        // Up to date. Look again in a while even without an event: the pod store is fed by
        // another watch than the one that triggers us, and a deletion it has not seen yet
        // would otherwise leave the pod lost for good (a store lookup, no API call).
        Some(p) if p.annotations().get(names::REFLECTION_HASH) == want.as_ref() => {
            // A refusal from before the pod could be made is over (a level changed since keeps
            // its report: the pod runs, but would be refused now).
            if refusal(&sp).is_some_and(|(reason, _)| reason == REASON_POD_SECURITY) {
                set_refusal(&ctx.client, &sp, None).await?;
            }
            Ok(Action::requeue(RESYNC))
        }
        Some(_) => {
            // Only labels, annotations and images can change on a running pod.
            let containers: Vec<_> = desired
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .map(|c| json!({"name": c.name, "image": c.image}))
                .collect();
            let patch = json!({
                "metadata": {"labels": desired.metadata.labels, "annotations": desired.metadata.annotations},
                "spec": {"containers": containers},
            });
            api.patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
                .ctx(|| format!("updating pod {ns}/{name}"))?;
            Ok(Action::await_change())
        }
        None => {
            // Our store of ShadowPods may lag behind a deletion by the consumer: confirm before
            // making a pod nobody wants any more.
            let current = Api::<ShadowPod>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&name)
                .await
                .ctx(|| format!("reading ShadowPod {ns}/{name}"))?;
            if current
                .is_none_or(|c| c.uid() != sp.uid() || c.metadata.deletion_timestamp.is_some())
            {
                return Ok(Action::await_change());
            }
            tracing::debug!(namespace = %ns, pod = %name, "creating the pod of a ShadowPod");
            create(&api, &desired, &sp, &ctx).await
        }
    }
}

/// How often a ShadowPod whose pod the namespace's pod security level refused is tried again
/// (the provider's admin may change the level).
const REFUSED_RECHECK: Duration = Duration::from_secs(60);

async fn create(
    api: &Api<Pod>,
    desired: &Pod,
    sp: &ShadowPod,
    ctx: &Ctx,
) -> Result<Action, VkError> {
    let ns = sp.namespace().unwrap_or_default();
    let name = sp.name_any();
    {
        match api.create(&PostParams::default(), desired).await {
            Ok(_) => Ok(Action::await_change()),
            // Pod Security Admission: the consumer asked for more than this provider allows.
            // Say so on the ShadowPod (the consumer shows it on its pod) and try again slowly.
            Err(kube::Error::Api(s))
                if s.code == 403 && s.message.contains("violates PodSecurity") =>
            {
                let message = s
                    .message
                    .split_once("forbidden: ")
                    .map_or(s.message.as_str(), |(_, m)| m);
                let message = format!("namespace {ns}: {message}");
                tracing::warn!(namespace = %ns, pod = %name, reason = %message, "pod refused by the provider's pod security level");
                if refusal(sp) != Some((REASON_POD_SECURITY, message.as_str())) {
                    let about = sp.object_ref(&());
                    crate::events::warn(
                        &ctx.recorder,
                        &about,
                        REASON_POD_SECURITY,
                        "CreatePod",
                        &message,
                    )
                    .await;
                }
                set_refusal(&ctx.client, sp, Some((REASON_POD_SECURITY, &message))).await?;
                Ok(Action::requeue(REFUSED_RECHECK))
            }
            // Still terminating, or our store lags behind: try again shortly.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Ok(Action::requeue(Duration::from_millis(500)))
            }
            // The twin namespace is going away, and the ShadowPod with it.
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("being terminated") => {
                Ok(Action::await_change())
            }
            Err(e) => Err(VkError::kube(format!("creating pod {ns}/{name}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use kube::runtime::events::Reporter;

    use super::*;

    /// The deletion of a pod triggers a reconcile through the controller's own watch, which can
    /// run before the pod store (another watch) has seen the deletion: the store still holds
    /// the pod, terminating. That reconcile must come back by itself, or the pod is never
    /// recreated (no further event comes).
    #[tokio::test]
    async fn a_pod_seen_terminating_is_looked_at_again_soon() {
        let mut sp = ShadowPod::new(
            "web-1",
            ShadowPodSpec {
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(PodSpec::default()),
                },
            },
        );
        sp.metadata.namespace = Some("shop-milan".into());
        sp.metadata.uid = Some("u-1".into());
        let mut pod = pod_for(&sp);
        pod.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let (pods, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Apply(pod));
        // Never contacted: this branch decides from the store alone.
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("a URL"));
        let client = kube::Client::try_from(config).expect("a client");
        let recorder = Recorder::new(client.clone(), Reporter::from("test".to_owned()));
        let ctx = Ctx {
            client,
            pods,
            recorder,
        };
        let action = reconcile(Arc::new(sp), Arc::new(ctx))
            .await
            .expect("no API call to fail");
        assert_eq!(action, Action::requeue(TERMINATING_RECHECK));
    }

    #[test]
    fn pod_follows_the_template() {
        let mut sp = ShadowPod::new(
            "web-1",
            ShadowPodSpec {
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "c".into(),
                            image: Some("nginx:1".into()),
                            ..Container::default()
                        }],
                        ..PodSpec::default()
                    }),
                },
            },
        );
        sp.metadata.namespace = Some("shop-milan".into());
        sp.metadata.uid = Some("u-1".into());
        let p = pod_for(&sp);
        assert_eq!(p.name_any(), "web-1");
        assert_eq!(p.labels()["app"], "web");
        assert_eq!(p.owner_references()[0].uid, "u-1");
        let h1 = p.annotations()[names::REFLECTION_HASH].clone();
        sp.spec.template.spec.as_mut().unwrap().containers[0].image = Some("nginx:2".into());
        assert_ne!(
            pod_for(&sp).annotations()[names::REFLECTION_HASH],
            h1,
            "a new image is a change"
        );
        let crd = shadow_pod_crd();
        assert_eq!(crd.spec.group, "liqo.io");
    }
}
