//! IP address management: which range local pods use for each remote network.
//!
//! A remote CIDR is kept as it is when it clashes with nothing this cluster uses (its own pod,
//! service and external CIDRs, the reserved subnets, and the ranges already given to other
//! peers); otherwise a free range of the same size is taken from the pools. Allocations are
//! stable: asking again for the same remote CIDRs returns the same ranges, and
//! [`Ipam::restore`] reloads persisted allocations after a restart (see [`crate::store`]).

use std::collections::BTreeMap;

use liqo_core::{AddressTranslator, Cidr, CidrMapping, ClusterId, FabricError, NetworkParameters};
use serde::{Deserialize, Serialize};

/// The pools remapped ranges come from when nothing else is configured: 10.70.0.0–10.95.255.255,
/// away from the usual pod (10.244/16) and service (10.96/12) defaults.
pub const DEFAULT_POOLS: [&str; 3] = ["10.70.0.0/15", "10.72.0.0/13", "10.80.0.0/12"];

/// Where remapped ranges come from and which subnets must never be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConfig {
    /// Pools searched in order for a free range of the needed size.
    pub pools: Vec<Cidr>,
    /// Subnets that neither a kept remote CIDR nor a remapped range may overlap (node networks,
    /// the gateway underlay, anything routed elsewhere).
    #[serde(default)]
    pub reserved: Vec<Cidr>,
}

impl Default for IpamConfig {
    fn default() -> Self {
        Self {
            pools: DEFAULT_POOLS
                .iter()
                .map(|p| p.parse().expect("default pools are valid CIDRs"))
                .collect(),
            reserved: Vec::new(),
        }
    }
}

impl IpamConfig {
    /// A configuration from text, as read from flags or a config file. Each bad entry is
    /// reported with its role (`pool`/`reserved subnet`) and why it is bad.
    pub fn parse<P: AsRef<str>, R: AsRef<str>>(
        pools: &[P],
        reserved: &[R],
    ) -> Result<Self, FabricError> {
        let parse = |what: &str, s: &str| {
            s.parse::<Cidr>()
                .map_err(|e| FabricError::InvalidConfig(format!("{what} {s:?}: {e}")))
        };
        Ok(Self {
            pools: pools
                .iter()
                .map(|p| parse("pool", p.as_ref()))
                .collect::<Result<_, _>>()?,
            reserved: reserved
                .iter()
                .map(|r| parse("reserved subnet", r.as_ref()))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// The ranges given to one remote cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// The remote cluster.
    pub cluster: ClusterId,
    /// Its pod CIDR and the range local pods use for it.
    pub pod: CidrMapping,
    /// Its external CIDR and the range local pods use for it, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<CidrMapping>,
}

impl Allocation {
    /// Every mapping of this allocation, pod CIDR first.
    pub fn mappings(&self) -> Vec<CidrMapping> {
        std::iter::once(self.pod).chain(self.external).collect()
    }

    /// The ranges local pods use for the remote cluster (what is routed into the tunnel).
    pub fn remapped(&self) -> Vec<Cidr> {
        self.mappings().iter().map(|m| m.remapped).collect()
    }

    /// A translator for the remote cluster's addresses.
    pub fn translator(&self) -> AddressTranslator {
        AddressTranslator::new(self.cluster.clone(), self.mappings())
    }

    fn same_remote(&self, remote: &NetworkParameters) -> bool {
        self.pod.real == remote.pod_cidr && self.external.map(|m| m.real) == remote.external_cidr
    }
}

/// Remapping decisions for every peer of one cluster. Pure logic: persistence is the caller's
/// (see [`crate::store::AllocationStore`]).
#[derive(Debug, Clone)]
pub struct Ipam {
    local: NetworkParameters,
    config: IpamConfig,
    allocations: BTreeMap<ClusterId, Allocation>,
}

impl Ipam {
    /// An IPAM for a cluster with networks `local`. Fails when the configuration cannot work: no
    /// pool, a pool of another address family than the local pod CIDR, local networks that
    /// overlap each other or a reserved subnet.
    pub fn new(local: &NetworkParameters, config: IpamConfig) -> Result<Self, FabricError> {
        if config.pools.is_empty() {
            return Err(FabricError::InvalidConfig(
                "IPAM needs at least one pool to remap overlapping CIDRs from".into(),
            ));
        }
        let mut named = vec![
            ("pod CIDR", local.pod_cidr),
            ("service CIDR", local.service_cidr),
        ];
        named.extend(local.external_cidr.map(|c| ("external CIDR", c)));
        for (i, (a_name, a)) in named.iter().enumerate() {
            for (b_name, b) in &named[i + 1..] {
                if a.overlaps(b) {
                    return Err(FabricError::InvalidConfig(format!(
                        "local {a_name} {a} overlaps local {b_name} {b}"
                    )));
                }
            }
            if let Some(r) = config.reserved.iter().find(|r| r.overlaps(a)) {
                return Err(FabricError::InvalidConfig(format!(
                    "local {a_name} {a} clashes with reserved subnet {r}"
                )));
            }
        }
        Ok(Self {
            local: local.clone(),
            config,
            allocations: BTreeMap::new(),
        })
    }

    /// The local networks this IPAM protects.
    pub fn local(&self) -> &NetworkParameters {
        &self.local
    }

    /// The configuration in force.
    pub fn config(&self) -> &IpamConfig {
        &self.config
    }

    /// Every allocation, by cluster.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// The allocation of `cluster`, if any.
    pub fn get(&self, cluster: &ClusterId) -> Option<&Allocation> {
        self.allocations.get(cluster)
    }

    /// A translator for `cluster`'s addresses.
    pub fn translator(&self, cluster: &ClusterId) -> Result<AddressTranslator, FabricError> {
        self.get(cluster)
            .map(Allocation::translator)
            .ok_or_else(|| FabricError::NotConnected(cluster.clone()))
    }

    /// Takes back persisted allocations (after a restart). Each must still be valid: right
    /// shape, clear of local and reserved subnets and of the others; a bad one is reported and
    /// nothing is restored.
    pub fn restore(
        &mut self,
        allocations: impl IntoIterator<Item = Allocation>,
    ) -> Result<(), FabricError> {
        let mut next = self.allocations.clone();
        for a in allocations {
            for m in a.mappings() {
                // Re-checks family and prefix length of data read from outside.
                CidrMapping::new(m.real, m.remapped)?;
                let others: Vec<Cidr> = next
                    .values()
                    .filter(|o| o.cluster != a.cluster)
                    .flat_map(Allocation::remapped)
                    .collect();
                if let Some((what, c)) = self.clash(m.remapped, &others) {
                    return Err(FabricError::InvalidConfig(format!(
                        "persisted allocation {} for cluster {} overlaps {what} {c}",
                        m.remapped, a.cluster
                    )));
                }
            }
            next.insert(a.cluster.clone(), a);
        }
        self.allocations = next;
        Ok(())
    }

    /// The ranges for `cluster`'s networks `remote`: the same as before when its CIDRs did not
    /// change; otherwise each remote CIDR is kept when free, else remapped from the pools.
    pub fn allocate(
        &mut self,
        cluster: &ClusterId,
        remote: &NetworkParameters,
    ) -> Result<Allocation, FabricError> {
        if let Some(a) = self.allocations.get(cluster)
            && a.same_remote(remote)
        {
            return Ok(a.clone());
        }
        if let Some(ext) = remote.external_cidr
            && ext.overlaps(&remote.pod_cidr)
        {
            return Err(FabricError::InvalidConfig(format!(
                "cluster {cluster} announces external CIDR {ext} overlapping its pod CIDR {}",
                remote.pod_cidr
            )));
        }
        let mut taken: Vec<Cidr> = self
            .allocations
            .values()
            .filter(|a| &a.cluster != cluster)
            .flat_map(Allocation::remapped)
            .collect();
        let pod = self.map_one(cluster, remote.pod_cidr, &taken)?;
        taken.push(pod.remapped);
        let external = remote
            .external_cidr
            .map(|c| self.map_one(cluster, c, &taken))
            .transpose()?;
        let allocation = Allocation {
            cluster: cluster.clone(),
            pod,
            external,
        };
        self.allocations.insert(cluster.clone(), allocation.clone());
        Ok(allocation)
    }

    /// Forgets `cluster`'s allocation, returning it.
    pub fn release(&mut self, cluster: &ClusterId) -> Option<Allocation> {
        self.allocations.remove(cluster)
    }

    /// The first local, reserved or already allocated subnet `c` overlaps.
    fn clash(&self, c: Cidr, taken: &[Cidr]) -> Option<(&'static str, Cidr)> {
        let local = [
            ("local pod CIDR", Some(self.local.pod_cidr)),
            ("local service CIDR", Some(self.local.service_cidr)),
            ("local external CIDR", self.local.external_cidr),
        ];
        local
            .into_iter()
            .filter_map(|(n, c)| c.map(|c| (n, c)))
            .chain(self.config.reserved.iter().map(|r| ("reserved subnet", *r)))
            .chain(
                taken
                    .iter()
                    .map(|t| ("range allocated to another peer", *t)),
            )
            .find(|(_, other)| other.overlaps(&c))
    }

    fn map_one(
        &self,
        cluster: &ClusterId,
        real: Cidr,
        taken: &[Cidr],
    ) -> Result<CidrMapping, FabricError> {
        if self.clash(real, taken).is_none() {
            return Ok(CidrMapping::identity(real));
        }
        let mut used: Vec<Cidr> = taken.to_vec();
        used.push(self.local.pod_cidr);
        used.push(self.local.service_cidr);
        used.extend(self.local.external_cidr);
        used.extend(self.config.reserved.iter().copied());
        let remapped = self
            .config
            .pools
            .iter()
            .find_map(|pool| first_free(*pool, real, &used))
            .ok_or_else(|| FabricError::PoolExhausted {
                cluster: cluster.clone(),
                prefix_len: real.prefix_len(),
                pools: self
                    .config
                    .pools
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        CidrMapping::new(real, remapped)
    }
}

/// Address arithmetic on `u128` so IPv4 and IPv6 share one search.
struct Span {
    bits: u32,
    start: u128,
    /// Inclusive, so a /0 fits.
    last: u128,
}

fn span(c: Cidr) -> Span {
    let (bits, start) = match c.net().network() {
        std::net::IpAddr::V4(a) => (32, u128::from(u32::from(a))),
        std::net::IpAddr::V6(a) => (128, u128::from(a)),
    };
    let host_bits = bits - u32::from(c.prefix_len());
    let size_minus_one = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    Span {
        bits,
        start,
        last: start + size_minus_one,
    }
}

fn to_cidr(bits: u32, addr: u128, prefix_len: u8) -> Option<Cidr> {
    let ip = if bits == 32 {
        std::net::IpAddr::V4(u32::try_from(addr).ok()?.into())
    } else {
        std::net::IpAddr::V6(addr.into())
    };
    let net = ipnet_from(ip, prefix_len)?;
    Some(Cidr::new(net))
}

fn ipnet_from(ip: std::net::IpAddr, prefix_len: u8) -> Option<ipnet::IpNet> {
    ipnet::IpNet::new(ip, prefix_len).ok()
}

/// The first range of `real`'s size inside `pool` that overlaps none of `used`.
fn first_free(pool: Cidr, real: Cidr, used: &[Cidr]) -> Option<Cidr> {
    let p = span(pool);
    let r = span(real);
    if p.bits != r.bits || pool.prefix_len() > real.prefix_len() {
        return None;
    }
    let size_minus_one = r.last - r.start;
    let mut cand = p.start;
    loop {
        let cand_last = cand.checked_add(size_minus_one)?;
        if cand_last > p.last {
            return None;
        }
        // Jump past the furthest-reaching used subnet that overlaps the candidate, then align.
        let blocker = used
            .iter()
            .map(|u| span(*u))
            .filter(|u| u.bits == p.bits && u.start <= cand_last && cand <= u.last)
            .map(|u| u.last)
            .max();
        match blocker {
            None => return to_cidr(p.bits, cand, real.prefix_len()),
            Some(last) => {
                let next = last.checked_add(1)?;
                let align = size_minus_one.checked_add(1)?;
                cand = next.div_ceil(align).checked_mul(align)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn params(pod: &str, svc: &str) -> NetworkParameters {
        NetworkParameters::new(cidr(pod), cidr(svc))
    }

    fn id(s: &str) -> ClusterId {
        s.parse().unwrap()
    }

    #[test]
    fn keeps_free_cidr_and_remaps_overlapping_one() {
        let mut ipam = Ipam::new(
            &params("10.244.0.0/16", "10.96.0.0/12"),
            IpamConfig::default(),
        )
        .unwrap();
        let a = ipam
            .allocate(&id("rome"), &params("10.200.0.0/16", "10.96.0.0/12"))
            .unwrap();
        assert!(a.pod.is_identity(), "{a:?}");
        let b = ipam
            .allocate(&id("milan"), &params("10.244.0.0/16", "10.96.0.0/12"))
            .unwrap();
        assert_eq!(b.pod.remapped, cidr("10.70.0.0/16"));
        // A third peer with the same CIDR as milan gets the next range, not milan's.
        let c = ipam
            .allocate(&id("turin"), &params("10.244.0.0/16", "10.96.0.0/12"))
            .unwrap();
        assert_eq!(c.pod.remapped, cidr("10.71.0.0/16"));
        // A peer whose CIDR equals a range given to another peer is remapped too.
        let d = ipam
            .allocate(&id("paris"), &params("10.70.0.0/16", "10.96.0.0/12"))
            .unwrap();
        assert_eq!(d.pod.remapped, cidr("10.72.0.0/16"));
        // Stable on repeat.
        assert_eq!(
            ipam.allocate(&id("milan"), &params("10.244.0.0/16", "10.1.0.0/16"))
                .unwrap(),
            b
        );
        assert_eq!(
            ipam.translator(&id("milan"))
                .unwrap()
                .to_local_view("10.244.3.4".parse().unwrap())
                .unwrap()
                .to_string(),
            "10.70.3.4"
        );
    }

    #[test]
    fn external_cidr_is_mapped_and_kept_apart_from_pod_range() {
        let mut local = params("10.244.0.0/16", "10.96.0.0/12");
        local.external_cidr = Some(cidr("10.70.0.0/16"));
        let mut ipam = Ipam::new(&local, IpamConfig::default()).unwrap();
        let mut remote = params("10.244.0.0/16", "10.96.0.0/12");
        remote.external_cidr = Some(cidr("10.70.0.0/16"));
        let a = ipam.allocate(&id("rome"), &remote).unwrap();
        assert_eq!(a.pod.remapped, cidr("10.71.0.0/16"));
        assert_eq!(a.external.unwrap().remapped, cidr("10.72.0.0/16"));
        assert_eq!(a.mappings().len(), 2);
    }

    #[test]
    fn reserved_subnets_are_avoided_and_checked() {
        let cfg = IpamConfig::parse(
            &["10.70.0.0/15", "10.90.0.0/16"],
            &["10.70.0.0/16", "172.31.0.0/16"],
        )
        .unwrap();
        let mut ipam = Ipam::new(&params("10.244.0.0/16", "10.96.0.0/12"), cfg.clone()).unwrap();
        assert_eq!(
            ipam.allocate(&id("a"), &params("10.244.0.0/16", "10.96.0.0/12"))
                .unwrap()
                .pod
                .remapped,
            cidr("10.71.0.0/16")
        );
        // A remote CIDR inside a reserved subnet is remapped, not kept.
        let b = ipam
            .allocate(&id("b"), &params("172.31.5.0/24", "10.96.0.0/12"))
            .unwrap();
        assert_eq!(
            b.pod.remapped,
            cidr("10.90.0.0/24"),
            "10.70/16 is reserved, 10.71/16 taken"
        );
        let e = Ipam::new(&params("172.31.0.0/16", "10.96.0.0/12"), cfg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("local pod CIDR 172.31.0.0/16 clashes with reserved subnet 172.31.0.0/16"),
            "{e}"
        );
    }

    #[test]
    fn exhausted_pool_and_bad_input_are_clear_errors() {
        let cfg = IpamConfig::parse(&["10.70.0.0/16"], &[] as &[&str]).unwrap();
        let mut ipam = Ipam::new(&params("10.244.0.0/16", "10.96.0.0/12"), cfg).unwrap();
        ipam.allocate(&id("a"), &params("10.244.0.0/16", "10.96.0.0/12"))
            .unwrap();
        let e = ipam
            .allocate(&id("b"), &params("10.244.0.0/16", "10.96.0.0/12"))
            .unwrap_err();
        assert!(
            matches!(e, FabricError::PoolExhausted { prefix_len: 16, .. }),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("no free /16 left for cluster b in 10.70.0.0/16"),
            "{e}"
        );
        // A failed allocation leaves nothing behind.
        assert!(ipam.get(&id("b")).is_none());
        let e = IpamConfig::parse(&["10.70.0.1/16"], &[] as &[&str])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pool \"10.70.0.1/16\"") && e.contains("did you mean 10.70.0.0/16"),
            "{e}"
        );
        let e = Ipam::new(&params("10.0.0.0/8", "10.96.0.0/12"), IpamConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlaps local service CIDR"), "{e}");
        let mut remote = params("10.244.0.0/16", "10.96.0.0/12");
        remote.external_cidr = Some(cidr("10.244.1.0/24"));
        assert!(
            ipam.allocate(&id("c"), &remote)
                .unwrap_err()
                .to_string()
                .contains("overlapping its pod CIDR")
        );
        assert!(
            Ipam::new(
                &params("10.244.0.0/16", "10.96.0.0/12"),
                IpamConfig {
                    pools: vec![],
                    reserved: vec![]
                }
            )
            .is_err()
        );
    }

    #[test]
    fn restore_keeps_allocations_and_rejects_clashes() {
        let local = params("10.244.0.0/16", "10.96.0.0/12");
        let mut first = Ipam::new(&local, IpamConfig::default()).unwrap();
        let a = first
            .allocate(&id("a"), &params("10.244.0.0/16", "10.96.0.0/12"))
            .unwrap();
        let json =
            serde_json::to_string(&first.allocations().cloned().collect::<Vec<_>>()).unwrap();
        let mut second = Ipam::new(&local, IpamConfig::default()).unwrap();
        second
            .restore(serde_json::from_str::<Vec<Allocation>>(&json).unwrap())
            .unwrap();
        assert_eq!(second.get(&id("a")), Some(&a));
        // A new peer after the restart does not get the restored range.
        let b = second
            .allocate(&id("b"), &params("10.244.0.0/16", "10.96.0.0/12"))
            .unwrap();
        assert_ne!(b.pod.remapped, a.pod.remapped);
        let bad = Allocation {
            cluster: id("c"),
            pod: CidrMapping::identity(cidr("10.244.0.0/24")),
            external: None,
        };
        let e = second.restore([bad]).unwrap_err().to_string();
        assert!(e.contains("overlaps local pod CIDR"), "{e}");
        assert!(second.get(&id("c")).is_none());
    }

    #[test]
    fn search_handles_alignment_small_ranges_and_ipv6() {
        let used = [cidr("10.70.0.0/24"), cidr("10.70.1.128/25")];
        assert_eq!(
            first_free(cidr("10.70.0.0/16"), cidr("10.1.0.0/24"), &used),
            Some(cidr("10.70.2.0/24"))
        );
        assert_eq!(
            first_free(cidr("10.70.0.0/16"), cidr("10.1.0.0/25"), &used),
            Some(cidr("10.70.1.0/25"))
        );
        assert_eq!(
            first_free(cidr("10.70.0.0/24"), cidr("10.1.0.0/16"), &used),
            None
        );
        assert_eq!(
            first_free(cidr("fd00::/48"), cidr("fd10::/64"), &[cidr("fd00::/64")]),
            Some(cidr("fd00:0:0:1::/64"))
        );
        assert_eq!(
            first_free(cidr("fd00::/48"), cidr("10.1.0.0/24"), &[]),
            None
        );
    }
}
