//! # liqo-discovery-mdns
//!
//! Discovery on the local network with multicast DNS (DNS-SD over mDNS, RFC 6762/6763), through
//! the [`mdns-sd`](mdns_sd) crate; interoperable with avahi and Bonjour.
//!
//! A cluster is published as an instance of [`DEFAULT_SERVICE_TYPE`] (`_liqo._tcp.local.`)
//! named after its cluster id, on host `<cluster-id>.local.` with the addresses of the selected
//! interfaces, the port of its peering endpoint, and the [discovery record](liqo_discovery::record)
//! as TXT (`v`, `id`, `name`, `ep`, `fp`). Browsing reports every instance of that type:
//!
//! - the TXT `ep` is the peering endpoint; an instance without one (say, published with
//!   `avahi-publish -s rome _liqo._tcp 8443 v=1 id=rome`) gets `https://<address>:<port>` from
//!   its resolved address and SRV port;
//! - a malformed TXT record is an `Err` item, and the instance is dropped;
//! - instances claiming the same cluster id are resolved by [`liqo_discovery::claims`];
//! - records expire by their TTL (mdns-sd's cache: 120 s for SRV and addresses, refreshed by
//!   queries at 80 % of it), or at once when the publisher says goodbye (graceful stop);
//!   [`MdnsDiscovery::verify`] asks the network right away (RFC 6762 §10.4), for a caller that
//!   has reason to think a peer is gone (its endpoint stopped answering);
//! - this cluster's own instance, echoed back, is skipped.
//!
//! [`MdnsConfig::interfaces`] restricts both announcing and browsing to some interfaces (by name
//! or address); by default all multicast-capable interfaces are used.
//!
//! The `liqo-mdns` binary of this crate advertises and/or browses from the command line and
//! prints events as JSON lines: a diagnostic tool, also used by this crate's tests to run a peer
//! inside a network namespace.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use liqo_core::{
    ClusterId, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream,
    PeerAdvertisement,
};
use liqo_discovery::{
    InstanceTable,
    record::{DiscoveryRecord, endpoint_url},
};
use mdns_sd::{IfKind, ResolvedService, ServiceDaemon, ServiceEvent, ServiceInfo};
use tracing::{debug, info, warn};

/// The service type clusters are published as.
pub const DEFAULT_SERVICE_TYPE: &str = "_liqo._tcp.local.";

/// The TTL mdns-sd gives SRV and address records (RFC 6762's recommendation for host records):
/// a peer that vanishes without a goodbye is dropped at most this long after its last answer.
pub const RECORD_TTL: Duration = Duration::from_secs(120);

/// How long [`MdnsDiscovery::verify`] waits for an answer by default (RFC 6762 §10.4 allows the
/// querier to flush after about 10 s; on a LAN an answer comes in milliseconds).
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the mDNS provider.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MdnsError {
    /// The mDNS daemon could not start or refused a command.
    #[error("mDNS daemon: {0}")]
    Daemon(#[from] mdns_sd::Error),
    /// The advertisement cannot be published as given.
    #[error("cannot advertise: {0}")]
    Advertisement(String),
}

impl From<MdnsError> for DiscoveryError {
    fn from(e: MdnsError) -> Self {
        DiscoveryError::Unavailable {
            source_name: "mDNS".into(),
            message: e.to_string(),
        }
    }
}

/// An interface to announce and browse on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interface {
    /// By name, e.g. `eth0`.
    Name(String),
    /// The interface holding this address.
    Addr(IpAddr),
}

impl From<&str> for Interface {
    /// An address if it parses as one, else a name.
    fn from(s: &str) -> Self {
        s.parse()
            .map(Interface::Addr)
            .unwrap_or_else(|_| Interface::Name(s.to_owned()))
    }
}

impl Interface {
    fn kind(&self) -> IfKind {
        match self {
            Interface::Name(n) => IfKind::Name(n.clone()),
            Interface::Addr(a) => IfKind::Addr(*a),
        }
    }
}

/// How to run mDNS.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MdnsConfig {
    /// The service type, [`DEFAULT_SERVICE_TYPE`] by default.
    pub service_type: String,
    /// The interfaces to use; empty for all of them.
    pub interfaces: Vec<Interface>,
    /// The UDP port (5353, the mDNS port, unless testing).
    pub port: u16,
    /// Default timeout of [`MdnsDiscovery::verify`].
    pub verify_timeout: Duration,
}

impl Default for MdnsConfig {
    fn default() -> Self {
        Self {
            service_type: DEFAULT_SERVICE_TYPE.into(),
            interfaces: vec![],
            port: mdns_sd::MDNS_PORT,
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
        }
    }
}

impl MdnsConfig {
    /// Uses only these interfaces.
    #[must_use]
    pub fn interfaces(mut self, interfaces: impl IntoIterator<Item = Interface>) -> Self {
        self.interfaces = interfaces.into_iter().collect();
        self
    }

    /// Sets the service type (must end in `._tcp.local.` or `._udp.local.`).
    #[must_use]
    pub fn service_type(mut self, service_type: impl Into<String>) -> Self {
        self.service_type = service_type.into();
        self
    }
}

/// Discovery over mDNS; see the [crate documentation](crate).
///
/// Dropping it (the last clone) unregisters this cluster's instance, sending goodbye packets so
/// peers drop it at once, and stops the mDNS daemon.
#[derive(Clone)]
pub struct MdnsDiscovery {
    inner: Arc<Inner>,
}

struct Inner {
    daemon: ServiceDaemon,
    config: MdnsConfig,
    /// The full name of our own instance, once advertised.
    advertised: Mutex<Option<String>>,
    /// What the current watch knows, shared so that `verify` can find instances.
    table: Arc<Mutex<InstanceTable>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The daemon runs its commands in order: the goodbye packets of the unregistration go
        // out before it stops.
        if let Some(name) = lock(&self.advertised).take() {
            let _ = self.daemon.unregister(&name);
        }
        let _ = self.daemon.shutdown();
    }
}

impl std::fmt::Debug for MdnsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MdnsDiscovery")
            .field("config", &self.inner.config)
            .field("advertised", &*lock(&self.inner.advertised))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MdnsDiscovery {
    /// Starts an mDNS daemon (its own thread) for `config`.
    pub fn new(config: MdnsConfig) -> Result<Self, MdnsError> {
        let daemon = ServiceDaemon::new_with_port(config.port)?;
        if !config.interfaces.is_empty() {
            daemon.disable_interface(IfKind::All)?;
            daemon.enable_interface(
                config
                    .interfaces
                    .iter()
                    .map(Interface::kind)
                    .collect::<Vec<_>>(),
            )?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                daemon,
                config,
                advertised: Mutex::new(None),
                table: Arc::new(Mutex::new(InstanceTable::new(DiscoverySource::Mdns))),
            }),
        })
    }

    /// Asks the network whether the instances claiming `cluster` are still there (RFC 6762
    /// §10.4): if none answers within `timeout` (default [`MdnsConfig::verify_timeout`]), their
    /// records are flushed and the watch reports the cluster `Expired`.
    pub fn verify(&self, cluster: &ClusterId, timeout: Option<Duration>) -> Result<(), MdnsError> {
        let timeout = timeout.unwrap_or(self.inner.config.verify_timeout);
        let instances: Vec<String> = {
            let table = lock(&self.inner.table);
            table.instances_of(cluster).map(str::to_owned).collect()
        };
        for name in instances {
            debug!(instance = %name, "verifying");
            self.inner.daemon.verify(name, timeout)?;
        }
        Ok(())
    }

    /// Stops announcing this cluster (goodbye packets: peers drop it at once). Returns once the
    /// daemon has sent them, or after a second.
    pub async fn withdraw(&self) -> Result<(), MdnsError> {
        let name = lock(&self.inner.advertised).take();
        if let Some(name) = name {
            let rx = self.inner.daemon.unregister(&name)?;
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.recv_async()).await;
            info!(instance = %name, "mDNS advertisement withdrawn");
        }
        Ok(())
    }

    fn service_info(&self, me: &PeerAdvertisement) -> Result<ServiceInfo, MdnsError> {
        let url = url::Url::parse(&me.peering_endpoint)
            .map_err(|e| MdnsError::Advertisement(format!("peering endpoint: {e}")))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| MdnsError::Advertisement("peering endpoint has no port".into()))?;
        let properties = DiscoveryRecord::from_advertisement(me).to_properties();
        if let Some((k, v)) = properties.iter().find(|(k, v)| k.len() + v.len() + 1 > 255) {
            return Err(MdnsError::Advertisement(format!(
                "TXT entry {k:?} is {} bytes; at most 255 fit",
                k.len() + v.len() + 1
            )));
        }
        let host = format!("{}.local.", me.cluster_id);
        let mut info = ServiceInfo::new(
            &self.inner.config.service_type,
            me.cluster_id.as_str(),
            &host,
            (),
            port,
            properties.as_slice(),
        )?
        .enable_addr_auto();
        if !self.inner.config.interfaces.is_empty() {
            info.set_interfaces(
                self.inner
                    .config
                    .interfaces
                    .iter()
                    .map(Interface::kind)
                    .collect(),
            );
        }
        Ok(info)
    }
}

/// The TXT properties of a resolved service as raw `key=value` entries.
fn txt_entries(service: &ResolvedService) -> Vec<Vec<u8>> {
    service
        .get_properties()
        .iter()
        .map(|p| {
            let mut e = p.key().as_bytes().to_vec();
            if let Some(v) = p.val() {
                e.push(b'=');
                e.extend_from_slice(v);
            }
            e
        })
        .collect()
}

/// The endpoint an instance without a TXT `ep` is reached at: its first address (IPv4 first)
/// and SRV port.
fn fallback_endpoint(service: &ResolvedService) -> Option<String> {
    let mut addrs: Vec<IpAddr> = service
        .get_addresses()
        .iter()
        .map(|a| a.to_ip_addr())
        .collect();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    addrs
        .first()
        .map(|a| endpoint_url(&a.to_string(), service.get_port()))
}

type Items = Vec<Result<DiscoveryEvent, DiscoveryError>>;

/// Turns one mDNS event into discovery items.
fn on_event(table: &Mutex<InstanceTable>, own: Option<&str>, event: ServiceEvent) -> Items {
    match event {
        ServiceEvent::ServiceResolved(service) => {
            let name = service.get_fullname().to_owned();
            if own == Some(name.as_str()) {
                return vec![];
            }
            let decoded = DiscoveryRecord::from_txt_with_endpoint(
                txt_entries(&service),
                fallback_endpoint(&service),
            );
            let mut table = lock(table);
            match decoded {
                Ok(record) => {
                    let ad = record.into_advertisement(DiscoverySource::Mdns, Some(RECORD_TTL));
                    debug!(instance = %name, cluster = %ad.cluster_id, "mDNS instance resolved");
                    table.upsert(&name, ad, false)
                }
                Err(e) => {
                    warn!(instance = %name, error = %e, "malformed mDNS record ignored");
                    let mut out = table.remove(&name);
                    out.push(Err(DiscoveryError::MalformedRecord {
                        origin: format!("mDNS instance {name}"),
                        reason: e.to_string(),
                    }));
                    out
                }
            }
        }
        ServiceEvent::ServiceRemoved(_, name) => {
            debug!(instance = %name, "mDNS instance removed");
            lock(table).remove(&name)
        }
        _ => vec![],
    }
}

#[async_trait]
impl Discovery for MdnsDiscovery {
    fn source(&self) -> DiscoverySource {
        DiscoverySource::Mdns
    }

    /// Publishes this cluster (replacing an earlier advertisement of this provider).
    async fn advertise(&self, me: &PeerAdvertisement) -> Result<(), DiscoveryError> {
        let info = self.service_info(me)?;
        let name = info.get_fullname().to_owned();
        if let Some(old) = lock(&self.inner.advertised).take()
            && old != name
        {
            let _ = self.inner.daemon.unregister(&old);
        }
        self.inner.daemon.register(info).map_err(MdnsError::from)?;
        info!(instance = %name, endpoint = %me.peering_endpoint, "advertising on mDNS");
        *lock(&self.inner.advertised) = Some(name);
        Ok(())
    }

    /// Browses for peers. One watch at a time: a new call replaces the previous one, whose
    /// stream ends.
    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let rx = self
            .inner
            .daemon
            .browse(&self.inner.config.service_type)
            .map_err(MdnsError::from)?;
        // A new browse starts from scratch and reports every live instance again. The previous
        // records are forgotten silently: a consumer such as the composite keeps them until their
        // TTL unless they are reported again.
        lock(&self.inner.table).reset();
        let table = self.inner.table.clone();
        let inner = Arc::downgrade(&self.inner);
        let stream = rx
            .into_stream()
            .map(move |event| {
                let own = inner.upgrade().and_then(|i| lock(&i.advertised).clone());
                futures::stream::iter(on_event(&table, own.as_deref(), event))
            })
            .flatten()
            .boxed();
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_from_str() {
        assert_eq!(Interface::from("eth0"), Interface::Name("eth0".into()));
        assert_eq!(
            Interface::from("10.0.0.1"),
            Interface::Addr("10.0.0.1".parse().unwrap())
        );
    }
}
