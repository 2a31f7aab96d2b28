//! One `Node` per `VirtualNode`, with a Lease heartbeat and readiness that follows the provider.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures::{StreamExt, channel::mpsc};
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Secret, Taint,
        },
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
        reflector::{self, ObjectRef},
        watcher,
    },
};
use liqo_core::{
    ClusterId,
    conditions::{self, Status},
    crds::{ForeignCluster, RemoteNamespace, VirtualNode, VirtualNodeStatus},
    labels,
};
use serde_json::json;

use crate::{
    VkError,
    consumer::{Ctx, Session},
    error::{KubeContext, is_not_found},
    names::{self, FIELD_MANAGER},
    reflection::digest,
};

const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_SECONDS: i32 = 40;

pub(crate) async fn run(ctx: Arc<Ctx>, trigger: mpsc::UnboundedReceiver<ObjectRef<VirtualNode>>) {
    let api: Api<VirtualNode> = Api::all(ctx.local.clone());
    let cancel = ctx.shutdown.clone();
    Controller::new(api, watcher::Config::default())
        .trigger_backoff(liqo_core::watch_backoff())
        .reconcile_on(trigger)
        .with_config(
            kube::runtime::Config::default().concurrency(ctx.config.controller_concurrency),
        )
        .graceful_shutdown_on(async move { cancel.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "virtual node reconcile");
            }
            futures::future::ready(())
        })
        .await;
}

fn error_policy(vn: Arc<VirtualNode>, e: &VkError, _: Arc<Ctx>) -> Action {
    tracing::warn!(virtual_node = %vn.name_any(), error = %e, "virtual node reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(vn: Arc<VirtualNode>, ctx: Arc<Ctx>) -> Result<Action, VkError> {
    let ns = vn.namespace().unwrap_or_default();
    let api: Api<VirtualNode> = Api::namespaced(ctx.local.clone(), &ns);
    let object = format!("VirtualNode {ns}/{}", vn.name_any());
    finalizer(&api, labels::FINALIZER, vn, |event| async {
        match event {
            Finalizer::Apply(vn) => apply(&vn, &ctx).await,
            Finalizer::Cleanup(vn) => cleanup(&vn, &ctx).await,
        }
    })
    .await
    .map_err(|e| VkError::Finalizer {
        object,
        message: e.to_string(),
    })
}

async fn set_status(
    vn: &VirtualNode,
    ctx: &Ctx,
    node: Option<&str>,
    status: Status,
    reason: &str,
    message: &str,
) -> Result<(), VkError> {
    let mut st = vn.status.clone().unwrap_or_default();
    let changed = conditions::set(
        &mut st.conditions,
        "Ready",
        status,
        reason,
        message,
        vn.metadata.generation,
    );
    let node_changed = st.node_name.as_deref() != node;
    if !changed && !node_changed {
        return Ok(());
    }
    let st = VirtualNodeStatus {
        node_name: node.map(str::to_owned),
        ..st
    };
    let api: Api<VirtualNode> =
        Api::namespaced(ctx.local.clone(), &vn.namespace().unwrap_or_default());
    api.patch_status(
        &vn.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": st})),
    )
    .await
    .ctx(|| format!("updating the status of VirtualNode {}", vn.name_any()))?;
    Ok(())
}

async fn kubeconfig(vn: &VirtualNode, ctx: &Ctx) -> Result<String, String> {
    let ns = vn.namespace().unwrap_or_default();
    let r = &vn.spec.kubeconfig_secret_ref;
    let secret = Api::<Secret>::namespaced(ctx.local.clone(), &ns)
        .get_opt(&r.name)
        .await
        .map_err(|e| format!("reading Secret {ns}/{}: {e}", r.name))?
        .ok_or_else(|| format!("Secret {ns}/{} does not exist", r.name))?;
    let bytes = secret
        .data
        .and_then(|d| d.get(&r.key).cloned())
        .ok_or_else(|| format!("Secret {ns}/{} has no key {:?}", r.name, r.key))?;
    String::from_utf8(bytes.0)
        .map_err(|_| format!("key {:?} of Secret {ns}/{} is not UTF-8", r.key, r.name))
}

/// Starts a session for the provider (client, RemoteNamespace watch, heartbeat), replacing one
/// whose credential changed.
async fn ensure_session(
    vn: &VirtualNode,
    ctx: &Arc<Ctx>,
    kubeconfig: &str,
) -> Result<Arc<Session>, VkError> {
    let id = vn.spec.cluster_id.clone();
    let want = digest(&kubeconfig);
    if let Some(s) = ctx.session(&id) {
        if s.kubeconfig_digest == want {
            return Ok(s);
        }
        drop_session(ctx, &id).await;
    }
    let remote = liqo_core::client_from_kubeconfig(&id, kubeconfig)
        .await
        .map_err(|e| VkError::Credential {
            cluster: id.clone(),
            message: e.to_string(),
        })?;
    let tenant = remote.default_namespace().to_owned();
    let (store, writer) = reflector::store();
    let cancel = ctx.shutdown.child_token();
    let session = Arc::new(Session {
        cluster: id.clone(),
        remote: remote.clone(),
        tenant: tenant.clone(),
        kubeconfig_digest: want,
        reachable: std::sync::atomic::AtomicBool::new(false),
        remote_namespaces: store,
        node_uid: std::sync::RwLock::new(None),
        cancel: cancel.clone(),
    });
    // The provider's answers to our RemoteNamespaces drive the offloading controller.
    let nso_tx = ctx.nso_tx.clone();
    let rn_api: Api<RemoteNamespace> = Api::namespaced(remote, &tenant);
    let watch = reflector::reflector(
        writer,
        watcher(rn_api, watcher::Config::default()).backoff(liqo_core::watch_backoff()),
    )
    .applied_objects()
    .for_each(move |r| {
        match r {
            Ok(rn) => {
                let _ = nso_tx.unbounded_send(
                    ObjectRef::new(names::OFFLOADING_NAME).within(&rn.spec.source_namespace),
                );
            }
            Err(e) => tracing::debug!(error = %e, "RemoteNamespace watch"),
        }
        futures::future::ready(())
    });
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = c.cancelled() => {}
            () = watch => {}
        }
    });
    let vn_ref = ObjectRef::from_obj(vn);
    tokio::spawn(heartbeat(ctx.clone(), session.clone(), vn_ref));
    ctx.sessions
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(id.clone(), session.clone());
    tracing::info!(provider = %id, tenant = %tenant, "provider session started");
    let _ = ctx.nso_all_tx.unbounded_send(());
    Ok(session)
}

async fn drop_session(ctx: &Ctx, id: &ClusterId) {
    ctx.reflections.stop_cluster(id).await;
    let s = ctx
        .sessions
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(id);
    if let Some(s) = s {
        s.cancel.cancel();
    }
}

/// Probes the provider and renews the node Lease every `heartbeat`; a change of reachability
/// (and every `node_status_every`) re-reconciles the VirtualNode, which rewrites the Node status.
/// A heartbeat is periodic by nature: it is what a kubelet does, not a poll for changes.
async fn heartbeat(ctx: Arc<Ctx>, session: Arc<Session>, vn: ObjectRef<VirtualNode>) {
    let node = names::node_name(&session.cluster);
    let leases: Api<Lease> = Api::namespaced(ctx.local.clone(), LEASE_NAMESPACE);
    let mut ticker = tokio::time::interval(ctx.config.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = session.cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let ok = matches!(
            tokio::time::timeout(ctx.config.probe_timeout, session.remote.apiserver_version())
                .await,
            Ok(Ok(_))
        );
        let was = session.reachable.swap(ok, Ordering::SeqCst);
        if was != ok {
            tracing::info!(provider = %session.cluster, reachable = ok, "provider reachability changed");
        }
        let uid = session
            .node_uid
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(uid) = uid {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.clone()),
                    namespace: Some(LEASE_NAMESPACE.to_owned()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: node.clone(),
                        uid,
                        ..OwnerReference::default()
                    }]),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(node.clone()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    renew_time: Some(MicroTime(Timestamp::now())),
                    ..LeaseSpec::default()
                }),
            };
            if let Err(e) = leases
                .patch(
                    &node,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&lease),
                )
                .await
            {
                tracing::debug!(node = %node, error = %e, "renewing the node lease failed");
            }
        }
        if was != ok || last_status.elapsed() >= ctx.config.node_status_every {
            last_status = tokio::time::Instant::now();
            let _ = ctx.vn_tx.unbounded_send(vn.clone());
        }
    }
}

async fn cluster_name(ctx: &Ctx, id: &ClusterId) -> String {
    match Api::<ForeignCluster>::all(ctx.local.clone())
        .get_opt(id.as_str())
        .await
    {
        Ok(Some(fc)) => fc.spec.cluster_name.unwrap_or_else(|| id.to_string()),
        _ => id.to_string(),
    }
}

fn label_value_ok(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && v.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
}

/// The Node's metadata and spec for a VirtualNode.
pub fn desired_node(vn: &VirtualNode, cluster_name: &str) -> Node {
    let id = &vn.spec.cluster_id;
    let name = names::node_name(id);
    let mut l: BTreeMap<String, String> = vn.spec.resources.labels.clone();
    l.extend(vn.spec.labels.clone());
    l.extend([
        (
            labels::TYPE.to_owned(),
            labels::TYPE_VIRTUAL_NODE.to_owned(),
        ),
        (labels::REMOTE_CLUSTER_ID.to_owned(), id.to_string()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        ("kubernetes.io/role".to_owned(), "agent".to_owned()),
        ("type".to_owned(), "virtual-kubelet".to_owned()),
        (
            "node.kubernetes.io/exclude-from-external-load-balancers".to_owned(),
            "true".to_owned(),
        ),
    ]);
    if label_value_ok(cluster_name) {
        l.insert(
            names::REMOTE_CLUSTER_NAME.to_owned(),
            cluster_name.to_owned(),
        );
    }
    if name.len() <= 63 {
        l.insert("kubernetes.io/hostname".to_owned(), name.clone());
    }
    let mut taints = vec![Taint {
        key: names::VIRTUAL_NODE_TAINT_KEY.to_owned(),
        value: Some("true".to_owned()),
        effect: "NoExecute".to_owned(),
        time_added: None,
    }];
    taints.extend(vn.spec.taints.iter().cloned());
    Node {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(l),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(taints),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    transition: &Time,
) -> NodeCondition {
    NodeCondition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(Time(Timestamp::now())),
        last_transition_time: Some(transition.clone()),
    }
}

/// The Node's status: capacity from the offer and readiness from the provider's reachability.
pub fn desired_node_status(
    vn: &VirtualNode,
    ready: bool,
    previous: Option<&NodeStatus>,
) -> NodeStatus {
    let now = Time(Timestamp::now());
    let transition = |type_: &str, status: bool| {
        let want = if status { "True" } else { "False" };
        previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == want)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone())
    };
    let (reason, message) = if ready {
        ("ProviderReachable", "the provider's API server answers")
    } else {
        (
            "ProviderUnreachable",
            "the provider's API server does not answer",
        )
    };
    let capacity = vn.spec.resources.as_capacity();
    NodeStatus {
        capacity: Some(capacity.clone()),
        allocatable: Some(capacity),
        conditions: Some(vec![
            condition("Ready", ready, reason, message, &transition("Ready", ready)),
            condition(
                "MemoryPressure",
                false,
                "ProviderHasSufficientMemory",
                "",
                &transition("MemoryPressure", false),
            ),
            condition(
                "DiskPressure",
                false,
                "ProviderHasNoDiskPressure",
                "",
                &transition("DiskPressure", false),
            ),
            condition(
                "PIDPressure",
                false,
                "ProviderHasSufficientPID",
                "",
                &transition("PIDPressure", false),
            ),
            condition(
                "NetworkUnavailable",
                false,
                "ProviderNetworkReady",
                "",
                &transition("NetworkUnavailable", false),
            ),
        ]),
        addresses: Some(vec![NodeAddress {
            type_: "Hostname".to_owned(),
            address: names::node_name(&vn.spec.cluster_id),
        }]),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".to_owned(),
            operating_system: "linux".to_owned(),
            kubelet_version: "v1.34.0-liqo-vk".to_owned(),
            kube_proxy_version: String::new(),
            container_runtime_version: "liqo-vk://remote".to_owned(),
            os_image: format!("liqo provider {}", vn.spec.cluster_id),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    }
}

async fn apply(vn: &VirtualNode, ctx: &Arc<Ctx>) -> Result<Action, VkError> {
    let id = vn.spec.cluster_id.clone();
    let kubeconfig = match kubeconfig(vn, ctx).await {
        Ok(k) => k,
        Err(message) => {
            set_status(vn, ctx, None, Status::False, "CredentialMissing", &message).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let session = match ensure_session(vn, ctx, &kubeconfig).await {
        Ok(s) => s,
        Err(e) => {
            set_status(
                vn,
                ctx,
                None,
                Status::False,
                "CredentialInvalid",
                &e.to_string(),
            )
            .await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let nodes: Api<Node> = Api::all(ctx.local.clone());
    let mut node = desired_node(vn, &cluster_name(ctx, &id).await);
    let name = node.name_any();
    let hash = digest(&node);
    node.annotations_mut()
        .insert(names::REFLECTION_HASH.to_owned(), hash.clone());
    let existing = nodes
        .get_opt(&name)
        .await
        .ctx(|| format!("reading Node {name}"))?;
    // Taints are an atomic list: re-applying it would drop the lifecycle controller's taints, so
    // apply only when our part changed.
    let current = match existing {
        Some(n) if n.annotations().get(names::REFLECTION_HASH) == Some(&hash) => n,
        _ => nodes
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&node),
            )
            .await
            .ctx(|| format!("applying Node {name}"))?,
    };
    *session
        .node_uid
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = current.uid();
    let ready = session.reachable.load(Ordering::SeqCst);
    let status = desired_node_status(vn, ready, current.status.as_ref());
    let patch =
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": status});
    nodes
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .ctx(|| format!("updating the status of Node {name}"))?;
    let (st, reason, message) = if ready {
        (Status::True, "NodeReady", format!("node {name} is Ready"))
    } else {
        (
            Status::False,
            "ProviderUnreachable",
            format!("the API server of provider {id} does not answer"),
        )
    };
    set_status(vn, ctx, Some(&name), st, reason, &message).await?;
    Ok(Action::requeue(ctx.config.node_status_every * 5))
}

async fn cleanup(vn: &VirtualNode, ctx: &Arc<Ctx>) -> Result<Action, VkError> {
    let id = vn.spec.cluster_id.clone();
    drop_session(ctx, &id).await;
    let name = names::node_name(&id);
    for r in [
        Api::<Node>::all(ctx.local.clone())
            .delete(&name, &DeleteParams::default())
            .await
            .map(|_| ()),
        Api::<Lease>::namespaced(ctx.local.clone(), LEASE_NAMESPACE)
            .delete(&name, &DeleteParams::default())
            .await
            .map(|_| ()),
    ] {
        match r {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(VkError::kube(
                    format!("deleting the node {name} or its lease"),
                    e,
                ));
            }
        }
    }
    tracing::info!(provider = %id, node = %name, "virtual node removed");
    let _ = ctx.nso_all_tx.unbounded_send(());
    Ok(Action::await_change())
}
