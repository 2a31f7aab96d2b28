//! The `Tunnel` object of each peer, for fabrics that report a tunnel.

use std::time::SystemTime;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use liqo_core::{
    ClusterId, FabricError, LinkState, LinkStatus, NetworkParameters, TunnelInfo,
    conditions::{self, Status},
    crds::{ForeignCluster, Tunnel, TunnelSpec, TunnelStatus},
    labels, names,
};

use super::{Ctx, FIELD_MANAGER, MANAGED_BY_VALUE, NetError, TUNNEL_CONNECTED, kube_err};

fn time(t: SystemTime) -> Option<Time> {
    Timestamp::try_from(t).ok().map(Time)
}

pub(super) async fn write_tunnel(
    ctx: &Ctx,
    fc: &ForeignCluster,
    peer: &ClusterId,
    params: &NetworkParameters,
) -> Result<(), NetError> {
    // A fabric without a tunnel (or a peer without a key) has no `Tunnel` to show.
    let (Some(info), Some(peer_key)) = (ctx.fabric.tunnel_info(), params.wireguard_public_key)
    else {
        return Ok(());
    };
    let namespace = names::tenant_namespace(peer);
    let api: Api<Tunnel> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut t = Tunnel::new(
        peer.as_str(),
        TunnelSpec {
            cluster_id: peer.clone(),
            backend: info.backend,
            endpoint: params.gateway_endpoint.clone(),
            peer_public_key: peer_key,
            mtu: Some(info.mtu),
            persistent_keepalive_seconds: info.persistent_keepalive,
        },
    );
    t.metadata.labels = Some(
        [
            (labels::REMOTE_CLUSTER_ID.to_owned(), peer.to_string()),
            (labels::MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        ]
        .into(),
    );
    if let Some(uid) = fc.uid() {
        t.metadata.owner_references = Some(vec![OwnerReference {
            api_version: ForeignCluster::api_version(&()).into_owned(),
            kind: ForeignCluster::kind(&()).into_owned(),
            name: fc.name_any(),
            uid,
            ..OwnerReference::default()
        }]);
    }
    let mut body = serde_json::to_value(&t).map_err(|e| FabricError::Other(e.into()))?;
    body["apiVersion"] = Tunnel::api_version(&()).into();
    body["kind"] = Tunnel::kind(&()).into();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let current = api
        .patch(peer.as_str(), &pp, &Patch::Apply(&body))
        .await
        .map_err(kube_err(format!("applying Tunnel {namespace}/{peer}")))?;
    let link = ctx.links.lock().statuses.get(peer).cloned();
    let mut status = current.status.clone().unwrap_or_default();
    let before = status.clone();
    status.interface = Some(info.interface.clone());
    status.local_public_key = Some(info.public_key);
    let (s, reason, message) = match &link {
        None => (
            Status::Unknown,
            "Connecting",
            "waiting for the first link check".to_owned(),
        ),
        Some(l) => {
            status.latest_handshake = l.latest_handshake.and_then(time);
            status.rx_bytes = l.rx_bytes;
            status.tx_bytes = l.tx_bytes;
            match l.state {
                LinkState::Connecting => (Status::Unknown, "Connecting", l.message.clone()),
                LinkState::Connected => (Status::True, "HandshakeRecent", l.message.clone()),
                LinkState::Disconnected => (Status::False, "HandshakeStale", l.message.clone()),
            }
        }
    };
    conditions::set(
        &mut status.conditions,
        TUNNEL_CONNECTED,
        s,
        reason,
        &message,
        current.metadata.generation,
    );
    if status == before {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": Tunnel::api_version(&()),
        "kind": Tunnel::kind(&()),
        "status": status,
    });
    api.patch_status(peer.as_str(), &pp, &Patch::Apply(&body))
        .await
        .map_err(kube_err(format!(
            "writing the status of Tunnel {namespace}/{peer}"
        )))?;
    Ok(())
}

/// The fields of a `TunnelStatus` from a link status (for callers that report links
/// elsewhere, e.g. `liqoctl`).
pub fn tunnel_status(info: &TunnelInfo, link: &LinkStatus) -> TunnelStatus {
    TunnelStatus {
        interface: Some(info.interface.clone()),
        local_public_key: Some(info.public_key),
        latest_handshake: link.latest_handshake.and_then(time),
        rx_bytes: link.rx_bytes,
        tx_bytes: link.tx_bytes,
        conditions: vec![],
    }
}
