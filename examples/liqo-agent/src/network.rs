//! The network fabric, driven by liqo-net's `NetworkController`: a WireGuard gateway (kernel or
//! userspace backend, optionally in another network namespace) or, for pod networks already
//! routed to each other, liqo-fabric-routed's `RoutedFabric` (`network.fabric`).

use std::sync::Arc;

use kube::Client;
use liqo_core::{FabricError, NetworkFabric, NetworkParameters};
use liqo_fabric_wireguard::{FabricConfig, GatewayConfig, WireGuardFabric};
use liqo_net::{IpamConfig, Netns, NetnsFabric, store::NetworkConfigStore};

use crate::config::{Backend, FabricKind, Validated};

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
    let key = liqo_fabric_wireguard::cluster::cluster_key(client).await?;
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
    let store = NetworkConfigStore::new(client.clone(), liqo_fabric_wireguard::cluster::NAMESPACE)?;
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
