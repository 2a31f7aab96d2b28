//! The `NamespaceOffloading` controller: twin namespaces on the selected providers, reflection
//! for each, and the status that says how it went.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use futures::{StreamExt, channel::mpsc};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use liqo_core::{
    ClusterId,
    conditions::{self, Status},
    crds::{
        NamespaceOffloading, NamespaceOffloadingStatus, OffloadingPhase, RemoteNamespace,
        RemoteNamespaceSpec, RemoteNamespaceStatusEntry,
    },
    labels,
};
use serde_json::json;

use crate::{
    VkError,
    consumer::{Ctx, Session, delete_pods_on_node},
    error::{KubeContext, is_not_found},
    names::{self, FIELD_MANAGER},
    selector,
};

pub(crate) fn controller(local: kube::Client) -> Controller<NamespaceOffloading> {
    Controller::new(Api::all(local), watcher::Config::default())
        .trigger_backoff(liqo_core::watch_backoff())
}

pub(crate) async fn run(
    ctl: Controller<NamespaceOffloading>,
    ctx: Arc<Ctx>,
    one: mpsc::UnboundedReceiver<ObjectRef<NamespaceOffloading>>,
    all: mpsc::UnboundedReceiver<()>,
) {
    let cancel = ctx.shutdown.clone();
    // Until the first listing of the virtual nodes, an empty store would read as "no cluster
    // selected" and unoffload every namespace: after a restart that deleted the twin namespaces
    // (remote pods with them) and every offloaded pod at home. The only waiter on this store.
    tokio::select! {
        () = cancel.cancelled() => return,
        r = ctx.virtual_nodes.wait_until_ready() => if r.is_err() {
            tracing::warn!("the virtual node watch ended before its first listing");
            return;
        }
    }
    ctl.reconcile_on(one)
        .reconcile_all_on(all)
        .with_config(
            kube::runtime::Config::default().concurrency(ctx.config.controller_concurrency),
        )
        .graceful_shutdown_on(async move { cancel.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "namespace offloading reconcile");
            }
            futures::future::ready(())
        })
        .await;
}

fn error_policy(nso: Arc<NamespaceOffloading>, e: &VkError, _: Arc<Ctx>) -> Action {
    tracing::warn!(namespace = ?nso.namespace(), error = %e, "namespace offloading reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(nso: Arc<NamespaceOffloading>, ctx: Arc<Ctx>) -> Result<Action, VkError> {
    let ns = nso.namespace().unwrap_or_default();
    let api: Api<NamespaceOffloading> = Api::namespaced(ctx.local.clone(), &ns);
    finalizer(&api, labels::FINALIZER, nso, |event| async {
        match event {
            Finalizer::Apply(nso) => apply(&nso, &ctx).await,
            Finalizer::Cleanup(nso) => cleanup(&nso, &ctx).await,
        }
    })
    .await
    .map_err(|e| VkError::Finalizer {
        object: format!("NamespaceOffloading {ns}/offloading"),
        message: e.to_string(),
    })
}

async fn label_namespace(ctx: &Ctx, ns: &str, on: bool) -> Result<(), VkError> {
    let api: Api<Namespace> = Api::all(ctx.local.clone());
    // Applying without the label releases our ownership of it, which removes it.
    let labels = if on {
        json!({ names::OFFLOADING_ENABLED: "true" })
    } else {
        json!({})
    };
    let patch = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}});
    match api
        .patch(
            ns,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if !on && is_not_found(&e) => Ok(()),
        Err(e) => Err(VkError::kube(format!("labelling namespace {ns}"), e)),
    }
}

fn remote_namespaces_of(session: &Session, ns: &str) -> Vec<Arc<RemoteNamespace>> {
    session
        .remote_namespaces
        .state()
        .into_iter()
        .filter(|r| r.spec.source_namespace == ns)
        .collect()
}

/// Stops offloading `ns` to one provider: reflection, twin namespace request, local pods there.
async fn unoffload(ctx: &Ctx, session: &Session, ns: &str) -> Result<(), VkError> {
    ctx.reflections.stop(&session.cluster, ns).await;
    let api: Api<RemoteNamespace> = Api::namespaced(session.remote.clone(), &session.tenant);
    for rn in remote_namespaces_of(session, ns) {
        match api.delete(&rn.name_any(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(VkError::kube(
                    format!(
                        "deleting RemoteNamespace {}/{} on {}",
                        session.tenant,
                        rn.name_any(),
                        session.cluster
                    ),
                    e,
                ));
            }
        }
    }
    delete_pods_on_node(&ctx.local, ns, &names::node_name(&session.cluster)).await
}

async fn offload_to(
    ctx: &Ctx,
    session: &Session,
    ns: &str,
    twin: &str,
) -> Result<RemoteNamespaceStatusEntry, VkError> {
    let entry = |ready: bool, message: String| RemoteNamespaceStatusEntry {
        cluster_id: session.cluster.clone(),
        namespace: twin.to_owned(),
        ready,
        message,
    };
    // The RemoteNamespace is named after the twin: one local namespace per twin name.
    if let Some(other) = session
        .remote_namespaces
        .state()
        .into_iter()
        .find(|r| r.name_any() == twin && r.spec.source_namespace != ns)
    {
        return Ok(entry(
            false,
            format!(
                "{}: twin namespace {twin} is already used by local namespace {}",
                names::REASON_NAME_CONFLICT,
                other.spec.source_namespace
            ),
        ));
    }
    // A previous twin of another name (the mapping strategy changed) goes.
    let api: Api<RemoteNamespace> = Api::namespaced(session.remote.clone(), &session.tenant);
    for old in remote_namespaces_of(session, ns)
        .into_iter()
        .filter(|r| r.name_any() != twin)
    {
        ctx.reflections.stop(&session.cluster, ns).await;
        if let Err(e) = api.delete(&old.name_any(), &DeleteParams::default()).await
            && !is_not_found(&e)
        {
            return Err(VkError::kube(
                format!("deleting old RemoteNamespace {}", old.name_any()),
                e,
            ));
        }
    }
    let rn = RemoteNamespace {
        metadata: ObjectMeta {
            name: Some(twin.to_owned()),
            namespace: Some(session.tenant.clone()),
            labels: Some(
                [(
                    labels::MANAGED_BY.to_owned(),
                    names::MANAGED_BY_VALUE.to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: RemoteNamespaceSpec {
            namespace: twin.to_owned(),
            consumer_cluster_id: ctx.me.clone(),
            source_namespace: ns.to_owned(),
        },
        status: None,
    };
    let got = api
        .patch(
            twin,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&rn),
        )
        .await
        .ctx(|| {
            format!(
                "applying RemoteNamespace {}/{twin} on provider {}",
                session.tenant, session.cluster
            )
        })?;
    let conds = got.status.map(|s| s.conditions).unwrap_or_default();
    match conditions::find(&conds, "Ready") {
        Some(c) if c.status == "True" => {
            ctx.reflections
                .start(&session.cluster, session.remote.clone(), ns, twin)
                .await;
            Ok(entry(true, String::new()))
        }
        Some(c) if c.status == "False" => {
            ctx.reflections.stop(&session.cluster, ns).await;
            Ok(entry(false, format!("{}: {}", c.reason, c.message)))
        }
        _ => Ok(entry(
            false,
            "waiting for the provider to create the twin namespace".to_owned(),
        )),
    }
}

async fn apply(nso: &NamespaceOffloading, ctx: &Arc<Ctx>) -> Result<Action, VkError> {
    let ns = nso.namespace().unwrap_or_default();
    label_namespace(ctx, &ns, true).await?;
    let twin = names::twin_namespace(
        nso.spec.namespace_mapping_strategy,
        &ns,
        &ctx.me,
        nso.spec.remote_namespace_name.as_deref(),
    );
    let mut entries = vec![];
    let mut selected: BTreeSet<ClusterId> = BTreeSet::new();
    let mut known: BTreeSet<ClusterId> = BTreeSet::new();
    for node in ctx.virtual_nodes.state() {
        let Some(id) = node
            .labels()
            .get(labels::REMOTE_CLUSTER_ID)
            .and_then(|v| v.parse::<ClusterId>().ok())
        else {
            continue;
        };
        known.insert(id.clone());
        if !selector::matches(
            nso.spec.cluster_selector.as_ref(),
            &node.name_any(),
            node.labels(),
        ) {
            continue;
        }
        selected.insert(id.clone());
        let twin = match &twin {
            Ok(t) => t.clone(),
            Err(e) => {
                entries.push(RemoteNamespaceStatusEntry {
                    cluster_id: id,
                    namespace: String::new(),
                    ready: false,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let Some(session) = ctx.session(&id) else {
            entries.push(RemoteNamespaceStatusEntry {
                cluster_id: id,
                namespace: twin,
                ready: false,
                message: "no connection to the provider yet".to_owned(),
            });
            continue;
        };
        match offload_to(ctx, &session, &ns, &twin).await {
            Ok(e) => entries.push(e),
            Err(e) => entries.push(RemoteNamespaceStatusEntry {
                cluster_id: id,
                namespace: twin,
                ready: false,
                message: e.to_string(),
            }),
        }
    }
    // Unoffloading deletes pods: only for a provider whose virtual node we see and the selector
    // excludes. A session can start before its node reaches the store (a new peering, a
    // restart), and a node we do not see says nothing about the selector.
    for session in ctx.all_sessions() {
        if known.contains(&session.cluster) && !selected.contains(&session.cluster) {
            unoffload(ctx, &session, &ns).await?;
        }
    }
    let ready = entries.iter().filter(|e| e.ready).count();
    let conflicts = entries
        .iter()
        .filter(|e| {
            !e.ready
                && (e.message.starts_with(names::REASON_NAME_CONFLICT) || e.namespace.is_empty())
        })
        .count();
    let phase = if entries.is_empty() {
        OffloadingPhase::NoClusterSelected
    } else if ready == entries.len() {
        OffloadingPhase::Ready
    } else if conflicts == entries.len() {
        OffloadingPhase::AllFailed
    } else if conflicts > 0 {
        OffloadingPhase::SomeFailed
    } else {
        OffloadingPhase::InProgress
    };
    let mut status = nso.status.clone().unwrap_or_default();
    let (st, reason, message) = match phase {
        OffloadingPhase::Ready => (
            Status::True,
            "Offloaded",
            format!("{ready} provider(s) ready"),
        ),
        OffloadingPhase::NoClusterSelected => (
            Status::False,
            "NoClusterSelected",
            "the cluster selector matches no virtual node".to_owned(),
        ),
        OffloadingPhase::InProgress => (
            Status::False,
            "InProgress",
            format!("{ready} of {} provider(s) ready", entries.len()),
        ),
        _ => (
            Status::False,
            "TwinNamespaceFailed",
            entries
                .iter()
                .filter(|e| !e.ready)
                .map(|e| format!("{}: {}", e.cluster_id, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let mut changed = conditions::set(
        &mut status.conditions,
        "Ready",
        st,
        reason,
        &message,
        nso.metadata.generation,
    );
    entries.sort_by(|a, b| a.cluster_id.cmp(&b.cluster_id));
    changed |= status.phase != Some(phase) || status.remote_namespaces != entries;
    if changed {
        let status = NamespaceOffloadingStatus {
            phase: Some(phase),
            remote_namespaces: entries,
            ..status
        };
        Api::<NamespaceOffloading>::namespaced(ctx.local.clone(), &ns)
            .patch_status(
                names::OFFLOADING_NAME,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
            .ctx(|| format!("updating the status of NamespaceOffloading {ns}/offloading"))?;
    }
    Ok(if phase == OffloadingPhase::Ready {
        Action::requeue(Duration::from_secs(300))
    } else {
        // The provider's answer arrives through its RemoteNamespace watch; this is a safety net.
        Action::requeue(Duration::from_secs(30))
    })
}

async fn cleanup(nso: &NamespaceOffloading, ctx: &Arc<Ctx>) -> Result<Action, VkError> {
    let ns = nso.namespace().unwrap_or_default();
    let status = NamespaceOffloadingStatus {
        phase: Some(OffloadingPhase::Terminating),
        ..nso.status.clone().unwrap_or_default()
    };
    let api = Api::<NamespaceOffloading>::namespaced(ctx.local.clone(), &ns);
    if let Err(e) = api
        .patch_status(
            names::OFFLOADING_NAME,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
        && !is_not_found(&e)
    {
        tracing::debug!(namespace = %ns, error = %e, "marking offloading as terminating");
    }
    for session in ctx.all_sessions() {
        unoffload(ctx, &session, &ns).await?;
    }
    label_namespace(ctx, &ns, false).await?;
    tracing::info!(namespace = %ns, "namespace unoffloaded");
    Ok(Action::await_change())
}
