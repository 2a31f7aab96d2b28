//! Mirroring objects between clusters: the [`ResourceReflector`] trait.

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{AddressTranslator, ClusterId, ReflectionError};

/// Which way a kind of object flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReflectionDirection {
    /// Local objects are copied to the remote namespace (ConfigMaps, Secrets, Services).
    LocalToRemote,
    /// Remote objects are copied back (Events).
    RemoteToLocal,
    /// Spec flows out, status flows back (Pods).
    Both,
}

/// One pair of namespaces to reflect between, and everything needed to do it.
#[derive(Clone)]
pub struct ReflectionScope {
    /// The remote cluster.
    pub remote_cluster: ClusterId,
    /// A client for the local cluster.
    pub local: kube::Client,
    /// A client for the remote cluster, with the credential peering granted.
    pub remote: kube::Client,
    /// The local namespace.
    pub local_namespace: String,
    /// Its twin on the remote cluster.
    pub remote_namespace: String,
    /// Translates remote addresses for local use and back.
    pub translator: AddressTranslator,
}

impl std::fmt::Debug for ReflectionScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReflectionScope")
            .field("remote_cluster", &self.remote_cluster)
            .field("local_namespace", &self.local_namespace)
            .field("remote_namespace", &self.remote_namespace)
            .finish_non_exhaustive()
    }
}

/// Reflects one kind of object between a local and a remote namespace.
///
/// [`reflect`](Self::reflect) runs until `shutdown` is cancelled, converging the remote side to
/// the local one (or back, per [`direction`](Self::direction)); it returns an error only when it
/// cannot go on, and the runtime restarts it with backoff. It must be restart-safe: after a crash
/// it re-lists and converges without duplicating or orphaning objects.
///
/// A reflector in a few lines (a one-shot copy of ConfigMaps; the generic engine in `liqo-vk` does
/// this with watches, retries and deletions):
///
/// ```
/// use async_trait::async_trait;
/// use k8s_openapi::api::core::v1::ConfigMap;
/// use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams};
/// use liqo_core::{ReflectionDirection, ReflectionError, ReflectionScope, ResourceReflector};
/// use tokio_util::sync::CancellationToken;
///
/// struct CopyConfigMaps;
///
/// #[async_trait]
/// impl ResourceReflector for CopyConfigMaps {
///     fn kind(&self) -> &str { "ConfigMap" }
///     fn direction(&self) -> ReflectionDirection { ReflectionDirection::LocalToRemote }
///     async fn reflect(&self, s: ReflectionScope, shutdown: CancellationToken) -> Result<(), ReflectionError> {
///         let err = |name: &str, source| ReflectionError::Kube { kind: "ConfigMap".into(), namespace: s.local_namespace.clone(), name: name.into(), source };
///         let local: Api<ConfigMap> = Api::namespaced(s.local.clone(), &s.local_namespace);
///         let remote: Api<ConfigMap> = Api::namespaced(s.remote.clone(), &s.remote_namespace);
///         for cm in local.list(&ListParams::default()).await.map_err(|e| err("", e))? {
///             let name = cm.metadata.name.clone().unwrap_or_default();
///             let copy = ConfigMap { metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() }, data: cm.data, ..Default::default() };
///             remote.patch(&name, &PatchParams::apply("my-reflector"), &Patch::Apply(&copy)).await.map_err(|e| err(&name, e))?;
///         }
///         shutdown.cancelled().await;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait ResourceReflector: Send + Sync + 'static {
    /// The kind reflected, for logs and metrics (e.g. `ConfigMap`).
    fn kind(&self) -> &str;

    /// Which way objects flow.
    fn direction(&self) -> ReflectionDirection;

    /// Reflects until `shutdown` is cancelled.
    async fn reflect(
        &self,
        scope: ReflectionScope,
        shutdown: CancellationToken,
    ) -> Result<(), ReflectionError>;

    /// Removes what this reflector made for `scope` when the namespace stops being offloaded.
    ///
    /// The default does nothing: objects reflected into the remote twin namespace go away with
    /// that namespace. Override it for objects kept elsewhere.
    async fn cleanup(&self, scope: &ReflectionScope) -> Result<(), ReflectionError> {
        let _ = scope;
        Ok(())
    }
}
