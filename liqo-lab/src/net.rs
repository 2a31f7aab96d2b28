//! Address arithmetic: per-node pod CIDRs and the API server's service IP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::error::{LabError, Result};

/// Splits a cluster's pod CIDR into `count` distinct node CIDRs.
///
/// Nodes get a /24 (IPv4) or /64 (IPv6) when the cluster CIDR is large enough, as
/// kube-controller-manager's node IPAM would by default; otherwise the CIDR is split evenly into the
/// smallest power of two of slices that holds `count`.
pub fn node_pod_cidrs(cluster_cidr: IpNet, count: usize) -> Result<Vec<IpNet>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let cidr = cluster_cidr.trunc();
    let prefix = cidr.prefix_len();
    let max = cidr.max_prefix_len();
    let preferred: u8 = if matches!(cidr, IpNet::V4(_)) { 24 } else { 64 };
    // Bits needed to number `count` slices: ceil(log2(count)).
    let bits = usize::BITS - (count - 1).leading_zeros();
    let bits = u8::try_from(bits).unwrap_or(u8::MAX);
    let needed = prefix.saturating_add(bits);
    let node_prefix = if needed <= preferred {
        preferred
    } else {
        needed
    };
    // Leave at least a few addresses per node.
    if node_prefix + 2 > max {
        return Err(LabError::InvalidSpec(format!(
            "pod CIDR {cluster_cidr} is too small for {count} worker node(s)"
        )));
    }
    let subnets = cidr
        .subnets(node_prefix)
        .map_err(|e| LabError::InvalidSpec(format!("splitting pod CIDR {cluster_cidr}: {e}")))?;
    let out: Vec<IpNet> = subnets.take(count).collect();
    if out.len() < count {
        return Err(LabError::InvalidSpec(format!(
            "pod CIDR {cluster_cidr} is too small for {count} worker node(s)"
        )));
    }
    Ok(out)
}

/// The first address of a service CIDR: the ClusterIP of the `kubernetes` service, which goes into
/// the API server's serving certificate.
pub fn first_service_ip(service_cidr: IpNet) -> IpAddr {
    match service_cidr.trunc() {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()).wrapping_add(1))),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()).wrapping_add(1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    #[test]
    fn splits_a_16_into_24s() {
        let got = node_pod_cidrs(net("10.244.0.0/16"), 3).expect("split");
        assert_eq!(
            got,
            vec![
                net("10.244.0.0/24"),
                net("10.244.1.0/24"),
                net("10.244.2.0/24")
            ]
        );
    }

    #[test]
    fn splits_small_cidrs_evenly() {
        let got = node_pod_cidrs(net("10.0.0.0/23"), 3).expect("split");
        assert_eq!(
            got,
            vec![net("10.0.0.0/25"), net("10.0.0.128/25"), net("10.0.1.0/25")]
        );
        let got = node_pod_cidrs(net("10.0.0.0/24"), 1).expect("split");
        assert_eq!(got, vec![net("10.0.0.0/24")]);
        let got = node_pod_cidrs(net("10.0.0.0/24"), 2).expect("split");
        assert_eq!(got, vec![net("10.0.0.0/25"), net("10.0.0.128/25")]);
    }

    #[test]
    fn slices_are_disjoint_and_inside() {
        let cluster = net("10.244.0.0/16");
        let got = node_pod_cidrs(cluster, 256).expect("split");
        assert_eq!(got.len(), 256);
        for (i, a) in got.iter().enumerate() {
            assert!(cluster.contains(a));
            for b in &got[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a));
            }
        }
        assert!(node_pod_cidrs(cluster, 257).expect("split").len() == 257);
    }

    #[test]
    fn ipv6_uses_64s_and_rejects_too_small() {
        let got = node_pod_cidrs(net("fd00:10:244::/56"), 2).expect("split");
        assert_eq!(
            got,
            vec![net("fd00:10:244::/64"), net("fd00:10:244:1::/64")]
        );
        assert!(node_pod_cidrs(net("10.0.0.0/30"), 2).is_err());
        assert!(
            node_pod_cidrs(net("10.0.0.0/16"), 0)
                .expect("empty")
                .is_empty()
        );
        // Host bits are ignored.
        let got = node_pod_cidrs(net("10.244.3.7/16"), 1).expect("split");
        assert_eq!(got, vec![net("10.244.0.0/24")]);
    }

    #[test]
    fn first_service_ip_is_network_plus_one() {
        assert_eq!(
            first_service_ip(net("10.96.0.0/16")).to_string(),
            "10.96.0.1"
        );
        assert_eq!(
            first_service_ip(net("10.96.5.9/16")).to_string(),
            "10.96.0.1"
        );
        assert_eq!(first_service_ip(net("fd00::/108")).to_string(), "fd00::1");
    }
}
