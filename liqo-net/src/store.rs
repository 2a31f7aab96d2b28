//! Where IPAM allocations live between restarts.
//!
//! [`NetworkConfigStore`] keeps one `NetworkConfig` object per peer (the remote CIDRs in its
//! spec, the ranges chosen here in its status), which is what an agent in a cluster uses.
//! [`FileStore`] keeps a JSON file for agents without an API server (and the tests);
//! [`MemoryStore`] keeps nothing across processes.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use liqo_core::{
    CidrMapping, ClusterId, FabricError,
    conditions::{self, Status},
    crds::{NetworkConfig, NetworkConfigSpec, NetworkConfigStatus},
};

use crate::ipam::Allocation;

/// Persists [`Allocation`]s so a restarted agent makes the same choices.
#[async_trait]
pub trait AllocationStore: Send + Sync + 'static {
    /// Every persisted allocation.
    async fn load(&self) -> Result<Vec<Allocation>, FabricError>;
    /// Records (or replaces) the allocation of `allocation.cluster`.
    async fn save(&self, allocation: &Allocation) -> Result<(), FabricError>;
    /// Forgets the allocation of `cluster`; nothing to forget is not an error.
    async fn remove(&self, cluster: &ClusterId) -> Result<(), FabricError>;
}

/// Allocations in memory only. Clones share the same map, so a test can drop a fabric and
/// build a new one over the same store to play a restart.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore(Arc<Mutex<BTreeMap<ClusterId, Allocation>>>);

impl MemoryStore {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<ClusterId, Allocation>> {
        // The map is always consistent between statements: a panic elsewhere cannot corrupt it.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl AllocationStore for MemoryStore {
    async fn load(&self) -> Result<Vec<Allocation>, FabricError> {
        Ok(self.map().values().cloned().collect())
    }

    async fn save(&self, allocation: &Allocation) -> Result<(), FabricError> {
        self.map()
            .insert(allocation.cluster.clone(), allocation.clone());
        Ok(())
    }

    async fn remove(&self, cluster: &ClusterId) -> Result<(), FabricError> {
        self.map().remove(cluster);
        Ok(())
    }
}

/// Allocations in a JSON file, rewritten atomically (write to a temporary file, then rename).
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    // Serialises read-modify-write cycles of this process.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl FileStore {
    /// A store in `path` (created on first save).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            lock: Arc::default(),
        }
    }

    fn err(&self, action: &str, e: impl std::fmt::Display) -> FabricError {
        FabricError::Backend {
            backend: "allocation file".into(),
            message: format!("{action} {}: {e}", self.path.display()),
        }
    }

    async fn read(&self) -> Result<BTreeMap<ClusterId, Allocation>, FabricError> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => {
                let list: Vec<Allocation> =
                    serde_json::from_slice(&bytes).map_err(|e| self.err("parsing", e))?;
                Ok(list.into_iter().map(|a| (a.cluster.clone(), a)).collect())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(self.err("reading", e)),
        }
    }

    async fn write(&self, map: &BTreeMap<ClusterId, Allocation>) -> Result<(), FabricError> {
        let list: Vec<&Allocation> = map.values().collect();
        let json = serde_json::to_vec_pretty(&list).map_err(|e| self.err("encoding", e))?;
        let tmp = self.path.with_extension("tmp");
        // On disk before it replaces the old file, so a crash or a full disk leaves either the
        // old file or the new one, never a torn one; a failed write leaves no temporary behind.
        let target = tmp.clone();
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&target)?;
            f.write_all(&json)?;
            f.sync_all()
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(self.err("writing", e));
        }
        tokio::fs::rename(&tmp, &self.path)
            .await
            .map_err(|e| self.err("replacing", e))
    }
}

#[async_trait]
impl AllocationStore for FileStore {
    async fn load(&self) -> Result<Vec<Allocation>, FabricError> {
        let _g = self.lock.lock().await;
        Ok(self.read().await?.into_values().collect())
    }

    async fn save(&self, allocation: &Allocation) -> Result<(), FabricError> {
        let _g = self.lock.lock().await;
        let mut map = self.read().await?;
        map.insert(allocation.cluster.clone(), allocation.clone());
        self.write(&map).await
    }

    async fn remove(&self, cluster: &ClusterId) -> Result<(), FabricError> {
        let _g = self.lock.lock().await;
        let mut map = self.read().await?;
        if map.remove(cluster).is_some() {
            self.write(&map).await?;
        }
        Ok(())
    }
}

/// The condition type set on a `NetworkConfig` once its ranges are reserved.
pub const ALLOCATED: &str = "Allocated";

/// Allocations as `NetworkConfig` objects in one namespace, named after the peer's cluster id.
#[derive(Clone)]
pub struct NetworkConfigStore {
    api: Api<NetworkConfig>,
    field_manager: String,
}

impl std::fmt::Debug for NetworkConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkConfigStore")
            .field("field_manager", &self.field_manager)
            .finish_non_exhaustive()
    }
}

impl NetworkConfigStore {
    /// A store over `NetworkConfig`s in `namespace`. Its requests run on the current runtime
    /// whichever namespace the fabric calls it from (see [`crate::netns::host_client`]), so it
    /// must be made outside a gateway's namespace, and is refused there.
    pub fn new(client: kube::Client, namespace: &str) -> Result<Self, FabricError> {
        Ok(Self {
            api: Api::namespaced(crate::netns::host_client(client)?, namespace),
            field_manager: "liqo-net-ipam".into(),
        })
    }

    fn err(action: &str, cluster: Option<&ClusterId>, e: kube::Error) -> FabricError {
        let target = cluster
            .map(|c| format!(" for cluster {c}"))
            .unwrap_or_default();
        FabricError::Backend {
            backend: "NetworkConfig store".into(),
            message: format!("{action} NetworkConfig{target}: {e}"),
        }
    }
}

/// The `NetworkConfig` that records `allocation`.
pub fn to_network_config(allocation: &Allocation) -> NetworkConfig {
    let mut status = NetworkConfigStatus {
        remapped_pod_cidr: Some(allocation.pod.remapped),
        remapped_external_cidr: allocation.external.map(|m| m.remapped),
        conditions: Vec::new(),
    };
    conditions::set(
        &mut status.conditions,
        ALLOCATED,
        Status::True,
        "RangesReserved",
        "ranges reserved for the remote networks",
        None,
    );
    NetworkConfig {
        metadata: ObjectMeta {
            name: Some(allocation.cluster.to_string()),
            labels: Some(
                [(
                    liqo_core::labels::REMOTE_CLUSTER_ID.to_owned(),
                    allocation.cluster.to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: NetworkConfigSpec {
            cluster_id: allocation.cluster.clone(),
            remote_pod_cidr: allocation.pod.real,
            remote_external_cidr: allocation.external.map(|m| m.real),
        },
        status: Some(status),
    }
}

/// The allocation a `NetworkConfig` records, if its status holds one.
pub fn from_network_config(nc: &NetworkConfig) -> Result<Option<Allocation>, FabricError> {
    let Some(status) = &nc.status else {
        return Ok(None);
    };
    let Some(pod) = status.remapped_pod_cidr else {
        return Ok(None);
    };
    let pod = CidrMapping::new(nc.spec.remote_pod_cidr, pod)?;
    let external = match (nc.spec.remote_external_cidr, status.remapped_external_cidr) {
        (Some(real), Some(remapped)) => Some(CidrMapping::new(real, remapped)?),
        (None, None) => None,
        (real, remapped) => {
            return Err(FabricError::InvalidConfig(format!(
                "NetworkConfig {}: external CIDR {real:?} and its remapped range {remapped:?} must be set together",
                nc.spec.cluster_id
            )));
        }
    };
    Ok(Some(Allocation {
        cluster: nc.spec.cluster_id.clone(),
        pod,
        external,
    }))
}

#[async_trait]
impl AllocationStore for NetworkConfigStore {
    async fn load(&self) -> Result<Vec<Allocation>, FabricError> {
        let list = self
            .api
            .list(&ListParams::default())
            .await
            .map_err(|e| Self::err("listing", None, e))?;
        let mut out = Vec::new();
        for nc in &list.items {
            out.extend(from_network_config(nc)?);
        }
        Ok(out)
    }

    async fn save(&self, allocation: &Allocation) -> Result<(), FabricError> {
        let name = allocation.cluster.to_string();
        let mut nc = to_network_config(allocation);
        let status = nc.status.take();
        let pp = PatchParams::apply(&self.field_manager).force();
        // Server-side apply twice: the spec through the main resource, the ranges through the
        // status subresource (the main endpoint ignores status).
        let mut body = serde_json::to_value(&nc).map_err(|e| FabricError::Other(e.into()))?;
        body["apiVersion"] = "liqo.io/v1alpha1".into();
        body["kind"] = "NetworkConfig".into();
        self.api
            .patch(&name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|e| Self::err("applying", Some(&allocation.cluster), e))?;
        let status_body = serde_json::json!({
            "apiVersion": "liqo.io/v1alpha1",
            "kind": "NetworkConfig",
            "status": status,
        });
        self.api
            .patch_status(&name, &pp, &Patch::Apply(&status_body))
            .await
            .map_err(|e| Self::err("writing the status of", Some(&allocation.cluster), e))?;
        Ok(())
    }

    async fn remove(&self, cluster: &ClusterId) -> Result<(), FabricError> {
        match self
            .api
            .delete(&cluster.to_string(), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Self::err("deleting", Some(cluster), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(ext: bool) -> Allocation {
        Allocation {
            cluster: "rome".parse().unwrap(),
            pod: CidrMapping::new(
                "10.244.0.0/16".parse().unwrap(),
                "10.70.0.0/16".parse().unwrap(),
            )
            .unwrap(),
            external: ext.then(|| CidrMapping::identity("192.0.2.0/24".parse().unwrap())),
        }
    }

    #[test]
    fn network_config_round_trip() {
        for ext in [false, true] {
            let a = alloc(ext);
            let nc = to_network_config(&a);
            assert_eq!(nc.metadata.name.as_deref(), Some("rome"));
            assert!(conditions::is_true(
                &nc.status.as_ref().unwrap().conditions,
                ALLOCATED
            ));
            assert_eq!(from_network_config(&nc).unwrap(), Some(a));
        }
        let mut nc = to_network_config(&alloc(true));
        nc.status.as_mut().unwrap().remapped_external_cidr = None;
        assert!(
            from_network_config(&nc)
                .unwrap_err()
                .to_string()
                .contains("must be set together")
        );
        nc.status = None;
        assert_eq!(from_network_config(&nc).unwrap(), None);
    }

    #[tokio::test]
    async fn file_store_survives_a_new_instance() {
        let dir = std::env::temp_dir().join(format!("liqo-net-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("alloc.json");
        let s = FileStore::new(&path);
        assert!(s.load().await.unwrap().is_empty());
        s.save(&alloc(true)).await.unwrap();
        let again = FileStore::new(&path);
        assert_eq!(again.load().await.unwrap(), vec![alloc(true)]);
        again.remove(&"rome".parse().unwrap()).await.unwrap();
        again.remove(&"rome".parse().unwrap()).await.unwrap();
        assert!(s.load().await.unwrap().is_empty());
        std::fs::write(&path, b"not json").unwrap();
        let e = s.load().await.unwrap_err().to_string();
        assert!(e.contains("parsing") && e.contains("alloc.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
