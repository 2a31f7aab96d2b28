//! The view exchange (see the protocol in the [controller docs](super)): where the two views
//! of a pair live, publishing this side's, watching and checking the peer's.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        reflector::ObjectRef,
        watcher::{self, Event},
    },
};
use liqo_core::{
    CidrMapping, ClusterId, FabricError, NetworkParameters, PeerLink,
    conditions::{self, Status},
    crds::{NetworkConfig, NetworkConfigSpec, NetworkConfigStatus},
    labels, names,
};
use tracing::{debug, info, warn};

use super::{
    Ctx, FIELD_MANAGER, KUBECONFIG_KEY, MANAGED_BY_VALUE, NetError, PeerState, ViewState,
    ViewStatus, kube_err, kubeconfig_secret,
};

/// Where the two views of a pair live, as seen from this side.
#[derive(Clone)]
pub(super) struct Exchange {
    pub(super) api: Api<NetworkConfig>,
    pub(super) namespace: String,
    /// `local` when this cluster hosts the views, else the peer does.
    pub(super) local: bool,
    /// The kubeconfig the remote client was built from (to notice a rotated credential).
    pub(super) kubeconfig: Option<String>,
}

/// Makes sure the exchange place is known and the peer's view is watched.
pub(super) async fn ensure_exchange(
    ctx: &Arc<Ctx>,
    peer: &ClusterId,
    host: bool,
    state: &mut PeerState,
) -> Result<(), NetError> {
    let exchange = if host {
        let namespace = names::tenant_namespace(peer);
        match &state.exchange {
            Some(e) if e.local => return ensure_watch(ctx, peer, state),
            _ => Exchange {
                api: Api::namespaced(ctx.client.clone(), &namespace),
                namespace,
                local: true,
                kubeconfig: None,
            },
        }
    } else {
        let secrets: Api<Secret> =
            Api::namespaced(ctx.client.clone(), &names::tenant_namespace(peer));
        let secret_name = kubeconfig_secret(peer);
        let secret = secrets
            .get_opt(&secret_name)
            .await
            .map_err(kube_err(format!(
                "reading Secret {}/{secret_name}",
                names::tenant_namespace(peer)
            )))?
            .ok_or_else(|| NetError::Credential {
                cluster: peer.clone(),
                message: format!(
                    "Secret {}/{secret_name} does not exist (yet)",
                    names::tenant_namespace(peer)
                ),
            })?;
        let kubeconfig = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KUBECONFIG_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .ok_or_else(|| NetError::Credential {
                cluster: peer.clone(),
                message: format!("Secret {secret_name} has no key {KUBECONFIG_KEY}"),
            })?;
        if let Some(e) = &state.exchange
            && !e.local
            && e.kubeconfig.as_deref() == Some(kubeconfig.as_str())
        {
            return ensure_watch(ctx, peer, state);
        }
        let client = liqo_core::client_from_kubeconfig(peer, &kubeconfig)
            .await
            .map_err(|e| NetError::Credential {
                cluster: peer.clone(),
                message: e.to_string(),
            })?;
        let namespace = names::tenant_namespace(&ctx.me);
        Exchange {
            api: Api::namespaced(client, &namespace),
            namespace,
            local: false,
            kubeconfig: Some(kubeconfig),
        }
    };
    // A new place (first time, or a rotated credential): watch again, publish again.
    if let Some(w) = state.watch.take() {
        w.abort();
    }
    state.exchange = Some(exchange);
    state.published = None;
    ensure_watch(ctx, peer, state)
}

fn ensure_watch(ctx: &Arc<Ctx>, peer: &ClusterId, state: &mut PeerState) -> Result<(), NetError> {
    if state.watch.as_ref().is_some_and(|w| !w.is_finished()) {
        return Ok(());
    }
    let Some(ex) = state.exchange.clone() else {
        return Ok(());
    };
    let task = tokio::spawn(watch_view(
        ctx.clone(),
        peer.clone(),
        state.fc_name.clone(),
        ex,
    ));
    state.watch = Some(task);
    Ok(())
}

/// Watches `NetworkConfig` `<me>` (the peer's view of this cluster) and applies it.
async fn watch_view(ctx: Arc<Ctx>, peer: ClusterId, fc_name: String, ex: Exchange) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", ctx.me));
    let mut stream = watcher::watcher(ex.api.clone(), cfg)
        .backoff(liqo_core::watch_backoff())
        .boxed();
    let mut seen = false;
    let mut applied: Option<Vec<CidrMapping>> = None;
    while let Some(ev) = stream.next().await {
        let view = match ev {
            Ok(Event::Init) => {
                seen = false;
                continue;
            }
            Ok(Event::InitApply(nc) | Event::Apply(nc)) => {
                seen = true;
                check_view(&ctx.me, &ctx.local, &nc)
            }
            Ok(Event::InitDone) if seen => continue,
            Ok(Event::InitDone) => ViewStatus::missing(format!(
                "NetworkConfig {}/{} does not exist",
                ex.namespace, ctx.me
            )),
            Ok(Event::Delete(_)) => ViewStatus::missing(format!(
                "NetworkConfig {}/{} was deleted",
                ex.namespace, ctx.me
            )),
            Err(e) => {
                warn!(%peer, error = %e, namespace = %ex.namespace, "watching the peer's view of this cluster");
                ViewStatus::missing(format!(
                    "cannot watch NetworkConfigs in {} {}: {e}",
                    ex.namespace,
                    if ex.local { "here" } else { "on the peer" }
                ))
            }
        };
        let view = if view.state == ViewState::Applied && applied.as_ref() != Some(&view.mappings) {
            match ctx
                .fabric
                .set_local_mappings(&peer, view.mappings.clone())
                .await
            {
                Ok(_) => {
                    info!(%peer, mappings = ?view.mappings, "applied the peer's view of this cluster");
                    // Translators handed out from now on know how the peer reaches us.
                    if let Some(l) = ctx.links.lock().links.get_mut(&peer) {
                        l.local_mappings = view.mappings.clone();
                    }
                    ctx.links.bump();
                    applied = Some(view.mappings.clone());
                    view
                }
                Err(e) => ViewStatus {
                    state: ViewState::Invalid,
                    mappings: vec![],
                    message: format!("the gateway refused it: {e}"),
                },
            }
        } else if view.state == ViewState::Missing && applied.is_some() {
            // Keep the last applied mappings in the gateway (traffic keeps flowing), say so.
            ViewStatus {
                message: format!("{} (keeping the last one applied)", view.message),
                ..view
            }
        } else {
            view
        };
        let changed = {
            let mut g = ctx.links.lock();
            if g.links.contains_key(&peer) {
                g.views.insert(peer.clone(), view.clone()) != Some(view)
            } else {
                false
            }
        };
        if changed {
            let _ = ctx.trigger.unbounded_send(ObjectRef::new(&fc_name));
        }
    }
}

/// Checks the peer's view of this cluster.
pub fn check_view(me: &ClusterId, local: &NetworkParameters, nc: &NetworkConfig) -> ViewStatus {
    let invalid = |message: String| ViewStatus {
        state: ViewState::Invalid,
        mappings: vec![],
        message,
    };
    let name = nc.name_any();
    if &nc.spec.cluster_id != me {
        return invalid(format!(
            "NetworkConfig {name} is about cluster {}, not this one ({me})",
            nc.spec.cluster_id
        ));
    }
    if nc.spec.remote_pod_cidr != local.pod_cidr {
        return invalid(format!(
            "NetworkConfig {name} says this cluster's pod CIDR is {}, it is {}",
            nc.spec.remote_pod_cidr, local.pod_cidr
        ));
    }
    let status = nc.status.clone().unwrap_or_default();
    let Some(pod) = status.remapped_pod_cidr else {
        return ViewStatus::missing(format!("NetworkConfig {name} has no remapped pod CIDR yet"));
    };
    let pair = |what: &str, real: liqo_core::Cidr, remapped: liqo_core::Cidr| {
        if real.prefix_len() != remapped.prefix_len() {
            return Err(format!(
                "NetworkConfig {name}: {what} {real} is remapped to {remapped}, a different size \
                 (prefix /{} vs /{})",
                real.prefix_len(),
                remapped.prefix_len()
            ));
        }
        CidrMapping::new(real, remapped).map_err(|e| format!("NetworkConfig {name}: {e}"))
    };
    let mut mappings = match pair("pod CIDR", local.pod_cidr, pod) {
        Ok(m) => vec![m],
        Err(e) => return invalid(e),
    };
    match (
        local.external_cidr,
        nc.spec.remote_external_cidr,
        status.remapped_external_cidr,
    ) {
        (Some(real), Some(stated), Some(remapped)) if stated == real => {
            match pair("external CIDR", real, remapped) {
                Ok(m) => mappings.push(m),
                Err(e) => return invalid(e),
            }
        }
        (_, None, None) => {}
        (real, stated, remapped) => {
            return invalid(format!(
                "NetworkConfig {name}: external CIDR {stated:?} remapped to {remapped:?} does \
                 not match this cluster's {real:?}"
            ));
        }
    }
    ViewStatus {
        state: ViewState::Applied,
        message: mappings
            .iter()
            .map(|m| format!("{} is known as {}", m.real, m.remapped))
            .collect::<Vec<_>>()
            .join(", "),
        mappings,
    }
}

/// This cluster's view of `peer`, as published.
pub fn view_of(peer: &ClusterId, params: &NetworkParameters, link: &PeerLink) -> NetworkConfig {
    let find = |real: liqo_core::Cidr| {
        link.remote_mappings
            .iter()
            .find(|m| m.real == real)
            .map(|m| m.remapped)
    };
    let mut status = NetworkConfigStatus {
        remapped_pod_cidr: find(params.pod_cidr),
        remapped_external_cidr: params.external_cidr.and_then(find),
        conditions: vec![],
    };
    conditions::set(
        &mut status.conditions,
        crate::store::ALLOCATED,
        Status::True,
        "RangesReserved",
        "the ranges this cluster uses for the peer's networks",
        None,
    );
    let mut nc = NetworkConfig::new(
        peer.as_str(),
        NetworkConfigSpec {
            cluster_id: peer.clone(),
            remote_pod_cidr: params.pod_cidr,
            remote_external_cidr: params.external_cidr,
        },
    );
    nc.metadata.labels = Some(
        [
            (labels::REMOTE_CLUSTER_ID.to_owned(), peer.to_string()),
            (labels::MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        ]
        .into(),
    );
    nc.status = Some(status);
    nc
}

fn same_view(a: &NetworkConfig, b: &NetworkConfig) -> bool {
    let strip = |n: &NetworkConfig| {
        let s = n.status.clone().unwrap_or_default();
        (
            n.spec.clone(),
            s.remapped_pod_cidr,
            s.remapped_external_cidr,
        )
    };
    strip(a) == strip(b)
}

pub(super) async fn publish_view(
    ctx: &Ctx,
    peer: &ClusterId,
    state: &mut PeerState,
) -> Result<(), NetError> {
    let Some(ex) = state.exchange.clone() else {
        return Ok(());
    };
    let Some(link) = ctx.links.lock().links.get(peer).cloned() else {
        return Ok(());
    };
    let mut nc = view_of(peer, &state.params, &link);
    if let Some(p) = &state.published
        && same_view(p, &nc)
    {
        return Ok(());
    }
    let status = nc.status.take();
    let mut body = serde_json::to_value(&nc).map_err(|e| FabricError::Other(e.into()))?;
    body["apiVersion"] = NetworkConfig::api_version(&()).into();
    body["kind"] = NetworkConfig::kind(&()).into();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let what = format!(
        "publishing this cluster's view of {peer} (NetworkConfig {}/{peer}{})",
        ex.namespace,
        if ex.local { "" } else { " on the peer" }
    );
    ex.api
        .patch(peer.as_str(), &pp, &Patch::Apply(&body))
        .await
        .map_err(kube_err(what.clone()))?;
    let status_body = serde_json::json!({
        "apiVersion": NetworkConfig::api_version(&()),
        "kind": NetworkConfig::kind(&()),
        "status": status,
    });
    ex.api
        .patch_status(peer.as_str(), &pp, &Patch::Apply(&status_body))
        .await
        .map_err(kube_err(what))?;
    nc.status = status;
    debug!(%peer, namespace = %ex.namespace, "published our view");
    state.published = Some(nc);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> liqo_core::Cidr {
        s.parse().unwrap()
    }

    fn local() -> NetworkParameters {
        NetworkParameters::new(c("10.244.0.0/16"), c("10.96.0.0/12"))
    }

    fn view(me: &str, pod: &str, remapped: Option<&str>) -> NetworkConfig {
        let mut nc = NetworkConfig::new(
            me,
            NetworkConfigSpec {
                cluster_id: me.parse().unwrap(),
                remote_pod_cidr: c(pod),
                remote_external_cidr: None,
            },
        );
        nc.status = Some(NetworkConfigStatus {
            remapped_pod_cidr: remapped.map(c),
            ..NetworkConfigStatus::default()
        });
        nc
    }

    #[test]
    fn views_are_checked() {
        let me: ClusterId = "rome".parse().unwrap();
        let ok = check_view(
            &me,
            &local(),
            &view("rome", "10.244.0.0/16", Some("10.71.0.0/16")),
        );
        assert_eq!(ok.state, ViewState::Applied, "{ok:?}");
        assert_eq!(
            ok.mappings,
            vec![CidrMapping::new(c("10.244.0.0/16"), c("10.71.0.0/16")).unwrap()]
        );
        let other = check_view(
            &me,
            &local(),
            &view("milan", "10.244.0.0/16", Some("10.71.0.0/16")),
        );
        assert_eq!(other.state, ViewState::Invalid);
        assert!(other.message.contains("not this one"), "{}", other.message);
        let size = check_view(
            &me,
            &local(),
            &view("rome", "10.244.0.0/16", Some("10.71.0.0/24")),
        );
        assert_eq!(size.state, ViewState::Invalid);
        assert!(size.message.contains("different size"), "{}", size.message);
        let wrong = check_view(
            &me,
            &local(),
            &view("rome", "10.1.0.0/16", Some("10.71.0.0/16")),
        );
        assert_eq!(wrong.state, ViewState::Invalid);
        assert!(
            wrong.message.contains("pod CIDR is 10.1.0.0/16"),
            "{}",
            wrong.message
        );
        let pending = check_view(&me, &local(), &view("rome", "10.244.0.0/16", None));
        assert_eq!(pending.state, ViewState::Missing);
    }

    #[test]
    fn published_view_round_trips_through_the_check() {
        // What milan publishes about rome is what rome accepts.
        let rome: ClusterId = "rome".parse().unwrap();
        let link = PeerLink {
            cluster: rome.clone(),
            remote_mappings: vec![CidrMapping::new(c("10.244.0.0/16"), c("10.70.0.0/16")).unwrap()],
            local_mappings: vec![],
        };
        let nc = view_of(&rome, &local(), &link);
        assert_eq!(nc.name_any(), "rome");
        let v = check_view(&rome, &local(), &nc);
        assert_eq!(v.state, ViewState::Applied);
        assert_eq!(v.mappings, link.remote_mappings);
    }
}
