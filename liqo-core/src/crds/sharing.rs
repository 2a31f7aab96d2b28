//! `ResourceOffer` and `VirtualNode`: what a provider shares and the node that stands for it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ClusterId;

/// A provider's offer to one consumer. Written by the provider's authority in the consumer's
/// tenant namespace (where it becomes the ResourceQuota) and mirrored on the consumer.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "liqo.io",
    version = "v1alpha1",
    kind = "ResourceOffer",
    plural = "resourceoffers",
    namespaced,
    status = "ResourceOfferStatus",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".spec.providerClusterId"}"#,
    printcolumn = r#"{"name":"Consumer","type":"string","jsonPath":".spec.consumerClusterId"}"#,
    printcolumn = r#"{"name":"CPU","type":"string","jsonPath":".spec.resources.cpu"}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".spec.resources.memory"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".spec.resources.pods"}"#,
    printcolumn = r#"{"name":"Cordoned","type":"boolean","jsonPath":".spec.cordoned"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ResourceOfferSpec {
    /// The cluster that offers.
    pub provider_cluster_id: ClusterId,
    /// The cluster the offer is for.
    pub consumer_cluster_id: ClusterId,
    /// The resources and descriptive labels.
    pub resources: crate::ResourceOffer,
    /// When true, the provider accepts no new pods from this consumer (running ones stay).
    #[serde(default)]
    pub cordoned: bool,
}

/// The consumer's view of an offer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceOfferStatus {
    /// `Accepted` once the consumer made a virtual node for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The virtual node made for the offer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_node_name: Option<String>,
}

/// A key of a Secret in the same namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key inside it.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The consumer's node for one provider: the virtual kubelet keeps a `Node` from it.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "liqo.io",
    version = "v1alpha1",
    kind = "VirtualNode",
    plural = "virtualnodes",
    shortname = "vn",
    namespaced,
    status = "VirtualNodeStatus",
    printcolumn = r#"{"name":"Cluster ID","type":"string","jsonPath":".spec.clusterId"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNodeSpec {
    /// The provider the node stands for.
    pub cluster_id: ClusterId,
    /// Capacity and labels (copied from the accepted offer).
    pub resources: crate::ResourceOffer,
    /// Where the credential for the provider's API server is kept.
    pub kubeconfig_secret_ref: SecretKeyRef,
    /// Extra labels for the node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra taints for the node (the offloading taint is always added).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
}

/// The virtual node's observed state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualNodeStatus {
    /// The Node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// `Ready` mirrors the Node's readiness (the provider's API server is reachable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
