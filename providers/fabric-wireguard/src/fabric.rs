//! [`WireGuardFabric`]: the [`NetworkFabric`] built from IPAM, a gateway and a store, generic
//! over the WireGuard backend.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use async_trait::async_trait;
use liqo_core::{
    CidrMapping, ClusterId, FabricError, LinkStatus, NetworkFabric, NetworkParameters, PeerLink,
    TunnelInfo,
};
use liqo_net::{
    checker::{LinkChecker, LinkSource},
    ipam::{Allocation, Ipam, IpamConfig},
    store::AllocationStore,
};
use tokio::{sync::Mutex, task::JoinHandle};
use tracing::{info, warn};
use wireguard_control::Key;

use crate::{
    backend::WireGuardBackend,
    gateway::{Gateway, GatewayConfig, GatewayPeer},
};

/// Everything a [`WireGuardFabric`] needs to know about this cluster.
#[derive(Debug, Clone)]
pub struct FabricConfig {
    /// This cluster's networks; `gateway_endpoint` is what peers are told to connect to
    /// (`host:port`), `wireguard_public_key` is filled in from the private key.
    pub local: NetworkParameters,
    /// Remapping pools and reserved subnets.
    pub ipam: IpamConfig,
    /// The gateway interface.
    pub gateway: GatewayConfig,
}

struct Inner<B: WireGuardBackend> {
    /// Set by `shutdown`: the gateway is gone and must not be recreated.
    stopped: bool,
    ipam: Ipam,
    gateway: Gateway<B>,
    /// What each peer told us about how it addresses our networks.
    learned: BTreeMap<ClusterId, Vec<CidrMapping>>,
}

/// A network fabric over one WireGuard gateway.
///
/// `connect` allocates ranges for the peer's networks (kept when free, remapped otherwise,
/// persisted in the store), adds the peer to the gateway with those ranges as allowed-ips,
/// routes them into the tunnel and installs the NAT; `disconnect` removes exactly that.
///
/// Traffic in the tunnel uses per-peer remapped ranges (see [`liqo_net::nat`]), so each side must
/// learn how the other addresses it: hand the peer's [`PeerLink::remote_mappings`] to
/// [`set_local_mappings`](Self::set_local_mappings); the
/// [`NetworkController`](liqo_net::NetworkController) does so from the view the peer publishes.
/// Until then the fabric assumes the peer kept this cluster's CIDRs, which is right whenever
/// they did not clash on its side.
pub struct WireGuardFabric<B: WireGuardBackend, S: AllocationStore> {
    inner: Arc<Mutex<Inner<B>>>,
    store: S,
    local: NetworkParameters,
    public_key: liqo_core::WireGuardKey,
    info: TunnelInfo,
    watcher: JoinHandle<()>,
}

impl<B: WireGuardBackend, S: AllocationStore> std::fmt::Debug for WireGuardFabric<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireGuardFabric")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// The `Tunnel` backend kind of a [`WireGuardBackend::name`].
fn backend_kind(name: &str) -> liqo_core::crds::WireGuardBackend {
    use liqo_core::crds::WireGuardBackend as K;
    match name {
        "wireguard-go" => K::WireGuardGo,
        "boringtun" => K::Boringtun,
        _ => K::Kernel,
    }
}

/// Resolves a `host:port` endpoint (a name is looked up once, at connect time).
pub async fn resolve_endpoint(cluster: &ClusterId, s: &str) -> Result<SocketAddr, FabricError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = |why: String| {
        FabricError::InvalidConfig(format!(
            "gateway endpoint {s:?} of cluster {cluster}: {why}"
        ))
    };
    if !s.contains(':') {
        return Err(bad("expected host:port".into()));
    }
    tokio::net::lookup_host(s)
        .await
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("the name has no address".into()))
}

impl<B: WireGuardBackend, S: AllocationStore> WireGuardFabric<B, S> {
    /// Starts the gateway with `private_key` and reloads the allocations persisted in
    /// `store` (a restart keeps every range). On failure nothing is left behind.
    pub async fn start(
        backend: B,
        store: S,
        config: FabricConfig,
        private_key: Key,
    ) -> Result<Self, FabricError> {
        let mut ipam = Ipam::new(&config.local, config.ipam)?;
        ipam.restore(store.load().await?)?;
        let backend = Arc::new(backend);
        let gateway_config = config.gateway.clone();
        let gateway = Gateway::start(backend.clone(), config.gateway, private_key).await?;
        let public_key = gateway.public_key();
        let info = TunnelInfo {
            interface: gateway_config.interface.clone(),
            backend: backend_kind(backend.name()),
            public_key,
            mtu: gateway_config.mtu,
            persistent_keepalive: gateway_config.persistent_keepalive,
        };
        let mut local = config.local;
        local.wireguard_public_key = Some(public_key);
        let inner = Arc::new(Mutex::new(Inner {
            stopped: false,
            ipam,
            gateway,
            learned: BTreeMap::new(),
        }));
        // A daemon that restarted came back with an empty interface: configure it again. And
        // every `resync`, compare the interface, routes, rules and NAT with what we made and
        // make them again if another program changed them.
        let mut restarts = backend.restarts();
        let weak = Arc::downgrade(&inner);
        let mut resync = gateway_config.resync.map(|every| {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        let watcher = tokio::spawn(async move {
            // A backend that never recreates interfaces drops its sender at once.
            let mut restarts_open = true;
            loop {
                if !restarts_open && resync.is_none() {
                    return;
                }
                let restarted = tokio::select! {
                    changed = restarts.changed(), if restarts_open => {
                        if changed.is_err() {
                            restarts_open = false;
                            continue;
                        }
                        true
                    }
                    () = next_tick(resync.as_mut()) => false,
                };
                let Some(inner) = weak.upgrade() else { return };
                let inner = inner.lock().await;
                if inner.stopped {
                    return;
                }
                let interface = &inner.gateway.config().interface;
                if !restarted {
                    match inner.gateway.drift().await {
                        Ok(drifted) if drifted.is_empty() => continue,
                        Ok(drifted) => warn!(
                            %interface, ?drifted,
                            "gateway state changed by another program; making it again"
                        ),
                        Err(e) => {
                            warn!(%interface, error = %e, "checking the gateway state failed");
                            continue;
                        }
                    }
                }
                match inner.gateway.apply().await {
                    Ok(()) if restarted => info!(
                        %interface,
                        "WireGuard interface recreated by its backend; configuration reapplied"
                    ),
                    Ok(()) => info!(%interface, "gateway state made again"),
                    Err(e) => warn!(%interface, error = %e, "reapplying the gateway state failed"),
                }
            }
        });
        Ok(Self {
            inner,
            store,
            local,
            public_key,
            info,
            watcher,
        })
    }

    /// This gateway's public key.
    pub fn public_key(&self) -> liqo_core::WireGuardKey {
        self.public_key
    }

    /// The clusters currently connected.
    pub async fn peers(&self) -> Vec<ClusterId> {
        self.inner
            .lock()
            .await
            .gateway
            .peers()
            .map(|p| p.cluster.clone())
            .collect()
    }

    /// The allocation made for `cluster`, if any.
    pub async fn allocation(&self, cluster: &ClusterId) -> Option<Allocation> {
        self.inner.lock().await.ipam.get(cluster).cloned()
    }

    /// Records how `cluster` addresses this cluster's networks (the peer's own
    /// `PeerLink::remote_mappings` for us) and, if connected, applies it. Each mapping must be
    /// about one of this cluster's pod or external CIDRs.
    pub async fn set_local_mappings(
        &self,
        cluster: &ClusterId,
        mappings: Vec<CidrMapping>,
    ) -> Result<Option<PeerLink>, FabricError> {
        let ours: Vec<_> = std::iter::once(self.local.pod_cidr)
            .chain(self.local.external_cidr)
            .collect();
        for m in &mappings {
            CidrMapping::new(m.real, m.remapped)?;
            if !ours.contains(&m.real) {
                return Err(FabricError::InvalidConfig(format!(
                    "cluster {cluster} maps {} which is not a pod or external CIDR of this cluster",
                    m.real
                )));
            }
        }
        let mut guard = self.inner.lock().await;
        let inner = guard.running()?;
        let previous = inner.learned.insert(cluster.clone(), mappings);
        let Some(mut peer) = inner
            .gateway
            .peers()
            .find(|p| &p.cluster == cluster)
            .cloned()
        else {
            return Ok(None);
        };
        peer.local_mappings = self.local_mappings(inner, cluster);
        if let Err(e) = inner.gateway.set_peer(peer).await {
            match previous {
                Some(p) => inner.learned.insert(cluster.clone(), p),
                None => inner.learned.remove(cluster),
            };
            return Err(e);
        }
        Ok(Some(self.link(inner, cluster)))
    }

    fn local_mappings(&self, inner: &Inner<B>, cluster: &ClusterId) -> Vec<CidrMapping> {
        let learned = inner.learned.get(cluster);
        std::iter::once(self.local.pod_cidr)
            .chain(self.local.external_cidr)
            .map(|real| {
                learned
                    .and_then(|l| l.iter().find(|m| m.real == real).copied())
                    .unwrap_or(CidrMapping::identity(real))
            })
            .collect()
    }

    fn link(&self, inner: &Inner<B>, cluster: &ClusterId) -> PeerLink {
        PeerLink {
            cluster: cluster.clone(),
            remote_mappings: inner
                .ipam
                .get(cluster)
                .map(Allocation::mappings)
                .unwrap_or_default(),
            local_mappings: inner.learned.get(cluster).cloned().unwrap_or_default(),
        }
    }

    /// Starts a [`LinkChecker`] over this fabric's links.
    pub fn link_checker(self: &Arc<Self>, interval: Duration) -> LinkChecker {
        LinkChecker::spawn(self.clone(), interval)
    }

    /// Removes the gateway and everything it made (interface, daemon, NAT, routes, rules);
    /// afterwards every operation fails. Allocations stay in the store, so a fabric started
    /// again over it gives every peer the same ranges. Idempotent.
    pub async fn shutdown(&self) -> Result<(), FabricError> {
        self.watcher.abort();
        let mut inner = self.inner.lock().await;
        inner.stopped = true;
        inner.gateway.stop().await
    }
}

impl<B: WireGuardBackend> Inner<B> {
    fn running(&mut self) -> Result<&mut Self, FabricError> {
        if self.stopped {
            return Err(FabricError::Backend {
                backend: self.gateway.backend().name().to_owned(),
                message: format!("gateway {} was shut down", self.gateway.config().interface),
            });
        }
        Ok(self)
    }
}

#[async_trait]
impl<B: WireGuardBackend, S: AllocationStore> NetworkFabric for WireGuardFabric<B, S> {
    async fn local_parameters(&self) -> Result<NetworkParameters, FabricError> {
        Ok(self.local.clone())
    }

    async fn connect(
        &self,
        remote: &ClusterId,
        params: &NetworkParameters,
    ) -> Result<PeerLink, FabricError> {
        let public_key = params.wireguard_public_key.ok_or_else(|| {
            FabricError::InvalidConfig(format!(
                "cluster {remote} sent no WireGuard public key in its network parameters"
            ))
        })?;
        if public_key == self.public_key() {
            return Err(FabricError::InvalidConfig(format!(
                "cluster {remote} announces this gateway's own public key"
            )));
        }
        let endpoint = match &params.gateway_endpoint {
            Some(e) => Some(resolve_endpoint(remote, e).await?),
            None => None,
        };
        let mut guard = self.inner.lock().await;
        let inner = guard.running()?;
        let before = inner.ipam.clone();
        let allocation = inner.ipam.allocate(remote, params)?;
        let peer = GatewayPeer {
            cluster: remote.clone(),
            public_key,
            endpoint,
            remote_ranges: allocation.remapped(),
            local_mappings: self.local_mappings(inner, remote),
        };
        let previous_peer = inner
            .gateway
            .peers()
            .find(|p| &p.cluster == remote)
            .cloned();
        if let Err(e) = inner.gateway.set_peer(peer).await {
            inner.ipam = before;
            return Err(e);
        }
        if before.get(remote) != Some(&allocation)
            && let Err(e) = self.store.save(&allocation).await
        {
            // Roll back so nothing unpersisted stays in use.
            let undo = match previous_peer {
                Some(p) => inner.gateway.set_peer(p).await,
                None => inner.gateway.remove_peer(remote).await.map(|_| ()),
            };
            if let Err(u) = undo {
                warn!(error = %u, cluster = %remote, "rolling back the gateway peer");
            }
            inner.ipam = before;
            return Err(e);
        }
        info!(cluster = %remote, ranges = ?allocation.remapped(), "peer connected");
        Ok(self.link(inner, remote))
    }

    async fn disconnect(&self, remote: &ClusterId) -> Result<(), FabricError> {
        let mut guard = self.inner.lock().await;
        let inner = guard.running()?;
        inner.gateway.remove_peer(remote).await?;
        if inner.ipam.get(remote).is_some() {
            self.store.remove(remote).await?;
            inner.ipam.release(remote);
        }
        inner.learned.remove(remote);
        Ok(())
    }

    async fn status(&self, remote: &ClusterId) -> Result<LinkStatus, FabricError> {
        self.inner
            .lock()
            .await
            .running()?
            .gateway
            .peer_status(remote)
            .await
    }

    /// Every link's status under one lock, read once from the gateway.
    async fn link_statuses(
        &self,
        peers: &[ClusterId],
    ) -> Result<BTreeMap<ClusterId, LinkStatus>, FabricError> {
        let mut all = LinkSource::link_statuses(self).await?;
        all.retain(|c, _| peers.contains(c));
        Ok(all)
    }

    async fn set_local_mappings(
        &self,
        cluster: &ClusterId,
        mappings: Vec<CidrMapping>,
    ) -> Result<Option<PeerLink>, FabricError> {
        WireGuardFabric::set_local_mappings(self, cluster, mappings).await
    }

    fn tunnel_info(&self) -> Option<TunnelInfo> {
        Some(self.info.clone())
    }

    async fn shutdown(&self) -> Result<(), FabricError> {
        WireGuardFabric::shutdown(self).await
    }
}

#[async_trait]
impl<B: WireGuardBackend, S: AllocationStore> LinkSource for WireGuardFabric<B, S> {
    async fn link_statuses(&self) -> Result<BTreeMap<ClusterId, LinkStatus>, FabricError> {
        let mut guard = self.inner.lock().await;
        let inner = guard.running()?;
        let mut out = BTreeMap::new();
        let clusters: Vec<ClusterId> = inner.gateway.peers().map(|p| p.cluster.clone()).collect();
        for c in clusters {
            let s = inner.gateway.peer_status(&c).await?;
            out.insert(c, s);
        }
        Ok(out)
    }
}

/// The next tick of an optional interval; never, without one.
async fn next_tick(tick: Option<&mut tokio::time::Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}
