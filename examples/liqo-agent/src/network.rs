//! The network fabric, driven by liqo-net's `NetworkController`: a WireGuard gateway (kernel or
//! userspace backend, optionally in another network namespace) or, for pod networks already
//! routed to each other, liqo-fabric-routed's `RoutedFabric` (`network.fabric`).

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use liqo_core::{FabricError, NetworkFabric, NetworkParameters};
use liqo_fabric_wireguard::{FabricConfig, GatewayConfig, WireGuardFabric};
use liqo_net::{IpamConfig, Netns, NetnsFabric, store::NetworkConfigStore};

use crate::config::{Backend, FabricKind, Validated};

/// Namespace of the fabric's Secret and IPAM store.
const NAMESPACE: &str = "liqo-system";
/// The Secret holding the gateway's WireGuard private key (stable across restarts).
const KEY_SECRET: &str = "liqo-wireguard-key";
const KEY_FIELD: &str = "privateKey";

/// The gateway's private key, made and stored on first start.
async fn private_key(
    client: &Client,
) -> Result<liqo_fabric_wireguard::wireguard_control::Key, FabricError> {
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
            return liqo_fabric_wireguard::parse_private_key(&value);
        }
        let key = liqo_fabric_wireguard::generate_private_key();
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

/// Starts the fabric the configuration describes (`network.fabric`).
pub async fn fabric(
    client: &Client,
    cfg: &Validated,
    local: NetworkParameters,
) -> Result<Arc<dyn NetworkFabric>, FabricError> {
    match cfg.raw.network.fabric {
        FabricKind::WireGuard => wireguard(client, cfg, local).await,
        FabricKind::Routed => Ok(Arc::new(liqo_fabric_routed::RoutedFabric::new(local))),
    }
}

/// Starts the WireGuard gateway the configuration describes (in `network.netns` if given).
async fn wireguard(
    client: &Client,
    cfg: &Validated,
    local: NetworkParameters,
) -> Result<Arc<dyn NetworkFabric>, FabricError> {
    let n = &cfg.raw.network;
    let key = private_key(client).await?;
    let mut gateway = GatewayConfig::new(&n.interface, n.listen_port);
    gateway.mtu = n.mtu;
    gateway.persistent_keepalive = (n.keepalive_seconds > 0).then_some(n.keepalive_seconds);
    gateway.resync =
        (n.resync_seconds > 0).then(|| std::time::Duration::from_secs(n.resync_seconds));
    let mut ipam = IpamConfig::default();
    if !cfg.pools.is_empty() {
        ipam.pools = cfg.pools.clone();
    }
    ipam.reserved.extend(cfg.reserved.iter().cloned());
    let config = FabricConfig {
        local,
        ipam,
        gateway,
    };
    let store = NetworkConfigStore::new(client.clone(), NAMESPACE)?;
    let netns = Netns::new(n.netns.as_deref())?;
    let fabric: Arc<dyn NetworkFabric> = match n.backend {
        Backend::Kernel => Arc::new(
            NetnsFabric::start(netns, move || {
                WireGuardFabric::start(liqo_wireguard_kernel::Kernel, store, config, key)
            })
            .await?,
        ),
        Backend::Userspace => {
            let implementation =
                liqo_wireguard_userspace::Implementation::from_name(&n.implementation)?;
            Arc::new(
                NetnsFabric::start(netns, move || {
                    WireGuardFabric::start(
                        liqo_wireguard_userspace::Userspace::new(implementation),
                        store,
                        config,
                        key,
                    )
                })
                .await?,
            )
        }
    };
    Ok(fabric)
}
