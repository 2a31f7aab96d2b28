//! The provider's side: twin namespaces for consumers, on request (`RemoteNamespace`).
//!
//! A consumer may only manage `RemoteNamespace` objects in its tenant namespace. For each, the
//! [`ProviderAgent`] creates the namespace (labelled with the consumer's id), binds the
//! [`OFFLOADING_CLUSTER_ROLE`](crate::names::OFFLOADING_CLUSTER_ROLE) to the consumer's user in
//! it, and answers with a `Ready` condition, or `Ready=False` / `NameConflict` when the name
//! belongs to someone else. Deleting the `RemoteNamespace` deletes the namespace (finalizer).
//! The agent also runs the pods consumers offload, from their `ShadowPod`s (see
//! [`shadow`](crate::shadow)).

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::Namespace,
        rbac::v1::{AggregationRule, ClusterRole, PolicyRule, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use liqo_core::{
    ClusterId,
    conditions::{self, Status},
    crds::RemoteNamespace,
    labels,
};
use serde_json::json;

use crate::{
    VkError,
    error::{KubeContext, is_not_found},
    names::{self, FIELD_MANAGER},
    security::{self, PodSecurity},
};

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let v = |xs: &[&str]| xs.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(v(groups)),
        resources: Some(v(resources)),
        verbs: v(verbs),
        ..PolicyRule::default()
    }
}

/// Label that adds a ClusterRole's rules to [`offloading_cluster_role`] (value `true`): a
/// provider admin grants consumers a custom resource in their twin namespaces by labelling a
/// ClusterRole with it; Kubernetes' ClusterRole aggregation does the rest.
pub const AGGREGATE_TO_OFFLOADING: &str = "liqo.io/aggregate-to-offloading";

fn managed(name: &str, extra: &[(&str, &str)]) -> ObjectMeta {
    let mut l = BTreeMap::from([(
        labels::MANAGED_BY.to_owned(),
        names::MANAGED_BY_VALUE.to_owned(),
    )]);
    l.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some(l),
        ..ObjectMeta::default()
    }
}

/// The ClusterRole bound to a consumer in each twin namespace: the aggregation of every
/// ClusterRole labelled [`AGGREGATE_TO_OFFLOADING`], starting with
/// [`offloading_core_cluster_role`].
pub fn offloading_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: managed(names::OFFLOADING_CLUSTER_ROLE, &[]),
        rules: None,
        aggregation_rule: Some(AggregationRule {
            cluster_role_selectors: Some(vec![LabelSelector {
                match_labels: Some(
                    [(AGGREGATE_TO_OFFLOADING.to_owned(), "true".to_owned())].into(),
                ),
                match_expressions: None,
            }]),
        }),
    }
}

/// What offloading the built-in kinds needs in a twin namespace, and nothing more.
pub fn offloading_core_cluster_role() -> ClusterRole {
    let rw = [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    ClusterRole {
        metadata: managed(
            &format!("{}-core", names::OFFLOADING_CLUSTER_ROLE),
            &[(AGGREGATE_TO_OFFLOADING, "true")],
        ),
        rules: Some(vec![
            rule(
                &[""],
                &["configmaps", "secrets", "services", "serviceaccounts"],
                &rw,
            ),
            // Pods are made by the provider's agent from ShadowPods; the consumer reads them
            // and deletes them with its own grace period.
            rule(&[""], &["pods"], &["get", "list", "watch", "delete"]),
            rule(&["liqo.io"], &["shadowpods"], &rw),
            rule(&["discovery.k8s.io"], &["endpointslices"], &rw),
            rule(
                &["", "events.k8s.io"],
                &["events"],
                &["get", "list", "watch"],
            ),
        ]),
        aggregation_rule: None,
    }
}

struct Ctx {
    client: kube::Client,
    recorder: Recorder,
    security: PodSecurity,
    /// The Pod Security Standards version twin namespaces pin.
    psa_version: String,
}

/// The provider side of liqo-vk: the `RemoteNamespace` controller.
#[derive(Clone)]
pub struct ProviderAgent {
    client: kube::Client,
    me: ClusterId,
    shadow_concurrency: u16,
    security: PodSecurity,
}

impl std::fmt::Debug for ProviderAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderAgent")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl ProviderAgent {
    /// An agent for the provider `me`, with an admin-like client (it creates namespaces and
    /// role bindings).
    pub fn new(client: kube::Client, me: ClusterId) -> Self {
        Self {
            client,
            me,
            shadow_concurrency: 32,
            security: PodSecurity::default(),
        }
    }

    /// The pod security levels consumers are held to (default: `baseline` for all).
    pub fn pod_security(mut self, security: PodSecurity) -> Self {
        self.security = security;
        self
    }

    /// How many ShadowPods are reconciled at once (default 32).
    pub fn shadow_concurrency(mut self, n: u16) -> Self {
        self.shadow_concurrency = n.max(1);
        self
    }

    /// Runs until `shutdown` resolves. Twin namespaces stay when the agent stops.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ) -> Result<(), VkError> {
        for role in [offloading_core_cluster_role(), offloading_cluster_role()] {
            let name = role.name_any();
            Api::<ClusterRole>::all(self.client.clone())
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&role),
                )
                .await
                .ctx(|| format!("applying ClusterRole {name}"))?;
        }
        crate::shadow::install_crd(&self.client).await?;
        security::install_policy(&self.client).await?;
        let psa_version = security::resolve_version(&self.security, &self.client).await?;
        let ctx = Arc::new(Ctx {
            client: self.client.clone(),
            recorder: Recorder::new(
                self.client.clone(),
                Reporter::from(format!("liqo-vk-{}", self.me)),
            ),
            security: self.security.clone(),
            psa_version,
        });
        tracing::info!(
            cluster = %self.me,
            pod_security = %self.security.default,
            overrides = self.security.per_consumer.len(),
            version = %ctx.psa_version,
            "provider agent started"
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        let stop = cancel.clone();
        let shadows = crate::shadow::run(
            self.client.clone(),
            self.shadow_concurrency,
            ctx.recorder.clone(),
            async move { stop.cancelled().await },
        );
        let namespaces = Controller::new(
            Api::<RemoteNamespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .trigger_backoff(liqo_core::watch_backoff())
        // A twin namespace deleted or changed behind our back is made again.
        .watches(
            Api::<Namespace>::all(self.client.clone()),
            watcher::Config::default().labels(&format!(
                "{}={}",
                labels::MANAGED_BY,
                names::MANAGED_BY_VALUE
            )),
            |ns| {
                ns.annotations()
                    .get(names::REMOTE_NAMESPACE_OWNER)
                    .and_then(|o| o.split_once('/'))
                    .map(|(tenant, name)| ObjectRef::new(name).within(tenant))
            },
        )
        .graceful_shutdown_on(async move {
            shutdown.await;
            cancel.cancel();
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "remote namespace reconcile");
            }
            futures::future::ready(())
        });
        tokio::join!(namespaces, shadows);
        tracing::info!(cluster = %self.me, "provider agent stopped");
        Ok(())
    }
}

fn error_policy(rn: Arc<RemoteNamespace>, e: &VkError, _: Arc<Ctx>) -> Action {
    tracing::warn!(remote_namespace = %rn.name_any(), error = %e, "remote namespace reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(rn: Arc<RemoteNamespace>, ctx: Arc<Ctx>) -> Result<Action, VkError> {
    let ns = rn.namespace().unwrap_or_default();
    let api: Api<RemoteNamespace> = Api::namespaced(ctx.client.clone(), &ns);
    let object = format!("RemoteNamespace {ns}/{}", rn.name_any());
    finalizer(&api, labels::FINALIZER, rn, |event| async {
        match event {
            Finalizer::Apply(rn) => apply(&rn, &ctx).await,
            Finalizer::Cleanup(rn) => cleanup(&rn, &ctx).await,
        }
    })
    .await
    .map_err(|e| VkError::Finalizer {
        object,
        message: e.to_string(),
    })
}

fn owner_key(rn: &RemoteNamespace) -> String {
    format!("{}/{}", rn.namespace().unwrap_or_default(), rn.name_any())
}

async fn set_ready(
    rn: &RemoteNamespace,
    ctx: &Ctx,
    status: Status,
    reason: &str,
    message: &str,
) -> Result<(), VkError> {
    let mut st = rn.status.clone().unwrap_or_default();
    if !conditions::set(
        &mut st.conditions,
        "Ready",
        status,
        reason,
        message,
        rn.metadata.generation,
    ) {
        return Ok(());
    }
    Api::<RemoteNamespace>::namespaced(ctx.client.clone(), &rn.namespace().unwrap_or_default())
        .patch_status(
            &rn.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": st})),
        )
        .await
        .ctx(|| format!("updating the status of RemoteNamespace {}", owner_key(rn)))?;
    if status == Status::False {
        let about = rn.object_ref(&());
        crate::events::warn(
            &ctx.recorder,
            &about,
            reason,
            "CreateTwinNamespace",
            message,
        )
        .await;
    }
    Ok(())
}

async fn apply(rn: &RemoteNamespace, ctx: &Ctx) -> Result<Action, VkError> {
    let tenant = rn.namespace().unwrap_or_default();
    let consumer = &rn.spec.consumer_cluster_id;
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    // The consumer is who the tenant namespace says, whatever the object claims.
    let tenant_ns = namespaces
        .get_opt(&tenant)
        .await
        .ctx(|| format!("reading namespace {tenant}"))?;
    let tenant_of = tenant_ns
        .as_ref()
        .and_then(|n| n.labels().get(labels::TENANT_NAMESPACE).cloned());
    if tenant_of.as_deref() != Some(consumer.as_str()) {
        let message = format!(
            "namespace {tenant} is not the tenant namespace of consumer {consumer} (its {} label is {tenant_of:?})",
            labels::TENANT_NAMESPACE
        );
        set_ready(rn, ctx, Status::False, "ConsumerMismatch", &message).await?;
        return Ok(Action::await_change());
    }
    let twin = &rn.spec.namespace;
    let owner = owner_key(rn);
    let existing = namespaces
        .get_opt(twin)
        .await
        .ctx(|| format!("reading namespace {twin}"))?;
    let previous_level = existing
        .as_ref()
        .and_then(|n| security::enforced_level(n.labels()).map(str::to_owned));
    if let Some(existing) = existing {
        let ours = existing.annotations().get(names::REMOTE_NAMESPACE_OWNER) == Some(&owner);
        if !ours || existing.metadata.deletion_timestamp.is_some() {
            let message = if ours {
                format!("namespace {twin} is still being deleted")
            } else {
                format!("namespace {twin} already exists and does not belong to {owner}")
            };
            set_ready(
                rn,
                ctx,
                Status::False,
                names::REASON_NAME_CONFLICT,
                &message,
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
    }
    let mut ns_labels = BTreeMap::from([
        (labels::REMOTE_CLUSTER_ID.to_owned(), consumer.to_string()),
        (
            labels::MANAGED_BY.to_owned(),
            names::MANAGED_BY_VALUE.to_owned(),
        ),
    ]);
    ns_labels.extend(ctx.security.namespace_labels(consumer, &ctx.psa_version));
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(twin.clone()),
            labels: Some(ns_labels),
            annotations: Some(BTreeMap::from([(
                names::REMOTE_NAMESPACE_OWNER.to_owned(),
                owner.clone(),
            )])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .patch(
            twin,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&ns),
        )
        .await
        .ctx(|| format!("applying namespace {twin}"))?;
    let level = ctx.security.level_for(consumer);
    if previous_level.is_some_and(|p| p != level.as_str()) {
        tracing::info!(namespace = %twin, %consumer, %level, "pod security level changed: checking the pods already offloaded");
        security::report_existing(&ctx.client, &ctx.recorder, twin).await?;
    }
    let user = names::consumer_user(consumer);
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(names::OFFLOADING_CLUSTER_ROLE.to_owned()),
            namespace: Some(twin.clone()),
            labels: Some(
                [(
                    labels::MANAGED_BY.to_owned(),
                    names::MANAGED_BY_VALUE.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: names::OFFLOADING_CLUSTER_ROLE.to_owned(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "User".to_owned(),
            name: user.clone(),
            namespace: None,
        }]),
    };
    Api::<RoleBinding>::namespaced(ctx.client.clone(), twin)
        .patch(
            names::OFFLOADING_CLUSTER_ROLE,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await
        .ctx(|| {
            format!(
                "binding {} to {user} in {twin}",
                names::OFFLOADING_CLUSTER_ROLE
            )
        })?;
    set_ready(
        rn,
        ctx,
        Status::True,
        "NamespaceReady",
        &format!("namespace {twin} is ready for {user}"),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(600)))
}

async fn cleanup(rn: &RemoteNamespace, ctx: &Ctx) -> Result<Action, VkError> {
    let twin = &rn.spec.namespace;
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    if let Some(existing) = namespaces
        .get_opt(twin)
        .await
        .ctx(|| format!("reading namespace {twin}"))?
        && existing.annotations().get(names::REMOTE_NAMESPACE_OWNER) == Some(&owner_key(rn))
    {
        match namespaces.delete(twin, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(namespace = %twin, "twin namespace deleted"),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(VkError::kube(format!("deleting namespace {twin}"), e)),
        }
    }
    Ok(Action::await_change())
}
