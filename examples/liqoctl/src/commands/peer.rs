//! `peer` and `unpeer`: set the role on the consumer's ForeignCluster, then watch the agents.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Secret};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use liqo_core::{
    ClusterId,
    crds::{ForeignCluster, PeeringRole, Tunnel, VirtualNode, foreign_cluster_condition as cond},
    info::{self, InfoError},
};
use serde_json::json;

use super::{CondView, fc_conditions, kubeconfig_secret, node_name};
use crate::{
    CliError, FIELD_MANAGER,
    cli::{Cli, NetworkWait, PeerArgs},
    kube_util::{Target, connect, is_not_found, watch_until},
    progress::{Reporter, Steps},
};

/// How long `--network auto` waits for a fabric to report before skipping the network step.
const NETWORK_GRACE: Duration = Duration::from_secs(10);
/// The finalizer liqo-net's network controller holds on a `ForeignCluster` it connected.
const NETWORK_FINALIZER: &str = "liqo.io/network";

/// Whether a fabric reports on (or holds) this ForeignCluster.
fn fabric_on(fc: &ForeignCluster) -> bool {
    CondView::of(fc_conditions(fc), cond::NETWORK_READY).is_some()
        || fc
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == NETWORK_FINALIZER)
}

pub(super) fn role_name(r: PeeringRole) -> &'static str {
    match r {
        PeeringRole::None => "None",
        PeeringRole::Provider => "Provider",
        PeeringRole::Consumer => "Consumer",
        PeeringRole::Both => "Both",
    }
}

/// The role after adding "it provides to us".
pub(super) fn with_provider(r: PeeringRole) -> PeeringRole {
    match r {
        PeeringRole::None | PeeringRole::Provider => PeeringRole::Provider,
        PeeringRole::Consumer | PeeringRole::Both => PeeringRole::Both,
    }
}

/// The role after removing "it provides to us".
fn without_provider(r: PeeringRole) -> PeeringRole {
    match r {
        PeeringRole::None | PeeringRole::Provider => PeeringRole::None,
        PeeringRole::Consumer | PeeringRole::Both => PeeringRole::Consumer,
    }
}

/// The apply body: every spec field the object has now (so that liqoctl, sharing ownership of
/// them, never removes one it set earlier by leaving it out), then `changes` on top.
pub(super) fn apply_body(
    id: &ClusterId,
    existing: Option<&ForeignCluster>,
    changes: serde_json::Value,
) -> Result<serde_json::Value, CliError> {
    let mut spec = match existing {
        Some(fc) => serde_json::to_value(&fc.spec)
            .map_err(|e| CliError::plain(format!("encoding ForeignCluster {id}: {e}")))?,
        None => json!({ "clusterId": id }),
    };
    if let (Some(spec), Some(changes)) = (spec.as_object_mut(), changes.as_object()) {
        for (k, v) in changes {
            spec.insert(k.clone(), v.clone());
        }
    }
    Ok(json!({
        "apiVersion": ForeignCluster::api_version(&()),
        "kind": ForeignCluster::kind(&()),
        "metadata": { "name": id.as_str() },
        "spec": spec,
    }))
}

pub(super) async fn apply_fc(
    local: &Target,
    id: &ClusterId,
    body: &serde_json::Value,
) -> Result<ForeignCluster, CliError> {
    Api::<ForeignCluster>::all(local.client.clone())
        .patch(
            id.as_str(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 422 => CliError::failed(
                format!("the local cluster rejected ForeignCluster {id}: {}", s.message),
                "fix the value the API server names above (endpoint and fingerprint come from the provider's cluster info)",
            ),
            _ => local.err(format!("applying ForeignCluster {id}"))(e),
        })
}

fn key_mismatch(fc: &ForeignCluster) -> Option<CliError> {
    let c = CondView::of(fc_conditions(fc), cond::KEY_MISMATCH).filter(CondView::is_true)?;
    Some(CliError::failed(
        format!(
            "ForeignCluster {} reports a key mismatch: {}",
            fc.spec.cluster_id, c.message
        ),
        "someone announced this cluster id with another key; if the provider's key was rotated on purpose, delete the ForeignCluster and peer again with --provider-kubeconfig",
    ))
}

/// `peer`.
pub async fn peer(cli: &Cli, local: &Target, args: &PeerArgs) -> Result<(), CliError> {
    if let Some(path) = &args.bundle {
        return super::bundle::peer(cli, local, args, path).await;
    }
    let fcs: Api<ForeignCluster> = Api::all(local.client.clone());
    let (id, endpoint, existing, changes) = match (&args.provider_kubeconfig, &args.cluster_id) {
        (Some(path), _) => {
            let provider = connect(
                Some(path),
                args.provider_context.as_deref(),
                "provider cluster",
            )
            .await?;
            let info = read_info(&provider, &path.display().to_string()).await?;
            let endpoint = info.peering_endpoint.clone().ok_or_else(|| {
                CliError::failed(
                    format!(
                        "the provider cluster {} publishes no peering endpoint in ConfigMap {}/{}: it serves no peering requests",
                        info.cluster_id,
                        info::NAMESPACE,
                        info::CONFIG_MAP
                    ),
                    "enable the peering server (provider role) in the provider's agent configuration, then retry",
                )
            })?;
            if let Ok(Some(me)) = info::read(&local.client).await
                && me.cluster_id == info.cluster_id
            {
                return Err(CliError::failed(
                    format!(
                        "the provider kubeconfig points at this cluster ({})",
                        me.cluster_id
                    ),
                    "pass the other cluster's kubeconfig with --provider-kubeconfig (and --provider-context)",
                ));
            }
            let id = info.cluster_id.clone();
            let existing = fcs
                .get_opt(id.as_str())
                .await
                .map_err(local.err(format!("reading ForeignCluster {id}")))?;
            if let Some(pinned) = existing
                .as_ref()
                .and_then(|f| f.spec.public_key_fingerprint)
                && pinned != info.fingerprint
            {
                return Err(CliError::failed(
                    format!(
                        "ForeignCluster {id} pins key {pinned}, but the provider now publishes {}",
                        info.fingerprint
                    ),
                    format!(
                        "if the provider's key was rotated on purpose, delete the pinned record (`kubectl delete foreigncluster {id}`) and peer again"
                    ),
                ));
            }
            let mut changes = json!({
                "peeringEndpoint": endpoint,
                "publicKeyFingerprint": info.fingerprint,
            });
            if let Some(name) = &info.cluster_name {
                changes["clusterName"] = json!(name);
            }
            if existing.is_none() {
                changes["discovery"] = json!({"source": "Manual"});
            }
            (id, endpoint, existing, changes)
        }
        (None, Some(id)) => {
            let fc = fcs
                .get_opt(id.as_str())
                .await
                .map_err(local.err(format!("reading ForeignCluster {id}")))?
                .ok_or_else(|| {
                    CliError::failed(
                        format!("no ForeignCluster {id} on the local cluster"),
                        "list the clusters discovery found with `liqoctl discover`, or give the provider's kubeconfig with --provider-kubeconfig",
                    )
                })?;
            if let Some(e) = key_mismatch(&fc) {
                return Err(e);
            }
            let missing: Vec<&str> = [
                ("spec.peeringEndpoint", fc.spec.peering_endpoint.is_none()),
                (
                    "spec.publicKeyFingerprint",
                    fc.spec.public_key_fingerprint.is_none(),
                ),
            ]
            .into_iter()
            .filter_map(|(f, m)| m.then_some(f))
            .collect();
            if !missing.is_empty() {
                return Err(CliError::failed(
                    format!("ForeignCluster {id} has no {}", missing.join(" and ")),
                    "peer with --provider-kubeconfig PATH to read them from the provider's cluster info",
                ));
            }
            let endpoint = fc.spec.peering_endpoint.clone().unwrap_or_default();
            (id.clone(), endpoint, Some(fc), json!({}))
        }
        (None, None) => {
            return Err(CliError::Usage(
                "peer needs a cluster id or --provider-kubeconfig".into(),
            ));
        }
    };

    let before = existing.as_ref().map(|f| f.spec.role).unwrap_or_default();
    let role = with_provider(before);
    let mut changes = changes;
    changes["role"] = json!(role);
    let body = apply_body(&id, existing.as_ref(), changes)?;
    apply_fc(local, &id, &body).await?;
    eprintln!(
        "ForeignCluster {id}: role {} (was {}), endpoint {endpoint}",
        role_name(role),
        role_name(before)
    );
    wait_peered(
        cli,
        local,
        &id,
        args.network,
        &format!("is the liqo agent running here, and does it reach {endpoint}? Check its logs"),
    )
    .await
}

/// Waits, after `peer` declared the intent, until the peering with `id` is up: authenticated,
/// offer accepted, virtual node Ready, network (per `network`). `reach_hint` says what to check
/// when authentication does not come. Returns at once with `--wait=false`.
pub(super) async fn wait_peered(
    cli: &Cli,
    local: &Target,
    id: &ClusterId,
    network: NetworkWait,
    reach_hint: &str,
) -> Result<(), CliError> {
    if !cli.wait {
        eprintln!("not waiting (--wait=false); follow the peering with `liqoctl info {id}`");
        return Ok(());
    }

    let steps = Steps::new(cli.timeout);
    let diagnose = format!("run `liqoctl diagnose {id}`");
    wait_condition(
        &steps,
        local,
        id,
        cond::AUTHENTICATED,
        &format!("authenticated with {id}"),
        &format!("{reach_hint}; {diagnose}"),
    )
    .await?;
    wait_condition(
        &steps,
        local,
        id,
        cond::OFFER_ACCEPTED,
        &format!("offer from {id} accepted"),
        &format!(
            "the provider may await manual approval (annotate its ForeignCluster with liqo.io/peering-approved=true) or offer nothing free; check the provider agent's logs; {diagnose}"
        ),
    )
    .await?;
    let node = node_name(id);
    steps
        .run(
            &format!("virtual node {node} Ready"),
            &format!(
                "check the local agent's virtual-kubelet logs and `kubectl describe node {node}`; {diagnose}"
            ),
            |rep| async move {
                let api: Api<Node> = Api::all(local.client.clone());
                watch_until(local, api, &node, &rep, |n, rep| {
                    let Some(n) = n else {
                        rep.note("node not created yet");
                        return None;
                    };
                    let ready = n
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
                    match ready {
                        Some(c) if c.status == "True" => Some(()),
                        Some(c) => {
                            rep.note(format!(
                                "Ready={} ({})",
                                c.status,
                                c.message.clone().unwrap_or_default()
                            ));
                            None
                        }
                        None => {
                            rep.note("no Ready condition yet");
                            None
                        }
                    }
                })
                .await
            },
        )
        .await?;
    wait_network(&steps, local, id, network, &diagnose).await?;
    eprintln!(
        "peered: {id} provides resources through node {}",
        node_name(id)
    );
    eprintln!("next:  offload a namespace with `liqoctl offload namespace NAME`");
    Ok(())
}

async fn read_info(provider: &Target, path: &str) -> Result<info::ClusterInfo, CliError> {
    match info::read(&provider.client).await {
        Ok(Some(i)) => Ok(i),
        Ok(None) => Err(CliError::failed(
            format!(
                "the provider cluster at {} has no ConfigMap {}/{}: it publishes no identity to peer with",
                provider.url,
                info::NAMESPACE,
                info::CONFIG_MAP
            ),
            format!(
                "start the liqo agent on the provider (it publishes that ConfigMap), check with `kubectl --kubeconfig {path} -n {} get configmap {}`, then retry",
                info::NAMESPACE,
                info::CONFIG_MAP
            ),
        )),
        Err(InfoError::Kube(e)) => Err(provider.err(format!(
            "reading ConfigMap {}/{}",
            info::NAMESPACE,
            info::CONFIG_MAP
        ))(e)),
        Err(e) => Err(CliError::failed(
            format!("the provider's cluster info is unusable: {e}"),
            "the provider's agent writes it: check that agent's version and logs",
        )),
    }
}

/// Waits for condition `type_` of ForeignCluster `id` to be True (fails at once on a key mismatch
/// or when the ForeignCluster is deleted).
async fn wait_condition(
    steps: &Steps,
    local: &Target,
    id: &ClusterId,
    type_: &'static str,
    title: &str,
    next: &str,
) -> Result<(), CliError> {
    steps
        .run(title, next, |rep| async move {
            let api: Api<ForeignCluster> = Api::all(local.client.clone());
            watch_until(local, api, id.as_str(), &rep, |fc, rep| {
                let Some(fc) = fc else {
                    return Some(Err(CliError::failed(
                        format!("ForeignCluster {id} was deleted while peering"),
                        "peer again; find out who deleted it (`kubectl get events`)",
                    )));
                };
                if let Some(e) = key_mismatch(fc) {
                    return Some(Err(e));
                }
                match CondView::of(fc_conditions(fc), type_) {
                    Some(c) if c.is_true() => Some(Ok(())),
                    Some(c) => {
                        rep.note(format!("{type_}={}", c.short()));
                        None
                    }
                    None => {
                        rep.note(format!("no {type_} condition yet"));
                        None
                    }
                }
            })
            .await?
        })
        .await
}

/// Whether a network fabric reports on peer `id`: a `NetworkReady` condition, the network
/// finalizer or a `Tunnel`, now or within [`NETWORK_GRACE`].
async fn fabric_reports(local: &Target, id: &ClusterId, rep: &Reporter) -> bool {
    let fc = Api::<ForeignCluster>::all(local.client.clone())
        .get_opt(id.as_str())
        .await
        .ok()
        .flatten();
    if fc.is_some_and(|fc| fabric_on(&fc)) {
        return true;
    }
    let tunnels: Api<Tunnel> = Api::namespaced(
        local.client.clone(),
        &liqo_core::names::tenant_namespace(id),
    );
    if matches!(tunnels.get_opt(id.as_str()).await, Ok(Some(_))) {
        return true;
    }
    // Give a fabric that is about to report a moment to do so.
    let api: Api<ForeignCluster> = Api::all(local.client.clone());
    let appeared = tokio::time::timeout(
        NETWORK_GRACE,
        watch_until(local, api, id.as_str(), rep, |fc, rep| {
            rep.note("looking for a network fabric (NetworkReady condition, network finalizer)");
            fc.filter(|fc| fabric_on(fc)).map(|_| ())
        }),
    )
    .await;
    matches!(appeared, Ok(Ok(())))
}

async fn wait_network(
    steps: &Steps,
    local: &Target,
    id: &ClusterId,
    mode: NetworkWait,
    diagnose: &str,
) -> Result<(), CliError> {
    let title = format!("network to {id} ready");
    if mode == NetworkWait::Skip {
        steps.skipped(&title, "--network skip");
        return Ok(());
    }
    if mode == NetworkWait::Auto {
        let reports = steps
            .run(
                &format!("looking for a network fabric for {id}"),
                diagnose,
                |rep| async move { Ok(fabric_reports(local, id, &rep).await) },
            )
            .await?;
        if !reports {
            steps.skipped(
                &title,
                "no network fabric reports on this peer: no NetworkReady condition, no Tunnel",
            );
            return Ok(());
        }
    }
    wait_condition(
        steps,
        local,
        id,
        cond::NETWORK_READY,
        &title,
        &format!(
            "check both gateways: Tunnel {}/{id} (handshake, endpoint), UDP reachability between them; {diagnose}",
            liqo_core::names::tenant_namespace(id)
        ),
    )
    .await
}

/// `unpeer`.
pub async fn unpeer(cli: &Cli, local: &Target, id: &ClusterId) -> Result<(), CliError> {
    let fcs: Api<ForeignCluster> = Api::all(local.client.clone());
    let fc = fcs
        .get_opt(id.as_str())
        .await
        .map_err(local.err(format!("reading ForeignCluster {id}")))?
        .ok_or_else(|| {
            CliError::failed(
                format!("no ForeignCluster {id} on the local cluster"),
                "list the known clusters with `liqoctl discover`",
            )
        })?;
    let before = fc.spec.role;
    let role = without_provider(before);
    if role == before {
        eprintln!(
            "ForeignCluster {id}: role {}; this cluster does not consume from {id}, nothing to do",
            role_name(before)
        );
    } else {
        let body = apply_body(id, Some(&fc), json!({ "role": role }))?;
        apply_fc(local, id, &body).await?;
        eprintln!(
            "ForeignCluster {id}: role {} (was {})",
            role_name(role),
            role_name(before)
        );
    }
    if !cli.wait {
        eprintln!("not waiting (--wait=false)");
        return Ok(());
    }
    let steps = Steps::new(cli.timeout);
    let node = node_name(id);
    let tenant = liqo_core::names::tenant_namespace(id);
    steps
        .run(
            &format!("virtual node {node} removed"),
            &format!(
                "is the local agent running? Pods on the node are drained first; check `kubectl get pods -A --field-selector spec.nodeName={node}` and the agent's logs"
            ),
            |rep| async move {
                let api: Api<Node> = Api::all(local.client.clone());
                watch_until(local, api, &node, &rep, |n, rep| match n {
                    None => Some(()),
                    Some(_) => {
                        rep.note("node still present");
                        None
                    }
                })
                .await?;
                let api: Api<VirtualNode> = Api::namespaced(local.client.clone(), &tenant);
                watch_until(local, api, id.as_str(), &rep, |v, rep| match v {
                    None => Some(()),
                    Some(_) => {
                        rep.note(format!("VirtualNode {tenant}/{id} still present"));
                        None
                    }
                })
                .await
            },
        )
        .await?;
    let (ns, secret) = kubeconfig_secret(id);
    steps
        .run(
            &format!("peering with {id} released"),
            "check the local agent's logs: it releases the grant with the provider and deletes the credential",
            |rep| async move {
                let api: Api<Secret> = Api::namespaced(local.client.clone(), &ns);
                match api.get_opt(&secret).await {
                    Err(e) if !is_not_found(&e) => {
                        return Err(local.err(format!("reading Secret {ns}/{secret}"))(e));
                    }
                    _ => {}
                }
                watch_until(local, api, &secret, &rep, |s, rep| match s {
                    None => Some(()),
                    Some(_) => {
                        rep.note(format!("credential Secret {ns}/{secret} still present"));
                        None
                    }
                })
                .await
            },
        )
        .await?;
    eprintln!("unpeered: {id} no longer provides resources to this cluster");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_add_and_remove_the_provider_side() {
        use PeeringRole::*;
        assert_eq!(with_provider(None), Provider);
        assert_eq!(with_provider(Consumer), Both);
        assert_eq!(with_provider(Both), Both);
        assert_eq!(without_provider(Provider), None);
        assert_eq!(without_provider(Both), Consumer);
        assert_eq!(without_provider(Consumer), Consumer);
    }
}
