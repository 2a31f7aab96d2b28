//! `NamespaceOffloading`: turns a namespace into one that spans clusters.

use k8s_openapi::api::core::v1::NodeSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ClusterId;

/// How the twin namespace on each provider is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum NamespaceMappingStrategy {
    /// `<namespace>-<local cluster id>`: never collides between consumers.
    #[default]
    DefaultName,
    /// The same name as the local namespace (reported as a conflict if taken).
    EnforceSameName,
    /// The name in `remoteNamespaceName`.
    SelectedName,
}

/// Where the namespace's pods may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum PodOffloadingStrategy {
    /// Only on this cluster's own nodes (objects are still reflected).
    Local,
    /// Only on virtual nodes, i.e. on providers.
    Remote,
    /// Anywhere; the scheduler decides.
    #[default]
    LocalAndRemote,
}

/// Offloads the namespace it lives in. There is one per namespace, named `offloading`.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "liqo.io",
    version = "v1alpha1",
    kind = "NamespaceOffloading",
    plural = "namespaceoffloadings",
    shortname = "nsoff",
    namespaced,
    status = "NamespaceOffloadingStatus",
    validation = Rule::new("self.metadata.name == 'offloading'").message("a NamespaceOffloading must be named 'offloading' (one per namespace)"),
    printcolumn = r#"{"name":"Pods","type":"string","jsonPath":".spec.podOffloadingStrategy"}"#,
    printcolumn = r#"{"name":"Mapping","type":"string","jsonPath":".spec.namespaceMappingStrategy"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self.namespaceMappingStrategy == 'SelectedName' ? has(self.remoteNamespaceName) : !has(self.remoteNamespaceName)").message("remoteNamespaceName is required with namespaceMappingStrategy SelectedName, and not allowed otherwise"))]
#[serde(rename_all = "camelCase")]
pub struct NamespaceOffloadingSpec {
    /// How twin namespaces are named.
    #[serde(default)]
    pub namespace_mapping_strategy: NamespaceMappingStrategy,
    /// The twin namespace's name with `SelectedName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub remote_namespace_name: Option<String>,
    /// Where pods may run.
    #[serde(default)]
    pub pod_offloading_strategy: PodOffloadingStrategy,
    /// Which providers to offload to, as a node selector over the virtual nodes' labels (every
    /// provider when empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_selector: Option<NodeSelector>,
}

/// The summary of offloading across the selected providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OffloadingPhase {
    /// Every selected provider has its twin namespace.
    Ready,
    /// The selector matches no provider.
    NoClusterSelected,
    /// Twin namespaces are being made.
    InProgress,
    /// Some providers failed (see `remoteNamespaces`).
    SomeFailed,
    /// Every provider failed.
    AllFailed,
    /// Offloading is being removed.
    Terminating,
}

/// The twin namespace on one provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteNamespaceStatusEntry {
    /// The provider.
    pub cluster_id: ClusterId,
    /// The twin namespace's name there.
    pub namespace: String,
    /// Whether it exists and is ours.
    pub ready: bool,
    /// Why not, when not ready (e.g. a name conflict).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The observed state of a namespace's offloading.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceOffloadingStatus {
    /// The summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<OffloadingPhase>,
    /// One entry per selected provider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_namespaces: Vec<RemoteNamespaceStatusEntry>,
    /// Conditions (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A consumer's request for a namespace on the provider to offload into (its twin namespace).
///
/// The consumer creates it in its tenant namespace on the provider, where its credential allows
/// nothing cluster-wide; the provider's agent creates the namespace, binds the consumer's
/// offloading role in it and reports `Ready` (or `Ready=False` with reason `NameConflict` when the
/// name belongs to someone else). Deleting it deletes the twin namespace.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "liqo.io",
    version = "v1alpha1",
    kind = "RemoteNamespace",
    plural = "remotenamespaces",
    namespaced,
    status = "RemoteNamespaceStatus",
    printcolumn = r#"{"name":"Namespace","type":"string","jsonPath":".spec.namespace"}"#,
    printcolumn = r#"{"name":"Consumer","type":"string","jsonPath":".spec.consumerClusterId"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.sourceNamespace"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RemoteNamespaceSpec {
    /// The namespace to create on the provider. Immutable.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("namespace is immutable"))]
    pub namespace: String,
    /// The consumer asking (must match the tenant namespace's consumer).
    pub consumer_cluster_id: ClusterId,
    /// The consumer's local namespace it mirrors (informational).
    #[schemars(length(min = 1, max = 63))]
    pub source_namespace: String,
}

/// The provider's answer to a [`RemoteNamespace`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteNamespaceStatus {
    /// `Ready` once the namespace exists and the consumer may use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
