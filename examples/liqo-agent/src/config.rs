//! The agent's configuration file (YAML) and its validation.
//!
//! Every field has a default except `cluster.name` (which `--cluster-name` may give instead).
//! Unknown fields are errors, so a typo never silently falls back to a default. Errors name the
//! file and the field: `agent.yaml: peering.offer.cpu: "two" is not a Kubernetes quantity`.
//! See `agent.example.yaml` for a documented example.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use liqo_core::{Cidr, ClusterId};
use liqo_vk::security::{PodSecurity, PodSecurityLevel};
use serde::Deserialize;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML for the configuration (the message names the field).
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's message, with the field path and position.
        message: String,
    },
    /// A field has a value the agent cannot use.
    #[error("{file}: {field}: {message}")]
    Invalid {
        /// The file (`<flags>` when no file was given).
        file: PathBuf,
        /// The dotted field path, e.g. `network.listenPort`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Kubeconfig of the local cluster (default: in-cluster or `$KUBECONFIG`/`~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// Apply the liqo CRDs at start (server-side apply). Default true, convenient on a lab or
    /// a dev cluster; `deploy/` installs the CRDs with the manifests and sets it false, so the
    /// agent needs no right to create CustomResourceDefinitions.
    pub install_crds: Option<bool>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served. Default `0.0.0.0:9090`.
    pub metrics_addr: Option<SocketAddr>,
    /// This cluster.
    pub cluster: ClusterConfig,
    /// How peers are found.
    pub discovery: DiscoveryConfig,
    /// How peerings are made.
    pub peering: PeeringConfig,
    /// The network fabric.
    pub network: NetworkConfig,
    /// The virtual kubelet.
    pub virtual_kubelet: VirtualKubeletConfig,
}

/// This cluster's identity and address ranges.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Human-readable name (required here or through `--cluster-name`).
    pub name: Option<String>,
    /// Cluster id used at first start (default: the `kube-system` namespace's UID). Once the
    /// identity Secret exists its id wins; a different value here is an error.
    pub id: Option<String>,
    /// The pod CIDR handed to peers. Default `10.244.0.0/16`.
    pub pod_cidr: Option<String>,
    /// The service CIDR handed to peers. Default `10.96.0.0/12`.
    pub service_cidr: Option<String>,
    /// An optional external CIDR (addresses peers use to reach this cluster's external hosts).
    pub external_cidr: Option<String>,
}

/// Discovery sources; all off by default except hand-made `ForeignCluster`s.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// mDNS on the local network.
    pub mdns: MdnsConfig,
    /// DNS-SD in a domain (off unless given).
    pub dns: Option<DnsConfig>,
    /// A list or a watched file of peers.
    pub r#static: StaticConfig,
    /// Watch `ForeignCluster`s made by hand (`spec.discovery.source: Manual`). Default true.
    pub foreign_clusters: bool,
    /// Sources whose peers are peered automatically (`Manual`, `Dns`, `Mdns`). Default none:
    /// discovered is not trusted.
    pub auto_peer: Vec<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            mdns: MdnsConfig::default(),
            dns: None,
            r#static: StaticConfig::default(),
            foreign_clusters: true,
            auto_peer: vec![],
        }
    }
}

/// mDNS discovery.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MdnsConfig {
    /// Announce and browse with mDNS. Default false.
    pub enabled: bool,
    /// Interfaces (names or addresses); empty for all.
    pub interfaces: Vec<String>,
}

/// DNS-SD discovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsConfig {
    /// The domain browsed, e.g. `clusters.example.org`.
    pub domain: String,
    /// The nameserver (`ip:port`); default the system resolver.
    #[serde(default)]
    pub server: Option<SocketAddr>,
}

/// Peers declared by an administrator.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct StaticConfig {
    /// A YAML file of peers, watched for changes (format of `liqo-discovery-static`).
    pub file: Option<PathBuf>,
    /// Peers listed inline.
    pub peers: Vec<StaticPeer>,
}

/// One inline peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticPeer {
    /// Its cluster id.
    pub cluster_id: String,
    /// Its name (default: the id).
    #[serde(default)]
    pub cluster_name: Option<String>,
    /// Its peering endpoint, `https://host:port`.
    pub peering_endpoint: String,
    /// Its key fingerprint, `sha256:<64 hex>`.
    #[serde(default)]
    pub key_fingerprint: Option<String>,
}

/// How this cluster obtains credentials from providers (and how it grants them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum PeeringMethod {
    /// One-step peering over the provider agent's HTTPS endpoint (liqo-peering-csr): the
    /// consumer proves its key, the provider's policy decides, credentials are renewed. The
    /// default.
    #[default]
    Csr,
    /// Out of band (liqo-peering-kubeconfig): the provider's administrator issues a peering
    /// bundle, the consumer's stores it as Secret `liqo-system/liqo-peering-bundle-<provider>`;
    /// no endpoint is served or used.
    Kubeconfig,
}

/// Which consumers a provider accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum PolicyKind {
    /// Every consumer that proves its key: anyone who can reach the endpoint. An explicit
    /// choice (the agent warns at start).
    AcceptAll,
    /// Only the ids in `peering.allowList`.
    AllowList,
    /// An administrator approves each consumer (annotation on its `ForeignCluster`). The
    /// default.
    #[default]
    Manual,
}

/// What a new consumer is offered.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OfferConfig {
    /// Absolute CPU (a Kubernetes quantity, e.g. `4`).
    #[serde(default)]
    pub cpu: Option<String>,
    /// Absolute memory (e.g. `8Gi`).
    #[serde(default)]
    pub memory: Option<String>,
    /// Absolute pod count.
    #[serde(default)]
    pub pods: Option<u32>,
    /// Instead of absolute amounts: this percent (1-100) of the free allocatable resources.
    #[serde(default)]
    pub share_of_free: Option<u8>,
}

impl Default for OfferConfig {
    fn default() -> Self {
        Self {
            cpu: None,
            memory: None,
            pods: None,
            share_of_free: Some(50),
        }
    }
}

/// Peering.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PeeringConfig {
    /// `Csr` (the default) or `Kubeconfig`. Every field below but `offer` is the CSR method's.
    pub method: PeeringMethod,
    /// Serve the HTTPS peering endpoint (provider role) here; `null` for consumer only.
    /// Default `0.0.0.0:8443`; not served with the `Kubeconfig` method.
    pub listen: Option<SocketAddr>,
    /// The endpoint advertised to peers (`https://host:port`); default derived from `listen`.
    pub endpoint: Option<String>,
    /// The API server URL put in credentials issued to consumers; default the kubeconfig's.
    pub api_server: Option<String>,
    /// A PEM file with the CA of `apiServer`; default the kubeconfig's CA.
    pub api_server_ca_file: Option<PathBuf>,
    /// `AcceptAll`, `AllowList` or `Manual` (the default).
    pub policy: PolicyKind,
    /// Consumer ids accepted under `AllowList`.
    pub allow_list: Vec<String>,
    /// What a new consumer is offered.
    pub offer: OfferConfig,
    /// Lifetime of issued credentials, in seconds (at least 600). Default 86400.
    pub credential_lifetime_seconds: u64,
}

impl Default for PeeringConfig {
    fn default() -> Self {
        Self {
            method: PeeringMethod::Csr,
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 8443))),
            endpoint: None,
            api_server: None,
            api_server_ca_file: None,
            policy: PolicyKind::Manual,
            allow_list: vec![],
            offer: OfferConfig::default(),
            credential_lifetime_seconds: 86400,
        }
    }
}

/// WireGuard backend kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The kernel module.
    Kernel,
    /// A userspace implementation (see `implementation`).
    #[default]
    Userspace,
}

/// Which network fabric links the pod networks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum FabricKind {
    /// A WireGuard gateway with remapping and NAT (liqo-net): any pod CIDRs. The default.
    #[default]
    WireGuard,
    /// No tunnel, no NAT (liqo-fabric-routed): the clusters' pod networks are already routed to
    /// each other, and a peer whose CIDRs overlap this cluster's is refused.
    Routed,
}

/// The network fabric.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Run the fabric. Default false.
    pub enabled: bool,
    /// `WireGuard` (the default) or `Routed`. Every field below is WireGuard's.
    pub fabric: FabricKind,
    /// `kernel` or `userspace`.
    pub backend: Backend,
    /// Userspace implementation: `wireguard-go` or `boringtun`.
    pub implementation: String,
    /// The WireGuard interface. Default `liqo0`.
    pub interface: String,
    /// UDP listen port. Default 51820.
    pub listen_port: u16,
    /// `host:port` peers reach the gateway at (required when enabled).
    pub endpoint: Option<String>,
    /// Network namespace (path, e.g. `/run/netns/liqo-gw`) the gateway runs in; default the
    /// agent's own.
    pub netns: Option<PathBuf>,
    /// Pools remapped ranges are allocated from.
    pub pools: Vec<String>,
    /// Ranges never allocated nor accepted from peers.
    pub reserved: Vec<String>,
    /// Interface MTU. Default 1420.
    pub mtu: u16,
    /// WireGuard persistent keepalive in seconds (0: off). Default 25.
    pub keepalive_seconds: u16,
    /// Seconds between checks that the gateway's interface, routes, rules and NAT are still as
    /// it made them (remade if another program changed them; 0: off). Default 30.
    pub resync_seconds: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            fabric: FabricKind::WireGuard,
            backend: Backend::Userspace,
            implementation: "wireguard-go".into(),
            interface: "liqo0".into(),
            listen_port: 51820,
            endpoint: None,
            netns: None,
            pools: vec![],
            reserved: vec![],
            mtu: 1420,
            keepalive_seconds: 25,
            resync_seconds: 30,
        }
    }
}

/// The virtual kubelet.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct VirtualKubeletConfig {
    /// Consumer side: virtual nodes, offloading, reflection.
    pub consumer: ConsumerConfig,
    /// Provider side: twin namespaces and ShadowPods.
    pub provider: ProviderConfig,
}

/// Consumer side of the virtual kubelet.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Run it. Default true.
    pub enabled: bool,
    /// The pod webhook's address; `null` for no webhook. Default `127.0.0.1:0`.
    pub webhook: Option<SocketAddr>,
    /// The Service the API server reaches the webhook through (in a pod: the webhook listens
    /// on the pod's address and is registered by Service instead of URL). Default none.
    pub webhook_service: Option<WebhookServiceConfig>,
    /// Provider probe and node Lease period, in seconds. Default 10.
    pub heartbeat_seconds: u64,
    /// Reflectors to run: kinds of `liqo-reflectors-k8s` (`ConfigMap`, `Secret`, `Service`,
    /// `EndpointSlice`, `ServiceAccount` (tokens), `Event`); pods always. Default all.
    pub reflectors: Option<Vec<String>>,
    /// Pod reflection workers per namespace. Default 16.
    pub pod_workers: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            webhook: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            webhook_service: None,
            heartbeat_seconds: 10,
            reflectors: None,
            pod_workers: 16,
        }
    }
}

/// The Service in front of the pod webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookServiceConfig {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its port. Default 443.
    #[serde(default = "https_port")]
    pub port: u16,
}

fn https_port() -> u16 {
    443
}

/// Provider side of the virtual kubelet.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Run it. Default true.
    pub enabled: bool,
    /// What consumers may run here.
    pub pod_security: PodSecurityConfig,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            pod_security: PodSecurityConfig::default(),
        }
    }
}

/// The Pod Security Standards level offloaded pods are held to.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PodSecurityConfig {
    /// `privileged`, `baseline` or `restricted`. Default `baseline`.
    pub level: String,
    /// Per consumer cluster id, a level instead of `level`.
    pub per_consumer: BTreeMap<String, String>,
    /// The standards' version to pin (`v1.34`, `latest`); default the API server's version.
    pub version: Option<String>,
}

impl Default for PodSecurityConfig {
    fn default() -> Self {
        Self {
            level: "baseline".into(),
            per_consumer: BTreeMap::new(),
            version: None,
        }
    }
}

/// The longest credential a provider issues (deploy/guard.yaml refuses longer requests).
pub const MAX_CREDENTIAL_LIFETIME: u64 = 30 * 24 * 3600;

/// The default metrics address.
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 9090);

impl AgentConfig {
    /// Reads and parses `path` (not yet validated: flags may still fill fields).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses YAML text; `file` only names the source in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks every field; the first problem is returned, naming `file` and the field.
    pub fn validate(&self, file: &Path) -> Result<Validated, ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            field: field.to_owned(),
            message,
        };
        let name = match self.cluster.name.as_deref().map(str::trim) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => {
                return Err(bad(
                    "cluster.name",
                    "required (or give --cluster-name)".into(),
                ));
            }
        };
        let id = self
            .cluster
            .id
            .as_deref()
            .map(|s| {
                s.parse::<ClusterId>()
                    .map_err(|e| bad("cluster.id", format!("{s:?}: {e}")))
            })
            .transpose()?;
        let cidr = |field: &str, v: &str| {
            v.parse::<Cidr>()
                .map_err(|e| bad(field, format!("{v:?} is not a CIDR: {e}")))
        };
        let pod_cidr = cidr(
            "cluster.podCidr",
            self.cluster.pod_cidr.as_deref().unwrap_or("10.244.0.0/16"),
        )?;
        let service_cidr = cidr(
            "cluster.serviceCidr",
            self.cluster
                .service_cidr
                .as_deref()
                .unwrap_or("10.96.0.0/12"),
        )?;
        let external_cidr = self
            .cluster
            .external_cidr
            .as_deref()
            .map(|v| cidr("cluster.externalCidr", v))
            .transpose()?;

        let mut auto_peer = BTreeSet::new();
        for (i, s) in self.discovery.auto_peer.iter().enumerate() {
            let source = match s.to_ascii_lowercase().as_str() {
                "manual" | "static" => liqo_core::DiscoverySource::Manual,
                "dns" => liqo_core::DiscoverySource::Dns,
                "mdns" => liqo_core::DiscoverySource::Mdns,
                _ => {
                    return Err(bad(
                        &format!("discovery.autoPeer[{i}]"),
                        format!("{s:?} is not a source (Manual, Dns or Mdns)"),
                    ));
                }
            };
            auto_peer.insert(source);
        }
        if let Some(dns) = &self.discovery.dns
            && dns.domain.trim().is_empty()
        {
            return Err(bad("discovery.dns.domain", "must not be empty".into()));
        }
        let mut static_peers = vec![];
        for (i, p) in self.discovery.r#static.peers.iter().enumerate() {
            let field = |f: &str| format!("discovery.static.peers[{i}].{f}");
            let cluster_id = p
                .cluster_id
                .parse::<ClusterId>()
                .map_err(|e| bad(&field("clusterId"), format!("{:?}: {e}", p.cluster_id)))?;
            if !p.peering_endpoint.starts_with("https://") {
                return Err(bad(
                    &field("peeringEndpoint"),
                    format!("{:?} is not an https:// URL", p.peering_endpoint),
                ));
            }
            let key_fingerprint = p
                .key_fingerprint
                .as_deref()
                .map(|k| {
                    k.parse::<liqo_core::KeyFingerprint>()
                        .map_err(|e| bad(&field("keyFingerprint"), format!("{k:?}: {e}")))
                })
                .transpose()?;
            static_peers.push(liqo_core::PeerAdvertisement {
                cluster_name: p
                    .cluster_name
                    .clone()
                    .unwrap_or_else(|| cluster_id.to_string()),
                cluster_id,
                peering_endpoint: p.peering_endpoint.clone(),
                key_fingerprint,
                protocol_version: liqo_core::PROTOCOL_VERSION,
                source: liqo_core::DiscoverySource::Manual,
                ttl: None,
            });
        }

        let p = &self.peering;
        let endpoint = match (&p.endpoint, p.listen) {
            (Some(e), _) if !e.starts_with("https://") => {
                return Err(bad(
                    "peering.endpoint",
                    format!("{e:?} is not an https:// URL"),
                ));
            }
            (Some(e), _) => Some(e.clone()),
            (None, Some(l)) if !l.ip().is_unspecified() => Some(format!("https://{l}")),
            (None, _) => None,
        };
        if let Some(url) = &p.api_server
            && !url.starts_with("https://")
        {
            return Err(bad(
                "peering.apiServer",
                format!("{url:?} is not an https:// URL"),
            ));
        }
        let mut allow_list = BTreeSet::new();
        for (i, s) in p.allow_list.iter().enumerate() {
            allow_list.insert(
                s.parse::<ClusterId>()
                    .map_err(|e| bad(&format!("peering.allowList[{i}]"), format!("{s:?}: {e}")))?,
            );
        }
        if p.policy == PolicyKind::AllowList && allow_list.is_empty() {
            return Err(bad(
                "peering.allowList",
                "policy AllowList needs at least one cluster id".into(),
            ));
        }
        let o = &p.offer;
        let absolute = o.cpu.is_some() || o.memory.is_some() || o.pods.is_some();
        let offer = match (absolute, o.share_of_free) {
            (true, Some(_)) => {
                return Err(bad(
                    "peering.offer",
                    "give either cpu/memory/pods or shareOfFree, not both".into(),
                ));
            }
            (true, _) => {
                let cpu = o
                    .cpu
                    .clone()
                    .ok_or_else(|| bad("peering.offer.cpu", "required with memory/pods".into()))?;
                let memory = o
                    .memory
                    .clone()
                    .ok_or_else(|| bad("peering.offer.memory", "required with cpu/pods".into()))?;
                let pods = o
                    .pods
                    .ok_or_else(|| bad("peering.offer.pods", "required with cpu/memory".into()))?;
                for (f, q) in [
                    ("peering.offer.cpu", &cpu),
                    ("peering.offer.memory", &memory),
                ] {
                    liqo_peering_csr::quantity::Milli::parse(q)
                        .map_err(|e| bad(f, format!("{q:?} is not a Kubernetes quantity: {e}")))?;
                }
                Offer::Absolute { cpu, memory, pods }
            }
            (false, Some(pct)) if (1..=100).contains(&pct) => Offer::ShareOfFree(pct),
            (false, Some(pct)) => {
                return Err(bad(
                    "peering.offer.shareOfFree",
                    format!("{pct} is not a percent between 1 and 100"),
                ));
            }
            (false, None) => Offer::ShareOfFree(50),
        };
        let ps = &self.virtual_kubelet.provider.pod_security;
        let level = |field: &str, v: &str| {
            v.parse::<PodSecurityLevel>()
                .map_err(|e| bad(field, e.to_string()))
        };
        let mut pod_security = PodSecurity::new(level(
            "virtualKubelet.provider.podSecurity.level",
            &ps.level,
        )?);
        for (id, l) in &ps.per_consumer {
            let field = format!("virtualKubelet.provider.podSecurity.perConsumer.{id}");
            let consumer = id
                .parse::<ClusterId>()
                .map_err(|e| bad(&field, format!("{id:?} is not a cluster id: {e}")))?;
            pod_security = pod_security.with_consumer(consumer, level(&field, l)?);
        }
        if let Some(v) = &ps.version {
            let ok = v == "latest"
                || v.strip_prefix("v1.")
                    .is_some_and(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_digit()));
            if !ok {
                return Err(bad(
                    "virtualKubelet.provider.podSecurity.version",
                    format!("{v:?} is not v1.<minor> or latest"),
                ));
            }
            pod_security.version = Some(v.clone());
        }
        if p.credential_lifetime_seconds < 600 {
            return Err(bad(
                "peering.credentialLifetimeSeconds",
                format!(
                    "{} is below 600, the CSR API's minimum",
                    p.credential_lifetime_seconds
                ),
            ));
        }
        if p.credential_lifetime_seconds > MAX_CREDENTIAL_LIFETIME {
            return Err(bad(
                "peering.credentialLifetimeSeconds",
                format!(
                    "{} is above {MAX_CREDENTIAL_LIFETIME} (30 days), the most deploy/guard.yaml lets the agent request",
                    p.credential_lifetime_seconds
                ),
            ));
        }

        if p.method == PeeringMethod::Kubeconfig {
            // No endpoint and no handshake: a field set for them is a mistake, not a default.
            let d = PeeringConfig::default();
            let csr_fields = [
                ("endpoint", p.endpoint.is_some()),
                ("policy", p.policy != d.policy),
                ("allowList", !p.allow_list.is_empty()),
                (
                    "credentialLifetimeSeconds",
                    p.credential_lifetime_seconds != d.credential_lifetime_seconds,
                ),
            ];
            if let Some((field, _)) = csr_fields.iter().find(|(_, set)| *set) {
                return Err(bad(
                    &format!("peering.{field}"),
                    "only for the Csr method; peering.method is Kubeconfig (no endpoint: \
                     the provider's administrator issues bundles): remove it"
                        .into(),
                ));
            }
        }

        let n = &self.network;
        let mut pools = vec![];
        let mut reserved = vec![];
        if n.enabled && n.fabric == FabricKind::Routed {
            // Nothing of the gateway applies: a field set for it is a mistake, not a default.
            let d = NetworkConfig::default();
            let gateway_fields = [
                ("backend", n.backend != d.backend),
                ("implementation", n.implementation != d.implementation),
                ("interface", n.interface != d.interface),
                ("listenPort", n.listen_port != d.listen_port),
                ("endpoint", n.endpoint.is_some()),
                ("netns", n.netns.is_some()),
                ("pools", !n.pools.is_empty()),
                ("reserved", !n.reserved.is_empty()),
                ("mtu", n.mtu != d.mtu),
                (
                    "keepaliveSeconds",
                    n.keepalive_seconds != d.keepalive_seconds,
                ),
                ("resyncSeconds", n.resync_seconds != d.resync_seconds),
            ];
            if let Some((field, _)) = gateway_fields.iter().find(|(_, set)| *set) {
                return Err(bad(
                    &format!("network.{field}"),
                    "only for the WireGuard fabric; network.fabric is Routed (no gateway, \
                     tunnel or remapping): remove it"
                        .into(),
                ));
            }
        } else if n.enabled {
            if n.backend == Backend::Userspace
                && !["wireguard-go", "boringtun"].contains(&n.implementation.as_str())
            {
                return Err(bad(
                    "network.implementation",
                    format!("{:?} is not wireguard-go or boringtun", n.implementation),
                ));
            }
            if n.interface.is_empty() || n.interface.len() > 15 {
                return Err(bad(
                    "network.interface",
                    format!("{:?} is not an interface name (1-15 bytes)", n.interface),
                ));
            }
            if n.listen_port == 0 {
                return Err(bad("network.listenPort", "must not be 0".into()));
            }
            match n.endpoint.as_deref() {
                None => {
                    return Err(bad(
                        "network.endpoint",
                        "required when the network is enabled (host:port peers reach the gateway at)"
                            .into(),
                    ));
                }
                Some(e)
                    if e.rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<u16>().ok())
                        .is_none() =>
                {
                    return Err(bad("network.endpoint", format!("{e:?} is not host:port")));
                }
                Some(_) => {}
            }
            if !(576..=9000).contains(&n.mtu) {
                return Err(bad("network.mtu", format!("{} is outside 576-9000", n.mtu)));
            }
            for (i, c) in n.pools.iter().enumerate() {
                pools.push(cidr(&format!("network.pools[{i}]"), c)?);
            }
            for (i, c) in n.reserved.iter().enumerate() {
                reserved.push(cidr(&format!("network.reserved[{i}]"), c)?);
            }
        }

        let known = liqo_reflectors_k8s_kinds();
        if let Some(rs) = &self.virtual_kubelet.consumer.reflectors {
            for (i, r) in rs.iter().enumerate() {
                if !known.contains(&r.as_str()) {
                    return Err(bad(
                        &format!("virtualKubelet.consumer.reflectors[{i}]"),
                        format!("{r:?} is not one of {}", known.join(", ")),
                    ));
                }
            }
        }
        if self.virtual_kubelet.consumer.heartbeat_seconds == 0 {
            return Err(bad(
                "virtualKubelet.consumer.heartbeatSeconds",
                "must be at least 1".into(),
            ));
        }
        if self.virtual_kubelet.consumer.pod_workers == 0 {
            return Err(bad(
                "virtualKubelet.consumer.podWorkers",
                "must be at least 1".into(),
            ));
        }

        Ok(Validated {
            raw: self.clone(),
            name,
            id,
            pod_cidr,
            service_cidr,
            external_cidr,
            auto_peer,
            static_peers,
            endpoint,
            allow_list,
            offer,
            pools,
            reserved,
            pod_security,
        })
    }
}

/// The reflector kinds `virtualKubelet.consumer.reflectors` accepts.
pub fn liqo_reflectors_k8s_kinds() -> Vec<&'static str> {
    vec![
        "ConfigMap",
        "Secret",
        "Service",
        "EndpointSlice",
        "ServiceAccount",
        "Event",
    ]
}

/// What is offered to new consumers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Fixed amounts.
    Absolute {
        /// CPU quantity.
        cpu: String,
        /// Memory quantity.
        memory: String,
        /// Pods.
        pods: u32,
    },
    /// A percent of the free allocatable.
    ShareOfFree(u8),
}

/// A configuration that passed validation, with its values parsed.
#[derive(Debug, Clone)]
pub struct Validated {
    /// The configuration as written (after flags).
    pub raw: AgentConfig,
    /// `cluster.name`.
    pub name: String,
    /// `cluster.id`.
    pub id: Option<ClusterId>,
    /// `cluster.podCidr`.
    pub pod_cidr: Cidr,
    /// `cluster.serviceCidr`.
    pub service_cidr: Cidr,
    /// `cluster.externalCidr`.
    pub external_cidr: Option<Cidr>,
    /// `discovery.autoPeer`.
    pub auto_peer: BTreeSet<liqo_core::DiscoverySource>,
    /// `discovery.static.peers`.
    pub static_peers: Vec<liqo_core::PeerAdvertisement>,
    /// The advertised peering endpoint, if any.
    pub endpoint: Option<String>,
    /// `peering.allowList`.
    pub allow_list: BTreeSet<ClusterId>,
    /// `peering.offer`.
    pub offer: Offer,
    /// `network.pools`.
    pub pools: Vec<Cidr>,
    /// `network.reserved`.
    pub reserved: Vec<Cidr>,
    /// `virtualKubelet.provider.podSecurity`.
    pub pod_security: PodSecurity,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Result<Validated, ConfigError> {
        AgentConfig::parse(yaml, Path::new("agent.yaml"))?.validate(Path::new("agent.yaml"))
    }

    fn err(yaml: &str) -> String {
        match check(yaml) {
            Ok(v) => panic!("accepted: {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reflector_names_are_the_crate_kinds() {
        let kinds: Vec<String> = liqo_reflectors_k8s::all()
            .iter()
            .map(|r| r.kind().to_owned())
            .collect();
        assert_eq!(kinds, liqo_reflectors_k8s_kinds());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let v = check("cluster:\n  name: milan\n").expect("valid");
        assert_eq!(v.name, "milan");
        assert_eq!(v.pod_cidr.to_string(), "10.244.0.0/16");
        assert_eq!(v.offer, Offer::ShareOfFree(50));
        assert!(v.raw.discovery.foreign_clusters);
        assert!(!v.raw.network.enabled);
        assert_eq!(v.raw.network.fabric, FabricKind::WireGuard);
        assert_eq!(v.raw.peering.listen, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(v.endpoint, None, "0.0.0.0 cannot be advertised");
    }

    #[test]
    fn kubeconfig_method_needs_no_endpoint() {
        let v = check("cluster: {name: a}\npeering: {method: Kubeconfig}\n")
            .expect("the kubeconfig method needs nothing more");
        assert_eq!(v.raw.peering.method, PeeringMethod::Kubeconfig);
        assert_eq!(
            check("cluster: {name: a}\n").unwrap().raw.peering.method,
            PeeringMethod::Csr
        );
        let e = err("cluster: {name: a}\npeering: {method: Kubeconfig, policy: AcceptAll}\n");
        assert!(
            e.starts_with("agent.yaml: peering.policy: only for the Csr method"),
            "{e}"
        );
        let e = err("cluster: {name: a}\npeering: {method: Kubeconfig, endpoint: 'https://x:1'}\n");
        assert!(
            e.starts_with("agent.yaml: peering.endpoint: only for the Csr method"),
            "{e}"
        );
        let e = err("cluster: {name: a}\npeering: {method: Token}\n");
        assert!(
            e.starts_with("agent.yaml: peering.method: unknown variant `Token`")
                && e.contains("Kubeconfig"),
            "{e}"
        );
    }

    #[test]
    fn routed_fabric_needs_no_gateway() {
        let v = check("cluster: {name: a}\nnetwork: {enabled: true, fabric: Routed}\n")
            .expect("a routed fabric needs no endpoint");
        assert_eq!(v.raw.network.fabric, FabricKind::Routed);
        // The WireGuard fields keep their defaults when given as such.
        check("cluster: {name: a}\nnetwork: {enabled: true, fabric: Routed, mtu: 1420}\n")
            .expect("a default value is not a WireGuard setting");
    }

    #[test]
    fn example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.yaml");
        let v = AgentConfig::load(&path)
            .and_then(|c| c.validate(&path))
            .expect("the example config is valid");
        assert_eq!(v.name, "milan");
        assert!(matches!(v.offer, Offer::Absolute { pods: 110, .. }));
    }

    /// The configuration shipped in `deploy/` must be one this agent accepts.
    #[test]
    fn deploy_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config.yaml");
        let text = std::fs::read_to_string(&path).expect("deploy/config.yaml");
        let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("a ConfigMap");
        let embedded = cm["data"]["agent.yaml"]
            .as_str()
            .expect("data.agent.yaml in deploy/config.yaml");
        let v = AgentConfig::parse(embedded, &path)
            .and_then(|c| c.validate(&path))
            .unwrap_or_else(|e| panic!("deploy/config.yaml does not validate: {e}"));
        assert_eq!(
            v.raw.install_crds,
            Some(false),
            "CRDs come with the manifests"
        );
        let svc = v.raw.virtual_kubelet.consumer.webhook_service.as_ref();
        assert_eq!(svc.map(|s| s.name.as_str()), Some("liqo-agent-webhook"));
    }

    #[test]
    fn safe_defaults_and_pod_security_levels() {
        let v = check("cluster: {name: a}\n").expect("minimal config");
        assert_eq!(v.raw.peering.policy, PolicyKind::Manual);
        assert_eq!(v.pod_security, PodSecurity::new(PodSecurityLevel::Baseline));
        let v = check(
            "cluster: {name: a}\nvirtualKubelet:\n  provider:\n    podSecurity: {level: restricted, perConsumer: {rome: privileged}, version: v1.33}\n",
        )
        .expect("levels");
        let rome: ClusterId = "rome".parse().expect("id");
        let turin: ClusterId = "turin".parse().expect("id");
        assert_eq!(
            v.pod_security.level_for(&rome),
            PodSecurityLevel::Privileged
        );
        assert_eq!(
            v.pod_security.level_for(&turin),
            PodSecurityLevel::Restricted
        );
        assert_eq!(v.pod_security.version.as_deref(), Some("v1.33"));
        let e = err(
            "cluster: {name: a}\nvirtualKubelet: {provider: {podSecurity: {level: Baseline}}}\n",
        );
        assert!(
            e.starts_with("agent.yaml: virtualKubelet.provider.podSecurity.level: unknown pod security level \"Baseline\""),
            "{e}"
        );
        let e = err(
            "cluster: {name: a}\nvirtualKubelet: {provider: {podSecurity: {perConsumer: {rome: lax}}}}\n",
        );
        assert!(
            e.starts_with("agent.yaml: virtualKubelet.provider.podSecurity.perConsumer.rome:"),
            "{e}"
        );
        let e = err(
            "cluster: {name: a}\nvirtualKubelet: {provider: {podSecurity: {version: '1.34'}}}\n",
        );
        assert!(
            e.starts_with("agent.yaml: virtualKubelet.provider.podSecurity.version:"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = err("cluster: {}\n");
        assert!(e.starts_with("agent.yaml: cluster.name: required"), "{e}");
        let e = err("cluster: {name: a, podCidr: 10.0.0.0/33}\n");
        assert!(e.starts_with("agent.yaml: cluster.podCidr:"), "{e}");
        let e = err("cluster: {name: a}\npeering: {offer: {cpu: two, memory: 1Gi, pods: 3}}\n");
        assert!(e.starts_with("agent.yaml: peering.offer.cpu:"), "{e}");
        let e = err("cluster: {name: a}\npeering: {offer: {cpu: '1', pods: 3}}\n");
        assert!(
            e.starts_with("agent.yaml: peering.offer.memory: required"),
            "{e}"
        );
        let e = err(
            "cluster: {name: a}\npeering: {offer: {cpu: '1', memory: 1Gi, pods: 3, shareOfFree: 5}}\n",
        );
        assert!(
            e.starts_with("agent.yaml: peering.offer: give either"),
            "{e}"
        );
        let e = err("cluster: {name: a}\npeering: {offer: {shareOfFree: 150}}\n");
        assert!(
            e.starts_with("agent.yaml: peering.offer.shareOfFree:"),
            "{e}"
        );
        let e = err("cluster: {name: a}\npeering: {policy: AllowList}\n");
        assert!(e.starts_with("agent.yaml: peering.allowList:"), "{e}");
        let e = err("cluster: {name: a}\npeering: {credentialLifetimeSeconds: 2600000}\n");
        assert!(
            e.starts_with("agent.yaml: peering.credentialLifetimeSeconds: 2600000 is above"),
            "{e}"
        );
        let e = err("cluster: {name: a}\npeering: {credentialLifetimeSeconds: 60}\n");
        assert!(
            e.starts_with("agent.yaml: peering.credentialLifetimeSeconds:"),
            "{e}"
        );
        let e = err("cluster: {name: a}\ndiscovery: {autoPeer: [Dns, carrier-pigeon]}\n");
        assert!(e.starts_with("agent.yaml: discovery.autoPeer[1]:"), "{e}");
        let e = err(
            "cluster: {name: a}\ndiscovery: {static: {peers: [{clusterId: b, peeringEndpoint: 'http://b:1'}]}}\n",
        );
        assert!(
            e.starts_with("agent.yaml: discovery.static.peers[0].peeringEndpoint:"),
            "{e}"
        );
        let e = err("cluster: {name: a}\nnetwork: {enabled: true}\n");
        assert!(
            e.starts_with("agent.yaml: network.endpoint: required"),
            "{e}"
        );
        let e = err(
            "cluster: {name: a}\nnetwork: {enabled: true, endpoint: 'gw:51820', implementation: wg}\n",
        );
        assert!(e.starts_with("agent.yaml: network.implementation:"), "{e}");
        let e = err(
            "cluster: {name: a}\nnetwork: {enabled: true, endpoint: 'gw:51820', pools: [nope]}\n",
        );
        assert!(e.starts_with("agent.yaml: network.pools[0]:"), "{e}");
        let e = err(
            "cluster: {name: a}\nnetwork: {enabled: true, fabric: Routed, endpoint: 'gw:51820'}\n",
        );
        assert!(
            e.starts_with("agent.yaml: network.endpoint: only for the WireGuard fabric"),
            "{e}"
        );
        let e = err("cluster: {name: a}\nnetwork: {enabled: true, fabric: Routed, mtu: 1380}\n");
        assert!(e.starts_with("agent.yaml: network.mtu: only for"), "{e}");
        let e = err("cluster: {name: a}\nnetwork: {enabled: true, fabric: Flat}\n");
        assert!(
            e.starts_with("agent.yaml: network.fabric: unknown variant `Flat`")
                && e.contains("WireGuard")
                && e.contains("Routed"),
            "{e}"
        );
        let e =
            err("cluster: {name: a}\nvirtualKubelet: {consumer: {reflectors: [Secret, Pod]}}\n");
        assert!(
            e.starts_with("agent.yaml: virtualKubelet.consumer.reflectors[1]:"),
            "{e}"
        );
    }

    #[test]
    fn parse_errors_name_the_field() {
        // Unknown fields are rejected (a typo never falls back to a default).
        let e = err("cluster: {name: a}\npeering: {polcy: Manual}\n");
        assert!(
            e.starts_with("agent.yaml: peering: unknown field `polcy`"),
            "{e}"
        );
        // Wrong types name the field too.
        let e = err("cluster: {name: a}\nnetwork: {listenPort: lots}\n");
        assert!(
            e.starts_with("agent.yaml: network.listenPort: invalid type"),
            "{e}"
        );
        let e = err("cluster: {name: a}\npeering: {policy: Sometimes}\n");
        assert!(e.contains("Sometimes"), "{e}");
        let e = err("metricsAddr: not-an-addr\ncluster: {name: a}\n");
        assert!(e.contains("metricsAddr"), "{e}");
        let e = match AgentConfig::load(Path::new("/nonexistent/agent.yaml")) {
            Ok(_) => panic!("a missing file loads"),
            Err(e) => e.to_string(),
        };
        assert!(e.starts_with("/nonexistent/agent.yaml: "), "{e}");
    }
}
