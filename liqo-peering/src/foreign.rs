//! The `ForeignCluster` side of peering: one condition per stage, the role, Events.
//!
//! Each role writes with its own field manager and only its own condition types, so the discovery
//! controller's conditions (`Discovered`, `KeyMismatch`) and the other role's are never touched:
//!
//! | role of this cluster | condition types |
//! |---|---|
//! | consumer (the peer provides) | `Authenticated`, `OfferAccepted` |
//! | provider (the peer consumes) | `ConsumerAuthenticated`, `TenantReady` |

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use liqo_core::{
    ClusterId, DiscoverySource, NetworkParameters, PeeringError,
    conditions::{self, Condition, Status},
    crds::{
        DiscoverySpec, ForeignCluster, ForeignClusterSpec, PeeringRole, TenantNamespaces,
        foreign_cluster_condition as cond,
    },
    labels,
};

use crate::names::{self, MANAGED_BY_VALUE, kube_err};

/// Condition types written by the consumer role.
pub const CONSUMER_CONDITIONS: [&str; 2] = [cond::AUTHENTICATED, cond::OFFER_ACCEPTED];
/// Condition types written by the provider role.
pub const PROVIDER_CONDITIONS: [&str; 2] = [cond::CONSUMER_AUTHENTICATED, cond::TENANT_READY];

/// Which role a write is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This cluster consumes from the peer.
    Consumer,
    /// This cluster provides to the peer.
    Provider,
}

impl Side {
    fn manager(self) -> &'static str {
        match self {
            Side::Consumer => names::CONSUMER_MANAGER,
            Side::Provider => names::PROVIDER_MANAGER,
        }
    }

    fn own(self) -> &'static [&'static str; 2] {
        match self {
            Side::Consumer => &CONSUMER_CONDITIONS,
            Side::Provider => &PROVIDER_CONDITIONS,
        }
    }
}

/// One condition to set.
#[derive(Debug)]
pub struct Stage<'a> {
    /// The condition type (one of this side's).
    pub type_: &'static str,
    /// Its status.
    pub status: Status,
    /// CamelCase reason.
    pub reason: &'a str,
    /// What happened and what to do next.
    pub message: String,
}

/// Extra status fields a role records (the provider role records only `network`).
#[derive(Debug, Default)]
pub struct ConsumerFields {
    /// The tenant namespace on the provider (`status.tenantNamespaces.remote`).
    pub remote_namespace: Option<String>,
    /// The peer's network parameters (`status.network`).
    pub network: Option<NetworkParameters>,
}

/// The role a peer has given which stages hold: it provides once we accepted its offer, it
/// consumes once its tenant is ready.
fn role_of(conds: &[Condition]) -> PeeringRole {
    match (
        conditions::is_true(conds, cond::OFFER_ACCEPTED),
        conditions::is_true(conds, cond::TENANT_READY),
    ) {
        (true, true) => PeeringRole::Both,
        (true, false) => PeeringRole::Provider,
        (false, true) => PeeringRole::Consumer,
        (false, false) => PeeringRole::None,
    }
}

/// Finds the `ForeignCluster` of `peer` (by `spec.clusterId`).
pub async fn find(
    client: &Client,
    peer: &ClusterId,
) -> Result<Option<ForeignCluster>, PeeringError> {
    let api: Api<ForeignCluster> = Api::all(client.clone());
    if let Some(fc) = api
        .get_opt(peer.as_str())
        .await
        .map_err(kube_err(format!("reading ForeignCluster {peer}")))?
        && &fc.spec.cluster_id == peer
    {
        return Ok(Some(fc));
    }
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(kube_err("listing ForeignClusters"))?;
    Ok(all.items.into_iter().find(|fc| &fc.spec.cluster_id == peer))
}

/// The `ForeignCluster` of `peer`, created (named after the id, labelled as ours, source
/// `Manual`) when discovery has not made one.
pub async fn ensure(
    client: &Client,
    peer: &ClusterId,
    peer_name: Option<&str>,
    side: Side,
) -> Result<ForeignCluster, PeeringError> {
    if let Some(fc) = find(client, peer).await? {
        return Ok(fc);
    }
    let fc = ForeignCluster {
        metadata: ObjectMeta {
            name: Some(peer.to_string()),
            labels: Some(BTreeMap::from([
                (labels::MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
                (labels::REMOTE_CLUSTER_ID.to_owned(), peer.to_string()),
            ])),
            ..ObjectMeta::default()
        },
        spec: ForeignClusterSpec {
            cluster_id: peer.clone(),
            cluster_name: peer_name.map(str::to_owned),
            peering_endpoint: None,
            public_key_fingerprint: None,
            discovery: DiscoverySpec {
                source: DiscoverySource::Manual,
                auto_peer: false,
            },
            role: match side {
                Side::Consumer => PeeringRole::Provider,
                Side::Provider => PeeringRole::Consumer,
            },
        },
        status: None,
    };
    let api: Api<ForeignCluster> = Api::all(client.clone());
    match api
        .create(
            &PostParams {
                field_manager: Some(side.manager().to_owned()),
                ..PostParams::default()
            },
            &fc,
        )
        .await
    {
        Ok(fc) => Ok(fc),
        Err(kube::Error::Api(s)) if s.code == 409 => api
            .get(peer.as_str())
            .await
            .map_err(kube_err(format!("reading ForeignCluster {peer}"))),
        Err(e) => Err(kube_err(format!("creating ForeignCluster {peer}"))(e)),
    }
}

/// Sets `stages` (and, for the consumer, its extra fields) on `peer`'s `ForeignCluster` if it
/// exists, with optimistic concurrency (retried on conflict). Returns the updated object.
pub async fn set_stages(
    client: &Client,
    peer: &ClusterId,
    side: Side,
    stages: &[Stage<'_>],
    extra: Option<&ConsumerFields>,
) -> Result<Option<ForeignCluster>, PeeringError> {
    write(
        client,
        peer,
        side,
        |conds, generation| {
            for s in stages {
                conditions::set(conds, s.type_, s.status, s.reason, &s.message, generation);
            }
        },
        extra,
    )
    .await
}

/// Removes this side's conditions from `peer`'s `ForeignCluster`, and deletes the object when we
/// made it and no role remains.
pub async fn clear(client: &Client, peer: &ClusterId, side: Side) -> Result<(), PeeringError> {
    let own = side.own();
    let Some(fc) = write(
        client,
        peer,
        side,
        |conds, _| conds.retain(|c| !own.contains(&c.type_.as_str())),
        None,
    )
    .await?
    else {
        return Ok(());
    };
    let ours = fc.labels().get(labels::MANAGED_BY).map(String::as_str) == Some(MANAGED_BY_VALUE);
    let conds = fc
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if ours && role_of(conds) == PeeringRole::None {
        let api: Api<ForeignCluster> = Api::all(client.clone());
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: fc.uid(),
                resource_version: fc.resource_version(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&fc.name_any(), &dp).await {
            Ok(_) => {}
            Err(e) if names::is_not_found(&e) => {}
            // Changed meanwhile (the other role came back): keep it.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err(format!("deleting ForeignCluster {peer}"))(e)),
        }
    }
    Ok(())
}

async fn write(
    client: &Client,
    peer: &ClusterId,
    side: Side,
    edit: impl Fn(&mut Vec<Condition>, Option<i64>),
    extra: Option<&ConsumerFields>,
) -> Result<Option<ForeignCluster>, PeeringError> {
    let api: Api<ForeignCluster> = Api::all(client.clone());
    let mut attempts = 0;
    loop {
        let Some(fc) = find(client, peer).await? else {
            return Ok(None);
        };
        let status = fc.status.clone().unwrap_or_default();
        let mut all = status.conditions.clone();
        edit(&mut all, fc.metadata.generation);
        let own = side.own();
        let mine: Vec<&Condition> = all
            .iter()
            .filter(|c| own.contains(&c.type_.as_str()))
            .collect();
        let mut body = serde_json::json!({
            "apiVersion": ForeignCluster::api_version(&()),
            "kind": ForeignCluster::kind(&()),
            "metadata": {"name": fc.name_any(), "resourceVersion": fc.resource_version()},
            "status": {
                "conditions": mine,
                "role": role_of(&all),
            },
        });
        if side == Side::Consumer {
            let tenant = names::tenant_namespace(peer)?;
            let extra = extra.filter(|e| e.remote_namespace.is_some() || e.network.is_some());
            if let Some(e) = extra {
                body["status"]["tenantNamespaces"] = serde_json::to_value(TenantNamespaces {
                    local: Some(tenant),
                    remote: e.remote_namespace.clone(),
                })
                .unwrap_or_default();
                if let Some(n) = &e.network {
                    body["status"]["network"] = serde_json::to_value(n).unwrap_or_default();
                }
            } else if all.iter().any(|c| own.contains(&c.type_.as_str())) {
                // Keep what an earlier write recorded (apply drops fields a manager omits).
                if let Ok(v) = serde_json::to_value(&status.tenant_namespaces) {
                    body["status"]["tenantNamespaces"] = v;
                }
                if let Some(n) = &status.network {
                    body["status"]["network"] = serde_json::to_value(n).unwrap_or_default();
                }
            }
        } else {
            // The provider records the consumer's network from its request (the network
            // controller connects from `status.network` on both sides), and keeps it while it
            // still holds a stage.
            let keep = all.iter().any(|c| own.contains(&c.type_.as_str()));
            let network = extra
                .and_then(|e| e.network.as_ref())
                .or(status.network.as_ref().filter(|_| keep));
            if let Some(n) = network {
                body["status"]["network"] = serde_json::to_value(n).unwrap_or_default();
            }
        }
        match api
            .patch_status(
                &fc.name_any(),
                &PatchParams::apply(side.manager()).force(),
                &Patch::Apply(&body),
            )
            .await
        {
            Ok(fc) => return Ok(Some(fc)),
            Err(kube::Error::Api(s)) if (s.code == 409 || s.code == 404) && attempts < 5 => {
                attempts += 1;
            }
            Err(e) => {
                return Err(kube_err(format!(
                    "writing the status of ForeignCluster {peer}"
                ))(e));
            }
        }
    }
}

/// Publishes a Kubernetes Event on `fc` (best effort: an Event that cannot be written is logged,
/// never an error of the peering).
pub async fn event(
    client: &Client,
    fc: &ForeignCluster,
    warning: bool,
    reason: &str,
    note: String,
) {
    let reporter = Reporter {
        controller: MANAGED_BY_VALUE.into(),
        instance: None,
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Peering".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &fc.object_ref(&())).await {
        tracing::debug!(error = %e, "could not publish an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_follows_stages() {
        let mut c = vec![];
        assert_eq!(role_of(&c), PeeringRole::None);
        conditions::set(&mut c, cond::OFFER_ACCEPTED, Status::True, "x", "", None);
        assert_eq!(role_of(&c), PeeringRole::Provider);
        conditions::set(&mut c, cond::TENANT_READY, Status::True, "x", "", None);
        assert_eq!(role_of(&c), PeeringRole::Both);
        conditions::set(&mut c, cond::OFFER_ACCEPTED, Status::False, "x", "", None);
        assert_eq!(role_of(&c), PeeringRole::Consumer);
    }
}
