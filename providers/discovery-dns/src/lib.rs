//! # liqo-discovery-dns
//!
//! Finds the clusters published under a DNS domain, the DNS-SD way (RFC 6763 over unicast DNS),
//! the same records mDNS carries on a LAN:
//!
//! ```text
//! _liqo._tcp.example.org.        PTR  rome._liqo._tcp.example.org.       ; one per cluster
//! rome._liqo._tcp.example.org.   SRV  10 60 8443 gw1.rome.example.org.   ; its peering endpoints
//! rome._liqo._tcp.example.org.   SRV  10 40 8443 gw2.rome.example.org.
//! rome._liqo._tcp.example.org.   SRV  20 0  8443 backup.example.org.
//! rome._liqo._tcp.example.org.   TXT  "v=1" "id=rome" "name=Rome" "fp=sha256:…"
//! ```
//!
//! The TXT record is the [discovery record](liqo_discovery::record) (cluster id, name,
//! fingerprint, protocol version). The **SRV records give the peering endpoints** and win over a
//! TXT `ep` (which is only used when an instance has no SRV record). Endpoints are ordered by
//! priority (lowest first), then weight (highest first), then target and port: the first is the
//! advertisement's `peering_endpoint`, all of them are in [`DnsInstance::endpoints`]. The order is
//! deterministic on purpose (RFC 2782's weighted random pick would make the ForeignCluster's
//! endpoint flap between lookups); a client that wants load spreading can pick among
//! [`DnsInstance::endpoints`] of equal priority by weight. An SRV target of `.` ("service not
//! available here", RFC 2782) is skipped.
//!
//! [`DnsDiscovery::watch`] looks everything up, reports what changed, and looks up again when the
//! shortest TTL of the records it got runs out (clamped to
//! [`DnsConfig::min_requery`]..=[`DnsConfig::max_requery`]; a TTL of 0 means the minimum). An
//! instance that disappears from the zone is reported `Expired` at the next lookup. When the
//! server cannot be reached the known records are kept until their own TTL has passed since the
//! last successful lookup, and retried sooner, with backoff.
//!
//! Records are not trusted: an instance with a malformed TXT record is reported as an `Err` item
//! and skipped; two instances claiming one cluster id with different keys are resolved by
//! [`liqo_discovery::claims`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::{StreamExt, future::join_all};
use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::{Name, RData, RecordType},
};
use liqo_core::{
    Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream, PeerAdvertisement,
};
use liqo_discovery::{
    InstanceTable,
    record::{DiscoveryRecord, endpoint_url, validate_endpoint},
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The default service label, under which clusters are published.
pub const DEFAULT_SERVICE: &str = "_liqo._tcp";

/// Errors of the DNS provider.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The configured domain or service is not a valid DNS name.
    #[error("invalid DNS name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The resolver could not be built.
    #[error("building the DNS resolver failed: {0}")]
    Resolver(String),
    /// A query failed for a reason other than "no such records".
    #[error("DNS query for {name} {record_type} failed: {source}")]
    Query {
        /// The queried name.
        name: String,
        /// The record type.
        record_type: RecordType,
        /// The resolver's error.
        #[source]
        source: NetError,
    },
}

impl From<DnsError> for DiscoveryError {
    fn from(e: DnsError) -> Self {
        DiscoveryError::Unavailable {
            source_name: "DNS".into(),
            message: e.to_string(),
        }
    }
}

/// Where and how to look.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DnsConfig {
    /// The domain the clusters are published under, e.g. `example.org`.
    pub domain: String,
    /// The service label, [`DEFAULT_SERVICE`] by default.
    pub service: String,
    /// The DNS servers to ask (UDP, TCP on truncation). Empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Shortest delay between lookups (a record TTL below it, 0 included, is raised to it).
    pub min_requery: Duration,
    /// Longest delay between lookups.
    pub max_requery: Duration,
    /// Timeout of one DNS query.
    pub query_timeout: Duration,
    /// Most instances taken from one listing; more are reported and ignored.
    pub max_instances: usize,
}

impl DnsConfig {
    /// Clusters published under `domain`, looked up through the system's resolvers; re-queried
    /// every 5 s to 1 h depending on TTLs; 2 s per query; at most 256 instances.
    pub fn new(domain: impl Into<String>) -> Self {
        Self {
            domain: domain.into(),
            service: DEFAULT_SERVICE.into(),
            nameservers: vec![],
            min_requery: Duration::from_secs(5),
            max_requery: Duration::from_secs(3600),
            query_timeout: Duration::from_secs(2),
            max_instances: 256,
        }
    }

    /// Asks these servers instead of the system's.
    #[must_use]
    pub fn nameservers(mut self, servers: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.nameservers = servers.into_iter().collect();
        self
    }

    /// Sets the service label.
    #[must_use]
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = service.into();
        self
    }

    /// Sets the bounds of the re-query delay.
    #[must_use]
    pub fn requery_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.min_requery = min;
        self.max_requery = max.max(min);
        self
    }

    /// Sets the timeout of one query.
    #[must_use]
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }
}

/// One SRV target of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvTarget {
    /// Lower is preferred.
    pub priority: u16,
    /// Among equal priorities, higher gets more traffic.
    pub weight: u16,
    /// The port.
    pub port: u16,
    /// The target host (fully qualified, with the trailing dot).
    pub target: String,
}

impl SrvTarget {
    /// The endpoint URL, `https://target:port`.
    pub fn url(&self) -> String {
        endpoint_url(&self.target, self.port)
    }
}

/// One published cluster instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsInstance {
    /// The instance's DNS name (`rome._liqo._tcp.example.org.`).
    pub name: String,
    /// Its decoded record; `peering_endpoint` is the first of `endpoints`, or the TXT `ep`.
    pub record: DiscoveryRecord,
    /// Its SRV targets, in preference order.
    pub endpoints: Vec<SrvTarget>,
    /// The shortest TTL of its SRV and TXT records.
    pub ttl: Duration,
}

/// The result of one complete lookup.
#[derive(Debug, Default)]
pub struct Listing {
    /// The valid instances.
    pub instances: Vec<DnsInstance>,
    /// Instances that were skipped, with the reason.
    pub problems: Vec<DiscoveryError>,
    /// The shortest TTL of every record of the listing (the PTR records included); `None` when
    /// nothing was found.
    pub ttl: Option<Duration>,
}

/// Discovery through DNS-SD records under a domain; see the [crate documentation](crate).
#[derive(Clone)]
pub struct DnsDiscovery {
    config: DnsConfig,
    service_name: Name,
    resolver: Arc<TokioResolver>,
}

impl std::fmt::Debug for DnsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsDiscovery")
            .field("config", &self.config)
            .field("service_name", &self.service_name.to_string())
            .finish_non_exhaustive()
    }
}

fn parse_name(s: &str) -> Result<Name, DnsError> {
    let fqdn = if s.ends_with('.') {
        s.to_owned()
    } else {
        format!("{s}.")
    };
    Name::from_ascii(&fqdn).map_err(|e| DnsError::InvalidName {
        name: s.to_owned(),
        reason: e.to_string(),
    })
}

impl DnsDiscovery {
    /// A provider for `config`. Fails on an invalid domain or when the system's resolver
    /// configuration is needed and unreadable.
    pub fn new(config: DnsConfig) -> Result<Self, DnsError> {
        let service_name = parse_name(&format!(
            "{}.{}",
            config.service.trim_end_matches('.'),
            config.domain.trim_end_matches('.')
        ))?;
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| DnsError::Resolver(e.to_string()))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = config.query_timeout;
        opts.attempts = 1;
        // Every lookup round asks the server: the TTL logic lives in this provider.
        opts.cache_size = 0;
        opts.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| DnsError::Resolver(e.to_string()))?;
        Ok(Self {
            config,
            service_name,
            resolver: Arc::new(resolver),
        })
    }

    /// The name browsed (`_liqo._tcp.<domain>.`).
    pub fn service_name(&self) -> String {
        self.service_name.to_string()
    }

    /// Runs one query; "no such name" and "no records of that type" are an empty answer.
    async fn query(
        &self,
        name: &Name,
        record_type: RecordType,
    ) -> Result<Vec<(RData, u32)>, DnsError> {
        match self.resolver.lookup(name.clone(), record_type).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter(|r| r.record_type() == record_type && r.name == *name)
                .map(|r| (r.data.clone(), r.ttl))
                .collect()),
            Err(e) if e.is_no_records_found() || e.is_nx_domain() => Ok(vec![]),
            Err(source) => Err(DnsError::Query {
                name: name.to_string(),
                record_type,
                source,
            }),
        }
    }

    /// Looks up every published instance once: PTR, then SRV and TXT of each instance
    /// (concurrently). Fails only when the server could not answer.
    pub async fn lookup(&self) -> Result<Listing, DnsError> {
        self.resolver.clear_cache();
        let ptrs = self.query(&self.service_name, RecordType::PTR).await?;
        let mut listing = Listing::default();
        let mut ttl: Option<u32> = None;
        let mut names = vec![];
        for (data, rttl) in ptrs {
            if let RData::PTR(ptr) = data {
                ttl = Some(ttl.map_or(rttl, |t| t.min(rttl)));
                if !names.contains(&ptr.0) {
                    names.push(ptr.0);
                }
            }
        }
        if names.len() > self.config.max_instances {
            listing.problems.push(DiscoveryError::MalformedRecord {
                origin: self.service_name.to_string(),
                reason: format!(
                    "{} instances published; only the first {} are used",
                    names.len(),
                    self.config.max_instances
                ),
            });
            names.truncate(self.config.max_instances);
        }
        let results = join_all(names.iter().map(|n| self.instance(n))).await;
        for (name, r) in names.iter().zip(results) {
            match r? {
                Ok(instance) => {
                    let secs = u32::try_from(instance.ttl.as_secs()).unwrap_or(u32::MAX);
                    ttl = Some(ttl.map_or(secs, |t| t.min(secs)));
                    listing.instances.push(instance);
                }
                Err(reason) => listing.problems.push(DiscoveryError::MalformedRecord {
                    origin: name.to_string(),
                    reason,
                }),
            }
        }
        listing.ttl = ttl.map(|t| Duration::from_secs(u64::from(t)));
        Ok(listing)
    }

    /// One instance: `Err(DnsError)` when the server failed, `Ok(Err(reason))` when the instance
    /// is unusable.
    async fn instance(&self, name: &Name) -> Result<Result<DnsInstance, String>, DnsError> {
        let (srv, txt) = tokio::join!(
            self.query(name, RecordType::SRV),
            self.query(name, RecordType::TXT)
        );
        let (srv, txt) = (srv?, txt?);
        let mut ttl = u32::MAX;
        let mut endpoints = vec![];
        for (data, rttl) in srv {
            if let RData::SRV(s) = data {
                ttl = ttl.min(rttl);
                if s.target.is_root() || s.port == 0 {
                    // "." means "not available here" (RFC 2782); port 0 is no port.
                    continue;
                }
                let target = SrvTarget {
                    priority: s.priority,
                    weight: s.weight,
                    port: s.port,
                    target: s.target.to_string(),
                };
                if !endpoints.contains(&target) {
                    endpoints.push(target);
                }
            }
        }
        endpoints.sort_by(|a, b| {
            (a.priority, std::cmp::Reverse(a.weight), &a.target, a.port).cmp(&(
                b.priority,
                std::cmp::Reverse(b.weight),
                &b.target,
                b.port,
            ))
        });
        let mut txts = vec![];
        for (data, rttl) in txt {
            if let RData::TXT(t) = data {
                ttl = ttl.min(rttl);
                txts.push(t);
            }
        }
        let txt = match txts.as_slice() {
            [] => return Ok(Err("has no TXT record".into())),
            [one] => one,
            _ => {
                return Ok(Err(format!(
                    "has {} TXT records; exactly one is expected",
                    txts.len()
                )));
            }
        };
        let best = endpoints.first().map(SrvTarget::url);
        let mut record =
            match DiscoveryRecord::from_txt_with_endpoint(txt.txt_data.iter(), best.clone()) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e.to_string())),
            };
        if let Some(best) = best {
            // SRV records are the DNS-native statement of where the service is: they win.
            if let Err(e) = validate_endpoint(&best) {
                return Ok(Err(format!("SRV target: {e}")));
            }
            if record.peering_endpoint != best {
                debug!(instance = %name, txt_ep = %record.peering_endpoint, srv = %best, "the SRV endpoint overrides the TXT ep");
            }
            record.peering_endpoint = best;
        }
        Ok(Ok(DnsInstance {
            name: name.to_string(),
            record,
            endpoints,
            ttl: Duration::from_secs(u64::from(ttl)),
        }))
    }

    fn clamp(&self, ttl: Option<Duration>) -> Duration {
        ttl.unwrap_or(self.config.max_requery)
            .clamp(self.config.min_requery, self.config.max_requery)
    }
}

struct WatchState {
    dns: DnsDiscovery,
    table: InstanceTable,
    /// Instance name -> when its records stop being valid without a new lookup.
    valid_until: BTreeMap<String, Instant>,
    next: Instant,
    failures: u32,
    first: bool,
}

impl WatchState {
    async fn round(&mut self) -> Vec<Result<DiscoveryEvent, DiscoveryError>> {
        if !self.first {
            tokio::time::sleep_until(self.next).await;
        }
        self.first = false;
        let now = Instant::now();
        match self.dns.lookup().await {
            Ok(listing) => {
                self.failures = 0;
                let mut out: Vec<_> = listing.problems.into_iter().map(Err).collect();
                let mut present = vec![];
                let mut instances = listing.instances;
                // No instance is "first" within one listing: prefer, deterministically, the one
                // named after the cluster id it claims (the convention), then by name.
                instances.sort_by_key(|i| {
                    let label = i.name.split('.').next().unwrap_or_default();
                    (label != i.record.cluster_id.as_str(), i.name.clone())
                });
                for i in instances {
                    let ad: PeerAdvertisement = i.record.into_advertisement(
                        DiscoverySource::Dns,
                        Some(self.dns.clamp(Some(i.ttl))),
                    );
                    self.valid_until.insert(i.name.clone(), now + i.ttl);
                    out.extend(self.table.upsert(&i.name, ad, true));
                    present.push(i.name);
                }
                out.extend(self.table.retain(|n| present.iter().any(|p| p == n)));
                self.valid_until.retain(|n, _| present.contains(n));
                let wait = self.dns.clamp(listing.ttl);
                self.next = Instant::now() + wait;
                debug!(instances = present.len(), next_in = ?wait, "DNS lookup done");
                out
            }
            Err(e) => {
                self.failures += 1;
                warn!(error = %e, failures = self.failures, "DNS lookup failed; keeping known records until their TTL");
                let mut out: Vec<Result<DiscoveryEvent, DiscoveryError>> = vec![Err(e.into())];
                let lapsed: Vec<String> = self
                    .valid_until
                    .iter()
                    .filter(|(_, until)| **until <= now)
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in lapsed {
                    self.valid_until.remove(&n);
                    out.extend(self.table.remove(&n));
                }
                // Retry sooner than a TTL, with backoff, but never after a record lapses.
                let backoff = self
                    .dns
                    .config
                    .min_requery
                    .saturating_mul(1 << self.failures.min(10))
                    .min(self.dns.config.max_requery);
                let mut next = now + backoff;
                if let Some(first_lapse) = self.valid_until.values().min() {
                    next = next.min((*first_lapse).max(now + self.dns.config.min_requery));
                }
                self.next = next;
                out
            }
        }
    }
}

#[async_trait]
impl Discovery for DnsDiscovery {
    fn source(&self) -> DiscoverySource {
        DiscoverySource::Dns
    }

    /// DNS records are published by whoever runs the zone; this provider only reads them.
    async fn advertise(&self, me: &PeerAdvertisement) -> Result<(), DiscoveryError> {
        info!(cluster = %me.cluster_id, service = %self.service_name, "DNS discovery does not publish; add PTR, SRV and TXT records for this cluster to the zone");
        Ok(())
    }

    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let state = WatchState {
            dns: self.clone(),
            table: InstanceTable::new(DiscoverySource::Dns),
            valid_until: BTreeMap::new(),
            next: Instant::now(),
            failures: 0,
            first: true,
        };
        Ok(futures::stream::unfold(state, |mut state| async move {
            let items = state.round().await;
            Some((futures::stream::iter(items), state))
        })
        .flatten()
        .boxed())
    }
}

/// Renders the records that publish `ad` under `domain` in zone-file syntax: PTR, SRV (from the
/// advertisement's endpoint) and TXT. Handy to hand to whoever runs the zone.
///
/// ```
/// # use liqo_core::{PeerAdvertisement, DiscoverySource};
/// let ad = PeerAdvertisement { cluster_id: "rome".parse().unwrap(), cluster_name: "Rome".into(),
///     peering_endpoint: "https://gw.rome.example.org:8443".into(), key_fingerprint: None,
///     protocol_version: 1, source: DiscoverySource::Dns, ttl: None };
/// let zone = liqo_discovery_dns::zone_records(&ad, "example.org", 60);
/// assert!(zone.contains("rome._liqo._tcp.example.org. 60 IN SRV 0 0 8443 gw.rome.example.org."));
/// ```
pub fn zone_records(ad: &PeerAdvertisement, domain: &str, ttl: u32) -> String {
    let domain = domain.trim_end_matches('.');
    let service = format!("{DEFAULT_SERVICE}.{domain}.");
    let instance = format!("{}.{service}", ad.cluster_id);
    let mut out = format!("{service} {ttl} IN PTR {instance}\n");
    if let Ok(url) = url::Url::parse(&ad.peering_endpoint)
        && let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default())
    {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        out.push_str(&format!("{instance} {ttl} IN SRV 0 0 {port} {host}.\n"));
    }
    let txt: Vec<String> = DiscoveryRecord::from_advertisement(ad)
        .to_txt()
        .into_iter()
        .map(|e| format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    out.push_str(&format!("{instance} {ttl} IN TXT {}\n", txt.join(" ")));
    out
}
