//! A WireGuard fabric in a Kubernetes cluster: its private key kept in a Secret (the same key
//! across restarts, so peers need not be told again) and its allocations in `NetworkConfig`s.

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use liqo_core::{FabricError, NetworkParameters};
use liqo_net::{IpamConfig, store::NetworkConfigStore};

use crate::{FabricConfig, GatewayConfig, WireGuardBackend, WireGuardFabric};

/// Namespace of the fabric's Secret and IPAM store.
pub const NAMESPACE: &str = "liqo-system";
/// The Secret holding the gateway's WireGuard private key (stable across restarts).
pub const KEY_SECRET: &str = "liqo-wireguard-key";
/// Its key holding the base64 private key.
pub const KEY_FIELD: &str = "privateKey";

/// The gateway's private key from Secret [`NAMESPACE`]/[`KEY_SECRET`], made and stored on first
/// start (when two agents race, the second reads the first's).
pub async fn cluster_key(client: &Client) -> Result<wireguard_control::Key, FabricError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let err = |action: &str, e: kube::Error| FabricError::Backend {
        backend: "agent".into(),
        message: format!("{action} Secret {NAMESPACE}/{KEY_SECRET}: {e}"),
    };
    for _ in 0..2 {
        if let Some(s) = api
            .get_opt(KEY_SECRET)
            .await
            .map_err(|e| err("reading", e))?
        {
            let value = s
                .data
                .as_ref()
                .and_then(|d| d.get(KEY_FIELD))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or_else(|| {
                    FabricError::InvalidConfig(format!(
                        "Secret {NAMESPACE}/{KEY_SECRET} has no {KEY_FIELD}"
                    ))
                })?;
            return crate::parse_private_key(&value);
        }
        let key = crate::generate_private_key();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(KEY_SECRET.into()),
                namespace: Some(NAMESPACE.into()),
                labels: Some(BTreeMap::from([(
                    liqo_core::labels::MANAGED_BY.into(),
                    "liqo-agent".into(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                KEY_FIELD.into(),
                ByteString(key.to_base64().into_bytes()),
            )])),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(key),
            // Another agent made it first: read theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(err("creating", e)),
        }
    }
    Err(FabricError::InvalidConfig(format!(
        "Secret {NAMESPACE}/{KEY_SECRET} could not be read or created"
    )))
}

impl<B: WireGuardBackend> WireGuardFabric<B, NetworkConfigStore> {
    /// Starts the fabric of the cluster `client` reaches, in the current network namespace: the
    /// key from [`cluster_key`], allocations in `NetworkConfig`s in [`NAMESPACE`], the default
    /// remapping pools, `local` as this cluster's network and `gateway` as its interface.
    pub async fn in_cluster(
        client: &Client,
        backend: B,
        local: NetworkParameters,
        gateway: GatewayConfig,
    ) -> Result<Self, FabricError> {
        let key = cluster_key(client).await?;
        let store = NetworkConfigStore::new(client.clone(), NAMESPACE)?;
        let config = FabricConfig {
            local,
            ipam: IpamConfig::default(),
            gateway,
        };
        Self::start(backend, store, config, key).await
    }
}
