//! Names, labels and annotations the virtual kubelet agrees on with itself across clusters.

use liqo_core::{ClusterId, crds::NamespaceMappingStrategy};

/// Field manager of every server-side apply made by liqo-vk.
pub const FIELD_MANAGER: &str = "liqo-vk";
/// Value of `liqo.io/managed-by` on objects liqo-vk makes.
pub const MANAGED_BY_VALUE: &str = "liqo-vk";
/// Taint key on virtual nodes: only pods of offloaded namespaces tolerate it.
pub const VIRTUAL_NODE_TAINT_KEY: &str = "virtual-node.liqo.io/not-allowed";
/// Label with the provider's human-readable name on virtual nodes.
pub const REMOTE_CLUSTER_NAME: &str = "liqo.io/remote-cluster-name";
/// Label telling which reflector made a reflected object (its [`Reflect::name`]).
///
/// [`Reflect::name`]: crate::reflection::Reflect::name
pub const REFLECTOR_LABEL: &str = "liqo.io/reflector";
/// Annotation on a reflected object: the name of its source object.
pub const REFLECTION_SOURCE: &str = "liqo.io/reflection-source";
/// Annotation on a reflected object: digest of what was last applied (skips no-op applies).
pub const REFLECTION_HASH: &str = "liqo.io/reflection-hash";
/// Annotation that opts an object into reflectors with an opt-in policy (value `true`).
pub const ALLOW_REFLECTION: &str = "liqo.io/allow-reflection";
/// Label on remote ReplicaSets and pods: the uid of the local pod they run for.
pub const ORIGIN_POD_UID: &str = "liqo.io/origin-pod-uid";
/// Annotation on remote ReplicaSets and pods: the local pod's name.
pub const ORIGIN_POD: &str = "liqo.io/origin-pod";
/// Annotation on a local offloaded pod: the uid of the remote pod last seen running it.
pub const REMOTE_POD_UID: &str = "liqo.io/remote-pod-uid";
/// Annotation on a local offloaded pod: restarts carried over from remote pods that were
/// recreated (each recreation counts as one restart).
pub const RESTART_OFFSET: &str = "liqo.io/restart-offset";
/// Label on local namespaces with a `NamespaceOffloading` (selects them for the pod webhook).
pub const OFFLOADING_ENABLED: &str = "liqo.io/offloading-enabled";
/// Annotation on the twin namespace: the `RemoteNamespace` (`<namespace>/<name>`) it belongs to.
pub const REMOTE_NAMESPACE_OWNER: &str = "liqo.io/remote-namespace";
/// ClusterRole bound to the consumer in each twin namespace.
pub const OFFLOADING_CLUSTER_ROLE: &str = "liqo-offloading";
/// Condition reason when a twin namespace's name belongs to someone else.
pub const REASON_NAME_CONFLICT: &str = "NameConflict";
/// The only name a `NamespaceOffloading` may have.
pub const OFFLOADING_NAME: &str = "offloading";

/// The virtual node standing for `provider`: `liqo-<provider id>`.
pub fn node_name(provider: &ClusterId) -> String {
    format!("liqo-{provider}")
}

/// The consumer's user name on the provider's API server.
pub fn consumer_user(consumer: &ClusterId) -> String {
    liqo_core::names::consumer_user(consumer)
}

/// Why a twin namespace name cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamingError {
    /// `SelectedName` without `remoteNamespaceName` (the CRD schema normally rejects it).
    #[error("namespaceMappingStrategy SelectedName needs remoteNamespaceName")]
    MissingSelectedName,
    /// The computed name is longer than a namespace name may be.
    #[error("twin namespace name {0:?} is longer than 63 characters")]
    TooLong(String),
}

/// The twin namespace of `namespace` on a provider, per the mapping strategy.
///
/// ```
/// use liqo_core::crds::NamespaceMappingStrategy as S;
/// let me = "milan".parse().unwrap();
/// assert_eq!(liqo_vk::names::twin_namespace(S::DefaultName, "shop", &me, None).unwrap(), "shop-milan");
/// assert_eq!(liqo_vk::names::twin_namespace(S::EnforceSameName, "shop", &me, None).unwrap(), "shop");
/// assert_eq!(liqo_vk::names::twin_namespace(S::SelectedName, "shop", &me, Some("x")).unwrap(), "x");
/// ```
pub fn twin_namespace(
    strategy: NamespaceMappingStrategy,
    namespace: &str,
    local_cluster: &ClusterId,
    selected: Option<&str>,
) -> Result<String, NamingError> {
    let name = match strategy {
        NamespaceMappingStrategy::DefaultName => format!("{namespace}-{local_cluster}"),
        NamespaceMappingStrategy::EnforceSameName => namespace.to_owned(),
        NamespaceMappingStrategy::SelectedName => {
            selected.ok_or(NamingError::MissingSelectedName)?.to_owned()
        }
    };
    if name.len() > 63 {
        return Err(NamingError::TooLong(name));
    }
    Ok(name)
}

/// The ReplicaSet controller's annotation ranking pods for removal on scale-down (lower first).
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The deletion cost the virtual kubelet gives offloaded pods that have none: below the default
/// 0 of local pods, so scaling a burst back down removes remote pods first.
pub const OFFLOADED_POD_DELETION_COST: &str = "-100";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_name_too_long_is_reported() {
        let me: ClusterId = "c".repeat(40).parse().unwrap();
        let e = twin_namespace(
            NamespaceMappingStrategy::DefaultName,
            &"n".repeat(30),
            &me,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, NamingError::TooLong(_)), "{e}");
        assert_eq!(
            twin_namespace(NamespaceMappingStrategy::SelectedName, "a", &me, None).unwrap_err(),
            NamingError::MissingSelectedName
        );
        assert_eq!(node_name(&"rome".parse().unwrap()), "liqo-rome");
    }
}
