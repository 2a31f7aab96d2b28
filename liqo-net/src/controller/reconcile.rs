//! Reconciling one peer: connect or disconnect it through the fabric, hold the finalizer,
//! publish this side's view, and set `NetworkReady`.

use std::{
    sync::{Arc, PoisonError},
    time::Duration,
};

use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::controller::Action,
};
use liqo_core::{
    ClusterId, FabricError, LinkState,
    conditions::{self, Condition, Status},
    crds::{ForeignCluster, PeeringRole, Tunnel, foreign_cluster_condition::NETWORK_READY},
    names,
};
use tracing::{debug, info};

use super::{
    Ctx, FIELD_MANAGER, FINALIZER, NetError, PeerState, ViewState, ViewStatus, is_not_found,
    kube_err,
    tunnel::write_tunnel,
    view::{ensure_exchange, publish_view},
};

/// The peer's role decides who hosts the views: the provider, in `liqo-tenant-<consumer>`.
fn hosts_views(me: &ClusterId, peer: &ClusterId, role: PeeringRole) -> Option<bool> {
    match role {
        PeeringRole::None => None,
        // The peer provides: it hosts.
        PeeringRole::Provider => Some(false),
        PeeringRole::Consumer => Some(true),
        PeeringRole::Both => Some(me < peer),
    }
}

pub(super) async fn reconcile(fc: Arc<ForeignCluster>, ctx: Arc<Ctx>) -> Result<Action, NetError> {
    let peer = fc.spec.cluster_id.clone();
    let name = fc.name_any();
    if peer == ctx.me {
        return Ok(Action::await_change());
    }
    let status = fc.status.clone().unwrap_or_default();
    let wanted = fc.metadata.deletion_timestamp.is_none() && status.role != PeeringRole::None;
    let params = status.network.clone().filter(|_| wanted);
    let host = hosts_views(&ctx.me, &peer, status.role);
    let (Some(params), Some(host)) = (params, host) else {
        teardown(&ctx, &fc, &peer).await?;
        ctx.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name);
        return Ok(Action::await_change());
    };
    ctx.names
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(peer.clone(), name.clone());
    add_finalizer(&ctx.client, &fc).await?;
    let slot = ctx
        .peers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(peer.clone())
        .or_default()
        .clone();
    let mut peers = slot.lock().await;
    let state = peers.get_or_insert_with(|| PeerState {
        fc_name: name.clone(),
        params: params.clone(),
        exchange: None,
        published: None,
        watch: None,
    });
    state.fc_name = name.clone();
    let connected = ctx.links.lock().links.contains_key(&peer);
    if !connected || state.params != params {
        match ctx.fabric.connect(&peer, &params).await {
            Ok(link) => {
                info!(%peer, mappings = ?link.remote_mappings, "network connected");
                ctx.links.lock().links.insert(peer.clone(), link);
                ctx.links.bump();
                state.params = params.clone();
            }
            Err(e) => {
                drop(peers);
                let msg = format!("connecting to {peer} through the fabric: {e}");
                set_ready(&ctx, &fc, Status::False, "ConnectFailed", &msg).await?;
                return Err(e.into());
            }
        }
    }
    // The views.
    let exchange_result = ensure_exchange(&ctx, &peer, host, state).await;
    if let Err(e) = &exchange_result {
        let msg = format!("cannot reach where views are exchanged: {e}");
        ctx.links
            .lock()
            .views
            .entry(peer.clone())
            .or_insert_with(|| ViewStatus::missing(msg.clone()));
    } else {
        publish_view(&ctx, &peer, state).await?;
    }
    drop(peers);
    write_tunnel(&ctx, &fc, &peer, &params).await?;
    let (s, reason, message) = readiness(&ctx, &peer);
    set_ready(&ctx, &fc, s, reason, &message).await?;
    exchange_result?;
    ctx.failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&name);
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// `NetworkReady` from the link and the view.
fn readiness(ctx: &Ctx, peer: &ClusterId) -> (Status, &'static str, String) {
    let g = ctx.links.lock();
    let view = g
        .views
        .get(peer)
        .cloned()
        .unwrap_or_else(|| ViewStatus::missing("not watched yet"));
    match view.state {
        ViewState::Invalid => return (Status::False, "ViewInvalid", view.message),
        ViewState::Missing => {
            return (
                Status::False,
                "ViewMissing",
                format!(
                    "waiting for {peer}'s view of this cluster: {}",
                    view.message
                ),
            );
        }
        ViewState::Applied => {}
    }
    match g.statuses.get(peer) {
        None => (
            Status::Unknown,
            "Connecting",
            "waiting for the first link check".into(),
        ),
        Some(s) => match s.state {
            LinkState::Connecting => (Status::Unknown, "Connecting", s.message.clone()),
            LinkState::Connected => (Status::True, "Connected", s.message.clone()),
            LinkState::Disconnected => (Status::False, "HandshakeStale", s.message.clone()),
        },
    }
}

async fn set_ready(
    ctx: &Ctx,
    fc: &ForeignCluster,
    status: Status,
    reason: &str,
    message: &str,
) -> Result<(), NetError> {
    let mut conds: Vec<Condition> = fc
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if !conditions::set(
        &mut conds,
        NETWORK_READY,
        status,
        reason,
        message,
        fc.metadata.generation,
    ) {
        return Ok(());
    }
    let mine: Vec<&Condition> = conds.iter().filter(|c| c.type_ == NETWORK_READY).collect();
    apply_fc_conditions(ctx, fc, &mine).await
}

/// Server-side apply of this controller's conditions only (the list is a map keyed by type,
/// so other managers' conditions are untouched; an empty list drops ours).
async fn apply_fc_conditions(
    ctx: &Ctx,
    fc: &ForeignCluster,
    conds: &[&Condition],
) -> Result<(), NetError> {
    let name = fc.name_any();
    let body = serde_json::json!({
        "apiVersion": ForeignCluster::api_version(&()),
        "kind": ForeignCluster::kind(&()),
        "metadata": {"name": name},
        "status": {"conditions": conds},
    });
    let api: Api<ForeignCluster> = Api::all(ctx.client.clone());
    match api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err(format!(
            "writing condition {NETWORK_READY} of ForeignCluster {name}"
        ))(e)),
    }
}

async fn add_finalizer(client: &Client, fc: &ForeignCluster) -> Result<(), NetError> {
    if fc.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut list = fc.finalizers().to_vec();
    list.push(FINALIZER.into());
    patch_finalizers(client, fc, list).await
}

/// Replaces the finalizer list, guarded by a test of the current list (another controller's
/// finalizer changing meanwhile makes this fail and retry, never lose theirs; unrelated
/// changes such as a status write do not conflict).
async fn patch_finalizers(
    client: &Client,
    fc: &ForeignCluster,
    list: Vec<String>,
) -> Result<(), NetError> {
    let name = fc.name_any();
    let api: Api<ForeignCluster> = Api::all(client.clone());
    let result = match &fc.metadata.finalizers {
        Some(current) => {
            let ops = serde_json::json!([
                {"op": "test", "path": "/metadata/finalizers", "value": current},
                {"op": "replace", "path": "/metadata/finalizers", "value": list},
            ]);
            let patch: json_patch::Patch =
                serde_json::from_value(ops).map_err(|e| FabricError::Other(e.into()))?;
            api.patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
        }
        None => {
            let patch = serde_json::json!({
                "metadata": {"finalizers": list, "resourceVersion": fc.resource_version()},
            });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    match result {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err(format!(
            "updating the finalizers of ForeignCluster {name}"
        ))(e)),
    }
}

async fn teardown(ctx: &Ctx, fc: &ForeignCluster, peer: &ClusterId) -> Result<(), NetError> {
    let slot = ctx
        .peers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(peer);
    let state = match slot {
        Some(slot) => slot.lock().await.take(),
        None => None,
    };
    let had_link = ctx.links.lock().links.contains_key(peer);
    let has_finalizer = fc.finalizers().iter().any(|f| f == FINALIZER);
    if state.is_none() && !had_link && !has_finalizer {
        return Ok(());
    }
    // After a restart the in-memory state is gone; the finalizer says we may have a link.
    ctx.fabric.disconnect(peer).await?;
    {
        let mut g = ctx.links.lock();
        g.links.remove(peer);
        g.statuses.remove(peer);
        g.views.remove(peer);
    }
    ctx.links.bump();
    info!(%peer, "network disconnected");
    // My view: best effort on the peer's side (unpeering deletes its tenant namespace anyway).
    if let Some(ex) = state.as_ref().and_then(|s| s.exchange.clone()) {
        match ex.api.delete(peer.as_str(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) if !ex.local => {
                debug!(%peer, error = %e, "removing our view on the peer (its tenant namespace goes with unpeering)");
            }
            Err(e) => {
                return Err(kube_err(format!(
                    "deleting NetworkConfig {}/{peer}",
                    ex.namespace
                ))(e));
            }
        }
    }
    let tunnels: Api<Tunnel> = Api::namespaced(ctx.client.clone(), &names::tenant_namespace(peer));
    match tunnels
        .delete(peer.as_str(), &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => {
            return Err(kube_err(format!(
                "deleting Tunnel {}/{peer}",
                names::tenant_namespace(peer)
            ))(e));
        }
    }
    ctx.names
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(peer);
    if fc.metadata.deletion_timestamp.is_none() {
        apply_fc_conditions(ctx, fc, &[]).await?;
    }
    if has_finalizer {
        let list = fc
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        patch_finalizers(&ctx.client, fc, list).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_hosts_the_views() {
        let (a, b): (ClusterId, ClusterId) = ("a".parse().unwrap(), "b".parse().unwrap());
        assert_eq!(hosts_views(&a, &b, PeeringRole::Provider), Some(false));
        assert_eq!(hosts_views(&a, &b, PeeringRole::Consumer), Some(true));
        assert_eq!(hosts_views(&a, &b, PeeringRole::None), None);
        // Both: exactly one side hosts.
        assert_ne!(
            hosts_views(&a, &b, PeeringRole::Both),
            hosts_views(&b, &a, PeeringRole::Both)
        );
    }
}
