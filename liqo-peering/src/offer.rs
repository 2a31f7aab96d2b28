//! What a provider offers ([`OfferPolicy`]) and the network parameters it hands out
//! ([`NetworkSource`]): the same for every peering method.

use std::{collections::BTreeSet, fmt, sync::Arc};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{Api, Client, api::ListParams};
use liqo_core::{NetworkFabric, NetworkParameters, PeeringError, ResourceOffer, labels};

use crate::{
    names::kube_err,
    quantity::{Milli, QuantityError},
};

/// What a provider offers a new consumer. An administrator may later edit the provider-side
/// `ResourceOffer` in the tenant namespace; renewals keep the edited offer.
#[derive(Debug, Clone, PartialEq)]
pub enum OfferPolicy {
    /// Fixed amounts.
    Absolute(ResourceOffer),
    /// A share of the cluster's free allocatable resources at grant time: the allocatable of
    /// every schedulable node that is not a virtual node, minus the requests of the pods bound to
    /// them that have not finished.
    ShareOfFree {
        /// Percent of what is free, 1 to 100.
        percent: u8,
        /// Labels for the offer (region, zone, price).
        labels: std::collections::BTreeMap<String, String>,
    },
}

impl OfferPolicy {
    /// The offer for a new consumer.
    pub async fn offer(&self, client: &Client) -> Result<ResourceOffer, PeeringError> {
        match self {
            Self::Absolute(offer) => Ok(offer.clone()),
            Self::ShareOfFree { percent, labels } => {
                let free = free_allocatable(client).await?;
                let pct = (*percent).clamp(1, 100);
                let mut offer = ResourceOffer::new(
                    &free.cpu.percent(pct).to_string(),
                    &free.memory.percent(pct).to_string(),
                    u32::try_from(free.pods.percent(pct).whole_units()).unwrap_or(u32::MAX),
                );
                offer.labels = labels.clone();
                Ok(offer)
            }
        }
    }
}

/// Free resources of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FreeResources {
    /// CPU.
    pub cpu: Milli,
    /// Memory (bytes, in milli).
    pub memory: Milli,
    /// Pod slots (in milli).
    pub pods: Milli,
}

/// Allocatable minus requested over the cluster's real, schedulable nodes.
pub async fn free_allocatable(client: &Client) -> Result<FreeResources, PeeringError> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(kube_err("listing nodes to compute the offer"))?;
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
        .await
        .map_err(kube_err("listing pods to compute the offer"))?;
    compute_free(&nodes.items, &pods.items).map_err(|e| PeeringError::Other(Box::new(e)))
}

fn compute_free(nodes: &[Node], pods: &[Pod]) -> Result<FreeResources, QuantityError> {
    let usable: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| {
            let virtual_node = n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::TYPE))
                .is_some_and(|t| t == labels::TYPE_VIRTUAL_NODE);
            let unschedulable = n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            !virtual_node && !unschedulable
        })
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    let mut free = FreeResources::default();
    for node in nodes {
        if !node
            .metadata
            .name
            .as_deref()
            .is_some_and(|n| usable.contains(n))
        {
            continue;
        }
        let Some(alloc) = node.status.as_ref().and_then(|s| s.allocatable.as_ref()) else {
            continue;
        };
        let get = |k: &str| alloc.get(k).map(Milli::of).transpose();
        free.cpu = free.cpu + get("cpu")?.unwrap_or_default();
        free.memory = free.memory + get("memory")?.unwrap_or_default();
        free.pods = free.pods + get("pods")?.unwrap_or_default();
    }
    for pod in pods {
        let Some(spec) = &pod.spec else { continue };
        if !spec
            .node_name
            .as_deref()
            .is_some_and(|n| usable.contains(n))
        {
            continue;
        }
        free.pods = free.pods.saturating_sub(Milli(1000));
        for c in &spec.containers {
            let Some(req) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) else {
                continue;
            };
            if let Some(q) = req.get("cpu") {
                free.cpu = free.cpu.saturating_sub(Milli::of(q)?);
            }
            if let Some(q) = req.get("memory") {
                free.memory = free.memory.saturating_sub(Milli::of(q)?);
            }
        }
    }
    Ok(free)
}

/// Where a provider's network parameters come from.
#[derive(Clone)]
pub enum NetworkSource {
    /// Fixed parameters.
    Static(NetworkParameters),
    /// The fabric's [`NetworkFabric::local_parameters`], asked at each grant (so the gateway's
    /// current endpoint and key are handed out).
    Fabric(Arc<dyn NetworkFabric>),
}

impl fmt::Debug for NetworkSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(p) => f.debug_tuple("Static").field(p).finish(),
            Self::Fabric(_) => f.write_str("Fabric(..)"),
        }
    }
}

impl NetworkSource {
    /// The parameters now.
    pub async fn parameters(&self) -> Result<NetworkParameters, PeeringError> {
        match self {
            Self::Static(p) => Ok(p.clone()),
            Self::Fabric(f) => f.local_parameters().await.map_err(|e| {
                PeeringError::Other(format!("reading the network fabric's parameters: {e}").into())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::{Container, NodeSpec, NodeStatus, PodSpec, ResourceRequirements},
        apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::ObjectMeta},
    };

    use super::*;

    fn node(name: &str, cpu: &str, virtual_node: bool, unschedulable: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: virtual_node.then(|| {
                    BTreeMap::from([(labels::TYPE.into(), labels::TYPE_VIRTUAL_NODE.into())])
                }),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(unschedulable),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                allocatable: Some(BTreeMap::from([
                    ("cpu".into(), Quantity(cpu.into())),
                    ("memory".into(), Quantity("8Gi".into())),
                    ("pods".into(), Quantity("110".into())),
                ])),
                ..NodeStatus::default()
            }),
        }
    }

    fn pod(node: &str, cpu: &str) -> Pod {
        Pod {
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some(BTreeMap::from([("cpu".into(), Quantity(cpu.into()))])),
                        ..ResourceRequirements::default()
                    }),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn free_excludes_virtual_and_cordoned_nodes_and_subtracts_requests() {
        let nodes = [
            node("w1", "4", false, false),
            node("w2", "4", false, false),
            node("virtual", "100", true, false),
            node("cordoned", "100", false, true),
        ];
        let pods = [pod("w1", "500m"), pod("virtual", "50"), pod("w2", "1")];
        let free = compute_free(&nodes, &pods).unwrap();
        assert_eq!(free.cpu, Milli(6500));
        assert_eq!(free.pods, Milli(218_000));
        assert_eq!(free.memory, Milli::parse("16Gi").unwrap());
    }
}
