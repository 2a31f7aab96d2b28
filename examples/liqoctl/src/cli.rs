//! The command line: commands, flags and their parsers.

use std::{path::PathBuf, time::Duration};

use clap::{ArgAction, ArgGroup, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use liqo_core::{
    Cidr, ClusterId,
    crds::{NamespaceMappingStrategy, PodOffloadingStrategy},
};

/// liqoctl: peer clusters, offload namespaces and inspect liqo-rs peerings.
#[derive(Debug, Parser)]
#[command(name = "liqoctl", version, about, long_about = None)]
pub struct Cli {
    /// The kubeconfig of the local cluster (default: $KUBECONFIG, then ~/.kube/config, then the
    /// in-cluster service account).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Output format of commands that print data (`discover`, `info`, `diagnose`, `version`;
    /// `bundle issue` writes the bundle as JSON with `json`, YAML otherwise).
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// How long to wait for the agents to converge, e.g. `90s`, `5m`, `1h`.
    #[arg(long, global = true, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Wait until the agents converged (`--wait=false`: apply the intent and return).
    #[arg(long, global = true, value_name = "BOOL", default_value_t = true, action = ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub wait: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How data is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Peer with a provider: this cluster (the current context) consumes its resources.
    Peer(PeerArgs),
    /// Stop consuming a provider's resources (keeps the peer's own consumption, if any).
    Unpeer {
        /// The provider's cluster id (see `liqoctl discover`).
        cluster_id: ClusterId,
    },
    /// Offload a namespace to the providers.
    Offload {
        /// What to offload.
        #[command(subcommand)]
        target: OffloadTarget,
    },
    /// Stop offloading a namespace: remote twins and the pods in them are deleted.
    Unoffload {
        /// What to stop offloading.
        #[command(subcommand)]
        target: UnoffloadTarget,
    },
    /// List the clusters discovery found (one ForeignCluster each).
    Discover,
    /// Show each peering: authentication, network, virtual node, resources offered and used.
    Info {
        /// Only this peer.
        cluster_id: Option<ClusterId>,
    },
    /// Check a peering step by step and stop at the first failing step, saying what to do.
    Diagnose(DiagnoseArgs),
    /// Peering bundles (the kubeconfig peering method), on the provider: issue one for a
    /// consumer, or revoke it.
    Bundle {
        /// What to do.
        #[command(subcommand)]
        action: BundleAction,
    },
    /// Print liqoctl's version.
    Version,
}

/// `bundle` actions.
#[derive(Debug, Subcommand)]
pub enum BundleAction {
    /// Issue a peering bundle for a consumer (run with the provider's kubeconfig): makes the
    /// consumer's tenant and a client certificate, writes the bundle (a credential).
    Issue(Box<BundleIssueArgs>),
    /// Revoke what `bundle issue` made for a consumer (run with the provider's kubeconfig):
    /// its access, its tenant namespace and what is in it.
    Revoke {
        /// The consumer's cluster id.
        #[arg(long, value_name = "ID")]
        consumer: ClusterId,
    },
}

/// `bundle issue` flags.
#[derive(Debug, Args)]
pub struct BundleIssueArgs {
    /// The consumer's cluster id (its `liqoctl info`/agent configuration shows it).
    #[arg(long, value_name = "ID")]
    pub consumer: ClusterId,
    /// The consumer's human-readable name, recorded on its ForeignCluster here.
    #[arg(long, value_name = "NAME")]
    pub consumer_name: Option<String>,
    /// The consumer's published cluster info (JSON: `kubectl -n liqo-system get configmap
    /// liqo-cluster-info -o jsonpath='{.data.info\.json}'` on the consumer), whose network
    /// (CIDRs and, with a WireGuard fabric, gateway endpoint and key) the provider records.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["consumer_pod_cidr", "consumer_service_cidr"])]
    pub consumer_info: Option<std::path::PathBuf>,
    /// The consumer's pod CIDR, instead of `--consumer-info` (no gateway: a routed fabric).
    #[arg(long, value_name = "CIDR", requires = "consumer_service_cidr")]
    pub consumer_pod_cidr: Option<Cidr>,
    /// The consumer's service CIDR, with `--consumer-pod-cidr`.
    #[arg(long, value_name = "CIDR", requires = "consumer_pod_cidr")]
    pub consumer_service_cidr: Option<Cidr>,
    /// This (the provider) cluster's pod CIDR, handed to the consumer; default the network its
    /// agent publishes (with the gateway endpoint and key).
    #[arg(long, value_name = "CIDR", requires = "service_cidr")]
    pub pod_cidr: Option<Cidr>,
    /// This cluster's service CIDR, with `--pod-cidr`.
    #[arg(long, value_name = "CIDR", requires = "pod_cidr")]
    pub service_cidr: Option<Cidr>,
    /// CPU offered, e.g. `4` or `4500m` (with `--offer-memory` and `--offer-pods`; without
    /// them, the consumer's existing offer is kept).
    #[arg(long, value_name = "QUANTITY", requires_all = ["offer_memory", "offer_pods"])]
    pub offer_cpu: Option<String>,
    /// Memory offered, e.g. `8Gi`.
    #[arg(long, value_name = "QUANTITY", requires_all = ["offer_cpu", "offer_pods"])]
    pub offer_memory: Option<String>,
    /// Pods offered.
    #[arg(long, value_name = "N", requires_all = ["offer_cpu", "offer_memory"])]
    pub offer_pods: Option<u32>,
    /// The API server URL the consumer uses (default: the kubeconfig's server; it must be
    /// reachable from the consumer).
    #[arg(long, value_name = "URL")]
    pub api_server: Option<String>,
    /// The CA (PEM) that verifies that API server (default: the kubeconfig's).
    #[arg(long, value_name = "PATH")]
    pub api_server_ca_file: Option<PathBuf>,
    /// How long the client certificate is valid (at least 10m), e.g. `30d`, `720h`.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    pub lifetime: Duration,
    /// Write the bundle to this file (mode 0600) instead of stdout.
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<PathBuf>,
}

/// `peer` flags.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("provider").required(true).args(["cluster_id", "provider_kubeconfig", "bundle"])))]
pub struct PeerArgs {
    /// A discovered cluster to peer with (its ForeignCluster must have an endpoint and a key
    /// fingerprint). Not with `--provider-kubeconfig`.
    pub cluster_id: Option<ClusterId>,
    /// The provider's kubeconfig: its identity and endpoint are read from its cluster info.
    #[arg(long, value_name = "PATH")]
    pub provider_kubeconfig: Option<PathBuf>,
    /// The context in the provider's kubeconfig (default: its current context).
    #[arg(long, value_name = "NAME", requires = "provider_kubeconfig")]
    pub provider_context: Option<String>,
    /// A peering bundle the provider's administrator issued for this cluster
    /// (`liqoctl bundle issue`): stored as a Secret, the local agent (`peering.method:
    /// Kubeconfig`) peers with it. Not with a cluster id or `--provider-kubeconfig`.
    #[arg(long, value_name = "PATH")]
    pub bundle: Option<PathBuf>,
    /// Whether to wait for the network: `auto` waits when a network fabric reports on the peer.
    #[arg(long, value_enum, default_value_t = NetworkWait::Auto)]
    pub network: NetworkWait,
}

/// Whether `peer` waits for `NetworkReady`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkWait {
    /// Wait when a fabric reports on the peer (a `NetworkReady` condition, the `liqo.io/network`
    /// finalizer or a `Tunnel`, within 10 s).
    Auto,
    /// Always wait.
    Require,
    /// Never wait.
    Skip,
}

/// `diagnose` flags.
#[derive(Debug, Args)]
pub struct DiagnoseArgs {
    /// The peer to check (default: every peer with a role).
    pub cluster_id: Option<ClusterId>,
    /// How old the last tunnel handshake may be.
    #[arg(long, value_name = "DURATION", default_value = "3m", value_parser = parse_duration)]
    pub max_handshake_age: Duration,
    /// How long to watch the tunnel's counters for traffic through the NAT.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub traffic_window: Duration,
}

/// `offload` targets.
#[derive(Debug, Subcommand)]
pub enum OffloadTarget {
    /// Offload a namespace (creates its NamespaceOffloading `offloading`).
    Namespace(OffloadNamespaceArgs),
}

/// `unoffload` targets.
#[derive(Debug, Subcommand)]
pub enum UnoffloadTarget {
    /// Stop offloading a namespace (deletes its NamespaceOffloading).
    Namespace {
        /// The namespace.
        name: String,
    },
}

/// `offload namespace` flags.
#[derive(Debug, Args)]
pub struct OffloadNamespaceArgs {
    /// The namespace.
    pub name: String,
    /// Where its pods may run.
    #[arg(long, value_enum, ignore_case = true, default_value_t = PodStrategy::LocalAndRemote)]
    pub pod_offloading_strategy: PodStrategy,
    /// How the twin namespaces are named.
    #[arg(long, value_enum, ignore_case = true, default_value_t = MappingStrategy::DefaultName)]
    pub namespace_mapping_strategy: MappingStrategy,
    /// The twin namespaces' name (requires `--namespace-mapping-strategy SelectedName`).
    #[arg(long, value_name = "NAME")]
    pub remote_namespace_name: Option<String>,
    /// Only the providers whose virtual nodes have these labels, e.g.
    /// `topology.kubernetes.io/region=eu-west,tier=gold` (all must match).
    #[arg(long, value_name = "KEY=VALUE,...", value_parser = parse_selector)]
    pub selector: Option<Selector>,
}

/// `--pod-offloading-strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodStrategy {
    /// Only on this cluster's own nodes.
    #[value(name = "Local")]
    Local,
    /// Only on providers.
    #[value(name = "Remote")]
    Remote,
    /// Anywhere; the scheduler decides.
    #[value(name = "LocalAndRemote")]
    LocalAndRemote,
}

impl From<PodStrategy> for PodOffloadingStrategy {
    fn from(s: PodStrategy) -> Self {
        match s {
            PodStrategy::Local => Self::Local,
            PodStrategy::Remote => Self::Remote,
            PodStrategy::LocalAndRemote => Self::LocalAndRemote,
        }
    }
}

/// `--namespace-mapping-strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MappingStrategy {
    /// `<namespace>-<local cluster id>`.
    #[value(name = "DefaultName")]
    DefaultName,
    /// The same name as the local namespace.
    #[value(name = "EnforceSameName")]
    EnforceSameName,
    /// The name given with `--remote-namespace-name`.
    #[value(name = "SelectedName")]
    SelectedName,
}

impl From<MappingStrategy> for NamespaceMappingStrategy {
    fn from(s: MappingStrategy) -> Self {
        match s {
            MappingStrategy::DefaultName => Self::DefaultName,
            MappingStrategy::EnforceSameName => Self::EnforceSameName,
            MappingStrategy::SelectedName => Self::SelectedName,
        }
    }
}

/// A label selector of `key=value` pairs, all of which must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(pub Vec<(String, String)>);

/// Parses `key=value,key2=value2`.
pub fn parse_selector(s: &str) -> Result<Selector, String> {
    let mut pairs = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim().trim_start_matches('='));
        if k.is_empty() {
            return Err(format!("{part:?} has an empty key"));
        }
        if k.contains('!') {
            return Err(format!("{part:?}: only key=value (equality) is supported"));
        }
        pairs.push((k.to_owned(), v.to_owned()));
    }
    if pairs.is_empty() {
        return Err("empty selector: give key=value pairs separated by commas".into());
    }
    Ok(Selector(pairs))
}

/// Parses a duration: a number with a unit (`ms`, `s`, `m`, `h`, `d`), or several (`1m30s`); a
/// bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{s:?}: expected a number, e.g. 30s, 5m, 1h"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "" => return Err(format!("{s:?}: missing unit after {n} (ms, s, m, h or d)")),
            u => return Err(format!("{s:?}: unknown unit {u:?} (ms, s, m, h or d)")),
        };
    }
    Ok(total)
}

/// The clap command, named `kubectl liqo` when run as the kubectl plugin.
pub fn command(plugin: bool) -> clap::Command {
    let cmd = Cli::command();
    if plugin {
        cmd.name("kubectl-liqo").bin_name("kubectl liqo")
    } else {
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert!(parse_duration("5").is_ok());
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("m")
                .unwrap_err()
                .contains("expected a number")
        );
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn selectors() {
        let s = parse_selector("a=b, c.io/d=e").unwrap();
        assert_eq!(
            s.0,
            vec![("a".into(), "b".into()), ("c.io/d".into(), "e".into())]
        );
        assert!(parse_selector("a").unwrap_err().contains("not key=value"));
        assert!(parse_selector("=b").unwrap_err().contains("empty key"));
        assert!(parse_selector("a!=b").is_err());
        assert!(parse_selector(",").is_err());
    }

    #[test]
    fn command_is_consistent() {
        command(false).debug_assert();
        command(true).debug_assert();
    }

    #[test]
    fn bundle_flags() {
        let base = [
            "liqoctl",
            "bundle",
            "issue",
            "--consumer",
            "milan",
            "--consumer-pod-cidr",
            "10.1.0.0/16",
            "--consumer-service-cidr",
            "10.2.0.0/16",
            "--pod-cidr",
            "10.3.0.0/16",
            "--service-cidr",
            "10.4.0.0/16",
        ];
        let c = Cli::try_parse_from(base).unwrap();
        let Command::Bundle {
            action: BundleAction::Issue(a),
        } = c.command
        else {
            panic!("not bundle issue")
        };
        assert_eq!(a.lifetime, Duration::from_secs(30 * 86_400));
        assert!(a.offer_cpu.is_none());
        // The offer's three flags go together.
        let mut partial = base.to_vec();
        partial.extend(["--offer-cpu", "2"]);
        assert!(Cli::try_parse_from(partial).is_err());
        // A bad CIDR is a usage error naming the value.
        let mut bad = base.to_vec();
        bad[6] = "10.1.0.1/16";
        let e = Cli::try_parse_from(bad).unwrap_err().to_string();
        assert!(e.contains("host bits"), "{e}");
        // The consumer's network: its info file or its CIDRs, not both; one CIDR needs the other.
        let mut both = base.to_vec();
        both.extend(["--consumer-info", "milan.json"]);
        assert!(Cli::try_parse_from(both).is_err());
        assert!(
            Cli::try_parse_from([
                "liqoctl",
                "bundle",
                "issue",
                "--consumer",
                "milan",
                "--consumer-info",
                "m.json"
            ])
            .is_ok()
        );
        let mut half = base.to_vec();
        half.truncate(11); // --pod-cidr without --service-cidr
        assert!(Cli::try_parse_from(half).is_err());
        // peer: --bundle excludes the other ways.
        assert!(Cli::try_parse_from(["liqoctl", "peer", "--bundle", "b.yaml"]).is_ok());
        assert!(Cli::try_parse_from(["liqoctl", "peer", "x", "--bundle", "b.yaml"]).is_err());
    }

    #[test]
    fn wait_flag_forms() {
        let c = Cli::try_parse_from(["liqoctl", "--wait=false", "discover"]).unwrap();
        assert!(!c.wait);
        let c = Cli::try_parse_from(["liqoctl", "discover", "--wait"]).unwrap();
        assert!(c.wait);
        let c = Cli::try_parse_from(["liqoctl", "discover"]).unwrap();
        assert!(c.wait);
    }
}
