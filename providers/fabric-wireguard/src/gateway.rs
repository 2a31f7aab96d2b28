//! The gateway: one WireGuard interface with one peer per remote cluster, its routes, policy
//! rules and NAT, kept equal to a desired state.
//!
//! The gateway acts in the network namespace of the thread that runs it, as a real gateway
//! runs inside its own pod's namespace. Nothing here switches namespaces: an agent living in
//! another namespace runs the gateway through [`liqo_net::netns::Netns`] (a dedicated thread that
//! entered the gateway's namespace); the benchmarks start a gateway agent process inside each
//! namespace (`ip netns exec`).
//!
//! [`Gateway::apply`] converges everything from the desired state, so it is idempotent and is
//! also how the gateway recovers when a userspace daemon restarted with an empty interface.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use liqo_core::{Cidr, CidrMapping, ClusterId, FabricError, LinkState, LinkStatus, WireGuardKey};
use liqo_net::{
    nat::{NatPeer, NatTable},
    routes::{Netlink, RoutingConfig, enable_forwarding},
};
use tracing::{debug, info};
use wireguard_control::{Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder, PeerInfo};

use crate::backend::{WireGuardBackend, check_interface_name, public_key_of};

/// How a gateway is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The WireGuard interface name (at most 15 bytes). Userspace control sockets are shared
    /// by every namespace of the machine, so it must be unique machine-wide there.
    pub interface: String,
    /// The UDP port WireGuard listens on.
    pub listen_port: u16,
    /// The interface MTU (1420 fits WireGuard's overhead in a 1500-byte underlay).
    pub mtu: u16,
    /// Keepalive interval towards peers, in seconds; keeps NAT mappings of the underlay open
    /// and lets a restarted side handshake at once.
    pub persistent_keepalive: Option<u16>,
    /// Where routes and policy rules go.
    pub routing: RoutingConfig,
    /// The nftables table holding the NAT (family `inet`).
    pub nat_table: String,
    /// A link whose last handshake is older than this is reported disconnected (WireGuard
    /// rekeys every two minutes while traffic or keepalives flow).
    pub handshake_timeout: Duration,
    /// How often the interface, routes, rules and NAT are compared with what the gateway made,
    /// and made again if another program changed them (a firewall reload flushing nftables,
    /// a route cleanup); `None`: only on changes and backend restarts.
    pub resync: Option<Duration>,
}

impl GatewayConfig {
    /// Defaults for interface `interface` listening on `listen_port`: MTU 1420, keepalive
    /// 25 s, table `liqo-<interface>`, handshake timeout 180 s, resync every 30 s.
    pub fn new(interface: &str, listen_port: u16) -> Self {
        Self {
            interface: interface.to_owned(),
            listen_port,
            mtu: 1420,
            persistent_keepalive: Some(25),
            routing: RoutingConfig::default(),
            nat_table: format!("liqo-{interface}"),
            handshake_timeout: Duration::from_secs(180),
            resync: Some(Duration::from_secs(30)),
        }
    }

    fn validate(&self) -> Result<(InterfaceName, NatTable), FabricError> {
        let name = check_interface_name(&self.interface)?;
        if !(1280..=9000).contains(&self.mtu) {
            return Err(FabricError::InvalidConfig(format!(
                "MTU {} of interface {}: must be between 1280 and 9000",
                self.mtu, self.interface
            )));
        }
        if self.listen_port == 0 {
            return Err(FabricError::InvalidConfig(format!(
                "listen port of interface {}: 0 is not a port peers can reach",
                self.interface
            )));
        }
        if self.persistent_keepalive == Some(0) {
            return Err(FabricError::InvalidConfig(
                "persistent keepalive of 0 s: use None to disable it".into(),
            ));
        }
        if self.resync.is_some_and(|d| d.is_zero()) {
            return Err(FabricError::InvalidConfig(
                "resync interval of 0 s: use None to disable it".into(),
            ));
        }
        Ok((name, NatTable::new(&self.nat_table)?))
    }
}

/// One peer of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPeer {
    /// The remote cluster.
    pub cluster: ClusterId,
    /// Its gateway's public key.
    pub public_key: WireGuardKey,
    /// Its gateway's address, if known (a side without one waits for the peer to handshake).
    pub endpoint: Option<SocketAddr>,
    /// The ranges local pods use for it: its allowed-ips, routed into the tunnel.
    pub remote_ranges: Vec<Cidr>,
    /// Each local network and the range the peer knows it by (identity when not remapped).
    pub local_mappings: Vec<CidrMapping>,
}

/// A running gateway.
pub struct Gateway<B: WireGuardBackend> {
    backend: Arc<B>,
    config: GatewayConfig,
    iface: InterfaceName,
    key: Key,
    netlink: Netlink,
    nat: NatTable,
    /// The NAT table as `nft` listed it right after our last apply (`None`: no table).
    nat_seen: std::sync::Mutex<Option<String>>,
    peers: BTreeMap<ClusterId, GatewayPeer>,
}

impl<B: WireGuardBackend> std::fmt::Debug for Gateway<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("backend", &self.backend.name())
            .field("config", &self.config)
            .field("public_key", &public_key_of(&self.key))
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

fn wg_err(backend: &str, action: impl std::fmt::Display, e: impl std::fmt::Display) -> FabricError {
    FabricError::Backend {
        backend: backend.to_owned(),
        message: format!("{action}: {e}"),
    }
}

fn allowed(c: &Cidr) -> (IpAddr, u8) {
    (c.net().network(), c.prefix_len())
}

/// How long a start over an earlier run's leftovers retries its first configuration.
const LEFTOVER_GRACE: Duration = Duration::from_secs(10);

impl<B: WireGuardBackend> Gateway<B> {
    /// Creates the interface with `private_key` and brings it up. On failure nothing is left
    /// behind.
    pub async fn start(
        backend: Arc<B>,
        config: GatewayConfig,
        private_key: Key,
    ) -> Result<Self, FabricError> {
        let (iface, nat) = config.validate()?;
        let gw = Self {
            netlink: Netlink::connect()?,
            backend,
            config,
            iface,
            key: private_key,
            nat,
            nat_seen: std::sync::Mutex::new(None),
            peers: BTreeMap::new(),
        };
        let leftovers = gw.leftovers().await?;
        let mut first = gw.apply().await;
        // A killed predecessor's daemon may still be closing its UDP port and TUN: its
        // environment and command line leave /proc before its sockets close, so the backend
        // cannot always find it to wait for it. Retry for a while before giving up.
        let deadline = tokio::time::Instant::now() + LEFTOVER_GRACE;
        let mut pause = Duration::from_millis(100);
        while !leftovers.is_empty() && tokio::time::Instant::now() < deadline {
            let Err(e) = &first else { break };
            debug!(error = %e, "configuring over an earlier run's leftovers failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            first = gw.apply().await;
        }
        if let Err(e) = first {
            if let Err(cleanup) = gw.teardown().await {
                debug!(error = %cleanup, "cleanup after a failed start");
            }
            return Err(e);
        }
        if !leftovers.is_empty() {
            info!(
                interface = %gw.config.interface,
                "gateway {}: an earlier run left state behind; {}",
                gw.config.interface,
                leftovers.join("; ")
            );
        }
        Ok(gw)
    }

    /// Clears or notes what an earlier run left (it crashed or was killed): the backend
    /// replaces a daemon of that run; an interface, routes, rules and the NAT table that are
    /// still there are reused and made again by the first [`apply`](Self::apply), which,
    /// with no peers yet, empties them until peers reconnect. Says what it found.
    async fn leftovers(&self) -> Result<Vec<String>, FabricError> {
        let iface = &self.config.interface;
        let mut found = self.backend.clear_leftovers(iface).await?;
        if self.netlink.link_index(iface).await?.is_some() {
            found.push(format!("reused interface {iface}"));
        }
        let cfg = &self.config.routing;
        let (routes, rules) = (
            self.netlink.routes(cfg).await?.len(),
            self.netlink.rules(cfg).await?.len(),
        );
        let mut cleared = Vec::new();
        if routes > 0 {
            cleared.push(format!("{routes} routes in table {}", cfg.table));
        }
        if rules > 0 {
            cleared.push(format!("{rules} policy rules"));
        }
        if self.nat.exists().await? {
            cleared.push(format!("nftables table inet {}", self.nat.name()));
        }
        if !cleared.is_empty() {
            found.push(format!(
                "replaced {} (made again as peers reconnect)",
                cleared.join(", ")
            ));
        }
        Ok(found)
    }

    /// The configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The public key peers must be given.
    pub fn public_key(&self) -> WireGuardKey {
        public_key_of(&self.key)
    }

    /// The peers.
    pub fn peers(&self) -> impl Iterator<Item = &GatewayPeer> {
        self.peers.values()
    }

    /// Adds or changes a peer and applies. A peer whose ranges overlap another peer's, or
    /// whose key is this gateway's own, is refused; if applying fails the previous state is
    /// restored.
    pub async fn set_peer(&mut self, peer: GatewayPeer) -> Result<(), FabricError> {
        if peer.public_key == self.public_key() {
            return Err(FabricError::InvalidConfig(format!(
                "cluster {} announces this gateway's own public key",
                peer.cluster
            )));
        }
        for other in self.peers.values().filter(|o| o.cluster != peer.cluster) {
            if other.public_key == peer.public_key {
                return Err(FabricError::InvalidConfig(format!(
                    "clusters {} and {} announce the same WireGuard key",
                    other.cluster, peer.cluster
                )));
            }
            for r in &peer.remote_ranges {
                if let Some(o) = other.remote_ranges.iter().find(|o| o.overlaps(r)) {
                    return Err(FabricError::InvalidConfig(format!(
                        "range {r} of cluster {} overlaps range {o} of cluster {}",
                        peer.cluster, other.cluster
                    )));
                }
            }
        }
        let previous = self.peers.insert(peer.cluster.clone(), peer.clone());
        if let Err(e) = self.apply().await {
            match previous {
                Some(p) => self.peers.insert(p.cluster.clone(), p),
                None => self.peers.remove(&peer.cluster),
            };
            if let Err(again) = self.apply().await {
                debug!(error = %again, "restoring the previous gateway state");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Removes a peer (its WireGuard peer, routes, rules and NAT rules). Returns whether it
    /// was there.
    pub async fn remove_peer(&mut self, cluster: &ClusterId) -> Result<bool, FabricError> {
        let Some(old) = self.peers.remove(cluster) else {
            return Ok(false);
        };
        if let Err(e) = self.apply().await {
            self.peers.insert(cluster.clone(), old);
            return Err(e);
        }
        Ok(true)
    }

    fn ranges(&self) -> Vec<Cidr> {
        self.peers
            .values()
            .flat_map(|p| p.remote_ranges.iter().copied())
            .collect()
    }

    fn nat_peers(&self) -> Vec<NatPeer> {
        self.peers
            .values()
            .map(|p| NatPeer {
                cluster: p.cluster.clone(),
                interface: self.config.interface.clone(),
                remote_ranges: p.remote_ranges.clone(),
                local: p.local_mappings.clone(),
            })
            .collect()
    }

    async fn device(&self) -> Result<Device, FabricError> {
        let (iface, control) = (self.iface, self.backend.control());
        tokio::task::spawn_blocking(move || Device::get(&iface, control))
            .await
            .map_err(|e| FabricError::Other(e.into()))?
            .map_err(|e| {
                wg_err(
                    self.backend.name(),
                    format_args!("reading interface {}", self.config.interface),
                    e,
                )
            })
    }

    fn diff(&self, dev: &Device, roaming: bool) -> Option<DeviceUpdate> {
        let have = (
            dev.public_key.as_ref(),
            dev.listen_port,
            dev.peers.as_slice(),
        );
        device_update(&self.key, &self.config, &self.peers, have, roaming)
    }

    /// Makes interface, WireGuard peers, routes, rules and NAT match the desired state.
    /// Idempotent; changes only what differs.
    pub async fn apply(&self) -> Result<(), FabricError> {
        let name = self.backend.name().to_owned();
        self.backend.create(&self.config.interface).await?;
        let dev = self.device().await?;
        if let Some(update) = self.diff(&dev, false) {
            let (iface, control) = (self.iface, self.backend.control());
            tokio::task::spawn_blocking(move || update.apply(&iface, control))
                .await
                .map_err(|e| FabricError::Other(e.into()))?
                .map_err(|e| {
                    wg_err(
                        &name,
                        format_args!("configuring interface {}", self.config.interface),
                        e,
                    )
                })?;
        }
        let index = self
            .netlink
            .link_index(&self.config.interface)
            .await?
            .ok_or_else(|| {
                wg_err(
                    &name,
                    format_args!("interface {}", self.config.interface),
                    "vanished after it was created",
                )
            })?;
        let mtu = u32::from(self.config.mtu);
        if self.netlink.link_state(index).await? != Some((mtu, true)) {
            self.netlink.set_up(index, mtu).await?;
        }
        let ranges = self.ranges();
        enable_forwarding(ranges.iter().any(|r| !r.net().addr().is_ipv4())).await?;
        self.netlink
            .sync_routes(&self.config.routing, index, &ranges)
            .await?;
        self.netlink
            .sync_rules(&self.config.routing, &ranges)
            .await?;
        self.nat.apply(&self.nat_peers()).await?;
        let seen = self.nat.listing().await?;
        *self.nat_seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        Ok(())
    }

    /// What of the gateway's state is no longer as [`apply`](Self::apply) made it: another
    /// program flushed the NAT table, deleted a route or rule, or reconfigured the interface.
    /// Empty when intact. Only reads.
    pub async fn drift(&self) -> Result<Vec<&'static str>, FabricError> {
        let Some(index) = self.netlink.link_index(&self.config.interface).await? else {
            return Ok(vec!["interface"]);
        };
        let mut drifted = Vec::new();
        if self.netlink.link_state(index).await? != Some((u32::from(self.config.mtu), true)) {
            drifted.push("interface state");
        }
        // An interface that cannot be read (its daemon restarting) counts as changed.
        if self
            .device()
            .await
            .map_or(true, |dev| self.diff(&dev, true).is_some())
        {
            drifted.push("WireGuard configuration");
        }
        let ranges: BTreeSet<Cidr> = self.ranges().into_iter().collect();
        let cfg = &self.config.routing;
        for (what, ours) in [
            ("routes", self.netlink.routes(cfg).await?),
            ("policy rules", self.netlink.rules(cfg).await?),
        ] {
            if ours.into_iter().collect::<BTreeSet<_>>() != ranges {
                drifted.push(what);
            }
        }
        let seen = self
            .nat_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if self.nat.listing().await? != seen {
            drifted.push("NAT");
        }
        Ok(drifted)
    }

    /// The link to `cluster` as the WireGuard interface reports it.
    pub async fn peer_status(&self, cluster: &ClusterId) -> Result<LinkStatus, FabricError> {
        let peer = self
            .peers
            .get(cluster)
            .ok_or_else(|| FabricError::NotConnected(cluster.clone()))?;
        let dev = self.device().await?;
        let key = Key(*peer.public_key.as_bytes());
        let Some(info) = dev.peers.iter().find(|p| p.config.public_key == key) else {
            return Ok(LinkStatus {
                state: LinkState::Disconnected,
                latest_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                message: format!(
                    "peer missing from interface {} (being reconfigured)",
                    self.config.interface
                ),
            });
        };
        let latest = self
            .backend
            .handshake_time(info.stats.last_handshake_time, info.stats.rx_bytes);
        Ok(liqo_net::checker::link_status(
            latest,
            info.stats.rx_bytes,
            info.stats.tx_bytes,
            SystemTime::now(),
            self.config.handshake_timeout,
        ))
    }

    async fn teardown(&self) -> Result<(), FabricError> {
        let mut errors = Vec::new();
        if let Err(e) = self.nat.remove().await {
            errors.push(e.to_string());
        }
        if let Err(e) = self.netlink.clear(&self.config.routing).await {
            errors.push(e.to_string());
        }
        if let Err(e) = self.backend.remove(&self.config.interface).await {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(FabricError::Backend {
                backend: self.backend.name().to_owned(),
                message: format!(
                    "tearing down gateway {}: {}",
                    self.config.interface,
                    errors.join("; ")
                ),
            })
        }
    }

    /// Removes everything the gateway made: NAT table, policy rules, routes, the interface
    /// (and a userspace daemon with its socket). Every step is attempted; idempotent.
    pub async fn stop(&self) -> Result<(), FabricError> {
        self.teardown().await
    }
}

/// The WireGuard changes that make a device with public key, listen port and peers `have`
/// match `key`, `config` and `peers`, or `None` if it does. With `roaming`, a peer's endpoint that differs from the configured one is left alone:
/// WireGuard moves it to wherever the peer's packets come from (a NAT in front of the peer),
/// and re-adding the peer would drop its session.
fn device_update(
    key: &Key,
    config: &GatewayConfig,
    peers: &BTreeMap<ClusterId, GatewayPeer>,
    have: (Option<&Key>, Option<u16>, &[PeerInfo]),
    roaming: bool,
) -> Option<DeviceUpdate> {
    let (public_key, listen_port, actual_peers) = have;
    let mut update = DeviceUpdate::new();
    let mut changed = false;
    if public_key != Some(&key.get_public()) {
        update = update.set_private_key(key.clone());
        changed = true;
    }
    if listen_port != Some(config.listen_port) {
        update = update.set_listen_port(config.listen_port);
        changed = true;
    }
    let desired: BTreeMap<[u8; 32], &GatewayPeer> = peers
        .values()
        .map(|p| (*p.public_key.as_bytes(), p))
        .collect();
    for actual in actual_peers {
        if !desired.contains_key(&actual.config.public_key.0) {
            update = update.remove_peer_by_key(&actual.config.public_key);
            changed = true;
        }
    }
    let keepalive = config.persistent_keepalive.unwrap_or(0);
    for (bytes, p) in desired {
        let key = Key(bytes);
        let mut want: Vec<(IpAddr, u8)> = p.remote_ranges.iter().map(allowed).collect();
        want.sort();
        let actual = actual_peers.iter().find(|a| a.config.public_key == key);
        let same = actual.is_some_and(|a| {
            let mut have: Vec<(IpAddr, u8)> = a
                .config
                .allowed_ips
                .iter()
                .map(|ip| (ip.address, ip.cidr))
                .collect();
            have.sort();
            have == want
                && a.config.persistent_keepalive_interval.unwrap_or(0) == keepalive
                && (p.endpoint.is_none()
                    || a.config.endpoint == p.endpoint
                    || (roaming && a.config.endpoint.is_some()))
        });
        if same {
            continue;
        }
        if actual.is_some() {
            // Remove and re-add in one transaction: boringtun cannot modify a peer.
            update = update.remove_peer_by_key(&key);
        }
        let mut b = PeerConfigBuilder::new(&key).replace_allowed_ips();
        for (addr, len) in &want {
            b = b.add_allowed_ip(*addr, *len);
        }
        if let Some(ep) = p.endpoint {
            b = b.set_endpoint(ep);
        }
        if keepalive > 0 {
            b = b.set_persistent_keepalive_interval(keepalive);
        }
        update = update.add_peer(b);
        changed = true;
    }
    changed.then_some(update)
}

#[cfg(test)]
mod tests {
    use wireguard_control::AllowedIp;

    use super::*;

    fn peer(key: &Key, endpoint: &str, range: &str) -> GatewayPeer {
        GatewayPeer {
            cluster: "milan".parse().unwrap(),
            public_key: public_key_of(key),
            endpoint: Some(endpoint.parse().unwrap()),
            remote_ranges: vec![range.parse().unwrap()],
            local_mappings: vec![],
        }
    }

    /// The peers of a device as `apply` leaves them for `config` and `p`, WireGuard having
    /// moved the peer's endpoint to `seen_at`.
    fn device_peers(config: &GatewayConfig, p: &GatewayPeer, seen_at: &str) -> Vec<PeerInfo> {
        let r = p.remote_ranges[0];
        let mut info = PeerInfo::from_public_key(Key(*p.public_key.as_bytes()));
        info.config.endpoint = Some(seen_at.parse().unwrap());
        info.config.persistent_keepalive_interval = config.persistent_keepalive;
        info.config.allowed_ips = vec![AllowedIp {
            address: r.net().network(),
            cidr: r.prefix_len(),
        }];
        vec![info]
    }

    #[test]
    fn a_roamed_endpoint_is_not_drift_but_other_changes_are() {
        let (own, theirs) = (Key::generate_private(), Key::generate_private());
        let public = own.get_public();
        let config = GatewayConfig::new("liqo-test", 51820);
        let p = peer(&theirs, "192.0.2.1:51820", "10.70.0.0/16");
        let peers = BTreeMap::from([(p.cluster.clone(), p.clone())]);
        let check = |port: u16, have: &[PeerInfo], roaming| {
            device_update(
                &own,
                &config,
                &peers,
                (Some(&public), Some(port), have),
                roaming,
            )
            .is_some()
        };

        let same = device_peers(&config, &p, "192.0.2.1:51820");
        assert!(
            !check(51820, &same, false) && !check(51820, &same, true),
            "as applied"
        );

        // The peer's packets came from another address (a NAT in front of it).
        let roamed = device_peers(&config, &p, "198.51.100.7:40001");
        assert!(
            check(51820, &roamed, false),
            "applying a new config sets the endpoint"
        );
        assert!(
            !check(51820, &roamed, true),
            "the drift check leaves roaming alone"
        );

        let mut narrowed = same.clone();
        narrowed[0].config.allowed_ips[0].cidr = 24;
        assert!(
            check(51820, &narrowed, true),
            "changed allowed-ips are drift"
        );

        let mut extra = same.clone();
        extra.push(PeerInfo::from_public_key(
            Key::generate_private().get_public(),
        ));
        assert!(check(51820, &extra, true), "a peer we did not add is drift");

        assert!(check(51821, &same, true), "another listen port is drift");
    }
}
